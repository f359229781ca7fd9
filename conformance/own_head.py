"""The capsule head as one piece: a user's forward pass from the primary capsules to the loss.

    capsule_head(u, weight, labels) -> (lengths, loss)

is predictions, routing (the given iterations), capsule lengths and the margin loss composed, the
part of the model where most of the paper's mistakes live; its reference is capsspec.ops's ops
composed in float64, and its gradients with respect to u and the W_ij are those ops' VJPs chained.
A user who has the pieces as separate functions composes them in a few lines (their own layout
throughout) and checks the composition like any piece: values and gradients at the model's
tolerance levels ("model", "gradients"), since four ops' roundings add up.

What this module must never do: compute the head otherwise than by capsspec.ops's functions.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from hypothesis import strategies as st

from capsspec import ops as ref_ops

from . import strategies as S
from .cases import labels_for, values

__all__ = ["PAPER_MARGINS", "head_recipes", "build_head", "head", "head_vjp", "LEVELS"]

PAPER_MARGINS = {"m_plus": 0.9, "m_minus": 0.1, "lambda_": 0.5}
LEVELS = ("model", "gradients")


def head_recipes(dtype: str, iterations: int | None) -> st.SearchStrategy[dict[str, Any]]:
    """Sizes as predictions' record draws them, values in routing's well-conditioned range."""
    its = S.sizes(iterations=(1, 5)) if iterations is None else st.just({"iterations": int(iterations)})
    return S.recipe(S.seeds, S.values("routing", dtype), S.batch, S.sizes(N=(1, 8), D=(1, 5), J=(2, 5), E=(1, 5)),
                    its, S.cotangents, K=0, **PAPER_MARGINS)


def build_head(r: Mapping[str, Any], dtype: str, rng: np.random.Generator) -> tuple[list[Any], dict[str, Any]]:
    scale = int(r.get("scale", 0))
    u = values(rng, (r["B"], r["N"], r["D"]), r.get("kind", "normal"), scale, dtype, tuple(r.get("row_scales",
                                                                                                    (scale, scale))))
    w = values(rng, (r["N"], r["J"], r["E"], r["D"]), "normal", 0, dtype)
    labels = labels_for(rng, r["B"], r["J"])
    static = {"iterations": int(r["iterations"]), **{k: r[k] for k in PAPER_MARGINS}}
    return [u, w, labels], static


def head(u: np.ndarray, weight: np.ndarray, labels: np.ndarray, iterations: int, m_plus: float, m_minus: float,
         lambda_: float) -> tuple[np.ndarray, np.ndarray]:
    v, _ = ref_ops.routing(ref_ops.predictions(u, weight), iterations)
    lengths = ref_ops.capsule_lengths(v)
    return lengths, ref_ops.margin_loss(lengths, labels, m_plus, m_minus, lambda_)


def head_vjp(g: tuple[Any, Any], u: np.ndarray, weight: np.ndarray, labels: np.ndarray, iterations: int,
             m_plus: float, m_minus: float, lambda_: float) -> tuple[np.ndarray, np.ndarray]:
    """The gradients (u, weight) of <lengths, g_lengths> + loss * g_loss, by the ops' VJPs chained."""
    g_lengths, g_loss = g
    u_hat = ref_ops.predictions(u, weight)
    v, _ = ref_ops.routing(u_hat, iterations)
    lengths = ref_ops.capsule_lengths(v)
    g_loss = np.zeros((), dtype=lengths.dtype) if g_loss is None else np.asarray(g_loss, dtype=lengths.dtype)
    (gl,) = ref_ops.margin_loss_vjp(g_loss, lengths, labels, m_plus, m_minus, lambda_)
    if g_lengths is not None:
        gl = gl + g_lengths
    (gv,) = ref_ops.capsule_lengths_vjp(np.ascontiguousarray(gl, dtype=v.dtype), v)
    (gu_hat,) = ref_ops.routing_vjp((gv, None), u_hat, iterations)
    return tuple(ref_ops.predictions_vjp(gu_hat, u, weight))  # type: ignore[return-value]
