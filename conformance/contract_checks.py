"""The contract checks: what a backend does with its inputs, whatever the numbers.

The error contract (error_contract): every bad input of records.py (an op's, a model or optimizer
function's, a conversion's) raises ValueError naming the argument, by the time the result is read
on the host at the latest. Purity (purity): no spec function changes what the caller passed in,
neither the backend's values nor the NumPy values they were converted from; only the arguments
that capsspec.spec.CONSUMES lists may be updated in place.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Mapping

import numpy as np

from capsspec.config import CapsNetConfig
from capsspec.spec import CONSUMES

from . import cases
from .check_kit import context, read_all, target_kwargs, to_backend
from .compare import Context, assert_true
from .records import MODEL_ERRORS, ErrorInput, ModelErrorCase, op_case, op_of, record
from .repro_line import reproducible
from .selection import Selected
from .strategies import SMALL_CONFIG

__all__ = ["error_contract", "purity", "model_error_case"]


def _names_argument(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def _expect_value_error(ctx: Context, b: Any, call: Callable[[], Any], err: ErrorInput, what: str) -> None:
    try:
        read_all(b, call())
    except ValueError as exc:
        assert_true(_names_argument(str(exc), err.names),
                    f"{what}: raised ValueError({str(exc)!r}), which does not name the argument "
                    f"({' or '.join(err.names)})", ctx)
        return
    except Exception as exc:  # noqa: BLE001 - any other exception breaks the contract; say which
        ctx.fail(f"{what}: raised {type(exc).__name__}({exc}); the contract is a ValueError naming "
                 f"{' or '.join(err.names)}")
    ctx.fail(f"{what}: accepted without a ValueError (the contract: a ValueError naming {' or '.join(err.names)})")


def _find(errors: tuple[ErrorInput, ...], error_id: str) -> ErrorInput:
    for e in errors:
        if e.id == error_id:
            return e
    raise ValueError(f"error_id must be one of {[e.id for e in errors]}, got {error_id!r}")


def _op_call(b: Any, name: str, op: str, case: Any) -> tuple[Callable[[], Any], list[Any], Any]:
    """The call of spec name `name` (op `op`'s forward or VJP) on the case's values as backend arrays,
    with those arrays: (call, args, cotangent or None for the forward)."""
    args = to_backend(b, case.args)
    if name == op:
        return (lambda: getattr(b, name)(*args, **case.static)), args, None
    cot = to_backend(b, case.cot)
    return (lambda: getattr(b, name)(cot, *args, **case.static)), args, cot


def _model_calls(b: Any, p: Any, x: Any, y: Any, config: Any, t: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """The model functions called the same way by both contracts, on backend values (t: the targets keyword)."""
    return {
        "forward": lambda: b.forward(p, x, config, labels=y),
        "loss": lambda: b.loss(p, x, y, config, **t),
        "value_and_grad": lambda: b.value_and_grad(p, x, y, config, **t),
        "predict": lambda: b.predict(p, x, config),
    }


def model_error_case(dtype: str) -> ModelErrorCase:
    """A small valid model call (a decoder, labels, an Adam state), the base of the model error inputs."""
    config = CapsNetConfig.from_dict(SMALL_CONFIG)
    params = cases.model_params(config, 11, 30.0, dtype)
    x, labels = cases.batch(config, {"seed": 12, "B": 3, "kind": "unit", "scale": 0}, dtype)
    rng = np.random.default_rng(13)
    grads = {k: cases.values(rng, p.shape, "normal", -2, dtype) for k, p in params.items()}
    return ModelErrorCase(config, params, x, labels, grads, cases.state_case(params, 3, rng, dtype))


def _model_call(b: Any, name: str, mc: ModelErrorCase) -> Callable[[], Any]:
    config = mc.call_config if mc.call_config is not None else mc.config
    if name == "params_from_numpy":
        return lambda: b.params_from_numpy(mc.params, config)
    p = b.params_from_numpy(mc.params, mc.config)
    x, y = b.asarray(mc.x), b.asarray(mc.labels)
    t = target_kwargs(b, mc)
    calls = {
        **_model_calls(b, p, x, y, config, t),
        # A state that does not fit the params may be refused by state_from_numpy or by adam_update.
        "adam_update": lambda: b.adam_update(p, {k: b.asarray(g) for k, g in mc.grads.items()},
                                             b.state_from_numpy(mc.state, p)),
        "train_step": lambda: b.train_step(p, b.adam_init(p), x, y, config, **t),
    }
    return calls[name]


@reproducible
def error_contract(sel: Selected, name: str, error_id: str, dtype: str) -> None:
    """Spec name `name` given error input `error_id` (records.py) raises ValueError naming the argument."""
    b = sel.backend
    op = op_of(name)
    if op is not None:
        rec = record(op)
        err = _find(rec.errors(), error_id)
        case = op_case(op, rec.example, dtype)
        err.change(case)
        inputs = dict(zip(rec.spec.array_args, case.args))
        ctx = context(f"error contract: {name} with {error_id}", sel, dtype, rec.example, inputs)
        call, _, _ = _op_call(b, name, op, case)
    else:
        err = _find(MODEL_ERRORS[name], error_id)
        mc = model_error_case(dtype)
        err.change(mc)
        ctx = context(f"error contract: {name} with {error_id}", sel, dtype, {"config": mc.config.to_dict()},
                      {"x": mc.x, "labels": mc.labels, "targets": mc.targets})
        call = _model_call(b, name, mc)
    _expect_value_error(ctx, b, call, err, f"{name} with {error_id}")


def _snapshot(b: Any, kind: str, a: Any) -> Any:
    if a is None:
        return None
    if kind == "params":
        return b.params_to_numpy(a)
    if kind == "state":
        return b.state_to_numpy(a)
    if isinstance(a, Mapping):
        return {k: _snapshot(b, kind, v) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return [_snapshot(b, kind, v) for v in a]
    return np.array(b.to_numpy(a), copy=True)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    return a == b


def _check_unchanged(ctx: Context, b: Any, name: str, given: dict[str, tuple[str, Any]], call: Callable[[], Any],
                     caller_numpy: dict[str, Any]) -> None:
    """Call, then check that every input (read back through the backend) and every NumPy value the
    caller converted (which a backend may share memory with) is as it was. The arguments that
    spec.CONSUMES lists for `name` (train_step's params and state) may be updated in place, as
    the spec allows; the caller's NumPy values they were converted from may not."""
    given = {k: v for k, v in given.items() if k not in CONSUMES.get(name, ())}
    kept = {k: copy.deepcopy(v) for k, v in caller_numpy.items()}
    before = {k: _snapshot(b, kind, a) for k, (kind, a) in given.items()}
    read_all(b, call())
    for k, (kind, a) in given.items():
        assert_true(_same(_snapshot(b, kind, a), before[k]),
                    f"{name} changed its argument {k} (the spec's functions leave their inputs untouched and "
                    f"return new values)", ctx)
    for k, v in kept.items():
        assert_true(_same(caller_numpy[k], v), f"{name} changed the caller's NumPy {k} through the backend's "
                    f"copy of it (the backend shares its memory and wrote into it)", ctx)


@reproducible
def purity(sel: Selected, name: str, recipe: Mapping[str, Any], dtype: str) -> None:
    """Spec name `name` leaves its inputs (arrays, parameters, optimizer state) as they were."""
    b = sel.backend
    op = op_of(name)
    ctx = context(f"purity of {name}", sel, dtype, recipe)
    if op is not None:
        case = op_case(op, recipe, dtype)
        names = record(op).spec.array_args
        call, args, cot = _op_call(b, name, op, case)
        given = {n: ("array", a) for n, a in zip(names, args)}
        caller = {n: a for n, a in zip(names, case.args)}
        if cot is not None:
            given["g"], caller["g"] = ("array", cot), case.cot
        _check_unchanged(ctx, b, name, given, call, caller)
        return
    if name == "adam_update":
        config, params, grads, state, adam = cases.adam_case(recipe, dtype)
        p = b.params_from_numpy(params, config)
        s = b.adam_init(p) if int(recipe["step"]) == 0 else b.state_from_numpy(state, p)
        g = {k: b.asarray(v) for k, v in grads.items()}
        _check_unchanged(ctx, b, name, {"params": ("params", p), "grads": ("array", g), "state": ("state", s)},
                         lambda: b.adam_update(p, g, s, adam), {"params": params, "grads": grads, "state": state})
        return
    case = cases.model_case(recipe, dtype)
    _model_purity(ctx, b, name, case)
    if name in ("forward", "loss", "value_and_grad", "train_step"):  # and with two digits and their targets
        _model_purity(ctx, b, name, cases.two_digit_variant(case))


def _model_purity(ctx: Context, b: Any, name: str, case: Any) -> None:
    config = case.config
    p = b.params_from_numpy(case.params, config)
    x, y = b.asarray(case.x), b.asarray(case.labels)
    given: dict[str, tuple[str, Any]] = {"params": ("params", p), "x": ("array", x)}
    caller: dict[str, Any] = {"params": case.params, "x": case.x}
    if name != "predict":
        given["labels"], caller["labels"] = ("array", y), case.labels
    t = target_kwargs(b, case)
    if t and name != "forward":
        given["targets"], caller["targets"] = ("array", t["targets"]), case.targets
    calls = {**_model_calls(b, p, x, y, config, t), "adam_init": lambda: b.adam_init(p)}
    if name == "train_step":
        s = b.adam_init(p)
        given["state"] = ("state", s)
        call = lambda: b.train_step(p, s, x, y, config, **t)  # noqa: E731
    else:
        call = calls[name]
    _check_unchanged(ctx, b, name, given, call, caller)
