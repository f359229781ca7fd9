"""Checks of user input for the reference, shared by every entry point.

Every public function of the reference validates what it is given and raises ValueError with
a message that names the argument, what was expected and what came. These helpers keep those
messages uniform. check_float_array, check_labels and check_images take NumPy arrays only;
check_params and check_same_dtype take anything with .shape and .dtype (framework tensors too),
and check finiteness only of the NumPy arrays among them.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

FLOAT_DTYPES = ("float32", "float64")

__all__ = [
    "FLOAT_DTYPES",
    "check_float_array",
    "check_same_dtype",
    "check_labels",
    "check_params",
    "check_images",
]


def _dtype_name(a: Any) -> str:
    dt = getattr(a, "dtype", None)
    if dt is None:
        return type(a).__name__
    name = getattr(dt, "name", None)
    return str(name if name is not None else dt).replace("torch.", "").replace("<dtype: '", "").rstrip("'>")


def check_float_array(
    name: str,
    a: Any,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    finite: bool = True,
) -> np.ndarray:
    """A float32/float64 NumPy array of the given rank/shape with only finite values."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray of float32 or float64, got {type(a).__name__}")
    if a.dtype.name not in FLOAT_DTYPES:
        raise ValueError(f"{name} must have dtype float32 or float64, got {a.dtype.name}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and a.ndim != ndim:
        want = f"shape {_fmt_shape(shape)}" if shape is not None else f"{ndim} dimensions"
        raise ValueError(f"{name} must have {want}, got shape {tuple(a.shape)}")
    if shape is not None:
        for want, got in zip(shape, a.shape):
            if want is not None and want != got:
                raise ValueError(f"{name} must have shape {_fmt_shape(shape)}, got shape {tuple(a.shape)}")
    if finite and a.size and not np.isfinite(a).all():
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ValueError(f"{name} must contain only finite values, got {bad} NaN or inf value(s)")
    return a


def _fmt_shape(shape: Sequence[int | None] | None) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_same_dtype(**arrays: Any) -> None:
    """All the named arrays share one dtype."""
    items = [(k, v) for k, v in arrays.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for k, v in items[1:]:
        if _dtype_name(v) != _dtype_name(first):
            raise ValueError(
                f"{k} has dtype {_dtype_name(v)} but {first_name} has dtype {_dtype_name(first)}: "
                "all float inputs of one call must share a dtype"
            )


def check_labels(name: str, labels: Any, batch: int, num_classes: int) -> np.ndarray:
    """Integer class labels of shape (batch,) in [0, num_classes)."""
    if not isinstance(labels, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray of integers, got {type(labels).__name__}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{name} must have an integer dtype, got {labels.dtype.name}")
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got shape {tuple(labels.shape)}")
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must lie in [0, {num_classes}), got a label {bad}")
    return labels


def check_params(
    params: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    name: str = "params",
    finite: bool = True,
) -> str:
    """A parameter dict with exactly the canonical names and shapes and one float dtype.

    Returns the dtype's name.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"{name} must be a dict of arrays keyed by canonical names, got {type(params).__name__}")
    missing = [k for k in shapes if k not in params]
    extra = [k for k in params if k not in shapes]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise ValueError(f"{name} does not match the config: " + "; ".join(parts) + f". Expected exactly {list(shapes)}")
    dtypes = set()
    for k, want in shapes.items():
        a = params[k]
        got = tuple(getattr(a, "shape", ()))
        if got != tuple(want):
            raise ValueError(f"{name}[{k!r}] must have shape {tuple(want)}, got {got}")
        dt = _dtype_name(a)
        if dt not in FLOAT_DTYPES:
            raise ValueError(f"{name}[{k!r}] must have dtype float32 or float64, got {dt}")
        dtypes.add(dt)
        if finite and isinstance(a, np.ndarray) and a.size and not np.isfinite(a).all():
            raise ValueError(f"{name}[{k!r}] must contain only finite values, got NaN or inf")
    if len(dtypes) > 1:
        raise ValueError(f"{name} mixes dtypes {sorted(dtypes)}: all parameters must share one dtype")
    return dtypes.pop()


def check_images(name: str, x: Any, input_shape: Iterable[int]) -> np.ndarray:
    """A batch of NCHW images of the config's (C, H, W), finite."""
    c, h, w = input_shape
    return check_float_array(name, x, shape=(None, c, h, w))
