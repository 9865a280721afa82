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
  `prepare_image`; they become uint8. Images of more than `MAX_IMAGE_PIXELS`
  (50 megapixels) are refused from their header, before any pixel is decoded.
* A list mixing uint8 and float inputs is sent as float32 (uint8 / 255).
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from convserve.client.errors import InputError

ImageSource: TypeAlias = "np.ndarray | str | os.PathLike[str] | bytes"
ImagesInput: TypeAlias = "npt.ArrayLike | ImageSource | Sequence[ImageSource]"
# (height, width, channels) of one image, as a model declares it.
ImageShape: TypeAlias = tuple[int, int, int]

# MNIST fits each digit into a 20x20 box inside the 28x28 field; other sizes
# keep that proportion.
MNIST_SIDE = 28
DIGIT_BOX = 20
# After contrast stretching, pixels darker than this share of full ink are
# paper texture or sensor noise, not stroke; they must not widen the crop.
NOISE_FLOOR = 0.15
# Largest image file read, in pixels: room for a full-resolution 48 MP phone
# photo. Decoding one costs several float64 copies (8 bytes a pixel each), so
# far larger images would exhaust memory long before their digit was found.
MAX_IMAGE_PIXELS = 50_000_000


def require_pillow() -> Any:
    """Import pillow's Image module, or explain how to get it."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading and writing image files needs pillow: pip install 'convserve[images]'"
        ) from exc
    return Image


def check_image_shape(shape: Sequence[int], field: str = "input shape") -> ImageShape:
    """(H, W, C) with positive sizes, or InputError naming `field`."""
    dims = tuple(int(d) for d in shape)
    if len(dims) != 3 or any(d < 1 for d in dims):
        raise InputError(f"{field}: expected (height, width, channels) > 0, got {list(dims)}")
    return (dims[0], dims[1], dims[2])


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


def load_grayscale(source: str | bytes | os.PathLike[str]) -> np.ndarray:
    """Decode a PNG/JPEG file (path) or its bytes into float64 gray levels in [0, 255].

    Transparent pixels count as white paper; phone photos are turned upright
    by their EXIF orientation. Images of more than `MAX_IMAGE_PIXELS` are
    refused from their header, before any pixel is decoded.
    """
    Image = require_pillow()
    from PIL import ImageOps, UnidentifiedImageError

    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
    except FileNotFoundError as exc:
        raise InputError(f"{name}: no such file") from exc
    except Image.DecompressionBombError as exc:
        # Pillow refuses images far beyond its own limit before telling their size.
        size = _header_size(source)
        if size is not None and size[0] * size[1] <= MAX_IMAGE_PIXELS:
            raise InputError(f"{name}: cannot read image ({exc})") from exc
        raise _too_large(name, size) from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{name}: not an image file pillow can read (PNG or JPEG)") from exc
    except _DECODE_ERRORS as exc:
        raise InputError(f"{name}: cannot read image ({_reason(exc)})") from exc
    with opened as img:
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise _too_large(name, (width, height))
        try:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(paper, rgba)
            gray = np.asarray(img.convert("L"), dtype=np.float64)
        except _DECODE_ERRORS as exc:
            raise InputError(f"{name}: cannot read image ({_reason(exc)})") from exc
    return gray


# What pillow raises on damaged files besides OSError: broken chunks and
# headers surface as ValueError, SyntaxError, IndexError, struct.error or
# EOFError. MemoryError: an image within the limit can still outgrow a small
# machine's memory.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    struct.error,
    MemoryError,
)


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _too_large(name: str, size: tuple[int, int] | None) -> InputError:
    limit = f"the limit of {MAX_IMAGE_PIXELS:,} pixels"
    if size is None:
        return InputError(f"{name}: image too large to decode, more than {limit}")
    width, height = size
    return InputError(
        f"{name}: image is {width}x{height} ({width * height:,} pixels), more than {limit}; "
        "scale it down first"
    )


def _header_size(source: str | bytes | os.PathLike[str]) -> tuple[int, int] | None:
    """(width, height) that a PNG or JPEG header declares, or None.

    The format classes read the header without pillow's own pixel limit, which
    `Image.open` enforces by refusing to return the image at all.
    """
    from PIL import JpegImagePlugin, PngImagePlugin

    for image_class in (PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile):
        try:
            with image_class(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                return (int(img.size[0]), int(img.size[1]))
        except _DECODE_ERRORS:
            continue
    return None


def prepare_image(gray: np.ndarray, shape: ImageShape) -> np.ndarray:
    """A grayscale image of any size -> uint8 [H,W,C] for a model whose images are `shape`.

    Prepared the MNIST way (see `mnist_preprocess`) at the model's height and
    width, and copied into each of its channels.
    """
    h, w, c = check_image_shape(shape)
    return np.repeat(mnist_preprocess(gray, (h, w))[..., np.newaxis], c, axis=2)


def mnist_preprocess(
    gray: np.ndarray, size: tuple[int, int] = (MNIST_SIDE, MNIST_SIDE)
) -> np.ndarray:
    """Prepare a grayscale digit of any size the way MNIST's digits were made.

    Makes ink white on black (inverting when the border is light), stretches
    the contrast, crops to the ink's bounding box, scales it to fit a box of
    20/28 of the field keeping the aspect ratio (20x20 in MNIST's 28x28), and
    places it in a `size` (height, width) field so that its centre of mass is
    at the centre. Returns uint8 [height, width]. Needs pillow for the
    anti-aliased resize.
    """
    height_out, width_out = int(size[0]), int(size[1])
    if height_out < 1 or width_out < 1:
        raise InputError(f"size: expected a positive (height, width), got {list(size)}")
    a = np.asarray(gray, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"image: expected a 2-D grayscale image, got shape {list(a.shape)}")
    blank = np.zeros((height_out, width_out), dtype=np.uint8)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    if np.median(border) > 127.5:
        a = 255.0 - a
        border = 255.0 - border
    a = np.clip(a - np.median(border), 0.0, None)
    peak = float(a.max())
    if peak <= 0.0:
        return blank
    a = a * (255.0 / peak)
    a[a < NOISE_FLOOR * 255.0] = 0.0
    rows = np.flatnonzero(a.any(axis=1))
    cols = np.flatnonzero(a.any(axis=0))
    a = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    height, width = a.shape
    box_h = max(1, round(height_out * DIGIT_BOX / MNIST_SIDE))
    box_w = max(1, round(width_out * DIGIT_BOX / MNIST_SIDE))
    scale = min(box_h / height, box_w / width)
    new_h = max(1, round(height * scale))
    new_w = max(1, round(width * scale))
    Image = require_pillow()
    resized = Image.fromarray(a.astype(np.float32)).resize((new_w, new_h), Image.Resampling.LANCZOS)
    box = np.clip(np.asarray(resized, dtype=np.float64), 0.0, None)
    if box.max() <= 0.0:
        return blank
    box *= 255.0 / box.max()

    total = box.sum()
    com_y = float((box.sum(axis=1) * np.arange(new_h)).sum() / total)
    com_x = float((box.sum(axis=0) * np.arange(new_w)).sum() / total)
    top = round((height_out - 1) / 2.0 - com_y)
    left = round((width_out - 1) / 2.0 - com_x)
    out = np.zeros((height_out, width_out), dtype=np.float64)
    # Paste with clipping: a lopsided digit can have its centre of mass so far
    # off-centre that part of the box would fall outside the field.
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + new_h, height_out), min(left + new_w, width_out)
    out[y0:y1, x0:x1] = box[y0 - top : y1 - top, x0 - left : x1 - left]
    return np.rint(out).astype(np.uint8)
