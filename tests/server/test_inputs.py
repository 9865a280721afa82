"""The one place client images are checked: against the model's own input shape."""

from __future__ import annotations

import numpy as np
import pytest

from convserve.server import errors
from convserve.server.inputs import ImageSpec, check_image, check_images

MNIST = ImageSpec((28, 28, 1))
DIGITS8 = ImageSpec((8, 8, 1))
RGB = ImageSpec((5, 4, 3))


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (MNIST, (3, 28, 28)),
        (MNIST, (3, 28, 28, 1)),
        (MNIST, (3, 784)),
        (DIGITS8, (3, 8, 8)),
        (DIGITS8, (3, 8, 8, 1)),
        (DIGITS8, (3, 64)),
        (RGB, (3, 5, 4, 3)),
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_every_allowed_layout_becomes_nhwc(
    spec: ImageSpec, shape: tuple[int, ...], dtype: type
) -> None:
    rng = np.random.default_rng(0)
    flat = rng.integers(0, 256, size=(3, spec.pixels)).astype(np.uint8)
    images = flat if dtype == np.uint8 else (flat / 255).astype(np.float32)
    checked = check_images(images.reshape(shape), "images", spec, max_images=8)
    assert (checked.spec, checked.count) == (spec, 3)
    assert checked.array.shape == (3, *spec.shape)
    assert checked.array.dtype == dtype
    np.testing.assert_array_equal(checked.array.reshape(3, spec.pixels), images)


def test_the_accepted_shapes_are_described_from_the_spec() -> None:
    assert MNIST.describe() == "[N,28,28,1], [N,28,28] or [N,784]"
    assert DIGITS8.describe() == "[N,8,8,1], [N,8,8] or [N,64]"
    # Several channels: only the full layout is unambiguous.
    assert RGB.describe() == "[N,5,4,3]"


@pytest.mark.parametrize(
    ("spec", "images", "message"),
    [
        (MNIST, np.zeros((1, 28, 28), np.float64), r"dtype uint8 \(0\.\.255\) or float32"),
        (MNIST, np.zeros((1, 28, 28), np.int32), "got int32"),
        (MNIST, np.zeros((28, 28), np.uint8), r"shape \[N,28,28,1\], \[N,28,28\] or \[N,784\]"),
        (MNIST, np.zeros((1, 28, 27), np.uint8), r"got \[1, 28, 27\]"),
        (MNIST, np.zeros((1, 28, 28, 3), np.uint8), r"got \[1, 28, 28, 3\]"),
        (MNIST, np.zeros((1, 783), np.uint8), r"got \[1, 783\]"),
        (MNIST, np.zeros((2, 8, 8), np.uint8), r"expected, got \[2, 8, 8\]"),
        (DIGITS8, np.zeros((2, 28, 28), np.uint8), r"\[N,8,8,1\], \[N,8,8\] or \[N,64\] expected"),
        (RGB, np.zeros((1, 5, 4), np.uint8), r"shape \[N,5,4,3\] expected, got \[1, 5, 4\]"),
        (MNIST, np.zeros((0, 28, 28), np.uint8), "at least one image expected, got N=0"),
        (MNIST, np.zeros((9, 784), np.uint8), "at most 8 images per request expected"),
        (MNIST, np.full((1, 784), np.nan, np.float32), "NaN or Inf"),
        (MNIST, np.full((1, 784), np.inf, np.float32), "NaN or Inf"),
        (MNIST, np.full((1, 784), 1.5, np.float32), r"got values in \[1.5, 1.5\]"),
        (MNIST, np.full((1, 784), -0.1, np.float32), r"in \[0, 1\] expected"),
        (MNIST, [[0.0] * 784], "a tensor"),
    ],
)
def test_refusals_name_the_field_and_the_expectation(
    spec: ImageSpec, images: np.ndarray, message: str
) -> None:
    with pytest.raises(errors.InvalidArgument, match=message) as caught:
        check_images(images, "inputs[images]", spec, max_images=8)
    assert caught.value.field == "inputs[images]"
    assert str(caught.value).startswith("inputs[images]: ")


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (MNIST, (28, 28)),
        (MNIST, (28, 28, 1)),
        (MNIST, (1, 28, 28)),
        (MNIST, (1, 28, 28, 1)),
        (MNIST, (784,)),
        (MNIST, (1, 784)),
        (DIGITS8, (8, 8)),
        (DIGITS8, (1, 64)),
        (RGB, (5, 4, 3)),
        (RGB, (1, 5, 4, 3)),
    ],
)
def test_one_image_with_or_without_its_leading_one(spec: ImageSpec, shape: tuple[int, ...]) -> None:
    image = np.arange(spec.pixels, dtype=np.uint8).reshape(shape)
    checked = check_image(image, "image", spec)
    assert checked.shape == (1, *spec.shape)
    np.testing.assert_array_equal(checked.reshape(-1), np.arange(spec.pixels, dtype=np.uint8))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((2, 28, 28), np.uint8), "one image expected, got 2"),
        (np.zeros((2, 784), np.uint8), "one image expected, got 2"),
        (np.zeros((8, 8), np.uint8), r"shape \[N,28,28,1\], \[N,28,28\] or \[N,784\] expected"),
    ],
)
def test_one_image_refusals(image: np.ndarray, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message) as caught:
        check_image(image, "image", MNIST)
    assert caught.value.field == "image"
