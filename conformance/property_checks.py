"""The property checks: what the paper's model must satisfy, checked on the backend's own results.

Coupling coefficients sum to 1 over the parents, permuting the child capsules permutes c and
leaves v alone, squash keeps directions and maps norms below 1, zero capsule vectors give finite
values and zero gradients, the margin loss is 0 where every margin is met, and each example's
results do not depend on the rest of its batch. No reference is involved (beyond building cases).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from . import cases
from .check_kit import acceptable_argmax, context, outputs, single_grad, to_backend
from .compare import assert_close, assert_true
from .records import op_case
from .repro_line import reproducible
from .selection import Selected

__all__ = ["coupling_sums_to_one", "child_permutation", "squash_direction_and_norm", "zero_vectors",
           "margin_loss_satisfied", "batch_independence"]


@reproducible
def coupling_sums_to_one(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """routing's coupling coefficients are >= 0 and sum to 1 over the parents j, for every child; with
    none_of_the_above, to less than 1 (the rest goes to the extra logit), and to J / (J + 1) after one
    iteration, when every logit is still 0."""
    b = sel.backend
    case = op_case("routing", recipe, dtype)
    ctx = context("coupling sums to 1 over parents", sel, dtype, recipe, {"u_hat": case.args[0]})
    _, c = outputs(ctx, b.routing(b.asarray(case.args[0]), **case.static), 2, "routing")
    c = b.to_numpy(c)
    assert_true(bool((c >= 0).all()), f"coupling coefficients must be >= 0, min is {c.min()!r}", ctx)
    sums = c.sum(axis=2).astype(dtype)
    if not case.static.get("none_of_the_above"):
        assert_close(sums, np.ones(c.shape[:2]), what="sum over parents of c", level="reduction", ctx=ctx)
    elif case.static["iterations"] == 1:
        j = c.shape[2]
        assert_close(sums, np.full(c.shape[:2], j / (j + 1)), what="sum over parents of c (none of the above, "
                     "first iteration)", level="reduction", ctx=ctx)
    else:  # below 1, or 1 by rounding where the extra logit's share is below the dtype's resolution
        slack = 1 + 4 * c.shape[2] * float(np.finfo(dtype).eps)
        assert_true(bool((sums <= slack).all()), f"with none_of_the_above the coupling coefficients must sum "
                    f"to at most 1 over the parents, max is {sums.max()!r}", ctx)


@reproducible
def child_permutation(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """Permuting the child capsules (u rows with their weights W_i) leaves v unchanged and permutes c."""
    b = sel.backend
    case = op_case("predictions", recipe, dtype)
    u, w = case.args
    perm = np.random.default_rng(recipe["seed"] + 7).permutation(u.shape[1])
    it = int(recipe.get("iterations", 3))
    ctx = context("child permutation", sel, dtype, recipe, {"u": u, "weight": w})
    v1, c1 = outputs(ctx, b.routing(b.predictions(b.asarray(u), b.asarray(w)), it), 2, "routing")
    v2, c2 = outputs(ctx, b.routing(b.predictions(b.asarray(np.ascontiguousarray(u[:, perm])),
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
    ctx = context("squash direction and norm", sel, dtype, recipe, {"s": s})
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
    ctx = context("zero capsule vectors", sel, dtype, r, {"s": s})
    g = np.ones_like(s)
    for what, out in (("squash", b.squash(b.asarray(s))),
                      ("squash_vjp", single_grad(ctx, b.squash_vjp(b.asarray(g), b.asarray(s)), "squash_vjp")),
                      ("capsule_lengths", b.capsule_lengths(b.asarray(s))),
                      ("capsule_lengths_vjp", single_grad(ctx, b.capsule_lengths_vjp(
                          b.asarray(np.ones(s.shape[:-1], dtype)), b.asarray(s)), "capsule_lengths_vjp"))):
        a = b.to_numpy(out)
        assert_true(bool(np.isfinite(a).all()), f"{what} is not finite where some capsule vectors are 0", ctx)
        at_zero = a[zero]
        assert_true(bool((at_zero == 0).all()), f"{what} must be exactly 0 at zero vectors, got "
                    f"{at_zero[at_zero != 0][:4].tolist()}", ctx)
    # Routing all-zero predictions: v = 0, c uniform, gradient 0.
    shape = (s.shape[0], 3, 4, s.shape[-1])
    u0 = np.zeros(shape, dtype)
    v, c = outputs(ctx, b.routing(b.asarray(u0), 3), 2, "routing")
    assert_close(b.to_numpy(v), np.zeros((shape[0], 4, shape[-1])), what="routing v at u_hat = 0",
                 level="exact", ctx=ctx)
    assert_close(b.to_numpy(c), np.full(shape[:3], 0.25), what="routing c at u_hat = 0", level="elementwise",
                 ctx=ctx)
    gv = np.ones((shape[0], 4, shape[-1]), dtype)
    gu = single_grad(ctx, b.routing_vjp((b.asarray(gv), None), b.asarray(u0), 3), "routing_vjp")
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
    ctx = context("margin loss zero when satisfied", sel, dtype, r, {"lengths": case.args[0], "labels": case.args[1]})
    lengths, labels = to_backend(b, case.args)
    value = b.to_numpy(b.margin_loss(lengths, labels, **static))
    assert_true(float(value) == 0.0, f"margin loss {float(value)!r} where every length is on the right side of "
                f"its margin (expected 0)", ctx)
    g = single_grad(ctx, b.margin_loss_vjp(b.asarray(np.asarray(1.0, dtype)), lengths, labels, **static),
                    "margin_loss_vjp")
    assert_close(b.to_numpy(g), np.zeros(case.args[0].shape), what="margin loss gradient", level="exact", ctx=ctx)


@reproducible
def batch_independence(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """Each example's outputs and prediction depend on that example alone, not on the rest of the batch."""
    b = sel.backend
    case = cases.model_case(recipe, dtype)
    ctx = context("batch independence", sel, dtype, recipe, {"x": case.x})
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
        ok = acceptable_argmax(lengths, dtype)[0]
        assert_true(int(pred[i]) in ok and int(alone[0]) in ok,
                    f"prediction of example {i}: {int(pred[i])} in the batch, {int(alone[0])} alone", ctx)
