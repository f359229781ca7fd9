"""The backend kit: what every autodiff backend of capsspec shares, so that a backend is its math.

A backend built on a framework with automatic differentiation writes the spec's ops and model
in that framework and takes the rest from here. Nothing here imports a framework: each helper
is handed the one or two framework calls it needs.

API
---
make_vjps(namespace, vjp) -> dict[str, function]
    Every ``<op>_vjp`` of capsspec.spec.OPS that `namespace` (a module's globals()) does not
    define yet, generated from the op of the same name in `namespace` and the framework's one
    VJP primitive. ``vjp(f, *primals)`` has jax.vjp's meaning: it returns ``(f(*primals),
    pullback)`` where ``pullback(cotangent)`` returns a tuple with one gradient per primal.
    Primals are always a flat sequence of arrays (the kit flattens decoder's weight and bias
    lists and regroups their gradients); a cotangent has the structure of f's output (a pair
    for routing's (v, c)), ``None`` in it stands for zeros, and the cotangent of a scalar loss
    may be a Python number or a 0-d array of any float dtype (the primitive casts it to the
    output's dtype). A primal an output does not depend on gets zeros, never None. Each
    generated VJP has the reference's signature (g, *args) and returns a tuple in the order of
    OpSpec.differentiable. Use:  ``globals().update(make_vjps(globals(), vjp))``.
    The ops are looked up in `namespace` at call time, so the VJPs follow a patched op. With
    JAX, `vjp` is jax.vjp with each None in the cotangent replaced by zeros of that output;
    torch's and TensorFlow's are in backends/torch/ops.py and backends/tensorflow/ops.py.

AdamStateView
    The spec's optimizer state {"step", "m", "v"} as a read-only Mapping over a backend's own
    storage (a torch optimizer, tf.Variables): subclass it, set ``params`` (the native params
    it belongs to) and implement ``step`` and ``moments(which)`` (canonical names and layouts).

state_to_numpy(state, to_numpy) / state_from_numpy(state, shapes, dtype, load)
    The two directions of the state conversion. state_from_numpy checks a {"step", "m", "v"}
    dict of NumPy arrays against the canonical shapes and the params' dtype (ValueError naming
    the entry) and hands each moment to load(which, name, array); it returns the step.
    dict_state_from_numpy(state, params, asarray, shape_of, dtype_name) does the whole
    conversion for a backend whose params and state are dicts of arrays (the reference's layout).

DictParams
    A mixin for a Backend (list it before Backend) whose native params are the reference's
    layout, a dict of its arrays under the canonical names, and whose optimizer state is the
    spec's {"step", "m", "v"} dict of them: the four conversions, from the backend's asarray
    and to_numpy (NumPy, CuPy, JAX). Its default to_numpy is a host copy through NumPy's array
    protocol (np.array(a, copy=True)); CuPy, whose arrays refuse that, defines its own.

ModuleParams
    A mixin for a Backend (list it before Backend) whose native params are one object built
    for a config (an nn.Module, a tf.Module) with ``.config`` and ``.dtype``: it answers the
    door's native_params / native_state (capsspec.validation) from two hooks, params_class()
    and state_class() (and module_device(params) where placement matters), so the model
    functions' checks (config match, dtype, device, state ownership) are the door's, not the
    backend's. It also implements the Backend's state_from_numpy (through the state class's
    classmethod from_numpy(state, params)) and state_to_numpy, and check_native(params, state)
    for the other conversions.

float_dtype(dtype, table)
    A module's dtype argument ("float32", "float64" or the framework's own) as the framework's.

loss_parts(margin_loss, reconstruction_loss, out, x, labels, config, zero, targets=None)
    The spec's LossParts of a forward output, from the backend's two (unchecked) loss ops and a
    0-d zero of the input's dtype (the reconstruction term without a decoder). The
    reconstructions are compared with targets, or with x where targets is None (one digit per
    image); with (B, K) labels the door has made sure targets are there.

An inference-only backend (Backend.trains False) needs none of the VJP or optimizer parts: it
implements forward and predict, and the door checks them as for any backend.

What this module must never do: import a framework, or check a spec name's arguments (the door
does; the checks here are of the conversions' inputs, which are not spec names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator

import numpy as np

from .config import CapsNetConfig
from .spec import OPS, CapsNetOutput, LossParts, OpSpec
from .validation import check_params, check_state, spec_signature

__all__ = ["make_vjps", "AdamStateView", "state_to_numpy", "state_from_numpy", "dict_state_from_numpy", "DictParams",
           "ModuleParams",
           "loss_parts", "float_dtype"]

Vjp = Callable[..., tuple[Any, Callable[[Any], tuple[Any, ...]]]]


# ============================================================================== VJPs from one primitive
def _make_vjp(op: OpSpec, namespace: dict[str, Any], vjp: Vjp) -> Callable[..., tuple[Any, ...]]:
    forward_sig = spec_signature(op.name)

    def op_vjp(g: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        bound = forward_sig.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        # Flatten the differentiable arguments (decoder's weights and biases are lists).
        sizes = [len(values[n]) if isinstance(values[n], (list, tuple)) else None for n in op.differentiable]
        flat = [a for n, k in zip(op.differentiable, sizes) for a in (values[n] if k is not None else [values[n]])]

        def f(*primals: Any) -> Any:
            rebuilt, i = dict(values), 0
            for n, k in zip(op.differentiable, sizes):
                rebuilt[n] = list(primals[i:i + k]) if k is not None else primals[i]
                i += 1 if k is None else k
            return namespace[op.name](**rebuilt)

        _, pullback = vjp(f, *flat)
        grads, out, i = tuple(pullback(tuple(g) if len(op.outputs) > 1 else g)), [], 0
        for k in sizes:
            out.append(grads[i] if k is None else list(grads[i:i + k]))
            i += 1 if k is None else k
        return tuple(out)

    op_vjp.__name__ = op_vjp.__qualname__ = op.vjp_name
    op_vjp.__module__ = namespace.get("__name__", __name__)
    op_vjp.__doc__ = f"Gradients of {op.name} with respect to {op.differentiable} (from the framework's VJP)."
    op_vjp.__signature__ = spec_signature(op.vjp_name)  # type: ignore[attr-defined]
    return op_vjp


def make_vjps(namespace: dict[str, Any], vjp: Vjp) -> dict[str, Callable[..., tuple[Any, ...]]]:
    """Every <op>_vjp that `namespace` lacks, from its ops and the framework's VJP primitive."""
    return {op.vjp_name: _make_vjp(op, namespace, vjp) for op in OPS if op.vjp_name not in namespace}


# ============================================================================== optimizer state
class AdamStateView(Mapping):
    """The spec's state {"step", "m", "v"} as a view over a backend's own optimizer storage."""

    params: Any  # the native params this state belongs to (the door checks train_step's pair)

    @property
    def step(self) -> int:
        raise NotImplementedError

    def moments(self, which: str) -> dict[str, Any]:
        """m or v under canonical names, in the canonical layout."""
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        if key == "step":
            return self.step
        if key in ("m", "v"):
            return self.moments(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("step", "m", "v"))

    def __len__(self) -> int:
        return 3

    def __repr__(self) -> str:
        return f"{type(self).__name__}(step={self.step})"


def state_to_numpy(state: Mapping[str, Any], to_numpy: Callable[[Any], np.ndarray]) -> dict[str, Any]:
    """{"step": int, "m": {name: array}, "v": {name: array}} of NumPy arrays in the canonical layouts."""
    return {"step": int(state["step"]),
            "m": {k: to_numpy(a) for k, a in state["m"].items()},
            "v": {k: to_numpy(a) for k, a in state["v"].items()}}


def state_from_numpy(state: Any, shapes: Mapping[str, tuple[int, ...]], dtype: str,
                     load: Callable[[str, str, np.ndarray], None]) -> int:
    """Checks a {"step", "m", "v"} dict of NumPy arrays and loads each moment; returns the step."""
    step = check_state(state, shapes, dtype)
    for part in ("m", "v"):
        for k in shapes:
            load(part, k, state[part][k])
    return step


def dict_state_from_numpy(state: Any, params: Mapping[str, Any], asarray: Callable[[np.ndarray], Any],
                          shape_of: Callable[[Any], tuple[int, ...]], dtype_name: Callable[[Any], str]) -> dict:
    """The reference's state layout {"step", "m", "v"} of a backend whose params are a dict of arrays."""
    shapes = {k: shape_of(p) for k, p in params.items()}
    dtypes = {dtype_name(p) for p in params.values()}
    out: dict[str, Any] = {"m": {}, "v": {}}

    def load(which: str, name: str, a: np.ndarray) -> None:
        out[which][name] = asarray(a)

    out["step"] = state_from_numpy(state, shapes, dtypes.pop() if len(dtypes) == 1 else "float32", load)
    return out


# ============================================================================== dict params
class DictParams:
    """Backend mixin: params and optimizer state are dicts of the backend's arrays (the reference's layout)."""

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)

    def params_from_numpy(self, params: Mapping[str, np.ndarray], config: CapsNetConfig) -> dict[str, Any]:
        """The canonical dict of the backend's arrays (copies), in the canonical order."""
        check_params(params, config.param_shapes())
        return {k: self.asarray(np.asarray(params[k])) for k in config.param_shapes()}  # type: ignore[attr-defined]

    def params_to_numpy(self, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {k: self.to_numpy(a) for k, a in params.items()}  # type: ignore[attr-defined]

    def state_from_numpy(self, state: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
        return dict_state_from_numpy(state, params, self.asarray, self.shape_of, self.dtype_name)  # type: ignore[attr-defined]

    def state_to_numpy(self, state: Mapping[str, Any]) -> dict:
        return state_to_numpy(state, self.to_numpy)  # type: ignore[attr-defined]


# ============================================================================== module params
class ModuleParams:
    """Backend mixin: native params are one module built for a config; answers the door's questions
    and converts the optimizer state (the state class has a classmethod from_numpy(state, params))."""

    def params_class(self) -> type:
        raise NotImplementedError

    def state_class(self) -> type:
        raise NotImplementedError

    def module_device(self, params: Any) -> str | None:
        return None

    def native_params(self, params: Any) -> tuple[CapsNetConfig, str, str | None] | str:
        if not isinstance(params, self.params_class()):
            return (f"params must be a {self.params_class().__name__} (what {type(self).__name__}.params_from_numpy "
                    f"returns), got {type(params).__name__}")
        return params.config, self.dtype_name(params), self.module_device(params)  # type: ignore[attr-defined]

    def native_state(self, state: Any) -> Any:
        if not isinstance(state, self.state_class()):
            return (f"state must be a {self.state_class().__name__} (what adam_init or state_from_numpy returns), "
                    f"got {type(state).__name__}")
        return state.params

    def check_native(self, params: Any = None, state: Any = None) -> None:
        """For the conversions: refuse anything but this backend's params (and state)."""
        for found in ((self.native_params(params),) if params is not None else ()) + \
                ((self.native_state(state),) if state is not None else ()):
            if isinstance(found, str):
                raise ValueError(found)

    def state_from_numpy(self, state: Mapping[str, Any], params: Any) -> Any:
        """The backend's state for these params from {"step", "m", "v"} of canonical NumPy arrays."""
        self.check_native(params)
        return self.state_class().from_numpy(state, params)

    def state_to_numpy(self, state: Any) -> dict[str, Any]:
        """{"step": int, "m": {name: array}, "v": {name: array}} in the canonical layouts."""
        self.check_native(state=state)
        return state_to_numpy(state, self.to_numpy)  # type: ignore[attr-defined]


# ============================================================================== dtypes
def float_dtype(dtype: Any, table: Mapping[str, Any]) -> Any:
    """The framework's float dtype for "float32"/"float64" (table maps the names to it) or for one
    of the framework's own float dtypes; ValueError otherwise."""
    if isinstance(dtype, str) and dtype in table:
        return table[dtype]
    if dtype in table.values():
        return dtype
    raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")


# ============================================================================== losses
def loss_parts(margin_loss: Callable[..., Any], reconstruction_loss: Callable[..., Any], out: CapsNetOutput,
               x: Any, labels: Any, config: CapsNetConfig, zero: Callable[[], Any], targets: Any = None) -> LossParts:
    """The spec's loss of a forward output built with these labels; zero() is the term without a decoder."""
    margin = margin_loss(out.lengths, labels, config.m_plus, config.m_minus, config.lambda_)
    if out.reconstruction is not None:
        recon = reconstruction_loss(out.reconstruction, x if targets is None else targets, config.reconstruction_scale)
    else:
        recon = zero()
    return LossParts(total=margin + recon, margin=margin, reconstruction=recon)

