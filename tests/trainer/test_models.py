"""Architectures (layer shapes, parameter counts) and the fixed-kernel first layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from convserve.trainer.models import (
    FIXED_KERNEL_LAYER,
    KERNEL_PRESETS,
    KernelError,
    build_model,
    conv_layer_names,
    feature_model,
    load_kernel,
)
from convserve.trainer.train import layer_table

KERAS_LAYERS = [
    ("conv1", "Conv2D", [26, 26, 32], 320),
    ("pool1", "MaxPooling2D", [13, 13, 32], 0),
    ("conv2", "Conv2D", [11, 11, 64], 18_496),
    ("pool2", "MaxPooling2D", [5, 5, 64], 0),
    ("conv3", "Conv2D", [3, 3, 64], 36_928),
    ("flatten", "Flatten", [576], 0),
    ("dense", "Dense", [64], 36_928),
    ("probabilities", "Dense", [10], 650),
]
KERAS_BN_LAYERS = [
    ("conv1", "Conv2D", [28, 28, 32], 320),
    ("pool1", "MaxPooling2D", [14, 14, 32], 0),
    ("bn1", "BatchNormalization", [14, 14, 32], 128),
    ("conv2", "Conv2D", [14, 14, 64], 18_496),
    ("pool2", "MaxPooling2D", [7, 7, 64], 0),
    ("bn2", "BatchNormalization", [7, 7, 64], 256),
    ("conv3", "Conv2D", [7, 7, 64], 36_928),
    ("pool3", "MaxPooling2D", [3, 3, 64], 0),
    ("bn3", "BatchNormalization", [3, 3, 64], 256),
    ("flatten", "Flatten", [576], 0),
    ("dropout", "Dropout", [576], 0),
    ("dense", "Dense", [128], 73_856),
    ("probabilities", "Dense", [10], 1_290),
]
TUTORIAL_LAYERS = [
    ("conv1", "Conv2D", [28, 28, 32], 832),
    ("pool1", "MaxPooling2D", [14, 14, 32], 0),
    ("conv2", "Conv2D", [14, 14, 64], 51_264),
    ("pool2", "MaxPooling2D", [7, 7, 64], 0),
    ("flatten", "Flatten", [3136], 0),
    ("dense", "Dense", [1024], 3_212_288),
    ("probabilities", "Dense", [10], 10_250),
]


def rows(arch: str, kernel: np.ndarray | None = None) -> list[tuple[str, str, list[int], int]]:
    table = layer_table(build_model(arch, kernel))
    return [(r["name"], r["type"], r["output_shape"], r["parameters"]) for r in table]


def test_keras_architecture() -> None:
    model = build_model("keras")
    assert model.count_params() == 93_322
    assert rows("keras") == KERAS_LAYERS
    assert conv_layer_names(model) == ["conv1", "conv2", "conv3"]
    probabilities = model(np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32))
    assert tuple(probabilities.shape) == (3, 10)
    np.testing.assert_allclose(np.sum(probabilities, axis=1), 1.0, rtol=1e-5)


def test_keras_bn_architecture() -> None:
    model = build_model("keras-bn")
    # Batch normalization's moving mean and variance (320 values) are not trained.
    assert model.count_params() == 131_530
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 131_210
    assert rows("keras-bn") == KERAS_BN_LAYERS
    assert conv_layer_names(model) == ["conv1", "conv2", "conv3"]
    images = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    probabilities = model(images, training=False)
    np.testing.assert_allclose(np.sum(probabilities, axis=1), 1.0, rtol=1e-5)
    # Dropout and batch statistics act only in training.
    np.testing.assert_array_equal(model(images, training=False), probabilities)


@pytest.mark.parametrize(
    ("size", "last_map"),
    [(28, [3, 3, 64]), (24, [3, 3, 64]), (16, [4, 4, 64]), (8, [2, 2, 64]), (4, [1, 1, 64])],
)
def test_keras_bn_pools_a_third_time_only_where_the_map_is_wide_enough(
    size: int, last_map: list[int]
) -> None:
    table = layer_table(build_model("keras-bn", image_shape=(size, size)))
    names = [row["name"] for row in table]
    assert ("pool3" in names) == (size >= 24)
    assert next(row for row in table if row["name"] == "bn3")["output_shape"] == last_map
    assert next(row for row in table if row["name"] == "conv1")["output_shape"] == [size, size, 32]


def test_tutorial_architecture() -> None:
    model = build_model("tutorial")
    assert model.count_params() == 3_274_634
    assert rows("tutorial") == TUTORIAL_LAYERS
    assert conv_layer_names(model) == ["conv1", "conv2"]


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="--arch must be one of keras-bn, keras, tutorial"):
        build_model("resnet")


@pytest.mark.parametrize("preset", sorted(KERNEL_PRESETS))
def test_fixed_kernel_presets_are_frozen(preset: str) -> None:
    kernel = load_kernel(preset)
    expected = np.asarray(KERNEL_PRESETS[preset], dtype=np.float32)
    model = build_model("keras", kernel)
    layer = model.get_layer(FIXED_KERNEL_LAYER)
    assert model.layers[1] is layer  # first after the input
    (weights,) = layer.get_weights()
    np.testing.assert_array_equal(weights[:, :, 0, 0], expected)
    assert not layer.trainable
    assert layer.trainable_weights == []
    # The rest of the network is unchanged and the only extra parameters are frozen.
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == 93_322
    assert model.count_params() == 93_322 + expected.size
    assert rows("keras", kernel)[0] == (FIXED_KERNEL_LAYER, "Conv2D", [28, 28, 1], expected.size)
    assert conv_layer_names(model)[0] == FIXED_KERNEL_LAYER


def test_fixed_kernel_layer_computes_cross_correlation() -> None:
    model = build_model("keras", load_kernel("laplacian"))
    image = np.random.default_rng(1).random((28, 28), dtype=np.float32)
    maps = feature_model(model)(image[None, :, :, None])
    got = np.asarray(maps[FIXED_KERNEL_LAYER])[0, :, :, 0]
    padded = np.pad(image, 1)
    kernel = np.asarray(KERNEL_PRESETS["laplacian"], dtype=np.float32)
    expected = np.zeros_like(image)
    for dy in range(3):
        for dx in range(3):
            expected += kernel[dy, dx] * padded[dy : dy + 28, dx : dx + 28]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_kernel_from_npy_files(tmp_path: Path) -> None:
    two_d = tmp_path / "k2.npy"
    np.save(two_d, np.arange(6, dtype=np.float64).reshape(2, 3))
    kernel = load_kernel(str(two_d))
    assert kernel.shape == (2, 3, 1, 1)
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel[:, :, 0, 0], np.arange(6).reshape(2, 3))

    three_d = tmp_path / "k3.npy"
    np.save(three_d, np.ones((3, 3, 4), dtype=np.float32))
    kernel = load_kernel(str(three_d))
    assert kernel.shape == (3, 3, 1, 4)
    model = build_model("keras", kernel)
    assert rows("keras", kernel)[0][2] == [28, 28, 4]
    assert model.get_layer("conv1").get_weights()[0].shape == (3, 3, 4, 32)


def test_kernel_errors(tmp_path: Path) -> None:
    with pytest.raises(KernelError, match="neither a preset"):
        load_kernel("gaussian")
    with pytest.raises(KernelError, match=r"missing\.npy: no such file"):
        load_kernel(str(tmp_path / "missing.npy"))
    bad_channels = tmp_path / "rgb.npy"
    np.save(bad_channels, np.ones((3, 3, 3, 2)))
    with pytest.raises(KernelError, match=r"kernel shape \[3, 3, 3, 2\]"):
        load_kernel(str(bad_channels))
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not numpy")
    with pytest.raises(KernelError, match=r"garbage\.npy: not a readable \.npy file"):
        load_kernel(str(garbage))
    non_finite = tmp_path / "nan.npy"
    np.save(non_finite, np.array([[1.0, np.nan]]))
    with pytest.raises(KernelError, match="finite"):
        load_kernel(str(non_finite))
