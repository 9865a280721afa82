"""Augmentation keeps every label's meaning: digits are never mirrored, nothing is turned
upside down, and the policies each data set gets by default respect that."""

from __future__ import annotations

import numpy as np
import pytest

from convserve.trainer.__main__ import ARCH_DEFAULTS, DATASET_DEFAULTS, defaults_for
from convserve.trainer.augment import (
    AUGMENTATIONS,
    Augmentation,
    AugmentationError,
    augment,
    check_label_preserving,
    gaussian_matrix,
    shift,
    turn_and_zoom,
    warp,
)
from convserve.trainer.models import ARCHITECTURES

DIGIT_DATA_SETS = {"mnist": (28, 28), "sample": (28, 28), "digits8": (8, 8)}
SIZE = 28
DRAWS = 2000


def ramp(axis: int) -> np.ndarray:
    """uint8 images [DRAWS, 28, 28] whose brightness grows along ``axis`` (1 rows, 2 columns)."""
    line = np.linspace(0, 255, SIZE)
    image = np.tile(line, (SIZE, 1)) if axis == 2 else np.tile(line[:, None], (1, SIZE))
    return np.repeat(image[None].astype(np.uint8), DRAWS, axis=0)


def mean_slope(images: np.ndarray, axis: int) -> np.ndarray:
    """Each image's mean brightness step along ``axis`` in its central 12x12 pixels: positive
    while the image still reads in its original direction, negative once it is mirrored.
    The centre is measured because shifts and distortions pull in the zero border."""
    centre = images.astype(np.float64)[:, 8:-8, 8:-8]
    return np.diff(centre, axis=axis).mean(axis=(1, 2))


@pytest.mark.parametrize("name", [n for n, p in AUGMENTATIONS.items() if not p.mirror])
def test_digit_policies_never_mirror_or_turn_images(name: str) -> None:
    rng = np.random.default_rng(0)
    for axis in (1, 2):
        slopes = mean_slope(augment(ramp(axis), AUGMENTATIONS[name], rng), axis)
        # An unchanged ramp climbs about 9.4 per pixel; a mirrored one falls as much.
        assert slopes.min() > 2.0, f"{name} reversed a ramp along axis {axis}"


def test_mirror_flips_half_the_images_left_right_and_none_upside_down() -> None:
    rng = np.random.default_rng(0)
    policy = AUGMENTATIONS["mirror"]
    across = mean_slope(augment(ramp(2), policy, rng), 2)
    mirrored = across < 0
    assert 0.4 < mirrored.mean() < 0.6
    # A flipped image is the whole image mirrored, not a blend.
    assert across[mirrored].max() < -9
    assert across[~mirrored].min() > 9
    down = mean_slope(augment(ramp(1), policy, rng), 1)
    assert down.min() > 9


@pytest.mark.parametrize("arch", list(ARCH_DEFAULTS))
@pytest.mark.parametrize("dataset", list(DIGIT_DATA_SETS))
def test_default_augmentation_of_digits_never_mirrors(arch: str, dataset: str) -> None:
    policy = AUGMENTATIONS[str(defaults_for(arch, dataset)["augment"])]
    assert not policy.mirror
    check_label_preserving(
        policy, mirror_symmetric_classes=False, image_shape=DIGIT_DATA_SETS[dataset]
    )


def test_every_architecture_has_defaults() -> None:
    assert tuple(ARCH_DEFAULTS) == ARCHITECTURES


def test_every_data_set_with_defaults_is_known() -> None:
    assert set(DATASET_DEFAULTS) == {"sample", "fashion-mnist", "digits8"}
    for table in DATASET_DEFAULTS.values():
        assert set(table) == set(ARCH_DEFAULTS)
        assert all(values.get("augment", "none") in AUGMENTATIONS for values in table.values())


def test_mirroring_is_refused_for_digits_and_allowed_for_clothes() -> None:
    policy = AUGMENTATIONS["mirror"]
    with pytest.raises(AugmentationError, match=r"mirror mirrors images.*digit"):
        check_label_preserving(policy, mirror_symmetric_classes=False, image_shape=(28, 28))
    check_label_preserving(policy, mirror_symmetric_classes=True, image_shape=(28, 28))


def test_turns_and_zooms_beyond_their_bounds_are_refused() -> None:
    with pytest.raises(AugmentationError, match=r"up to 30 degrees; expected 0 to 20"):
        check_label_preserving(Augmentation("lean", max_rotation_deg=30.0), True, (28, 28))
    with pytest.raises(AugmentationError, match=r"zooms by up to 0.5; expected 0 to 0.25"):
        check_label_preserving(Augmentation("big", max_zoom=0.5), True, (28, 28))
    check_label_preserving(AUGMENTATIONS["affine-elastic"], False, (28, 28))


def spot_positions(max_rotation_deg: float, max_zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """Where a spot 8 pixels right of a 29x29 image's centre lands over 400 draws:
    (angle in degrees, distance from the centre in pixels)."""
    image = np.zeros((400, 29, 29))
    image[:, 13:16, 21:24] = 1.0
    dy, dx = turn_and_zoom(400, (29, 29), np.random.default_rng(0), max_rotation_deg, max_zoom)
    out = warp(image, dy, dx)
    grid_y, grid_x = np.mgrid[0:29, 0:29] - 14.0
    mass = out.sum(axis=(1, 2))
    y = (out * grid_y).sum(axis=(1, 2)) / mass
    x = (out * grid_x).sum(axis=(1, 2)) / mass
    return np.degrees(np.arctan2(y, x)), np.hypot(y, x)


def test_turns_stay_within_their_angle_both_ways_and_zooms_within_their_scale() -> None:
    angle, distance = spot_positions(max_rotation_deg=10.0, max_zoom=0.0)
    assert np.abs(angle).max() < 10.5
    assert angle.min() < -8
    assert angle.max() > 8
    np.testing.assert_allclose(distance, 8.0, atol=0.3)
    angle, distance = spot_positions(max_rotation_deg=0.0, max_zoom=0.1)
    np.testing.assert_allclose(angle, 0.0, atol=0.1)
    assert 8 * 0.9 - 0.3 < distance.min() < 7.5
    assert 8.5 < distance.max() < 8 * 1.1 + 0.3


def test_shifts_too_large_for_small_images_are_refused() -> None:
    with pytest.raises(AugmentationError, match="up to 2 pixels, too far for 8x8 images"):
        check_label_preserving(AUGMENTATIONS["shift"], False, (8, 8))
    check_label_preserving(AUGMENTATIONS["none"], False, (8, 8))


def test_same_seed_same_images_and_dtype_kept() -> None:
    images = np.random.default_rng(3).integers(0, 256, (50, SIZE, SIZE), dtype=np.uint8)
    for name, policy in AUGMENTATIONS.items():
        first = augment(images, policy, np.random.default_rng(7))
        again = augment(images, policy, np.random.default_rng(7))
        assert first.dtype == np.uint8, name
        assert first.shape == images.shape, name
        np.testing.assert_array_equal(first, again)
        if name != "none":
            assert not np.array_equal(first, images), f"{name} changed nothing"
    floats = images.astype(np.float32) / 255
    assert augment(floats, AUGMENTATIONS["elastic"], np.random.default_rng(0)).dtype == np.float32


def test_chunks_do_not_change_what_an_image_gets_per_draw() -> None:
    # More images than one chunk: every image is still distorted, none left as it was.
    images = np.full((4100, 4, 4), 200, dtype=np.uint8)
    images[:, 1:3, 1:3] = 0
    out = augment(
        images, Augmentation("wide", elastic_alpha=8.0, elastic_sigma=1.0), np.random.default_rng(0)
    )
    assert out.shape == images.shape
    assert np.mean([np.array_equal(a, b) for a, b in zip(out, images, strict=True)]) < 0.05


def test_gaussian_matrix_smooths_and_keeps_the_mean() -> None:
    matrix = gaussian_matrix(SIZE, 4.0)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    flat = np.full(SIZE, 3.0)
    np.testing.assert_allclose(matrix @ flat, flat)
    spike = np.zeros(SIZE)
    spike[SIZE // 2] = 1.0
    smoothed = matrix @ spike
    assert smoothed.argmax() == SIZE // 2
    assert smoothed.max() < 0.2


def test_warp_by_whole_pixels_is_a_shift_and_by_halves_an_average() -> None:
    image = np.arange(16, dtype=np.float64).reshape(1, 4, 4)
    zero = np.zeros_like(image)
    np.testing.assert_array_equal(warp(image, zero, zero), image)
    moved = warp(image, zero, zero + 1)
    np.testing.assert_array_equal(moved[0, :, :3], image[0, :, 1:])
    np.testing.assert_array_equal(moved[0, :, 3], 0)
    half = warp(image, zero, zero + 0.5)
    np.testing.assert_allclose(half[0, :, 0], (image[0, :, 0] + image[0, :, 1]) / 2)


def test_shift_moves_every_image_within_its_bound() -> None:
    image = np.zeros((1, 9, 9), dtype=np.uint8)
    image[0, 4, 4] = 255
    moved = shift(np.repeat(image, 500, axis=0), np.random.default_rng(0), 2)
    rows, cols = np.nonzero(moved.reshape(500, 9, 9).max(axis=0))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 6, 2, 6)
    assert (moved.reshape(500, -1).sum(axis=1) == 255).all()
