"""What the checks share: values to and from the backend, a check's failure context, the float32
reference, and class choices that accept near ties.

Inputs reach a backend only through its protocol (asarray here; params_from_numpy and
state_from_numpy in the checks themselves), and results come back through to_numpy. The reference
runs in float64 on the same values; reference_float32 runs it once more on the float32-rounded
inputs, whose distance from the float64 result is the conditioning allowance of
compare.assert_close.

What this module must never do: call a backend's private helpers, or hand a backend anything
that did not pass through its conversion functions.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .compare import Context, assert_true
from .repro_line import current_line
from .selection import Selected
from .tolerances import tolerance

__all__ = ["to_backend", "to_numpy_tree", "context", "outputs", "narrow", "fits_float32", "reference_float32",
           "single_grad", "acceptable_argmax", "check_choice", "target_kwargs", "read_all"]


def to_backend(backend: Any, a: Any) -> Any:
    """NumPy inputs (arrays, lists/tuples of them, None) to the backend's arrays via asarray."""
    if a is None:
        return None
    if isinstance(a, list):
        return [to_backend(backend, x) for x in a]
    if isinstance(a, tuple):
        return tuple(to_backend(backend, x) for x in a)
    return backend.asarray(np.asarray(a))


def to_numpy_tree(backend: Any, a: Any) -> Any:
    """The backend's results (arrays, lists/tuples of them, None) to NumPy via to_numpy."""
    if a is None:
        return None
    if isinstance(a, (list, tuple)) and not hasattr(a, "_fields"):
        return type(a)(to_numpy_tree(backend, x) for x in a)
    return backend.to_numpy(a)


def context(check: str, sel: Selected, dtype: str, recipe: Mapping[str, Any],
            inputs: dict[str, Any] | None = None) -> Context:
    """A check's failure context: its name, the backend, the recipe, the inputs, and its reproduction line."""
    return Context(check, sel, dtype, dict(recipe), current_line(), inputs or {})


def outputs(ctx: Context, out: Any, n: int, what: str, single: bool = True) -> tuple:
    """The results of a call as a tuple of n; a single result is not wrapped unless single is False."""
    if n == 1 and single:
        return (out,)
    if not isinstance(out, (tuple, list)) or len(out) != n:
        ctx.fail(f"{what}: expected a tuple of {n} results, got {type(out).__name__}")
    return tuple(out)


def narrow(a: Any) -> Any:
    """float arrays to float32 (dicts, lists and tuples kept in shape); for the float32 reference."""
    if a is None:
        return None
    if isinstance(a, Mapping):
        return {k: narrow(v) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return type(a)(narrow(x) for x in a)
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        return a.astype(np.float32)
    return a


def _leaves(a: Any) -> list[Any]:
    if isinstance(a, Mapping):
        return [x for v in a.values() for x in _leaves(v)]
    if isinstance(a, (list, tuple)):
        return [x for v in a for x in _leaves(v)]
    return [a]


def fits_float32(a: Any) -> bool:
    """Whether a float64 array rounds to float32 without overflow (with room for a few products) or
    flushing to zero; anything else (ints, None, float32) fits as it is."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float64 or a.size == 0:
        return True
    m = np.abs(a)
    nz = m[m > 0]
    return not nz.size or (nz.min() >= np.finfo(np.float32).tiny and nz.max() <= np.finfo(np.float32).max / 16)


def reference_float32(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn (a reference function) on the float32-rounded inputs, or None where that overflows.

    Its distance from the float64 result is the conditioning allowance of compare.assert_close."""
    if not all(fits_float32(a) for a in _leaves(args)):
        return None  # float32 would overflow or flush these inputs: its error says nothing about conditioning
    try:
        with np.errstate(all="ignore"):
            return fn(*narrow(list(args)), **kwargs)
    except (ValueError, FloatingPointError, OverflowError):  # the reference refuses inf inputs
        return None


def single_grad(ctx: Context, result: Any, what: str) -> Any:
    """The one gradient of a VJP with one differentiable argument (VJPs return 1-tuples)."""
    if not isinstance(result, (tuple, list)) or len(result) != 1:
        ctx.fail(f"{what}: expected a tuple of 1 gradient, got {type(result).__name__}")
    return result[0]


def acceptable_argmax(ref_scores: np.ndarray, dtype: str, level: str = "model") -> list[np.ndarray]:
    """Per row, every class whose reference score is within tolerance of the best (near ties)."""
    tol = tolerance(dtype, level)
    best = ref_scores.max(axis=1, keepdims=True)
    margin = tol.atol + tol.rtol * np.abs(ref_scores).max(axis=1, keepdims=True)
    return [np.flatnonzero(row) for row in (ref_scores >= best - margin)]


def check_choice(ctx: Context, got: np.ndarray, ref_scores: np.ndarray, what: str) -> None:
    """Integer class choices (predict, correct): the reference's argmax, or a class tied with it."""
    want = np.argmax(ref_scores, axis=1).astype(np.int64)
    if not isinstance(got, np.ndarray):
        ctx.fail(f"{what}: to_numpy returned {type(got).__name__}, expected a numpy.ndarray")
    assert_true(got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}", ctx)
    assert_true(got.dtype == np.int64, f"{what}: dtype {got.dtype.name}, expected int64", ctx)
    ok = acceptable_argmax(ref_scores, ctx.dtype)
    bad = [i for i in range(len(want)) if got[i] not in ok[i]]
    if bad:
        i = bad[0]
        ctx.fail(f"{what}: {len(bad)} of {len(want)} predictions differ; example {i}: backend {got[i]}, reference "
                 f"{want[i]} (reference class lengths {np.round(ref_scores[i], 6).tolist()})")


def target_kwargs(b: Any, case: Any) -> dict[str, Any]:
    """The targets keyword for a model call: passed only where the case has them ((B, K) labels),
    so that one-digit calls are the calls every existing caller makes."""
    return {} if case.targets is None else {"targets": b.asarray(case.targets)}


def read_all(b: Any, out: Any) -> None:
    """Read every array of a result on the host: a value check deferred by a device backend must
    raise by then at the latest (the contract lets it wait for the caller's next read, no longer)."""
    if out is None or isinstance(out, (bool, int, float, str)):
        return
    if isinstance(out, Mapping):
        for v in out.values():
            read_all(b, v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            read_all(b, v)
    elif hasattr(out, "shape") and hasattr(out, "dtype"):
        b.to_numpy(out)
