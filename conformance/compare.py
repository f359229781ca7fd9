"""Comparing a backend's results with the reference, and saying exactly what went wrong.

assert_close checks type, shape and dtype before values, then values against the tolerance
table. A failure message carries the largest absolute and relative errors (with where and what
the values were), a summary of the drawn inputs, and the one command line that reproduces the
failing check (repro_line.py writes it, reproduce.py runs it). Every comparison is also recorded
(examples run, largest error) for the summary the pytest plugin prints at the end of a run.

What this module must never do: relax a tolerance, or swallow a backend's exception.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .tolerances import Tolerance, tolerance

__all__ = ["ConformanceFailure", "Context", "assert_close", "assert_true", "summarize", "STATS", "reset_stats",
           "check_stats", "current_check"]


class ConformanceFailure(AssertionError):
    """The backend disagrees with the reference (or breaks a property)."""


# ---------------------------------------------------------------------------------------- stats
@dataclass
class CheckStats:
    examples: int = 0
    comparisons: int = 0
    max_ratio: float = 0.0  # largest error / tolerance seen (1.0 is the limit)
    max_abs: float = 0.0
    worst: str = ""  # which quantity gave max_ratio


STATS: dict[str, CheckStats] = {}
_current = threading.local()


def current_check() -> str:
    return getattr(_current, "name", None) or "(outside pytest)"


def set_current_check(name: str | None) -> None:
    _current.name = name


def reset_stats() -> None:
    STATS.clear()


def check_stats() -> CheckStats:
    """The statistics of the check running now (examples, comparisons, the largest error), for the summary."""
    return STATS.setdefault(current_check(), CheckStats())


# ---------------------------------------------------------------------------------------- context
def _fmt(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)


def summarize(a: Any) -> str:
    """One line per array: shape, dtype, range, and how many zeros (never the values themselves)."""
    if a is None:
        return "None"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(summarize(x) for x in a) + "]"
    a = np.asarray(a)
    if a.size == 0:
        return f"{a.dtype.name}{tuple(a.shape)} (empty)"
    if a.dtype.kind in "iub":
        return f"{a.dtype.name}{tuple(a.shape)} values {np.unique(a)[:12].tolist()}"
    absval = np.abs(a.astype(np.float64))
    nz = absval[absval > 0]
    rng = f"|x| in [{nz.min():.3g}, {nz.max():.3g}]" if nz.size else "all zero"
    return (f"{a.dtype.name}{tuple(a.shape)} {rng}, {a.size - nz.size} zero(s), "
            f"min {a.min():.4g}, max {a.max():.4g}")


@dataclass
class Context:
    """What a failure message needs: the check, the backend, the recipe, the inputs, the line that reproduces it."""

    check: str
    backend: Any  # selection.Selected
    dtype: str
    recipe: Mapping[str, Any]
    repro: str  # one shell line (repro_line.py) that runs the failing check again
    inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_stats().examples += 1

    def describe(self) -> str:
        lines = [f"check: {self.check} on backend {self.backend.spec!r} ({self.dtype})",
                 f"drawn recipe: {_fmt(self.recipe)}"]
        if "config" in self.recipe:
            lines.append(f"config: CapsNetConfig.from_dict({_fmt(self.recipe['config'])})")
        for k, v in self.inputs.items():
            lines.append(f"input {k}: {summarize(v)}")
        lines.append(f"reproduce with: {self.repro}")
        return "\n".join(lines)

    def fail(self, message: str) -> None:
        raise ConformanceFailure(f"{message}\n{self.describe()}")


# ---------------------------------------------------------------------------------------- comparisons
def _reduce_max(a: np.ndarray, how: str) -> np.ndarray:
    """a's largest value over the scale's axes, broadcast back to a's shape."""
    if a.ndim == 0 or how == "tensor" or (how == "block" and a.ndim <= 2):
        return np.full(a.shape, a.max() if a.size else 0.0)
    axes = (-1,) if how == "row" else (-2, -1)
    return np.broadcast_to(a.max(axis=axes, keepdims=True), a.shape)


def _scale(expected: np.ndarray, how: str) -> np.ndarray:
    return _reduce_max(np.abs(expected), how)


def assert_true(ok: bool, message: str, ctx: Context) -> None:
    check_stats().comparisons += 1
    if not ok:
        ctx.fail(message)


# How many times the reference's own float32 rounding error (rescaled to the dtype under test)
# a backend may add on top of the table's tolerance; see assert_close.
CONDITIONING_FACTOR = 8.0
_EPS32 = float(np.finfo(np.float32).eps)


def conditioning_allowance(expected: np.ndarray, ref_float32: Any, dtype: str, how: str) -> np.ndarray | float:
    """The part of the bound that follows the problem's conditioning.

    ref_float32 is the reference evaluated in float32 on the same inputs rounded to float32: its
    distance from the float64 reference measures how sensitive this particular value is to
    rounding (a squash gradient that is a small difference of large terms, a softmax of large
    logits). The backend may be CONDITIONING_FACTOR times that far, rescaled from float32's epsilon
    to the dtype under test's. Where the float32 reference is not finite (overflow), it adds nothing.
    """
    if ref_float32 is None:
        return 0.0
    lo = np.asarray(ref_float32, dtype=np.float64)
    if lo.shape != expected.shape or not np.isfinite(lo).all():
        return 0.0
    d = np.abs(lo - expected) * (CONDITIONING_FACTOR * float(np.finfo(dtype).eps) / _EPS32)
    return _reduce_max(d, how) if d.size else 0.0


def assert_close(actual: Any, expected: Any, *, what: str, level: str, ctx: Context,
                 dtype: str | None = None, tol: Tolerance | None = None, ref_float32: Any = None,
                 magnitude: Any = None) -> None:
    """actual (from the backend, through to_numpy) against expected (the reference, float64).

    Checks it is a NumPy array, then shape, then dtype (the dtype under test, or int64 for integer
    results), then finiteness, then values: |actual - expected| <= atol + rtol * scale, plus the
    conditioning allowance when the float32 reference is given (see conditioning_allowance).
    `magnitude` (magnitudes.py), where given, raises the scale to the size of the terms behind
    each value.
    """
    dtype = dtype or ctx.dtype
    tol = tol or tolerance(ctx.dtype, level)
    st = check_stats()
    st.comparisons += 1
    if not isinstance(actual, np.ndarray):
        ctx.fail(f"{what}: to_numpy returned {type(actual).__name__}, expected a numpy.ndarray")
    expected = np.asarray(expected)
    if actual.shape != expected.shape:
        ctx.fail(f"{what}: shape {tuple(actual.shape)}, the reference's is {tuple(expected.shape)}")
    if actual.dtype.name != dtype:
        ctx.fail(f"{what}: dtype {actual.dtype.name}, expected {dtype}")
    if actual.dtype.kind in "iub":
        bad = np.argwhere(actual != expected)
        if bad.size:
            i = tuple(bad[0])
            ctx.fail(f"{what}: {len(bad)} of {actual.size} values differ; first at {i}: backend {actual[i]}, "
                     f"reference {expected[i]}")
        return
    a = actual.astype(np.float64)
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))
        i = tuple(bad[0])
        ctx.fail(f"{what}: {len(bad)} non-finite value(s) where the reference is finite; first at {i}: "
                 f"backend {a[i]}, reference {expected[i]}")
    if a.size == 0:
        return
    diff = np.abs(a - expected)
    scale = _scale(expected, tol.scale)
    if magnitude is not None and np.shape(magnitude) == expected.shape:
        scale = np.maximum(scale, np.asarray(magnitude, dtype=np.float64))
    bound = tol.atol + tol.rtol * scale + conditioning_allowance(
        expected, ref_float32, ctx.dtype, tol.scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, diff / bound, np.where(diff > 0, np.inf, 0.0))
        rel = np.where(expected != 0, diff / np.abs(expected), np.where(diff > 0, np.inf, 0.0))
    worst = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    max_ratio, max_abs = float(ratio[worst]), float(diff.max())
    if max_ratio > st.max_ratio or not st.worst:
        st.max_ratio, st.worst = max(max_ratio, st.max_ratio), what
    st.max_abs = max(st.max_abs, max_abs)
    if max_ratio > 1.0:
        iabs = np.unravel_index(int(np.argmax(diff)), diff.shape)
        irel = np.unravel_index(int(np.argmax(rel)), rel.shape)
        n_bad = int(np.count_nonzero(ratio > 1.0))
        ctx.fail(
            f"{what}: {n_bad} of {a.size} values differ from the reference beyond tolerance "
            f"({level}, {ctx.dtype}: rtol={tol.rtol:.3g}, atol={tol.atol:.3g}, relative to the {tol.scale}'s "
            f"largest |reference|, plus {CONDITIONING_FACTOR:g}x the float32 reference's own error)\n"
            f"  largest error/tolerance {max_ratio:.3g} at {tuple(int(i) for i in worst)}: backend {a[worst]!r}, "
            f"reference {expected[worst]!r}\n"
            f"  largest absolute error {max_abs:.3g} at {tuple(int(i) for i in iabs)}: backend {a[iabs]!r}, "
            f"reference {expected[iabs]!r}\n"
            f"  largest relative error {float(rel[irel]):.3g} at {tuple(int(i) for i in irel)}"
        )


def assert_all_close(actual: Mapping[str, Any], expected: Mapping[str, Any], *, what: str, level: str,
                     ctx: Context, ref_float32: Mapping[str, Any] | None = None,
                     magnitudes: Mapping[str, Any] | None = None) -> None:
    """Dicts keyed alike (parameters, gradients): same keys, then each value."""
    if not isinstance(actual, Mapping):
        ctx.fail(f"{what}: expected a dict keyed by canonical names, got {type(actual).__name__}")
    if list(actual) != list(expected) and set(actual) != set(expected):
        ctx.fail(f"{what}: keys {sorted(actual)}, the reference's are {sorted(expected)}")
    for k in expected:
        assert_close(actual[k], expected[k], what=f"{what}[{k!r}]", level=level, ctx=ctx,
                     ref_float32=None if ref_float32 is None else ref_float32.get(k),
                     magnitude=None if magnitudes is None else magnitudes.get(k))
