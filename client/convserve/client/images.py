"""Turning what callers have (arrays, image files, encoded bytes) into image batches.

A model declares its input shape ``[-1,H,W,C]`` (`ModelMetadata.inputs`; the
MNIST models declare ``[-1,28,28,1]``, the 8x8 digits ``[-1,8,8,1]``), and
every array is read against that shape; what goes on the wire is decided here:

* Arrays are reshaped (never resized) to ``[N,H,W,C]``: a batch
  ``[N,H,W,C]``, ``[N,H*W*C]`` and, when C is 1, ``[N,H,W]``, or one image
  ``[H,W,C]``, ``[H*W*C]`` and, when C is 1, ``[H,W]``.
* uint8 arrays are sent as uint8 (one byte per pixel, 0 = background).
* Arrays of another integer type are sent as uint8 when every value is in
  [0, 255] (e.g. ``np.array([[0, 255, ...]])``, which numpy makes int64).
* Float arrays are sent as float32 and must be in [0, 1]; they are never
  quantized to uint8, so the server sees exactly the values given.
* Image files and encoded PNG/JPEG bytes are decoded with pillow (the
  ``images`` extra) and prepared the MNIST way at the model's size by
  `prepare_image` (the server's console shares that code: `convserve.v1.images`);
  they become uint8. Images of more than ``MAX_IMAGE_PIXELS`` (50 megapixels)
  are refused from their header, before any pixel is decoded.
* A list mixing uint8 and float inputs is sent as float32 (uint8 / 255).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

from convserve.client.errors import InputError
from convserve.v1 import images as shared
from convserve.v1.images import ImageError, ImageShape

ImageSource: TypeAlias = "np.ndarray | str | os.PathLike[str] | bytes"
ImagesInput: TypeAlias = "npt.ArrayLike | ImageSource | Sequence[ImageSource]"

P = ParamSpec("P")
R = TypeVar("R")


def _input_errors(function: Callable[P, R]) -> Callable[P, R]:
    """`function` of `convserve.v1.images`, raising the client's InputError for its ImageError."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except ImageError as exc:
            raise InputError(str(exc)) from exc

    return wrapper


# The preparation the server's console shares (see `convserve.v1.images`).
check_image_shape = _input_errors(shared.check_image_shape)
load_grayscale = _input_errors(shared.load_grayscale)
prepare_image = _input_errors(shared.prepare_image)
mnist_preprocess = _input_errors(shared.mnist_preprocess)


def accepted_shapes(shape: ImageShape) -> str:
    """The array shapes `image_batch` reads for a model whose images are `shape`."""
    h, w, c = shape
    batch = [f"[N,{h},{w},{c}]", f"[N,{h * w * c}]"]
    one = [f"[{h},{w},{c}]", f"[{h * w * c}]"]
    if c == 1:
        batch.insert(1, f"[N,{h},{w}]")
        one.insert(1, f"[{h},{w}]")
    return ", ".join([*batch, *one[:-1]]) + f" or {one[-1]}"


def image_batch(images: ImagesInput, shape: ImageShape) -> np.ndarray:
    """Everything `predict` accepts -> one [N,H,W,C] uint8 or float32 array (N >= 1).

    `shape` is the model's (H, W, C).
    """
    shape = check_image_shape(shape)
    if isinstance(images, list | tuple) and not images:
        raise InputError("images: no images given")
    if isinstance(images, list | tuple) and any(_is_single_source(i) for i in images):
        parts = [_one_source(item, f"images[{i}]", shape) for i, item in enumerate(images)]
    else:
        parts = [_one_source(images, "images", shape)]
    if all(p.dtype == np.uint8 for p in parts):
        batch = np.concatenate(parts)
    else:
        batch = np.concatenate(
            [p.astype(np.float32) / 255.0 if p.dtype == np.uint8 else p for p in parts]
        ).astype(np.float32)
    if batch.shape[0] == 0:
        raise InputError("images: no images given")
    return batch


def single_image(image: ImageSource, shape: ImageShape) -> np.ndarray:
    """One image (any shape `image_batch` takes for one image, or a file) -> [1,H,W,C]."""
    batch = image_batch(image, shape)
    if batch.shape[0] != 1:
        raise InputError(f"image: expected one image, got {batch.shape[0]}")
    return batch


def _is_single_source(item: object) -> bool:
    return isinstance(item, np.ndarray | str | bytes | os.PathLike)


def _one_source(item: object, field: str, shape: ImageShape) -> np.ndarray:
    if isinstance(item, str | bytes | os.PathLike):
        return prepare_image(load_grayscale(item), shape)[np.newaxis]
    try:
        array = np.asarray(item)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{field}: not an array of pixels ({exc})") from exc
    return _checked_array(array, field, shape)


def _as_batch(array: np.ndarray, shape: ImageShape) -> np.ndarray | None:
    """`array` reshaped to [N,H,W,C] if it is one of `accepted_shapes`, else None."""
    h, w, c = shape
    size = h * w * c
    dims = array.shape
    singles = [(h, w, c), (size,)] + ([(h, w)] if c == 1 else [])
    if dims in singles:
        return array.reshape(1, h, w, c)
    batches = [(h, w, c), (size,)] + ([(h, w)] if c == 1 else [])
    if array.ndim >= 2 and dims[1:] in batches:
        return array.reshape(dims[0], h, w, c)
    return None


def _checked_array(array: np.ndarray, field: str, shape: ImageShape) -> np.ndarray:
    batch = _as_batch(array, shape)
    if batch is None:
        raise InputError(
            f"{field}: shape must be {accepted_shapes(shape)} (the model's input), "
            f"got {list(array.shape)}"
        )
    array = batch
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise InputError(
                f"{field}: integer pixels must be in [0, 255], "
                f"got values from {array.min()} to {array.max()}"
            )
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise InputError(f"{field}: float pixels must be finite")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise InputError(
                f"{field}: float pixels must be in [0, 1], got values from "
                f"{array.min():g} to {array.max():g} (divide by 255, or pass uint8)"
            )
        return array.astype(np.float32)
    raise InputError(f"{field}: pixels must be numbers, got dtype {array.dtype}")


def _area_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in]: how much of each input pixel each output pixel averages."""
    scale = size_in / size_out
    weights = np.zeros((size_out, size_in))
    for j in range(size_out):
        low, high = j * scale, (j + 1) * scale
        for i in range(math.floor(low), min(math.ceil(high), size_in)):
            weights[j, i] = min(high, i + 1) - max(low, i)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_batch(images: np.ndarray, shape: ImageShape) -> np.ndarray:
    """uint8 [N,h,w] or [N,h,w,c] -> uint8 [N,H,W,C] by area averaging (numpy only).

    Gray images are copied into every channel; colour images to one channel
    are averaged. For load tests, which need inputs of the model's shape, not
    a faithful rendering.
    """
    h, w, c = check_image_shape(shape)
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[..., np.newaxis]
    if array.ndim != 4 or array.shape[0] == 0:
        raise InputError(f"images: expected [N,H,W] or [N,H,W,C], got {list(array.shape)}")
    values = array.astype(np.float64)
    if array.shape[1:3] != (h, w):
        rows = _area_weights(array.shape[1], h)
        cols = _area_weights(array.shape[2], w)
        values = np.einsum("yi,nijc,xj->nyxc", rows, values, cols)
    if values.shape[3] != c:
        gray = values.mean(axis=3, keepdims=True)
        values = np.repeat(gray, c, axis=3)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
