"""The paper's augmentation: random integer shifts of up to 2 pixels, zero padded, training only;
and the crops of its section-7 settings (capsspec.training.presets): a crop per image at given
offsets (random ones in training, drawn by capsspec.training.splits.epoch_crops; the centre,
centre_offset, everywhere else).

Each image is shifted by (dy, dx), each drawn independently and uniformly from
{-max_shift, ..., max_shift}; pixels moved in from outside are 0, pixels moved out are lost.
Nothing else (no rotation, scaling or noise), as in the paper. Shifts are drawn from a NumPy
Generator the caller owns, so a run is reproducible; the work is one gather for the whole
batch (no Python loop over images).

What this module must never do: be applied to validation or test images (the trainer only
calls it on training batches; docs/spec.md, mistake 5), or draw from a global random state.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_SHIFT", "random_shifts", "shift_images", "augment_batch", "crop_images", "centre_offset"]

MAX_SHIFT = 2  # the paper's "shifted by up to 2 pixels in each direction"


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        raise ValueError(f"images must be a NumPy array (N, C, H, W), got "
                         f"{type(images).__name__} with shape {getattr(images, 'shape', None)}")


def _check_max_shift(max_shift: int) -> int:
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative int, got {max_shift!r}")
    return int(max_shift)


def random_shifts(rng: np.random.Generator, n: int, max_shift: int = MAX_SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx), each int64 of shape (n,), uniform in {-max_shift..max_shift}, dy drawn before dx."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    max_shift = _check_max_shift(max_shift)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    dy = rng.integers(-max_shift, max_shift + 1, size=int(n), dtype=np.int64)
    dx = rng.integers(-max_shift, max_shift + 1, size=int(n), dtype=np.int64)
    return dy, dx


def shift_images(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Each image n moved down by dy[n] and right by dx[n] pixels (negative: up/left), zero padded.

    out[n, c, y, x] = images[n, c, y - dy[n], x - dx[n]] where that index is inside the image, else 0.
    """
    _check_images(images)
    n, c, h, w = images.shape
    dy, dx = np.asarray(dy), np.asarray(dx)
    if dy.shape != (n,) or dx.shape != (n,) or not (np.issubdtype(dy.dtype, np.integer)
                                                      and np.issubdtype(dx.dtype, np.integer)):
        raise ValueError(f"dy and dx must be integer arrays of shape ({n},), got {dy.dtype} {dy.shape} "
                         f"and {dx.dtype} {dx.shape}")
    if n == 0:
        return images.copy()
    pad = int(max(np.abs(dy).max(), np.abs(dx).max()))
    if pad == 0:
        return images.copy()
    padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=images.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = images
    rows = np.arange(h)[None, :] + pad - dy[:, None]  # (n, h): source row in the padded image
    cols = np.arange(w)[None, :] + pad - dx[:, None]  # (n, w)
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def augment_batch(images: np.ndarray, rng: np.random.Generator, max_shift: int = MAX_SHIFT) -> np.ndarray:
    """A training batch with the paper's random shifts applied (a new array; images is untouched)."""
    _check_images(images)
    dy, dx = random_shifts(rng, images.shape[0], max_shift)
    return shift_images(images, dy, dx)


def centre_offset(size: int, crop: int) -> int:
    """Where the centre crop of `crop` pixels starts in `size` (an odd margin leaves the extra pixel at the end)."""
    if not 1 <= crop <= size:
        raise ValueError(f"a crop of {crop} pixels does not fit in {size}")
    return (size - crop) // 2


def crop_images(images: np.ndarray, top: np.ndarray, left: np.ndarray, height: int, width: int) -> np.ndarray:
    """out[n, c, y, x] = images[n, c, top[n] + y, left[n] + x]: a height x width window of each image (a new array)."""
    _check_images(images)
    n, c, h, w = images.shape
    top, left = np.asarray(top, dtype=np.int64), np.asarray(left, dtype=np.int64)
    if top.shape != (n,) or left.shape != (n,):
        raise ValueError(f"top and left must have shape ({n},), got {top.shape} and {left.shape}")
    if n and (top.min() < 0 or left.min() < 0 or top.max() + height > h or left.max() + width > w):
        raise ValueError(f"a {height}x{width} crop at these offsets leaves a {h}x{w} image")
    rows = top[:, None] + np.arange(height)[None, :]
    cols = left[:, None] + np.arange(width)[None, :]
    return images[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
