"""The optimizer checks: one adam_update from a given state, and a short train_step trajectory.

The optimizer state reaches the backend through adam_init or state_from_numpy and leaves it through
state_to_numpy. A trajectory is compared step by step, norm-wise on how far the parameters moved
(the trajectory level of tolerances.py), with the float32 reference trajectory's own distance from
the float64 one as the conditioning allowance.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from capsspec import model as ref_model
from capsspec import optim as ref_optim
from capsspec.config import AdamConfig, CapsNetConfig

from . import cases
from .check_kit import context, fits_float32, narrow, outputs
from .compare import CONDITIONING_FACTOR, Context, assert_all_close, assert_close, assert_true, check_stats
from .repro_line import reproducible
from .selection import Selected
from .tolerances import tolerance

__all__ = ["adam_step", "trajectory"]


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
    ctx = context("adam_update", sel, dtype, recipe, {"grads": list(grads.values())})
    p = b.params_from_numpy(params, config)
    s = b.adam_init(p) if init else b.state_from_numpy(state, p)
    if init:
        s0 = _state_np(ctx, b, s)
        assert_true(int(s0["step"]) == 0, f"adam_init: step {s0['step']}, expected 0", ctx)
        assert_all_close(s0["m"], state["m"], what="adam_init m", level="exact", ctx=ctx)
        assert_all_close(s0["v"], state["v"], what="adam_init v", level="exact", ctx=ctx)
    result = b.adam_update(p, {k: b.asarray(g) for k, g in grads.items()}, s, adam)
    got = outputs(ctx, result, 2, "adam_update")
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
    st = check_stats()
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
def trajectory(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """Several train_step calls from the same params and batches, compared step by step."""
    b = sel.backend
    config = CapsNetConfig.from_dict(recipe["config"])
    adam = AdamConfig(**recipe.get("adam", {}))
    params = cases.model_params(config, recipe["seed"], recipe.get("digit_scale", 1.0), dtype)
    batches = [cases.digits_batch(config, r, dtype) for r in recipe["batches"]]
    ctx = context("train_step trajectory", sel, dtype, recipe, {"x[0]": batches[0][0], "labels[0]": batches[0][1]})
    p = b.params_from_numpy(params, config)
    s = b.adam_init(p)
    rp = {k: cases.widen(v) for k, v in params.items()}
    rs = ref_optim.adam_init(rp)
    lo = narrow(rp) if all(fits_float32(v) for v in rp.values()) else None
    lo_s = ref_optim.adam_init(lo) if lo is not None else None
    t = tolerance(dtype, "trajectory")
    eps_ratio = float(np.finfo(dtype).eps) / float(np.finfo(np.float32).eps)
    for step, (x, y, targets) in enumerate(batches):
        if step == 0:
            ref_out = ref_model.forward(rp, cases.widen(x), config, labels=y)
        extra = {} if targets is None else {"targets": b.asarray(targets)}
        result = b.train_step(p, s, b.asarray(x), b.asarray(y), config, adam, **extra)
        p, s, metrics = outputs(ctx, result, 3, "train_step")
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
