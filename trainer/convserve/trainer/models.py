"""The two CNN architectures and the frozen fixed-kernel first layer.

Models take float32 images [None, height, width, 1] in [0, 1] (28x28 for MNIST, any
size the architecture fits) and output softmax probabilities [None, classes].
Convolution layers are named ``conv1``, ``conv2``, ... (and ``fixed_kernel`` for a
frozen first layer) because the server exposes their activations under these names.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np

ARCHITECTURES = ("keras-bn", "keras", "tutorial")
FIXED_KERNEL_LAYER = "fixed_kernel"
# keras-bn pools after its third convolution only when the map is at least this wide.
MIN_THIRD_POOL_SIZE = 6

KERNEL_PRESETS: dict[str, list[list[float]]] = {
    "laplacian": [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]],
    "sobel-x": [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
    "sobel-y": [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],
    "edge-x": [[1, -1]],
}


class KernelError(ValueError):
    """A --fixed-kernel value is neither a preset nor a usable .npy kernel."""


def load_kernel(spec: str) -> np.ndarray:
    """A preset name or a ``.npy`` file -> float32 kernel [kh, kw, 1, filters].

    A 2-D ``.npy`` array is one filter; a 3-D array [kh, kw, filters] or a 4-D
    array [kh, kw, 1, filters] holds several (input channels must be 1).
    """
    if spec in KERNEL_PRESETS:
        kernel = np.asarray(KERNEL_PRESETS[spec], dtype=np.float32)
    elif spec.endswith(".npy") or os.path.isfile(spec):
        path = Path(spec)
        try:
            kernel = np.load(path, allow_pickle=False)
        except FileNotFoundError as exc:
            raise KernelError(f"--fixed-kernel: {path}: no such file") from exc
        except (OSError, ValueError, EOFError) as exc:
            raise KernelError(f"--fixed-kernel: {path}: not a readable .npy file: {exc}") from exc
        if not np.issubdtype(kernel.dtype, np.number):
            raise KernelError(f"--fixed-kernel: {path}: dtype {kernel.dtype} is not numeric")
        kernel = kernel.astype(np.float32)
    else:
        raise KernelError(
            f"--fixed-kernel: {spec!r} is neither a preset ({', '.join(KERNEL_PRESETS)}) "
            "nor a .npy file"
        )
    if kernel.ndim == 2:
        kernel = kernel[:, :, None, None]
    elif kernel.ndim == 3:
        kernel = kernel[:, :, None, :]
    if kernel.ndim != 4 or kernel.shape[2] != 1 or min(kernel.shape) < 1:
        raise KernelError(
            f"--fixed-kernel: kernel shape {list(kernel.shape)} is not [kh, kw], "
            "[kh, kw, filters] or [kh, kw, 1, filters]"
        )
    if not np.all(np.isfinite(kernel)):
        raise KernelError("--fixed-kernel: kernel values must be finite")
    return kernel


def _valid_padding_fits(size: int) -> bool:
    # The keras architecture's unpadded 3x3 convolutions and 2x2 poolings:
    # 28 -> 26 -> 13 -> 11 -> 5 -> 3.
    size = (size - 2) // 2
    size = (size - 2) // 2
    return size - 2 >= 1


def build_model(
    arch: str = "keras",
    fixed_kernel: np.ndarray | None = None,
    image_shape: tuple[int, int] = (28, 28),
    num_classes: int = 10,
) -> keras.Model:
    """A compiled-free Keras model of the given architecture.

    ``keras`` (93,322 parameters on 28x28 digits): the small convnet of the Keras MNIST
    reference; on images too small for its unpadded convolutions (e.g. 8x8) they are
    ``same``-padded instead. ``keras-bn`` (131,530 parameters on 28x28): the same three
    3x3 convolutions, ``same``-padded, each followed by 2x2 max pooling (the third
    only on maps of at least 6 pixels) and batch normalization, then dropout 0.3 and
    a dense layer of 128; it trains in fewer epochs and overfits less on small data.
    ``tutorial`` (3,274,634 parameters on 28x28): the two-conv + dense-1024 TensorFlow
    tutorial net. ``fixed_kernel`` [kh, kw, 1, F] puts a frozen
    ``same``-padded convolution in front. ``image_shape`` is (height, width).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    height, width = image_shape
    # Below 4 pixels the second 2x2 pooling would leave nothing.
    if min(height, width) < 4:
        raise ValueError(f"images must be at least 4x4 pixels, got {height}x{width}")
    if fixed_kernel is not None and (
        fixed_kernel.shape[0] > height or fixed_kernel.shape[1] > width
    ):
        raise KernelError(
            f"--fixed-kernel: kernel {list(fixed_kernel.shape)} is larger than the "
            f"{height}x{width} images"
        )
    inputs = keras.Input(shape=(height, width, 1), dtype="float32", name="images")
    x = inputs
    if fixed_kernel is not None:
        layer = keras.layers.Conv2D(
            fixed_kernel.shape[3],
            fixed_kernel.shape[:2],
            padding="same",
            use_bias=False,
            trainable=False,
            name=FIXED_KERNEL_LAYER,
        )
        x = layer(x)
        layer.set_weights([fixed_kernel])
    if arch == "keras-bn":
        size = min(height, width)
        for index, filters in enumerate((32, 64, 64), start=1):
            # Padded convolutions keep the borders, and a 28x28 image reaches the
            # third convolution as a 7x7 map instead of the keras net's 5x5: on
            # Fashion-MNIST that took test accuracy from 0.924 to 0.931 in about the
            # same training time (README, "Training recipes").
            x = keras.layers.Conv2D(
                filters, 3, padding="same", activation="relu", name=f"conv{index}"
            )(x)
            # Normalizing after the ReLU and the pooling keeps Conv2D+bias+ReLU one fused
            # kernel and normalizes a quarter of the values: half the training time per
            # image of the conv -> BN -> ReLU order on a CPU, for the same accuracy.
            # The third pooling is left out on maps too small to halve again (8x8
            # digits reach it as 2x2).
            if index < 3 or size >= MIN_THIRD_POOL_SIZE:
                x = keras.layers.MaxPooling2D(2, name=f"pool{index}")(x)
                size //= 2
            # Momentum 0.9 (PyTorch's default) rather than Keras' 0.99: the moving
            # statistics that serving uses settle within tens of steps, so even a
            # short run exports a model that predicts as it trained.
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{index}")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dropout(0.3, name="dropout")(x)
        x = keras.layers.Dense(128, activation="relu", name="dense")(x)
    elif arch == "keras":
        padding = "valid" if _valid_padding_fits(min(height, width)) else "same"
        x = keras.layers.Conv2D(32, 3, padding=padding, activation="relu", name="conv1")(x)
        x = keras.layers.MaxPooling2D(2, name="pool1")(x)
        x = keras.layers.Conv2D(64, 3, padding=padding, activation="relu", name="conv2")(x)
        x = keras.layers.MaxPooling2D(2, name="pool2")(x)
        x = keras.layers.Conv2D(64, 3, padding=padding, activation="relu", name="conv3")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(64, activation="relu", name="dense")(x)
    else:
        x = keras.layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1")(x)
        x = keras.layers.MaxPooling2D(2, name="pool1")(x)
        x = keras.layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2")(x)
        x = keras.layers.MaxPooling2D(2, name="pool2")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(1024, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"mnist_{arch}")


def conv_layer_names(model: keras.Model) -> list[str]:
    """Names of the model's convolution layers, input side first."""
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def feature_model(model: keras.Model) -> keras.Model:
    """A model from the same input to a dict {conv layer name: activations}."""
    names = conv_layer_names(model)
    outputs = {name: model.get_layer(name).output for name in names}
    return keras.Model(model.input, outputs, name=f"{model.name}_feature_maps")
