"""Calling a user's function in their own framework on NumPy inputs, and its gradients through that
framework's own autodiff.

Two public functions, shared by every check that holds code outside capsspec to the reference:

    call(fn, args, framework)                    -> the outputs, as NumPy arrays (tuples kept)
    vjp(fn, args, cotangents, wrt, framework)    -> the gradients of sum(<output, cotangent>)
                                                    with respect to args[i] for i in wrt

`args` are NumPy arrays (or None, passed through, or plain Python values); float arrays become the
framework's tensors of the same dtype, integer arrays its integer tensors. `framework` is one of
FRAMEWORKS, or None to infer it from the module that defines `fn` (infer_framework). Gradients
come from torch.autograd, tf.GradientTape and jax.vjp; NumPy has no autodiff, so a NumPy function
is checked forward only unless its author passes a vjp of their own (numpy_vjp=...).

A framework is imported only when a function of it is called: importing this module imports none.
A float64 input to a JAX function turns on jax_enable_x64 for the process (JAX narrows float64 to
float32 otherwise); float32-only checks leave JAX's settings alone.

What this module must never do: compute a gradient by finite differences, or change the user's
arrays (every input is a fresh copy).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["FRAMEWORKS", "FrameworkError", "infer_framework", "call", "vjp", "has_autodiff"]

FRAMEWORKS = ("torch", "tensorflow", "jax", "numpy", "cupy")
# Names a user may write for a framework (the module's top-level package, or the common short forms).
_ALIASES = {"torch": "torch", "pytorch": "torch", "tensorflow": "tensorflow", "tf": "tensorflow",
            "keras": "tensorflow", "tf.keras": "tensorflow", "jax": "jax", "flax": "jax", "haiku": "jax",
            "equinox": "jax", "numpy": "numpy", "np": "numpy", "cupy": "cupy"}


class FrameworkError(ValueError):
    """A framework that cannot be named, inferred or imported, or a function it cannot differentiate."""


def normalize(framework: str) -> str:
    key = str(framework).strip().lower()
    if key not in _ALIASES:
        raise FrameworkError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    return _ALIASES[key]


def infer_framework(fn: Any) -> str:
    """The framework of `fn` from the module that defines it (or its class's, for a module object):
    torch.nn.Module and keras.Layer instances are recognised by their type; otherwise the imports of
    the defining module decide when exactly one framework appears there."""
    for cls in type(fn).__mro__:
        top = (cls.__module__ or "").split(".")[0]
        if top in ("torch", "keras", "tensorflow", "flax", "haiku", "equinox", "jaxlib"):
            return "jax" if top == "jaxlib" else _ALIASES[top]  # jaxlib: a jax.jit-compiled function
    target = getattr(fn, "func", fn)  # functools.partial
    module = inspect.getmodule(target) or inspect.getmodule(type(target))
    found = set()
    for value in vars(module).values() if module is not None else ():
        top = (getattr(value, "__name__", "") or "").split(".")[0] if inspect.ismodule(value) else ""
        if top in _ALIASES and _ALIASES[top] != "numpy":
            found.add(_ALIASES[top])
    if len(found) == 1:
        return found.pop()
    if not found and module is not None and "np" in vars(module):
        return "numpy"
    where = getattr(module, "__name__", "?")
    raise FrameworkError(f"cannot tell the framework of {getattr(fn, '__name__', fn)!r} (module {where} imports "
                         f"{sorted(found) or 'none of ' + ', '.join(FRAMEWORKS)}): pass framework=... "
                         f"(--framework on the command line)")


def has_autodiff(framework: str) -> bool:
    return normalize(framework) in ("torch", "tensorflow", "jax")


# ---------------------------------------------------------------------------------------- conversions
def _flatten(out: Any) -> tuple[list[Any], bool]:
    """A function's result as a list of arrays, and whether it was a tuple/list (kept for the caller)."""
    if isinstance(out, (tuple, list)):
        return list(out), True
    return [out], False


def _to_numpy(framework: str, x: Any) -> Any:
    if x is None:
        return None
    if framework == "torch":
        return x.detach().cpu().numpy().copy() if hasattr(x, "detach") else np.asarray(x)
    if framework == "cupy" and hasattr(x, "get"):
        return x.get()
    return np.array(x)


def _inputs(framework: str, args: Sequence[Any], grad: Sequence[int] = ()) -> list[Any]:
    mod = _module(framework)
    if framework == "jax" and any(isinstance(a, np.ndarray) and a.dtype == np.float64 for a in args):
        # float64 draws stay float64 (JAX narrows them otherwise); float32-only checks leave the setting alone.
        mod.config.update("jax_enable_x64", True)
    out = []
    for i, a in enumerate(args):
        if not isinstance(a, np.ndarray):
            out.append(a)
        elif framework == "torch":
            t = mod.from_numpy(np.array(a))
            out.append(t.requires_grad_(True) if i in grad else t)
        elif framework == "tensorflow":
            out.append(mod.convert_to_tensor(np.array(a)))
        elif framework == "jax":
            out.append(mod.numpy.asarray(np.array(a)))
        elif framework == "cupy":
            out.append(mod.asarray(a))
        else:
            out.append(np.array(a))
    return out


def _module(framework: str) -> Any:
    try:
        if framework == "torch":
            import torch
            return torch
        if framework == "tensorflow":
            from capsspec.backends.tensorflow import set_environment

            set_environment()  # oneDNN off, as in the tensorflow backend (its docstring says why)
            import tensorflow
            return tensorflow
        if framework == "jax":
            import jax
            import jax.numpy  # noqa: F401  (jax.numpy.asarray below)

            return jax
        if framework == "cupy":
            import cupy
            return cupy
    except ImportError as exc:
        raise FrameworkError(f"framework {framework!r} is not importable here: {exc}") from None
    return np


# ---------------------------------------------------------------------------------------- the two calls
def call(fn: Callable[..., Any], args: Sequence[Any], framework: str | None = None) -> Any:
    """fn(*args) in its framework; its result (an array, or a tuple of them) as NumPy."""
    fw = normalize(framework) if framework else infer_framework(fn)
    xs = _inputs(fw, args)
    if fw == "torch":
        with _module(fw).no_grad():
            out = fn(*xs)
    else:
        out = fn(*xs)
    outs, was_tuple = _flatten(out)
    arrays = [_to_numpy(fw, o) for o in outs]
    return tuple(arrays) if was_tuple else arrays[0]


def _dot(mod_sum: Callable[[Any], Any], outs: list[Any], cots: Sequence[Any], mul: Callable[[Any, Any], Any]) -> Any:
    total = None
    for o, c in zip(outs, cots):
        if c is None or o is None:
            continue
        term = mod_sum(mul(o, c))
        total = term if total is None else total + term
    return total


def vjp(fn: Callable[..., Any], args: Sequence[Any], cotangents: Sequence[Any], wrt: Sequence[int],
        framework: str | None = None, numpy_vjp: Callable[..., Any] | None = None) -> list[np.ndarray | None]:
    """The gradients of sum_k <fn(*args)[k], cotangents[k]> with respect to args[i], i in wrt, as NumPy
    (None where the function does not depend on that argument). cotangents has one entry per output
    (None: that output is not differentiated), each reshaped to its output's shape (a flattened output
    takes its cotangent flattened in the same order)."""
    fw = normalize(framework) if framework else infer_framework(fn)
    if fw in ("numpy", "cupy"):
        if numpy_vjp is None:
            raise FrameworkError(f"{fw} has no autodiff: pass vjp=... to check gradients (forward is checked "
                                 f"without it)")
        out = numpy_vjp(cotangents if len(cotangents) > 1 else cotangents[0], *args)
        return [_to_numpy(fw, g) for g in _flatten(out)[0]]
    mod = _module(fw)
    if fw == "torch":
        xs = _inputs(fw, args, wrt)
        with mod.enable_grad():
            outs, _ = _flatten(fn(*xs))
            cots = [None if c is None else mod.from_numpy(np.array(c)) for c in cotangents]
            total = _dot(mod.sum, outs, cots, lambda o, c: o * c.to(o.dtype).reshape(o.shape))
            if total is None or not total.requires_grad:
                return [None for _ in wrt]
            grads = mod.autograd.grad(total, [xs[i] for i in wrt], allow_unused=True)
        return [None if g is None else _to_numpy(fw, g) for g in grads]
    if fw == "tensorflow":
        xs = _inputs(fw, args)
        with mod.GradientTape() as tape:
            for i in wrt:
                tape.watch(xs[i])
            outs, _ = _flatten(fn(*xs))
            total = _dot(mod.reduce_sum, outs, cotangents,
                         lambda o, c: o * mod.reshape(mod.cast(c, o.dtype), mod.shape(o)))
        grads = tape.gradient(total, [xs[i] for i in wrt]) if total is not None else [None] * len(wrt)
        return [None if g is None else _to_numpy(fw, mod.convert_to_tensor(g)) for g in grads]
    xs = _inputs(fw, args)  # jax

    def partial(*diff: Any) -> Any:
        full = list(xs)
        for i, d in zip(wrt, diff):
            full[i] = d
        outs, _ = _flatten(fn(*full))
        return _dot(mod.numpy.sum, outs, cotangents,
                    lambda o, c: o * mod.numpy.asarray(c, dtype=o.dtype).reshape(o.shape))

    grads = mod.grad(partial, argnums=tuple(range(len(wrt))))(*[xs[i] for i in wrt])
    return [_to_numpy(fw, g) for g in grads]
