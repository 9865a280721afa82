"""Preparing pictures for a model: decoding PNG/JPEG files and drawing digits the MNIST way.

Shared code: the client and the server both import it (the server never
imports `convserve.client`). The CLI and the SDK prepare an image file, and
the server's console an uploaded or drawn picture, in exactly the same way,
so that a model gets the same pixels for the same picture from either side.

Decoding needs pillow (the ``images`` extra), imported only when an image is
read. Every problem raises `ImageError`; those about a file name the file
(or ``image bytes``).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

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


class ImageError(ValueError):
    """An image that cannot be read or prepared (unreadable, too large, wrong shape)."""


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
    """(H, W, C) with positive sizes, or ImageError naming `field`."""
    dims = tuple(int(d) for d in shape)
    if len(dims) != 3 or any(d < 1 for d in dims):
        raise ImageError(f"{field}: expected (height, width, channels) > 0, got {list(dims)}")
    return (dims[0], dims[1], dims[2])


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
        raise ImageError(f"{name}: no such file") from exc
    except Image.DecompressionBombError as exc:
        # Pillow refuses images far beyond its own limit before telling their size.
        size = _header_size(source)
        if size is not None and size[0] * size[1] <= MAX_IMAGE_PIXELS:
            raise ImageError(f"{name}: cannot read image ({exc})") from exc
        raise _too_large(name, size) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not an image file pillow can read (PNG or JPEG)") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{name}: cannot read image ({_reason(exc)})") from exc
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
            raise ImageError(f"{name}: cannot read image ({_reason(exc)})") from exc
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


def _too_large(name: str, size: tuple[int, int] | None) -> ImageError:
    limit = f"the limit of {MAX_IMAGE_PIXELS:,} pixels"
    if size is None:
        return ImageError(f"{name}: image too large to decode, more than {limit}")
    width, height = size
    return ImageError(
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
        raise ImageError(f"size: expected a positive (height, width), got {list(size)}")
    a = np.asarray(gray, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageError(f"image: expected a 2-D grayscale image, got shape {list(a.shape)}")
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
