"""The suite's checks: run the backend and the reference on one drawn case and compare.

Each check takes the selected backend (selection.Selected), a recipe (cases.py) and a dtype.
Inputs reach the backend only through its protocol: parameters through params_from_numpy,
arrays through asarray, optimizer state through state_from_numpy; results come back through
to_numpy / params_to_numpy / state_to_numpy. The reference runs in float64 on the same values.

The test modules (test_*.py) are thin Hypothesis wrappers around these functions. Each check is
@reproducible: its arguments after the backend are plain JSON, so a failure prints one command
line (reproduce.py) that runs the same check on the same inputs again.

Besides comparing values, the suite holds every backend to the error contract (error_contract:
bad input raises ValueError naming the argument, records.py lists the bad inputs) and to purity
(purity: no spec function changes what the caller passed in).

What this module must never do: call a backend's private helpers, or hand a backend anything
that did not pass through its conversion functions.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Mapping

import numpy as np

from capsspec import model as ref_model
from capsspec import ops as ref_ops
from capsspec import optim as ref_optim
from capsspec.config import AdamConfig, CapsNetConfig
from capsspec.spec import CONSUMES, OPS

from . import cases, magnitudes
from .compare import CONDITIONING_FACTOR, Context, _stats, assert_all_close, assert_close, assert_true
from .records import MODEL_ERRORS, RECORDS, ErrorInput, ModelErrorCase, op_case, record
from .repro_line import current_line, reproducible
from .selection import Selected
from .tolerances import tolerance

__all__ = [
    "op_forward", "op_vjp", "model_forward", "model_loss", "model_value_and_grad", "model_predict",
    "adam_step", "trajectory", "coupling_sums_to_one", "child_permutation", "squash_direction_and_norm",
    "zero_vectors", "margin_loss_satisfied", "batch_independence", "interchange", "error_contract", "purity",
]

OP_SPECS = {op.name: op for op in OPS}


# ---------------------------------------------------------------------------------------- plumbing
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


def _ctx(check: str, sel: Selected, dtype: str, recipe: Mapping[str, Any],
         inputs: dict[str, Any] | None = None) -> Context:
    return Context(check, sel, dtype, dict(recipe), current_line(), inputs or {})


def _outputs(ctx: Context, out: Any, n: int, what: str, single: bool = True) -> tuple:
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


def _fits_float32(a: Any) -> bool:
    if not isinstance(a, np.ndarray) or a.dtype != np.float64 or a.size == 0:
        return True
    m = np.abs(a)
    nz = m[m > 0]
    return not nz.size or (nz.min() >= np.finfo(np.float32).tiny and nz.max() <= np.finfo(np.float32).max / 16)


def reference_float32(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn (a reference function) on the float32-rounded inputs, or None where that overflows.

    Its distance from the float64 result is the conditioning allowance of compare.assert_close."""
    if not all(_fits_float32(a) for a in _leaves(args)):
        return None  # float32 would overflow or flush these inputs: its error says nothing about conditioning
    try:
        with np.errstate(all="ignore"):
            return fn(*narrow(list(args)), **kwargs)
    except (ValueError, FloatingPointError, OverflowError):  # the reference refuses inf inputs
        return None


def _single_grad(ctx: Context, result: Any, what: str) -> Any:
    """The one gradient of a VJP with one differentiable argument (VJPs return 1-tuples)."""
    if not isinstance(result, (tuple, list)) or len(result) != 1:
        ctx.fail(f"{what}: expected a tuple of 1 gradient, got {type(result).__name__}")
    return result[0]


def _acceptable_argmax(ref_scores: np.ndarray, dtype: str, level: str = "model") -> list[np.ndarray]:
    """Per row, every class whose reference score is within tolerance of the best (near ties)."""
    tol = tolerance(dtype, level)
    best = ref_scores.max(axis=1, keepdims=True)
    margin = tol.atol + tol.rtol * np.abs(ref_scores).max(axis=1, keepdims=True)
    return [np.flatnonzero(row) for row in (ref_scores >= best - margin)]


def _check_choice(ctx: Context, got: np.ndarray, ref_scores: np.ndarray, what: str) -> None:
    """Integer class choices (predict, correct): the reference's argmax, or a class tied with it."""
    want = np.argmax(ref_scores, axis=1).astype(np.int64)
    if not isinstance(got, np.ndarray):
        ctx.fail(f"{what}: to_numpy returned {type(got).__name__}, expected a numpy.ndarray")
    assert_true(got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}", ctx)
    assert_true(got.dtype == np.int64, f"{what}: dtype {got.dtype.name}, expected int64", ctx)
    ok = _acceptable_argmax(ref_scores, ctx.dtype)
    bad = [i for i in range(len(want)) if got[i] not in ok[i]]
    if bad:
        i = bad[0]
        ctx.fail(f"{what}: {len(bad)} of {len(want)} predictions differ; example {i}: backend {got[i]}, reference "
                 f"{want[i]} (reference class lengths {np.round(ref_scores[i], 6).tolist()})")


# ---------------------------------------------------------------------------------------- ops
@reproducible
def op_forward(sel: Selected, name: str, recipe: Mapping[str, Any], dtype: str) -> None:
    """backend.<op>(*args) against capsspec.ops.<op> in float64."""
    b, spec = sel.backend, OP_SPECS[name]
    case = op_case(name, recipe, dtype)
    ctx = _ctx(f"{name} forward", sel, dtype, recipe, dict(zip(spec.array_args, case.args)))
    out = getattr(b, name)(*to_backend(b, case.args), **case.static)
    ref = getattr(ref_ops, name)(*case.ref_args, **case.static)
    ref32 = reference_float32(getattr(ref_ops, name), *case.ref_args, **case.static)
    n = len(spec.outputs)
    got = _outputs(ctx, out, n, name)
    refs = ref if n > 1 else (ref,)
    refs32 = (ref32 if n > 1 else (ref32,)) if ref32 is not None else (None,) * n
    rec = record(name)
    mags = rec.forward_magnitude(case.ref_args, case.static) if rec.forward_magnitude else (None,) * n
    for oname, o, r, r32, mag in zip(spec.outputs, got, refs, refs32, mags):
        assert_close(b.to_numpy(o), r, what=f"{name} {oname}", level=rec.levels[0], ctx=ctx, ref_float32=r32,
                     magnitude=mag)


@reproducible
def op_vjp(sel: Selected, name: str, recipe: Mapping[str, Any], dtype: str) -> None:
    """backend.<op>_vjp(g, *args) against capsspec.ops.<op>_vjp with the same random cotangent."""
    b, spec = sel.backend, OP_SPECS[name]
    case = op_case(name, recipe, dtype)
    inputs = dict(zip(spec.array_args, case.args))
    inputs["g"] = case.cot
    ctx = _ctx(f"{name} vjp", sel, dtype, recipe, inputs)
    out = getattr(b, spec.vjp_name)(to_backend(b, case.cot), *to_backend(b, case.args), **case.static)
    ref = getattr(ref_ops, spec.vjp_name)(case.ref_cot, *case.ref_args, **case.static)
    ref32 = reference_float32(getattr(ref_ops, spec.vjp_name), case.ref_cot, *case.ref_args, **case.static)
    got = _outputs(ctx, out, len(spec.differentiable), spec.vjp_name, single=False)
    rec = record(name)
    level = rec.levels[1]
    mags = rec.vjp_magnitude(case.ref_cot, case.ref_args, case.static) if rec.vjp_magnitude else [None] * len(ref)
    for i, (arg, o, r) in enumerate(zip(spec.differentiable, got, ref)):
        r32 = None if ref32 is None else ref32[i]
        mag = mags[i]
        if isinstance(r, list):  # the decoder's weights and biases
            if not isinstance(o, (list, tuple)) or len(o) != len(r):
                ctx.fail(f"{spec.vjp_name}: gradient for {arg} must be a list of {len(r)} arrays, got "
                         f"{type(o).__name__}")
            for k, (ok, rk) in enumerate(zip(o, r)):
                assert_close(b.to_numpy(ok), rk, what=f"d/d{arg}[{k}]", level=level, ctx=ctx,
                             ref_float32=None if r32 is None else r32[k], magnitude=None if mag is None else mag[k])
        else:
            assert_close(b.to_numpy(o), r, what=f"d/d{arg}", level=level, ctx=ctx, ref_float32=r32, magnitude=mag)


# ---------------------------------------------------------------------------------------- model
def _labels_or_none(recipe: Mapping[str, Any]) -> bool:
    return bool(recipe.get("with_labels", True))


def _targets(b: Any, case: Any) -> dict[str, Any]:
    """The targets keyword for a model call: passed only where the case has them ((B, K) labels),
    so that one-digit calls are the calls every existing caller makes."""
    return {} if case.targets is None else {"targets": b.asarray(case.targets)}


def _correct_bounds(ref_lengths: np.ndarray, labels: np.ndarray, dtype: str) -> tuple[int, int]:
    """How many examples a backend may count as correct (their K longest capsules are their K classes)
    given the reference's lengths: at least the rows where that holds clear of every near tie, at most
    the rows where it holds up to one."""
    tol = tolerance(dtype, "model")
    rows = labels.reshape(len(labels), -1)
    surely = possibly = 0
    for scores, row in zip(ref_lengths, rows):
        margin = tol.atol + tol.rtol * float(np.abs(scores).max())
        others = np.delete(scores, row)
        weakest, strongest = float(scores[row].min()), float(others.max()) if others.size else -np.inf
        surely += weakest > strongest + margin
        possibly += weakest >= strongest - margin
    return surely, possibly


@reproducible
def model_forward(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """forward(params, x, config, labels): v, lengths, coupling and reconstruction."""
    b = sel.backend
    case = cases.model_case(recipe, dtype)
    use_labels = _labels_or_none(recipe)
    ctx = _ctx("forward", sel, dtype, recipe, {"x": case.x, "labels": case.labels if use_labels else None})
    p = b.params_from_numpy(case.params, case.config)
    out = b.forward(p, b.asarray(case.x), case.config, labels=b.asarray(case.labels) if use_labels else None)
    ref = ref_model.forward(case.ref_params, case.ref_x, case.config, labels=case.labels if use_labels else None)
    r32 = reference_float32(ref_model.forward, case.ref_params, case.ref_x, case.config,
                            labels=case.labels if use_labels else None)
    for f in ("v", "lengths", "coupling", "reconstruction"):
        assert_true(hasattr(out, f), f"forward must return a CapsNetOutput; got {type(out).__name__} without .{f}",
                    ctx)
    lo = (lambda f: None if r32 is None else getattr(r32, f))  # noqa: E731
    assert_close(b.to_numpy(out.v), ref.v, what="forward v", level="model", ctx=ctx, ref_float32=lo("v"))
    lengths = b.to_numpy(out.lengths)
    assert_close(lengths, ref.lengths, what="forward lengths", level="model", ctx=ctx, ref_float32=lo("lengths"))
    assert_close(b.to_numpy(out.coupling), ref.coupling, what="forward coupling", level="model", ctx=ctx,
                 ref_float32=lo("coupling"))
    if not case.config.use_decoder:
        assert_true(out.reconstruction is None, "forward reconstruction must be None when config.use_decoder is "
                    f"False, got {type(out.reconstruction).__name__}", ctx)
        return
    assert_true(out.reconstruction is not None, "forward reconstruction is None but config.use_decoder is True", ctx)
    ref_recon, recon32 = ref.reconstruction, lo("reconstruction")
    if not use_labels:
        # Masking by the longest capsule: where the reference has a near tie, accept the backend's
        # choice among the tied classes and compare with the reference's decoding of that choice.
        choice = np.argmax(lengths, axis=1).astype(np.int64)
        ok = _acceptable_argmax(ref.lengths, dtype)
        if any(len(o) > 1 for o in ok) and all(c in o for c, o in zip(choice, ok)):
            ref_recon = ref_model.forward(case.ref_params, case.ref_x, case.config, labels=choice).reconstruction
            recon32 = None
    assert_close(b.to_numpy(out.reconstruction), ref_recon, what="forward reconstruction", level="model", ctx=ctx,
                 ref_float32=recon32)


@reproducible
def model_loss(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """loss(params, x, labels, config, targets): total, margin and reconstruction terms (targets with (B, K) labels)."""
    b = sel.backend
    case = cases.model_case(recipe, dtype)
    ctx = _ctx("loss", sel, dtype, recipe, {"x": case.x, "labels": case.labels, "targets": case.targets})
    p = b.params_from_numpy(case.params, case.config)
    parts = b.loss(p, b.asarray(case.x), b.asarray(case.labels), case.config, **_targets(b, case))
    ref = ref_model.loss(case.ref_params, case.ref_x, case.labels, case.config, case.ref_targets)
    r32 = reference_float32(ref_model.loss, case.ref_params, case.ref_x, case.labels, case.config, case.ref_targets)
    for f in ("total", "margin", "reconstruction"):
        assert_true(hasattr(parts, f), f"loss must return LossParts; got {type(parts).__name__} without .{f}", ctx)
        assert_close(b.to_numpy(getattr(parts, f)), getattr(ref, f), what=f"loss {f}", level="model", ctx=ctx,
                     ref_float32=None if r32 is None else getattr(r32, f))


@reproducible
def model_value_and_grad(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """value_and_grad(params, x, labels, config, targets): the total loss and every parameter's gradient."""
    b = sel.backend
    case = cases.model_case(recipe, dtype)
    ctx = _ctx("value_and_grad", sel, dtype, recipe, {"x": case.x, "labels": case.labels, "targets": case.targets})
    p = b.params_from_numpy(case.params, case.config)
    result = b.value_and_grad(p, b.asarray(case.x), b.asarray(case.labels), case.config, **_targets(b, case))
    got = _outputs(ctx, result, 2, "value_and_grad")
    ref_total, ref_grads = ref_model.value_and_grad(case.ref_params, case.ref_x, case.labels, case.config,
                                                    case.ref_targets)
    r32 = reference_float32(ref_model.value_and_grad, case.ref_params, case.ref_x, case.labels, case.config,
                            case.ref_targets)
    assert_close(b.to_numpy(got[0]), ref_total, what="value_and_grad total", level="model", ctx=ctx,
                 ref_float32=None if r32 is None else r32[0])
    grads = got[1]
    if not isinstance(grads, Mapping):
        ctx.fail(f"value_and_grad grads must be a dict keyed by canonical names, got {type(grads).__name__}")
    # The terms behind each gradient (magnitudes.model_gradients): where the squash saturates, a
    # gradient is a small difference of large terms and only known to a few roundings of those.
    mags = magnitudes.model_gradients(case.ref_params, case.ref_x, case.labels, case.config, case.ref_targets)
    assert_all_close({k: b.to_numpy(v) for k, v in grads.items()}, ref_grads, what="grad", level="gradients",
                     ctx=ctx, ref_float32=None if r32 is None else r32[1], magnitudes=mags)


@reproducible
def model_predict(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """predict(params, x, config): the longest class capsule per example, int64 (near ties accepted)."""
    b = sel.backend
    case = cases.model_case(recipe, dtype)
    ctx = _ctx("predict", sel, dtype, recipe, {"x": case.x})
    p = b.params_from_numpy(case.params, case.config)
    pred = b.to_numpy(b.predict(p, b.asarray(case.x), case.config))
    ref = ref_model.forward(case.ref_params, case.ref_x, case.config)
    _check_choice(ctx, pred, ref.lengths, "predict")


# ---------------------------------------------------------------------------------------- optimizer
def _state_np(ctx: Context, b: Any, state: Any) -> dict:
    s = b.state_to_numpy(state)
    if not isinstance(s, Mapping) or not {"step", "m", "v"} <= set(s):
        ctx.fail(f"state_to_numpy must return {{'step', 'm', 'v'}}, got {type(s).__name__}")
    return s


@reproducible
def adam_step(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """adam_update(params, grads, state, adam) from a given state: new params, moments and step."""
    b = sel.backend
    config, params, grads, state, adam = cases.adam_case(recipe, dtype)
    init = int(recipe["step"]) == 0
    ctx = _ctx("adam_update", sel, dtype, recipe, {"grads": list(grads.values())})
    p = b.params_from_numpy(params, config)
    s = b.adam_init(p) if init else b.state_from_numpy(state, p)
    if init:
        s0 = _state_np(ctx, b, s)
        assert_true(int(s0["step"]) == 0, f"adam_init: step {s0['step']}, expected 0", ctx)
        assert_all_close(s0["m"], state["m"], what="adam_init m", level="exact", ctx=ctx)
        assert_all_close(s0["v"], state["v"], what="adam_init v", level="exact", ctx=ctx)
    result = b.adam_update(p, {k: b.asarray(g) for k, g in grads.items()}, s, adam)
    got = _outputs(ctx, result, 2, "adam_update")
    w = lambda d: {k: cases.widen(a) for k, a in d.items()}  # noqa: E731
    ref_p, ref_s = ref_optim.adam_update(w(params), w(grads), {"step": state["step"], "m": w(state["m"]),
                                                               "v": w(state["v"])}, adam)
    assert_all_close(b.params_to_numpy(got[0]), ref_p, what="adam_update params", level="optimizer", ctx=ctx)
    s1 = _state_np(ctx, b, got[1])
    assert_true(int(s1["step"]) == ref_s["step"], f"adam_update state step {s1['step']}, expected {ref_s['step']}",
                ctx)
    assert_all_close(s1["m"], ref_s["m"], what="adam_update m", level="optimizer", ctx=ctx)
    assert_all_close(s1["v"], ref_s["v"], what="adam_update v", level="optimizer", ctx=ctx)


def _normwise(ctx: Context, actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
              origin: Mapping[str, np.ndarray], lo: Mapping[str, np.ndarray] | None, what: str) -> None:
    """The trajectory level, per parameter tensor:

        ||actual - expected|| <= rtol ||expected - origin|| + K ||lo - expected|| eps / eps32 + 4 eps ||expected||

    i.e. relative to how far the parameters moved since the start, plus the conditioning allowance
    (the float32 reference trajectory's distance from the float64 one, see compare.py)."""
    tol = tolerance(ctx.dtype, "trajectory")
    eps = float(np.finfo(ctx.dtype).eps)
    st = _stats()
    for k, e in expected.items():
        a = actual.get(k)
        if not isinstance(a, np.ndarray) or a.shape != e.shape or a.dtype.name != ctx.dtype:
            ctx.fail(f"{what}[{k!r}]: expected a {ctx.dtype} array of shape {e.shape}, got "
                     f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
        st.comparisons += 1
        if not np.isfinite(a).all():
            ctx.fail(f"{what}[{k!r}]: non-finite values")
        err = float(np.linalg.norm(a.astype(np.float64) - e))
        moved = float(np.linalg.norm(e - origin[k].astype(np.float64)))
        noise = 0.0
        if lo is not None and np.isfinite(lo[k]).all():
            noise = CONDITIONING_FACTOR * float(np.linalg.norm(lo[k].astype(np.float64) - e)) * eps / float(
                np.finfo(np.float32).eps)
        bound = tol.atol + tol.rtol * moved + noise + 4 * eps * float(np.linalg.norm(e))
        ratio = err / bound if bound > 0 else (0.0 if err == 0 else np.inf)
        if ratio > st.max_ratio:
            st.max_ratio, st.worst = ratio, f"{what}[{k!r}]"
        st.max_abs = max(st.max_abs, float(np.abs(a - e).max()) if a.size else 0.0)
        if ratio > 1:
            ctx.fail(f"{what}[{k!r}]: ||backend - reference|| = {err:.3g} exceeds the bound {bound:.3g}: "
                     f"{tol.rtol:.3g} x the reference's change since the start ({moved:.3g}) + conditioning "
                     f"allowance {noise:.3g} (trajectory, {ctx.dtype}; ratio {ratio:.3g})")


@reproducible
def trajectory(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """Several train_step calls from the same params and batches, compared step by step."""
    b = sel.backend
    config = CapsNetConfig.from_dict(recipe["config"])
    adam = AdamConfig(**recipe.get("adam", {}))
    params = cases.model_params(config, recipe["seed"], recipe.get("digit_scale", 1.0), dtype)
    batches = [cases.digits_batch(config, r, dtype) for r in recipe["batches"]]
    ctx = _ctx("train_step trajectory", sel, dtype, recipe, {"x[0]": batches[0][0], "labels[0]": batches[0][1]})
    p = b.params_from_numpy(params, config)
    s = b.adam_init(p)
    rp = {k: cases.widen(v) for k, v in params.items()}
    rs = ref_optim.adam_init(rp)
    lo = narrow(rp) if all(_fits_float32(v) for v in rp.values()) else None
    lo_s = ref_optim.adam_init(lo) if lo is not None else None
    t = tolerance(dtype, "trajectory")
    eps_ratio = float(np.finfo(dtype).eps) / float(np.finfo(np.float32).eps)
    for step, (x, y, targets) in enumerate(batches):
        if step == 0:
            ref_out = ref_model.forward(rp, cases.widen(x), config, labels=y)
        extra = {} if targets is None else {"targets": b.asarray(targets)}
        result = b.train_step(p, s, b.asarray(x), b.asarray(y), config, adam, **extra)
        p, s, metrics = _outputs(ctx, result, 3, "train_step")
        rp, rs, rm = ref_optim.train_step(rp, rs, cases.widen(x), y, config, adam, cases.widen(targets))
        lm = None
        if lo is not None:
            with np.errstate(all="ignore"):
                try:
                    lo, lo_s, lm = ref_optim.train_step(lo, lo_s, narrow(cases.widen(x)), y, config, adam,
                                                        narrow(cases.widen(targets)))
                except ValueError:  # float32 overflowed: no conditioning estimate from here on
                    lo = lm = None
        for f in ("total", "margin", "reconstruction"):
            got = float(np.asarray(b.to_numpy(getattr(metrics, f)), dtype=np.float64).reshape(()))
            want = float(getattr(rm, f))
            if step == 0:
                # Metrics are host floats in the reference (float64), whatever the dtype under test.
                assert_close(np.asarray(got, dtype=np.float64), np.float64(want), what=f"step {step} {f}",
                             level="model", ctx=ctx, dtype="float64",
                             ref_float32=None if lm is None else np.float64(getattr(lm, f)))
            else:
                noise = 0.0 if lm is None else CONDITIONING_FACTOR * abs(float(getattr(lm, f)) - want) * eps_ratio
                assert_true(abs(got - want) <= t.rtol * abs(want) + noise + 1e-30,
                            f"step {step} {f}: backend {got!r}, reference {want!r} (allowed difference "
                            f"{t.rtol * abs(want) + noise:.3g})", ctx)
        assert_true(abs(float(metrics.lr) - rm.lr) <= 1e-12 * rm.lr,
                    f"step {step} lr: backend {metrics.lr!r}, reference {rm.lr!r}", ctx)
        correct = int(np.asarray(b.to_numpy(metrics.correct)).reshape(()))
        if step == 0:
            lo_c, hi_c = _correct_bounds(ref_out.lengths, y, dtype)
            assert_true(lo_c <= correct <= hi_c, f"step 0 correct: backend {correct}, reference {rm.correct} "
                        f"(near ties allow {lo_c} to {hi_c})", ctx)
        else:
            assert_true(0 <= correct <= len(y), f"step {step} correct: {correct} outside [0, {len(y)}]", ctx)
        sn = _state_np(ctx, b, s)
        assert_true(int(sn["step"]) == step + 1, f"after step {step}: state step {sn['step']}, expected {step + 1}",
                    ctx)
        _normwise(ctx, b.params_to_numpy(p), rp, params, lo, what=f"params after step {step}")


# ---------------------------------------------------------------------------------------- properties
@reproducible
def coupling_sums_to_one(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """routing's coupling coefficients are >= 0 and sum to 1 over the parents j, for every child."""
    b = sel.backend
    case = op_case("routing", recipe, dtype)
    ctx = _ctx("coupling sums to 1 over parents", sel, dtype, recipe, {"u_hat": case.args[0]})
    _, c = _outputs(ctx, b.routing(b.asarray(case.args[0]), **case.static), 2, "routing")
    c = b.to_numpy(c)
    assert_true(bool((c >= 0).all()), f"coupling coefficients must be >= 0, min is {c.min()!r}", ctx)
    assert_close(c.sum(axis=2).astype(dtype), np.ones(c.shape[:2]), what="sum over parents of c",
                 level="reduction", ctx=ctx)


@reproducible
def child_permutation(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """Permuting the child capsules (u rows with their weights W_i) leaves v unchanged and permutes c."""
    b = sel.backend
    case = op_case("predictions", recipe, dtype)
    u, w = case.args
    perm = np.random.default_rng(recipe["seed"] + 7).permutation(u.shape[1])
    it = int(recipe.get("iterations", 3))
    ctx = _ctx("child permutation", sel, dtype, recipe, {"u": u, "weight": w})
    v1, c1 = _outputs(ctx, b.routing(b.predictions(b.asarray(u), b.asarray(w)), it), 2, "routing")
    v2, c2 = _outputs(ctx, b.routing(b.predictions(b.asarray(np.ascontiguousarray(u[:, perm])),
                                                   b.asarray(np.ascontiguousarray(w[perm]))), it), 2, "routing")
    v1, c1 = b.to_numpy(v1), b.to_numpy(c1)
    assert_close(b.to_numpy(v2), cases.widen(v1), what="v with permuted children", level="routing", ctx=ctx)
    assert_close(b.to_numpy(c2), cases.widen(c1[:, perm]), what="c with permuted children", level="routing",
                 ctx=ctx)


@reproducible
def squash_direction_and_norm(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """squash keeps each vector's direction and maps its norm below 1 (to 1 only by rounding)."""
    b = sel.backend
    case = op_case("squash", recipe, dtype)
    s = case.args[0]
    ctx = _ctx("squash direction and norm", sel, dtype, recipe, {"s": s})
    v = b.to_numpy(b.squash(b.asarray(s), -1))
    assert_true(isinstance(v, np.ndarray) and v.shape == s.shape, "squash changed the shape", ctx)
    assert_true(bool(np.isfinite(v).all()), "squash returned non-finite values", ctx)
    s64, v64 = s.astype(np.float64), v.astype(np.float64)
    # Norms and cosines on vectors rescaled by their largest component: the squares of components
    # near 1e-150 (float64) underflow, and a check must not fail correct code on its own arithmetic.
    ms = np.abs(s64).max(axis=-1, keepdims=True)
    mv = np.abs(v64).max(axis=-1, keepdims=True)
    rs = s64 / np.where(ms > 0, ms, 1.0)
    rv = v64 / np.where(mv > 0, mv, 1.0)
    nrs, nrv = np.linalg.norm(rs, axis=-1), np.linalg.norm(rv, axis=-1)
    ns, nv = nrs * ms[..., 0], nrv * mv[..., 0]  # |s| and |v| without over- or underflow
    eps = np.finfo(dtype).eps
    assert_true(bool((nv <= 1 + 4 * eps).all()), f"|squash(s)| must be < 1, largest is {nv.max()!r}", ctx)
    small = ns ** 2 < 0.25 / eps  # where |s|^2 / (1 + |s|^2) is representably below 1
    assert_true(bool((nv[small] < 1).all()), "|squash(s)| reached 1 for an s whose squashed norm is below 1", ctx)
    live = (ns > 0) & (nv > 0)
    cos = np.sum(rs * rv, axis=-1)[live] / (nrs[live] * nrv[live])
    assert_true(bool((cos >= 1 - 64 * eps).all()), f"squash changed a direction: smallest cosine "
                f"{cos.min() if cos.size else None!r}", ctx)
    assert_true(bool((v64[ns == 0] == 0).all()), "squash of a zero vector must be 0", ctx)


@reproducible
def zero_vectors(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """Zero capsule vectors: squash, lengths and routing give finite values and zero gradients there."""
    b = sel.backend
    r = dict(recipe, kind="zero_rows")
    case = op_case("squash", r, dtype)
    s = case.args[0]
    zero = np.all(s == 0, axis=-1)
    ctx = _ctx("zero capsule vectors", sel, dtype, r, {"s": s})
    g = np.ones_like(s)
    for what, out in (("squash", b.squash(b.asarray(s))),
                      ("squash_vjp", _single_grad(ctx, b.squash_vjp(b.asarray(g), b.asarray(s)), "squash_vjp")),
                      ("capsule_lengths", b.capsule_lengths(b.asarray(s))),
                      ("capsule_lengths_vjp", _single_grad(ctx, b.capsule_lengths_vjp(
                          b.asarray(np.ones(s.shape[:-1], dtype)), b.asarray(s)), "capsule_lengths_vjp"))):
        a = b.to_numpy(out)
        assert_true(bool(np.isfinite(a).all()), f"{what} is not finite where some capsule vectors are 0", ctx)
        at_zero = a[zero]
        assert_true(bool((at_zero == 0).all()), f"{what} must be exactly 0 at zero vectors, got "
                    f"{at_zero[at_zero != 0][:4].tolist()}", ctx)
    # Routing all-zero predictions: v = 0, c uniform, gradient 0.
    shape = (s.shape[0], 3, 4, s.shape[-1])
    u0 = np.zeros(shape, dtype)
    v, c = _outputs(ctx, b.routing(b.asarray(u0), 3), 2, "routing")
    assert_close(b.to_numpy(v), np.zeros((shape[0], 4, shape[-1])), what="routing v at u_hat = 0",
                 level="exact", ctx=ctx)
    assert_close(b.to_numpy(c), np.full(shape[:3], 0.25), what="routing c at u_hat = 0", level="elementwise",
                 ctx=ctx)
    gv = np.ones((shape[0], 4, shape[-1]), dtype)
    gu = _single_grad(ctx, b.routing_vjp((b.asarray(gv), None), b.asarray(u0), 3), "routing_vjp")
    assert_close(b.to_numpy(gu), np.zeros(shape), what="routing gradient at u_hat = 0", level="exact", ctx=ctx)


@reproducible
def margin_loss_satisfied(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """The margin loss and its gradient are 0 when the true length >= m+ and every other <= m-."""
    b = sel.backend
    r = dict(recipe, kind="satisfied")
    r["m_minus"] = float(recipe["m_minus"]) * 0.99  # stay clear of the float32 rounding of the bounds
    r["m_plus"] = min(1.0, float(recipe["m_plus"]) / 0.99)
    case = op_case("margin_loss", r, dtype)
    static = {"m_plus": recipe["m_plus"], "m_minus": recipe["m_minus"], "lambda_": recipe["lambda_"]}
    ctx = _ctx("margin loss zero when satisfied", sel, dtype, r, {"lengths": case.args[0], "labels": case.args[1]})
    lengths, labels = to_backend(b, case.args)
    value = b.to_numpy(b.margin_loss(lengths, labels, **static))
    assert_true(float(value) == 0.0, f"margin loss {float(value)!r} where every length is on the right side of "
                f"its margin (expected 0)", ctx)
    g = _single_grad(ctx, b.margin_loss_vjp(b.asarray(np.asarray(1.0, dtype)), lengths, labels, **static),
                     "margin_loss_vjp")
    assert_close(b.to_numpy(g), np.zeros(case.args[0].shape), what="margin loss gradient", level="exact", ctx=ctx)


@reproducible
def batch_independence(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """Each example's outputs and prediction depend on that example alone, not on the rest of the batch."""
    b = sel.backend
    case = cases.model_case(recipe, dtype)
    ctx = _ctx("batch independence", sel, dtype, recipe, {"x": case.x})
    p = b.params_from_numpy(case.params, case.config)
    full = b.forward(p, b.asarray(case.x), case.config)
    full_v, full_c = b.to_numpy(full.v), b.to_numpy(full.coupling)
    pred = b.to_numpy(b.predict(p, b.asarray(case.x), case.config))
    for i in range(case.x.shape[0]):
        one = b.forward(p, b.asarray(np.ascontiguousarray(case.x[i:i + 1])), case.config)
        assert_close(full_v[i:i + 1], cases.widen(b.to_numpy(one.v)), what=f"v of example {i} in the batch vs alone",
                     level="model", ctx=ctx)
        assert_close(full_c[i:i + 1], cases.widen(b.to_numpy(one.coupling)),
                     what=f"coupling of example {i} in the batch vs alone", level="model", ctx=ctx)
        alone = b.to_numpy(b.predict(p, b.asarray(np.ascontiguousarray(case.x[i:i + 1])), case.config))
        lengths = cases.widen(b.to_numpy(one.lengths))
        ok = _acceptable_argmax(lengths, dtype)[0]
        assert_true(int(pred[i]) in ok and int(alone[0]) in ok,
                    f"prediction of example {i}: {int(pred[i])} in the batch, {int(alone[0])} alone", ctx)


# ---------------------------------------------------------------------------------------- interchange
@reproducible
def interchange(source: Selected, target: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """Params exported by `source` (params_to_numpy) load into `target` (params_from_numpy) and give the
    same predictions and losses; the round trip through `source` alone is exact. An inference-only
    side (Backend.trains False) takes part with what it has: it is not trained on (the params are
    the case's own), and it is compared on forward's lengths and predict instead of loss."""
    case = cases.model_case(recipe, dtype)
    a, t = source.backend, target.backend
    ctx = _ctx(f"interchange {source.spec} -> {target.spec}", source, dtype, recipe,
               {"x": case.x, "labels": case.labels})
    config = case.config
    pa = a.params_from_numpy(case.params, config)
    rt = a.params_to_numpy(pa)
    assert_all_close(rt, case.params, what=f"{source.spec} params round trip", level="exact", ctx=ctx)
    if a.trains:
        pa, _, _ = a.train_step(pa, a.adam_init(pa), a.asarray(case.x), a.asarray(case.labels), config,
                                **_targets(a, case))
    exported = a.params_to_numpy(pa)
    assert_true(isinstance(exported, Mapping) and list(exported) == list(config.param_shapes()),
                f"params_to_numpy must return the canonical names in order, got {list(exported)}", ctx)
    ref_params = {k: cases.widen(v) for k, v in exported.items()}
    ref_out = ref_model.forward(ref_params, case.ref_x, config)
    # With the drawn labels: one digit per image, or two with their targets (MultiMNIST's loss). No
    # second variant per example: a compiling partner (JAX) would compile the loss once more.
    ref_loss = ref_model.loss(ref_params, case.ref_x, case.labels, config, case.ref_targets)
    pb = t.params_from_numpy(exported, config)
    assert_all_close(t.params_to_numpy(pb), exported, what=f"{target.spec} params after loading {source.spec}'s",
                     level="exact", ctx=ctx)
    for who, bk, p in ((source.spec, a, pa), (target.spec, t, pb)):
        pred = bk.to_numpy(bk.predict(p, bk.asarray(case.x), config))
        _check_choice(ctx, pred, ref_out.lengths, f"{who} predict on {source.spec}'s exported params")
        if not bk.trains:
            lengths = bk.to_numpy(bk.forward(p, bk.asarray(case.x), config).lengths)
            assert_close(lengths, ref_out.lengths, what=f"{who} forward lengths on {source.spec}'s exported params",
                         level="model", ctx=ctx)
            continue
        parts = bk.loss(p, bk.asarray(case.x), bk.asarray(case.labels), config, **_targets(bk, case))
        digits = "" if case.targets is None else f" with {case.labels.shape[1]} digits per image"
        for f in ("total", "margin", "reconstruction"):
            assert_close(bk.to_numpy(getattr(parts, f)), getattr(ref_loss, f),
                         what=f"{who} loss {f}{digits} on {source.spec}'s exported params", level="model", ctx=ctx)


# ---------------------------------------------------------------------------------------- the error contract
def _names_argument(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", message) for n in names)


def _read_all(b: Any, out: Any) -> None:
    """Read every array of a result on the host: a value check deferred by a device backend must
    raise by then at the latest (the contract lets it wait for the caller's next read, no longer)."""
    if out is None or isinstance(out, (bool, int, float, str)):
        return
    if isinstance(out, Mapping):
        for v in out.values():
            _read_all(b, v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            _read_all(b, v)
    elif hasattr(out, "shape") and hasattr(out, "dtype"):
        b.to_numpy(out)


def _expect_value_error(ctx: Context, b: Any, call: Callable[[], Any], err: ErrorInput, what: str) -> None:
    try:
        _read_all(b, call())
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


def _op_of(name: str) -> str | None:
    if name in RECORDS:
        return name
    if name.endswith("_vjp") and name[:-4] in RECORDS:
        return name[:-4]
    return None


def model_error_case(dtype: str) -> ModelErrorCase:
    """A small valid model call (a decoder, labels, an Adam state), the base of the model error inputs."""
    from .strategies import SMALL_CONFIG

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
    t = {} if mc.targets is None else {"targets": b.asarray(mc.targets)}
    calls: dict[str, Callable[[], Any]] = {
        "forward": lambda: b.forward(p, x, config, labels=y),
        "loss": lambda: b.loss(p, x, y, config, **t),
        "value_and_grad": lambda: b.value_and_grad(p, x, y, config, **t),
        "predict": lambda: b.predict(p, x, config),
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
    op = _op_of(name)
    if op is not None:
        rec = record(op)
        err = _find(rec.errors(), error_id)
        case = op_case(op, rec.example, dtype)
        err.change(case)
        inputs = dict(zip(rec.spec.array_args, case.args))
        ctx = _ctx(f"error contract: {name} with {error_id}", sel, dtype, rec.example, inputs)
        args = to_backend(b, case.args)
        if name == op:
            call = lambda: getattr(b, name)(*args, **case.static)  # noqa: E731
        else:
            cot = to_backend(b, case.cot)
            call = lambda: getattr(b, name)(cot, *args, **case.static)  # noqa: E731
    else:
        err = _find(MODEL_ERRORS[name], error_id)
        mc = model_error_case(dtype)
        err.change(mc)
        ctx = _ctx(f"error contract: {name} with {error_id}", sel, dtype, {"config": mc.config.to_dict()},
                   {"x": mc.x, "labels": mc.labels, "targets": mc.targets})
        call = _model_call(b, name, mc)
    _expect_value_error(ctx, b, call, err, f"{name} with {error_id}")


# ---------------------------------------------------------------------------------------- purity
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
    _read_all(b, call())
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
    op = _op_of(name)
    ctx = _ctx(f"purity of {name}", sel, dtype, recipe)
    if op is not None:
        case = op_case(op, recipe, dtype)
        names = record(op).spec.array_args
        args = to_backend(b, case.args)
        given = {n: ("array", a) for n, a in zip(names, args)}
        caller = {n: a for n, a in zip(names, case.args)}
        if name == op:
            call = lambda: getattr(b, name)(*args, **case.static)  # noqa: E731
        else:
            cot = to_backend(b, case.cot)
            given["g"], caller["g"] = ("array", cot), case.cot
            call = lambda: getattr(b, name)(cot, *args, **case.static)  # noqa: E731
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
    t = _targets(b, case)
    if t and name != "forward":
        given["targets"], caller["targets"] = ("array", t["targets"]), case.targets
    calls: dict[str, Callable[[], Any]] = {
        "forward": lambda: b.forward(p, x, config, labels=y),
        "loss": lambda: b.loss(p, x, y, config, **t),
        "value_and_grad": lambda: b.value_and_grad(p, x, y, config, **t),
        "predict": lambda: b.predict(p, x, config),
        "adam_init": lambda: b.adam_init(p),
    }
    if name == "train_step":
        s = b.adam_init(p)
        given["state"] = ("state", s)
        call = lambda: b.train_step(p, s, x, y, config, **t)  # noqa: E731
    else:
        call = calls[name]
    _check_unchanged(ctx, b, name, given, call, caller)
