"""Turning what callers have (arrays, image files, encoded bytes) into digit batches.

Arrays must already be MNIST-shaped; what goes on the wire is decided here:

* uint8 arrays are sent as uint8 (one byte per pixel, 0 = background).
* Arrays of another integer type are sent as uint8 when every value is in
  [0, 255] (e.g. ``np.array([[0, 255, ...]])``, which numpy makes int64).
* Float arrays are sent as float32 and must be in [0, 1]; they are never
  quantized to uint8, so the server sees exactly the values given.
* Image files and encoded PNG/JPEG bytes are decoded with pillow (the
  ``images`` extra) and prepared the MNIST way by `mnist_preprocess`; they
  become uint8.
* A list mixing uint8 and float inputs is sent as float32 (uint8 / 255).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from convserve.client.errors import InputError

ImageSource: TypeAlias = "np.ndarray | str | os.PathLike[str] | bytes"
ImagesInput: TypeAlias = "npt.ArrayLike | ImageSource | Sequence[ImageSource]"

SIDE = 28
PIXELS = SIDE * SIDE
# MNIST fits each digit into a 20x20 box inside the 28x28 field.
DIGIT_BOX = 20
# After contrast stretching, pixels darker than this share of full ink are
# paper texture or sensor noise, not stroke; they must not widen the crop.
NOISE_FLOOR = 0.15

ACCEPTED_SHAPES = "[N,28,28], [N,28,28,1], [N,784], [28,28], [28,28,1] or [784]"


def require_pillow() -> Any:
    """Import pillow's Image module, or explain how to get it."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading and writing image files needs pillow: pip install 'convserve[images]'"
        ) from exc
    return Image


def image_batch(images: ImagesInput) -> np.ndarray:
    """Everything `predict` accepts -> one [N,28,28] uint8 or float32 array (N >= 1)."""
    if isinstance(images, list | tuple) and not images:
        raise InputError("images: no images given")
    if isinstance(images, list | tuple) and any(_is_single_source(i) for i in images):
        parts = [_one_source(item, f"images[{i}]") for i, item in enumerate(images)]
    else:
        parts = [_one_source(images, "images")]
    if all(p.dtype == np.uint8 for p in parts):
        batch = np.concatenate(parts)
    else:
        batch = np.concatenate(
            [p.astype(np.float32) / 255.0 if p.dtype == np.uint8 else p for p in parts]
        ).astype(np.float32)
    if batch.shape[0] == 0:
        raise InputError("images: no images given")
    return batch


def single_image(image: ImageSource) -> np.ndarray:
    """One image (any shape `image_batch` takes for one image, or a file) -> [1,28,28]."""
    batch = image_batch(image)
    if batch.shape[0] != 1:
        raise InputError(f"image: expected one image, got {batch.shape[0]}")
    return batch


def _is_single_source(item: object) -> bool:
    return isinstance(item, np.ndarray | str | bytes | os.PathLike)


def _one_source(item: object, field: str) -> np.ndarray:
    if isinstance(item, str | bytes | os.PathLike):
        return mnist_preprocess(load_grayscale(item))[np.newaxis]
    try:
        array = np.asarray(item)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{field}: not an array of pixels ({exc})") from exc
    return _checked_array(array, field)


def _checked_array(array: np.ndarray, field: str) -> np.ndarray:
    shape = array.shape
    if shape in ((SIDE, SIDE), (SIDE, SIDE, 1), (PIXELS,)):
        array = array.reshape(1, SIDE, SIDE)
    elif (
        (array.ndim == 3 and shape[1:] == (SIDE, SIDE))
        or (array.ndim == 4 and shape[1:] == (SIDE, SIDE, 1))
        or (array.ndim == 2 and shape[1] == PIXELS)
    ):
        array = array.reshape(shape[0], SIDE, SIDE)
    else:
        raise InputError(f"{field}: shape must be {ACCEPTED_SHAPES}, got {list(shape)}")
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


def load_grayscale(source: str | bytes | os.PathLike[str]) -> np.ndarray:
    """Decode a PNG/JPEG file (path) or its bytes into float64 gray levels in [0, 255].

    Transparent pixels count as white paper; phone photos are turned upright
    by their EXIF orientation.
    """
    Image = require_pillow()
    from PIL import ImageOps, UnidentifiedImageError

    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        opened = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
        with opened as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(paper, rgba)
            gray = np.asarray(img.convert("L"), dtype=np.float64)
    except FileNotFoundError as exc:
        raise InputError(f"{name}: no such file") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{name}: not an image file pillow can read (PNG or JPEG)") from exc
    except OSError as exc:
        raise InputError(f"{name}: cannot read image ({exc})") from exc
    return gray


def mnist_preprocess(gray: np.ndarray) -> np.ndarray:
    """Prepare a grayscale digit of any size the way MNIST's digits were made.

    Makes ink white on black (inverting when the border is light), stretches
    the contrast, crops to the ink's bounding box, scales it to fit 20x20
    keeping the aspect ratio, and places it in a 28x28 field so that its
    centre of mass is at the centre. Returns uint8 [28,28]. Needs pillow
    for the anti-aliased resize.
    """
    a = np.asarray(gray, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"image: expected a 2-D grayscale image, got shape {list(a.shape)}")
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    if np.median(border) > 127.5:
        a = 255.0 - a
        border = 255.0 - border
    a = np.clip(a - np.median(border), 0.0, None)
    peak = float(a.max())
    if peak <= 0.0:
        return np.zeros((SIDE, SIDE), dtype=np.uint8)
    a = a * (255.0 / peak)
    a[a < NOISE_FLOOR * 255.0] = 0.0
    rows = np.flatnonzero(a.any(axis=1))
    cols = np.flatnonzero(a.any(axis=0))
    a = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    height, width = a.shape
    scale = DIGIT_BOX / max(height, width)
    new_h = max(1, round(height * scale))
    new_w = max(1, round(width * scale))
    Image = require_pillow()
    resized = Image.fromarray(a.astype(np.float32)).resize((new_w, new_h), Image.Resampling.LANCZOS)
    box = np.clip(np.asarray(resized, dtype=np.float64), 0.0, None)
    if box.max() <= 0.0:
        return np.zeros((SIDE, SIDE), dtype=np.uint8)
    box *= 255.0 / box.max()

    total = box.sum()
    com_y = float((box.sum(axis=1) * np.arange(new_h)).sum() / total)
    com_x = float((box.sum(axis=0) * np.arange(new_w)).sum() / total)
    centre = (SIDE - 1) / 2.0
    top = round(centre - com_y)
    left = round(centre - com_x)
    out = np.zeros((SIDE, SIDE), dtype=np.float64)
    # Paste with clipping: a lopsided digit can have its centre of mass so far
    # off-centre that part of the box would fall outside the field.
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + new_h, SIDE), min(left + new_w, SIDE)
    out[y0:y1, x0:x1] = box[y0 - top : y1 - top, x0 - left : x1 - left]
    return np.rint(out).astype(np.uint8)
