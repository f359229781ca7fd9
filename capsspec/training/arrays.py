"""Your own images as arrays: an .npz file with x_train, y_train, x_test, y_test (and optionally x_val, y_val,
class_names), checked and brought to the model's layout.

Images: uint8 (0..255, scaled by 1/255 when used) or floats in [0, 1], shaped (N, H, W) (one
channel), (N, C, H, W) (NCHW) or (N, H, W, C) (NHWC). The layout rule: the channel axis is axis 1
(NCHW) or the last axis (NHWC), whichever is strictly smaller than both of the other two image
axes; (N, 3, 32, 32) is NCHW, (N, 32, 32, 3) NHWC. When neither is (a 3-channel 3x3 image,
(N, 3, 3, 3), or 16 channels of 8x8), the layout cannot be told and `--layout nchw|nhwc` must
say it; nothing is guessed.

Labels: integers (or whole-number floats) in [0, K), (N,) or (N, K') with K' distinct labels per
row; K is len(class_names) when given, else the largest label + 1. NaN or inf pixels, floats
outside [0, 1], labels out of range or not whole, and missing keys are refused, each in one line
naming the key. `--image-size H W` resizes (Pillow, the filter of decode_cache.RESIZE_FILTER, on
each channel), `--channels 1|3` converts (3 -> 1: ITU-R 601-2 luma, as Pillow's "L"; 1 -> 3: the
channel repeated). The file itself is only read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decode_cache import RESIZE_FILTER

__all__ = ["ArraySource", "load_npz", "to_nchw", "REQUIRED_KEYS"]

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
_LUMA = np.asarray([0.299, 0.587, 0.114])


@dataclass
class ArraySource:
    """Checked arrays: images (N, C, H, W) uint8 or float32 for each part, labels int64, class names."""

    x: dict[str, np.ndarray]  # "train", "test" and, when the file has it, "val"
    y: dict[str, np.ndarray]
    class_names: tuple[str, ...]
    layout: str  # "nchw", "nhwc" or "nhw" as the file holds them


def to_nchw(x: np.ndarray, layout: str | None, key: str) -> tuple[np.ndarray, str]:
    """x as (N, C, H, W) and the layout it was in, by the rule of the module's docstring."""
    if x.ndim == 3:
        return x[:, None], "nhw"
    if x.ndim != 4:
        raise ValueError(f"{key} has shape {x.shape}; images must be (N, H, W), (N, C, H, W) or (N, H, W, C)")
    _, a, b, c = x.shape
    if layout is None:
        nchw, nhwc = a < b and a < c, c < a and c < b
        if nchw == nhwc:
            raise ValueError(f"{key} has shape {x.shape}, which could be NCHW or NHWC (neither axis 1 nor the last is "
                             "smaller than the other two): pass --layout nchw or --layout nhwc")
        layout = "nchw" if nchw else "nhwc"
    return (x if layout == "nchw" else x.transpose(0, 3, 1, 2)), layout


def _check_pixels(x: np.ndarray, key: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{key} is {x.dtype}; images must be uint8 (0..255) or floats in [0, 1]")
    finite = np.isfinite(x)
    if not finite.all():
        n = int(np.argmin(finite.reshape(x.shape[0], -1).all(axis=1)))
        raise ValueError(f"{key} holds NaN or inf pixels (first in image {n}); fix or drop those images")
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo < 0 or hi > 1:
        raise ValueError(f"{key} holds floats in [{lo:g}, {hi:g}]; float images must lie in [0, 1] (divide 8-bit "
                         "values by 255, or store them as uint8)")
    return x.astype(np.float32, copy=False)


def _check_labels(y: np.ndarray, n: int, key: str) -> np.ndarray:
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise ValueError(f"{key} has shape {y.shape}; it needs one label per image ({n},) or a row of labels per "
                         f"image ({n}, K)")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{key} holds labels that are not whole numbers; labels are class indices 0, 1, ...")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{key} is {y.dtype}; labels must be integer class indices 0, 1, ...")
    y = y.astype(np.int64)
    if y.ndim == 2 and any(len(set(r)) != len(r) for r in y.tolist()):
        raise ValueError(f"{key}: a row names one class twice; each row must hold distinct labels")
    return y


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, C, H, W) resized to size (H, W) channel by channel with Pillow (uint8 stays uint8, floats float32)."""
    from PIL import Image

    if x.shape[2:] == tuple(size):
        return x
    out = np.empty((*x.shape[:2], *size), dtype=x.dtype)
    f = getattr(Image.Resampling, RESIZE_FILTER)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            im = Image.fromarray(x[i, c] if x.dtype == np.uint8 else x[i, c].astype(np.float32), mode=None)
            out[i, c] = np.asarray(im.resize((size[1], size[0]), f))
    return np.clip(out, 0, 1) if out.dtype != np.uint8 else out


def _convert(x: np.ndarray, channels: int, key: str) -> np.ndarray:
    c = x.shape[1]
    if c == channels:
        return x
    if channels == 1 and c == 3:
        grey = np.tensordot(x.astype(np.float64), _LUMA, axes=([1], [0]))[:, None]
        return np.round(grey).astype(np.uint8) if x.dtype == np.uint8 else grey.astype(np.float32)
    if channels == 3 and c == 1:
        return np.repeat(x, 3, axis=1)
    raise ValueError(f"{key} has {c} channels; --channels converts between 1 and 3 only (leave it out to train on "
                     f"{c} channels)")


def load_npz(path: str | os.PathLike, *, layout: str | None = None, size: tuple[int, int] | None = None,
             channels: int | None = None) -> ArraySource:
    """The checked arrays of an .npz file (see the module's docstring)."""
    p = Path(path)
    try:
        z = np.load(p, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"--data {path}: cannot read it as an .npz file ({' '.join(str(exc).split())})") from None
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if "x_val" in arrays and "y_val" not in arrays or "y_val" in arrays and "x_val" not in arrays:
        missing.append("y_val" if "x_val" in arrays else "x_val")
    if missing:
        raise ValueError(f"--data {path}: the .npz has no {', '.join(missing)} (it has {', '.join(sorted(arrays))}); "
                         f"it needs {', '.join(REQUIRED_KEYS)}, optionally x_val, y_val and class_names")
    xs, ys, layouts = {}, {}, set()
    for part in ("train", "val", "test"):
        if f"x_{part}" not in arrays:
            continue
        x, got = to_nchw(_check_pixels(arrays[f"x_{part}"], f"x_{part}"), layout, f"x_{part}")
        layouts.add(got)
        if size is not None:
            x = _resize(x, size)
        xs[part] = _convert(x, channels, f"x_{part}") if channels else x
        ys[part] = _check_labels(arrays[f"y_{part}"], x.shape[0], f"y_{part}")
    shapes = {k: v.shape[1:] for k, v in xs.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"--data {path}: the parts' images differ in shape ({shapes}); pass --image-size H W to "
                         "resize them all")
    names = _class_names(arrays, ys, path)
    return ArraySource(xs, ys, names, "/".join(sorted(layouts)))


def _class_names(arrays: dict[str, np.ndarray], ys: dict[str, np.ndarray], path: str | os.PathLike) -> tuple[str, ...]:
    top = max(int(y.max(initial=-1)) for y in ys.values())
    low = min(int(y.min(initial=0)) for y in ys.values())
    if "class_names" in arrays:
        names = tuple(str(n) for n in np.asarray(arrays["class_names"]).reshape(-1))
        if low < 0 or top >= len(names):
            raise ValueError(f"--data {path}: labels run from {low} to {top} but class_names names {len(names)} "
                             f"classes; labels must lie in [0, {len(names)})")
    else:
        if low < 0:
            raise ValueError(f"--data {path}: labels must be 0 or more, got {low}")
        names = tuple(str(j) for j in range(top + 1))
    if len(names) < 2:
        raise ValueError(f"--data {path}: the labels name {len(names)} class; training needs at least two")
    return names
