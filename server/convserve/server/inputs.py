"""Checks of client images against a model's input: the one place they happen.

Every protocol decodes its tensor and hands it to the runtime, which leases
the version the request names and checks the images against that version's
input (`check_images`) before anything else looks at the values. What passes
is a `CheckedImages`, the only thing a model's `predict` takes.
A model's input is ``[N,H,W,C]`` as its serving signature declares (`ImageSpec`);
single-channel models also take ``[N,H,W]`` and ``[N,H*W]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from convserve.server import errors

_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))


@dataclass(frozen=True)
class ImageSpec:
    """What one model takes: images of `shape` ([H,W,C]), uint8 0..255 or float32 0..1."""

    shape: tuple[int, int, int]

    @property
    def pixels(self) -> int:
        """Values per image (H*W*C)."""
        return math.prod(self.shape)

    def batch_shapes(self) -> list[tuple[int, ...]]:
        """The accepted shapes of a batch, without N."""
        h, w, c = self.shape
        return [(h, w, c), (h, w), (h * w,)] if c == 1 else [(h, w, c)]

    def describe(self) -> str:
        """The accepted batch shapes as text, e.g. "[N,28,28,1], [N,28,28] or [N,784]"."""
        shapes = []
        for rest in self.batch_shapes():
            shapes.append("[" + ",".join(["N", *(str(d) for d in rest)]) + "]")
        return shapes[0] if len(shapes) == 1 else ", ".join(shapes[:-1]) + " or " + shapes[-1]


@dataclass(frozen=True)
class CheckedImages:
    """Images `check_images` accepted for `spec`: [N,H,W,C], uint8 0..255 or float32 0..1.

    Made only by `check_images`: a value of this type has passed the checks.
    """

    array: np.ndarray
    spec: ImageSpec

    @property
    def count(self) -> int:
        return int(self.array.shape[0])


def _rest_matches(rest: tuple[int, ...], spec: ImageSpec) -> bool:
    return rest in spec.batch_shapes()


def check_images(images: object, field: str, spec: ImageSpec, *, max_images: int) -> CheckedImages:
    """Check a batch of images for `spec`; returns it as [N,H,W,C] (uint8 stays uint8).

    Raises errors.InvalidArgument naming `field`: not a tensor, another
    dtype, another shape, N=0 or over `max_images`, float32 values outside
    [0, 1] or not finite. Its scans are proportional to the input: callers
    run large ones off the event loop.
    """
    if not isinstance(images, np.ndarray):
        raise errors.InvalidArgument(field, f"a tensor {spec.describe()} expected")
    if images.dtype not in _DTYPES:
        raise errors.InvalidArgument(
            field, f"dtype uint8 (0..255) or float32 (0..1) expected, got {images.dtype}"
        )
    shape = images.shape
    if len(shape) < 2 or not _rest_matches(tuple(shape[1:]), spec):
        raise errors.InvalidArgument(field, f"shape {spec.describe()} expected, got {list(shape)}")
    n = shape[0]
    if n == 0:
        raise errors.InvalidArgument(field, "at least one image expected, got N=0")
    if n > max_images:
        raise errors.InvalidArgument(
            field,
            f"at most {max_images} images per request expected (the server's "
            f"max_images_per_request), got {n}",
        )
    if images.dtype == np.float32:
        if not np.all(np.isfinite(images)):
            raise errors.InvalidArgument(field, "finite float32 pixels expected, got NaN or Inf")
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:
            raise errors.InvalidArgument(
                field,
                f"float32 pixels in [0, 1] expected, got values in [{low:g}, {high:g}] "
                "(send uint8 for 0..255)",
            )
    return CheckedImages(np.ascontiguousarray(images.reshape(n, *spec.shape)), spec)


def check_image(image: object, field: str, spec: ImageSpec) -> np.ndarray:
    """Check one image for `spec`, with or without its leading 1; returns [1,H,W,C]."""
    if isinstance(image, np.ndarray) and _rest_matches(tuple(image.shape), spec):
        image = image[None]
    elif (
        isinstance(image, np.ndarray)
        and image.ndim >= 2
        and image.shape[0] > 1
        and _rest_matches(tuple(image.shape[1:]), spec)
    ):
        raise errors.InvalidArgument(field, f"one image expected, got {image.shape[0]}")
    return check_images(image, field, spec, max_images=1).array
