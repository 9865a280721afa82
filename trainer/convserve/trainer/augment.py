"""Label-preserving augmentation of training images: shifts, elastic distortions, mirroring.

Every policy is a plain :class:`Augmentation`; :data:`AUGMENTATIONS` names the ones the
``--augment`` flag offers. All of them work on uint8 or float images ``[n, height, width]``
with NumPy only, vectorised over the batch, and draw from a caller's seeded generator, so
the same seed gives the same images.

Elastic distortion follows Simard, Steinkraus and Platt (2003): a random displacement
field per image, smoothed by a Gaussian of ``elastic_sigma`` pixels and scaled by
``elastic_alpha``, resamples the image bilinearly. Of the augmentations tried on the
4,000 sample digits it gave the best held-out accuracy (README, "Training recipes").

Mirroring turns a 2 into something that is no digit and swaps the meaning of some
letters and arrows, so :func:`check_label_preserving` refuses it for data sets whose
classes are not mirror-symmetric (digits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Rows of images warped at a time: bounds the float64 displacement fields in memory
# (a chunk of 4,096 28x28 images needs about 50 MB) whatever the data set's size.
CHUNK_IMAGES = 4096
# The Gaussian is cut off at this many standard deviations, as scipy.ndimage does.
GAUSSIAN_TRUNCATE = 4.0


@dataclass(frozen=True)
class Augmentation:
    """One augmentation policy, applied anew to every training image every epoch.

    ``max_shift``: largest translation in pixels along each axis (uniform integer).
    ``elastic_alpha``/``elastic_sigma``: strength (pixels) and smoothness (pixels) of the
    elastic distortion; alpha 0 turns it off. ``mirror``: flip left-right with
    probability one half, for classes that look the same mirrored (clothes).
    """

    name: str
    max_shift: int = 0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0
    mirror: bool = False

    @property
    def enabled(self) -> bool:
        """Whether the policy changes any image at all."""
        return self.max_shift > 0 or self.elastic_alpha > 0 or self.mirror


AUGMENTATIONS: dict[str, Augmentation] = {
    policy.name: policy
    for policy in (
        Augmentation("none"),
        Augmentation("shift", max_shift=2),
        Augmentation("elastic", max_shift=2, elastic_alpha=34.0, elastic_sigma=4.0),
        Augmentation("mirror", mirror=True),
    )
}


class AugmentationError(ValueError):
    """An augmentation that would change what an image means, or does not fit it."""


def check_label_preserving(
    policy: Augmentation, mirror_symmetric_classes: bool, image_shape: tuple[int, int]
) -> None:
    """Refuse a policy that would change a label's meaning or cut away most of an image.

    ``mirror_symmetric_classes``: whether every class looks the same mirrored (clothes
    do, digits do not).
    """
    if policy.mirror and not mirror_symmetric_classes:
        raise AugmentationError(
            f"--augment {policy.name} mirrors images, which changes what a digit means; "
            "use none, shift or elastic for this data set"
        )
    smallest = min(image_shape)
    # A shift of more than an eighth of the image can push the object out of the frame.
    if policy.max_shift * 8 > smallest:
        raise AugmentationError(
            f"--augment {policy.name} shifts by up to {policy.max_shift} pixels, too far for "
            f"{image_shape[0]}x{image_shape[1]} images; use none"
        )


def gaussian_matrix(size: int, sigma: float) -> np.ndarray:
    """[size, size] matrix M with ``M @ v`` the Gaussian-smoothed ``v`` (mirrored edges)."""
    radius = max(1, int(GAUSSIAN_TRUNCATE * sigma + 0.5))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    rows = np.repeat(np.arange(size), len(offsets))
    cols = (np.arange(size)[:, None] + offsets[None, :]).ravel()
    # Reflect at the edges (d c b a | a b c d | d c b a), as scipy's default mode does,
    # folding as often as a kernel wider than the image needs.
    period = 2 * size
    cols = np.mod(cols, period)
    cols = np.where(cols >= size, period - 1 - cols, cols)
    matrix = np.zeros((size, size))
    np.add.at(matrix, (rows, cols), np.tile(weights, size))
    return matrix


def warp(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Each image resampled bilinearly at (row + dy, column + dx); outside reads 0.

    ``images`` float [n, h, w]; ``dy``/``dx`` float [n, h, w] displacements in pixels.
    """
    n, height, width = images.shape
    rows = np.arange(height)[None, :, None] + dy
    cols = np.arange(width)[None, None, :] + dx
    row0 = np.floor(rows).astype(np.int64)
    col0 = np.floor(cols).astype(np.int64)
    frac_r = rows - row0
    frac_c = cols - col0
    index = np.arange(n)[:, None, None]
    out = np.zeros(images.shape, dtype=np.float64)
    for dr, wr in ((0, 1.0 - frac_r), (1, frac_r)):
        for dc, wc in ((0, 1.0 - frac_c), (1, frac_c)):
            r = row0 + dr
            c = col0 + dc
            inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
            values = images[index, np.clip(r, 0, height - 1), np.clip(c, 0, width - 1)]
            out += np.where(inside, values, 0.0) * wr * wc
    return out


def shift(images: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Each image moved by its own random offset in [-max_shift, max_shift] (zero fill)."""
    if max_shift == 0:
        return images.copy()
    n, height, width = images.shape
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    dy = rng.integers(0, 2 * max_shift + 1, size=(n,))
    dx = rng.integers(0, 2 * max_shift + 1, size=(n,))
    rows = dy[:, None] + np.arange(height)[None, :]
    cols = dx[:, None] + np.arange(width)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def augment(images: np.ndarray, policy: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """``images`` [n, h, w] transformed by ``policy`` with fresh randomness from ``rng``.

    Mirroring comes first, then one resampling for shift and elastic distortion together.

    The result has the input's dtype (uint8 is rounded and clipped back to 0..255).
    """
    if not policy.enabled or len(images) == 0:
        return images.copy()
    parts = [
        _augment_chunk(images[start : start + CHUNK_IMAGES], policy, rng)
        for start in range(0, len(images), CHUNK_IMAGES)
    ]
    return np.concatenate(parts)


def _augment_chunk(
    images: np.ndarray, policy: Augmentation, rng: np.random.Generator
) -> np.ndarray:
    n, height, width = images.shape
    if policy.mirror:
        flip = rng.random(size=(n,)) < 0.5
        images = np.where(flip[:, None, None], images[:, :, ::-1], images)
    if policy.elastic_alpha == 0:
        # Whole-pixel moves need no resampling: cheaper by far on 60,000 images.
        return shift(images, rng, policy.max_shift)
    source = images.astype(np.float64)
    rows = gaussian_matrix(height, policy.elastic_sigma)
    cols = gaussian_matrix(width, policy.elastic_sigma)
    # Separable smoothing of uniform noise: rows x noise x cols^T per image.
    dy = (rows @ rng.uniform(-1.0, 1.0, source.shape) @ cols.T) * policy.elastic_alpha
    dx = (rows @ rng.uniform(-1.0, 1.0, source.shape) @ cols.T) * policy.elastic_alpha
    if policy.max_shift > 0:
        span = 2 * policy.max_shift + 1
        dy += rng.integers(0, span, size=(n,))[:, None, None] - policy.max_shift
        dx += rng.integers(0, span, size=(n,))[:, None, None] - policy.max_shift
    out = warp(source, dy, dx)
    if images.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(images.dtype)


__all__ = [
    "AUGMENTATIONS",
    "Augmentation",
    "AugmentationError",
    "augment",
    "check_label_preserving",
    "gaussian_matrix",
    "shift",
    "warp",
]
