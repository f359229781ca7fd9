"""Naming the mistake: the known deviations from the paper, each as the value it would give.

When a user's piece disagrees with the reference, check_op computes each known deviant form of that
piece with NumPy on the failing draw and asks which one the user's output (or gradient) matches
within tolerance. A match names the mistake, with a sentence on the paper's rule and the section
of docs/spec.md that settles it. The forms of the mistakes that conformance/broken.py's backends
carry are taken from those backends' patched copies of capsspec.ops (one definition of each
mistake); the others are written here, each in a line or two of NumPy.

Three are recognised by where the user's values go wrong rather than by a form: NaN at zero
vectors (non-finite values where the reference is finite, on a draw with zero capsules), overflow
past sqrt(float max) (every wrong row has |s|^2 beyond the dtype's range), and TF32 rounding
(float32 values outside float32's tolerance but within TF32's, tolerances.py's "tf32" table).

What this module must never do: name a deviation the user's values do not match.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from capsspec import ops as ref_ops

from .compare import conditioning_allowance
from .tolerances import tolerance

__all__ = ["Deviation", "DEVIATIONS", "SPEC", "deviations_of", "name_forward", "name_gradient"]

SPEC = "docs/spec.md"
_DECIDES = f"{SPEC}#2-open-points-the-spec-decides"
_MISTAKES = f"{SPEC}#4-mistakes-earlier-implementations-made"


@dataclass(frozen=True)
class Deviation:
    """A known mistake: its key, a title, the paper's rule (one sentence), the spec section, the pieces it
    concerns, and its value: forward(draw) -> canonical outputs or grads(draw) -> canonical gradients
    (float64; each returns a list of candidate forms, e.g. one per epsilon)."""

    key: str
    title: str
    rule: str
    link: str
    pieces: tuple[str, ...]
    forward: Callable[[Any], list[list[np.ndarray]]] | None = None
    grads: Callable[[Any], list[list[np.ndarray]]] | None = None

    def describe(self) -> str:
        return f"{self.title} ({self.key}). The paper's rule: {self.rule} See {self.link}."


def _broken_ops(key: str) -> Any:
    """The patched copy of capsspec.ops that broken.py's backend `key` runs on."""
    from .broken import BROKEN

    names = BROKEN[key]().impl_modules
    return sys.modules[names[0]]


def _args(d: Any) -> list[Any]:
    return d.case.ref_args


# ---------------------------------------------------------------------------------------- the forms
_EPSILONS = (1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-12)


def _squash_eps_sqrt(d: Any) -> list[list[np.ndarray]]:
    s = _args(d)[0]
    n2 = np.sum(s * s, axis=-1, keepdims=True)
    with np.errstate(all="ignore"):
        return [[n2 / (1 + n2) * s / np.sqrt(n2 + eps)] for eps in _EPSILONS]


def _squash_eps_norm(d: Any) -> list[list[np.ndarray]]:
    s = _args(d)[0]
    n2 = np.sum(s * s, axis=-1, keepdims=True)
    with np.errstate(all="ignore"):
        return [[n2 / (1 + n2) * s / (np.sqrt(n2) + eps)] for eps in _EPSILONS]


def _lengths_eps_sqrt(d: Any) -> list[list[np.ndarray]]:
    v = _args(d)[0]
    return [[np.sqrt(np.sum(v * v, axis=-1) + eps)] for eps in _EPSILONS]


def _head(d: Any, routing: Callable[..., Any] = ref_ops.routing,
          loss: Callable[..., Any] = ref_ops.margin_loss) -> list[np.ndarray]:
    """The capsule head (own_head.py) on the draw, with a deviant routing or margin loss in its place."""
    u, w, labels = _args(d)
    st = d.case.static
    v, _ = routing(ref_ops.predictions(u, w), int(st["iterations"]))
    lengths = ref_ops.capsule_lengths(v)
    return [lengths, np.asarray(loss(lengths, labels, st["m_plus"], st["m_minus"], st["lambda_"]))]


def _routing_broken(key: str) -> Callable[[Any], list[list[np.ndarray]]]:
    def form(d: Any) -> list[list[np.ndarray]]:
        with np.errstate(all="ignore"):
            if d.piece == "capsule_head":
                return [_head(d, routing=_broken_ops(key).routing)]
            return [list(_broken_ops(key).routing(_args(d)[0], int(d.case.static["iterations"])))]
    return form


def _routing_broken_grads(key: str) -> Callable[[Any], list[list[np.ndarray]]]:
    """The gradient of a broken backend's routing, where its VJP is the exact gradient of its forward (the
    iterations' mistakes; not the softmax's or the shared logits', whose VJPs are the reference's)."""
    def form(d: Any) -> list[list[np.ndarray]]:
        if d.piece != "routing":
            return []
        cot = tuple(None if c is None else np.asarray(c, dtype=np.float64) for c in d.cots)
        return [list(_broken_ops(key).routing_vjp(cot, _args(d)[0], int(d.case.static["iterations"])))]
    return form


def _routing_off_by_one_grads(d: Any) -> list[list[np.ndarray]]:
    if d.piece != "routing":
        return []
    k = int(d.case.static["iterations"])
    cot = tuple(None if c is None else np.asarray(c, dtype=np.float64) for c in d.cots)
    return [list(ref_ops.routing_vjp(cot, _args(d)[0], t)) for t in (k - 1, k + 1) if t >= 1]


def _margin_on_softmax_grads(d: Any) -> list[list[np.ndarray]]:
    if d.piece != "margin_loss":
        return []
    g = np.asarray(d.cots[0], dtype=np.float64)
    return [list(_broken_ops("margin_on_softmax").margin_loss_vjp(g, *_args(d), **d.case.static))]


def _routing_off_by_one(d: Any) -> list[list[np.ndarray]]:
    k = int(d.case.static["iterations"])
    if d.piece == "capsule_head":
        return [_head(d, routing=lambda u_hat, _k, t=t: ref_ops.routing(u_hat, t)) for t in (k - 1, k + 1) if t >= 1]
    return [list(ref_ops.routing(_args(d)[0], t)) for t in (k - 1, k + 1) if t >= 1]


def _routing_detached_grads(d: Any) -> list[list[np.ndarray]]:
    ops = _broken_ops("detached_routing_gradient")
    cot = tuple(None if c is None else np.asarray(c, dtype=np.float64) for c in d.cots)
    return [list(ops.routing_vjp(cot, _args(d)[0], int(d.case.static["iterations"])))]


def _margin_scaled(factor: Callable[[Any], float]) -> Callable[[Any], list[list[np.ndarray]]]:
    """The loss times a factor of the lengths' shape (B, J); the head's lengths unchanged."""
    def form(d: Any) -> list[list[np.ndarray]]:
        lengths = d.ref_out[0] if d.piece == "capsule_head" else _args(d)[0]
        return [[*d.ref_out[:-1], np.asarray(d.ref_out[-1] * factor(np.shape(lengths)))]]
    return form


def _margin_deviant(loss: Callable[..., Any]) -> Callable[[Any], list[list[np.ndarray]]]:
    def form(d: Any) -> list[list[np.ndarray]]:
        if d.piece == "capsule_head":
            return [_head(d, loss=loss)]
        st = d.case.static
        return [[np.asarray(loss(*_args(d), st["m_plus"], st["m_minus"], st["lambda_"]))]]
    return form


def _softmax_margin(lengths: Any, labels: Any, m_plus: float, m_minus: float, lambda_: float) -> Any:
    return _broken_ops("margin_on_softmax").margin_loss(lengths, labels, m_plus, m_minus, lambda_)


def _lambda_one_margin(lengths: Any, labels: Any, m_plus: float, m_minus: float, lambda_: float) -> Any:
    return ref_ops.margin_loss(lengths, labels, m_plus, m_minus, 1.0)


def _mask_by_prediction(d: Any) -> list[list[np.ndarray]]:
    v = _args(d)[0]
    return [[ref_ops.mask(v, None).reshape(v.shape)]]


def _recon_scaled(factor: Callable[[Any], float]) -> Callable[[Any], list[list[np.ndarray]]]:
    return lambda d: [[np.asarray(d.ref_out[0] * factor(d))]]


def _pixels(d: Any) -> float:
    return float(np.prod(d.case.args[1].shape[1:]))


DEVIATIONS: tuple[Deviation, ...] = (
    Deviation("softmax_over_children", "softmax over the wrong axis: over the children i instead of the parents j",
              "each child's coupling coefficients c_ij sum to 1 over the parents j (Procedure 1, line 4).",
              f"{_MISTAKES} (1) and {_DECIDES} (4)", ("routing", "capsule_head"),
              forward=_routing_broken("softmax_over_children")),
    Deviation("shared_routing_logits", "routing logits b shared across the batch",
              "b_ij start at 0 for each example; one example's routing never depends on another's.",
              f"{_MISTAKES} (7) and {_DECIDES} (3)", ("routing", "capsule_head"),
              forward=_routing_broken("shared_routing_logits")),
    Deviation("iterations_always_1", "the routing-iterations setting ignored (always 1)",
              "routing runs the number of iterations it is given (the paper uses 3).", f"{_MISTAKES} (8)",
              ("routing", "capsule_head"), forward=_routing_broken("iterations_always_1"),
              grads=_routing_broken_grads("iterations_always_1")),
    Deviation("iterations_always_3", "the routing-iterations setting ignored (always 3)",
              "routing runs the number of iterations it is given (the paper uses 3).", f"{_MISTAKES} (8)",
              ("routing", "capsule_head"), forward=_routing_broken("iterations_always_3"),
              grads=_routing_broken_grads("iterations_always_3")),
    Deviation("iterations_off_by_one", "one routing iteration too few or too many",
              "r iterations compute r softmaxes of b and r outputs v; the last update of b is not used.",
              f"{_DECIDES} (6)", ("routing", "capsule_head"), forward=_routing_off_by_one,
              grads=_routing_off_by_one_grads),
    Deviation("detached_routing", "detached routing / stop-gradient: gradients through the last iteration's "
              "weighted sum only (b, c or the agreement u_hat . v detached)",
              "gradients flow through every routing iteration: b, c and v are never detached.",
              f"{_DECIDES} (5) and {_MISTAKES}", ("routing",), grads=_routing_detached_grads),
    Deviation("squash_epsilon_in_sqrt", "an epsilon inside the square root of squash (s / sqrt(|s|^2 + eps))",
              "squash is exact: v = |s|^2 / (1 + |s|^2) * s / |s|, with value and gradient 0 at s = 0 and no "
              "epsilon anywhere.", f"{_DECIDES} (1)", ("squash",), forward=_squash_eps_sqrt),
    Deviation("squash_epsilon_on_norm", "an epsilon added to the norm in squash (s / (|s| + eps))",
              "squash is exact: v = |s|^2 / (1 + |s|^2) * s / |s|, with value and gradient 0 at s = 0 and no "
              "epsilon anywhere.", f"{_DECIDES} (1)", ("squash",), forward=_squash_eps_norm),
    Deviation("lengths_epsilon_in_sqrt", "an epsilon inside the square root of the capsule length",
              "the length is |v| exactly, 0 at v = 0 with gradient 0 there.", f"{_DECIDES} (2)",
              ("capsule_lengths",), forward=_lengths_eps_sqrt),
    Deviation("margin_on_softmax", "the margin loss on a softmax of the lengths",
              "Eq. 4 applies to the lengths |v_j| themselves.", f"{_MISTAKES} (4) and {_DECIDES} (9)",
              ("margin_loss", "capsule_head"), forward=_margin_deviant(_softmax_margin),
              grads=_margin_on_softmax_grads),
    Deviation("margin_mean_over_classes", "the margin loss averaged over the classes instead of summed",
              "the margin loss sums L_j over the classes and averages over the batch.", f"{_DECIDES} (9)",
              ("margin_loss", "capsule_head"), forward=_margin_scaled(lambda shape: 1.0 / shape[1])),
    Deviation("margin_sum_over_batch", "the margin loss summed over the batch instead of averaged",
              "the margin loss sums L_j over the classes and averages over the batch.", f"{_DECIDES} (9)",
              ("margin_loss", "capsule_head"), forward=_margin_scaled(lambda shape: float(shape[0]))),
    Deviation("margin_without_lambda", "the margin loss without its down-weighting lambda (lambda = 1)",
              "L_j = T_j max(0, m+ - |v_j|)^2 + lambda (1 - T_j) max(0, |v_j| - m-)^2 with lambda = 0.5.",
              f"{SPEC}#1-the-model-as-the-paper-states-it", ("margin_loss", "capsule_head"),
              forward=_margin_deviant(_lambda_one_margin)),
    Deviation("mask_by_prediction_in_training", "masking by the prediction (the longest capsule) in training",
              "in training the mask keeps the true class's capsule; the longest one only without labels.",
              f"{_DECIDES} (10)", ("mask",), forward=_mask_by_prediction),
    Deviation("reconstruction_mean_over_pixels", "the reconstruction loss averaged over the pixels instead of summed",
              "the reconstruction loss is the per-image sum of squared errors times 0.0005, averaged over the batch.",
              f"{_DECIDES} (9)", ("reconstruction_loss",), forward=_recon_scaled(lambda d: 1.0 / _pixels(d))),
    Deviation("reconstruction_sum_over_batch", "the reconstruction loss summed over the batch instead of averaged",
              "the reconstruction loss is the per-image sum of squared errors times 0.0005, averaged over the batch.",
              f"{_DECIDES} (9)", ("reconstruction_loss",),
              forward=_recon_scaled(lambda d: float(d.case.args[0].shape[0]))),
    Deviation("reconstruction_unscaled", "the reconstruction loss without its scale 0.0005",
              "the sum of squared errors is scaled by 0.0005 so that it does not dominate the margin loss.",
              f"{SPEC}#1-the-model-as-the-paper-states-it", ("reconstruction_loss",),
              forward=_recon_scaled(lambda d: 1.0 / float(d.case.static["scale"]))),
    # Recognised by where the values go wrong (see the module docstring), not by a form.
    Deviation("nan_at_zero", "NaN at zero vectors (a division by |s| or a norm's gradient unguarded at 0)",
              "squash and the length are 0 at a zero vector, with gradient 0 there.",
              f"{_MISTAKES} (2) and {_DECIDES} (1, 2)",
              ("squash", "capsule_lengths", "routing", "mask", "capsule_head")),
    Deviation("overflow", "|s|^2 overflows the dtype (NaN, inf or 0 for vectors longer than sqrt(float max))",
              "squash's domain is every s whose |s|^2 is finite in the dtype; no intermediate overflows in it.",
              f"{_DECIDES} (1)", ("squash", "capsule_lengths", "mask")),
    Deviation("tf32", "TF32 rounding of matrix products (float32 inputs kept to 10 mantissa bits)",
              "float32 results are float32's: TF32 (torch.backends.cuda.matmul.allow_tf32, TensorFlow's "
              "tensor_float_32_execution, JAX's default matmul precision on GPUs) is a speed mode asked for by name.",
              f"{_DECIDES} (13) and docs/backends.md", ("predictions", "routing", "capsule_head")),
)


def deviations_of(piece: str) -> list[Deviation]:
    return [dv for dv in DEVIATIONS if piece in dv.pieces]


# ---------------------------------------------------------------------------------------- matching
def _allowance(ref: Any, ref32: Any, dtype: str, level: str) -> Any:
    """The reference's own float32 error on this draw, as compare.assert_close allows it (the same for
    every form: it measures how sensitive the value is to rounding)."""
    return conditioning_allowance(np.asarray(ref, dtype=np.float64), ref32, dtype, tolerance(dtype, level).scale)


def _ratio(user: Any, form: Any, allowance: Any, dtype: str, level: str) -> float:
    """The largest |user - form| as a fraction of the level's tolerance around the form (non-finite values
    must sit where the form's are); inf where they cannot be the same value."""
    user, form = np.asarray(user, dtype=np.float64), np.asarray(form, dtype=np.float64)
    if user.shape != form.shape:
        return np.inf
    bad_u, bad_f = ~np.isfinite(user), ~np.isfinite(form)
    if (bad_u != bad_f).any():
        return np.inf
    tol = tolerance(dtype, level)
    u, f = np.where(bad_u, 0.0, user), np.where(bad_f, 0.0, form)
    scale = np.abs(f).max(axis=-1, keepdims=True) if f.ndim and tol.scale == "row" else np.abs(f).max(initial=0.0)
    bound = tol.atol + tol.rtol * scale + allowance
    with np.errstate(all="ignore"):
        return float(np.max(np.where(bound > 0, np.abs(u - f) / bound, np.where(u == f, 0.0, np.inf)), initial=0.0))


def _best(user: list[Any], refs: list[Any], refs32: list[Any], candidates: list[tuple[Deviation, list[Any]]],
          dtype: str, level: str) -> Deviation | None:
    """The candidate form closest to the user's values, among those that the user's values match (within 4x
    the tolerance) and that are themselves told apart from the reference (beyond the tolerance)."""
    best, best_ratio = None, 4.0
    for dv, form in candidates:
        if len(form) < len(user) or any(u is None for u in user):
            continue
        allow = [_allowance(r, r32, dtype, level) for r, r32 in zip(refs, refs32)]
        apart = max(_ratio(f, r, a, dtype, level) for f, r, a in zip(form, refs, allow))
        if apart <= 1.0:
            continue
        ratio = max(_ratio(u, f, a, dtype, level) for u, f, a in zip(user, form, allow))
        if ratio <= best_ratio:
            best, best_ratio = dv, ratio
    return best


def _zero_capsules(d: Any) -> bool:
    a = d.case.args[0]
    return a.ndim >= 1 and a.size > 0 and bool((np.abs(a).max(axis=-1) == 0).any())


def _overflowing_rows(d: Any, user: list[np.ndarray], level: str, dtype: str) -> bool:
    """Every value that is wrong lies in a capsule whose |s|^2 is beyond the dtype's largest number."""
    a = np.asarray(d.case.ref_args[0], dtype=np.float64)
    big = np.sum((a / np.finfo(dtype).max ** 0.5) ** 2, axis=-1) > 1.0
    if not big.any() or d.piece not in ("squash", "capsule_lengths", "mask"):
        return False
    tol = tolerance(dtype, level)
    for u, r in zip(user, d.ref_out):
        u = np.asarray(u, dtype=np.float64)
        with np.errstate(all="ignore"):
            wrong = ~np.isfinite(u) | (np.abs(u - r) > tol.atol + tol.rtol * np.abs(r).max(initial=0.0) * 4)
        rows = wrong.any(axis=-1) if wrong.ndim == big.ndim + 1 else wrong
        if rows.shape == big.shape and (rows & ~big).any():
            return False
    return True


def _by_place(d: Any, user: list[Any], dtype: str, level: str, refs: list[Any]) -> Deviation | None:
    keyed = {dv.key: dv for dv in deviations_of(d.piece)}
    finite = [np.isfinite(np.asarray(u, dtype=np.float64)).all() for u in user if u is not None]
    if "nan_at_zero" in keyed and not all(finite) and _zero_capsules(d):
        return keyed["nan_at_zero"]
    if "overflow" in keyed and refs is d.ref_out and _overflowing_rows(d, user, level, dtype):
        return keyed["overflow"]
    if "tf32" in keyed and dtype == "float32" and all(finite) and level != "elementwise":
        t = tolerance("tf32", level)  # (called on values that failed float32's tolerance)
        if all(np.all(np.abs(np.asarray(u, np.float64) - r) <= t.atol + t.rtol * np.abs(r).max(initial=0.0) * 1.0)
               for u, r in zip(user, refs) if u is not None):
            return keyed["tf32"]
    return None


def name_forward(d: Any, user: list[np.ndarray], dtype: str, level: str) -> Deviation | None:
    """The known deviation whose value the user's outputs are, on this draw (None: no known one)."""
    with np.errstate(all="ignore"):
        candidates = [(dv, form) for dv in deviations_of(d.piece) if dv.forward is not None for form in dv.forward(d)]
    return _best(user, d.ref_out, d.ref32_out, candidates, dtype, level) or _by_place(d, user, dtype, level, d.ref_out)


def name_gradient(d: Any, user: list[Any], dtype: str, level: str) -> Deviation | None:
    """The known deviation whose gradient the user's gradients are, on this draw (None: no known one)."""
    with np.errstate(all="ignore"):
        candidates = [(dv, form) for dv in deviations_of(d.piece) if dv.grads is not None for form in dv.grads(d)]
    return (_best(user, d.ref_grads, d.ref32_grads, candidates, dtype, level)
            or _by_place(d, user, dtype, level, d.ref_grads))
