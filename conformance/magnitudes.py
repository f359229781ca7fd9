"""Magnitude functions: how large the terms behind each value are, so that tolerances follow conditioning.

A convolution output that is a small difference of large products, or a squash gradient that is
mostly cancelled (the radial part at large |s|), can only be computed to within a few roundings
of the *terms*, not of the result. These functions evaluate the same computation on absolute
values: every product of the reference's formula with its factors replaced by their absolute
values, every difference turned into a sum. The comparison (compare.assert_close) then allows
rtol times that magnitude instead of rtol times a result that cancellation made small.

The squash Jacobian applied to g is f (g + q u (u . g)) with f = |s| / (1 + |s|^2), u = s / |s|
and |q| <= 1; its terms are bounded by f (max|g| + |u| (|u| . |g|)). At a large |s| the radial part
of the result is 2 f / |s|^2 times g: the terms are |s|^2 / 2 times larger than the result, which
is exactly the conditioning that a relative tolerance on the result misses. Gradients of the
whole model (model_gradients) chain these bounds through the network in reverse: the term
magnitude of each parameter's gradient.

The reference's sigmoid (0.5 (1 + tanh(z / 2))) is accurate to an absolute, not relative,
rounding, so decoder values are measured against that too.

Each op's record (records.py) names its forward and VJP magnitude functions; ops without one
compare against the value's own size.

What this module must never do: produce a magnitude smaller than the value itself (the caller
takes the larger of the two), or call a backend.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from capsspec import ops

__all__ = ["conv2d_forward", "conv2d_vjp", "squash_vjp", "primary_forward", "primary_vjp", "predictions_forward",
           "predictions_vjp", "routing_vjp", "decoder_forward", "decoder_vjp", "model_gradients"]


def _abs(a: Any) -> Any:
    if a is None:
        return None
    if isinstance(a, (list, tuple)):
        return type(a)(_abs(x) for x in a)
    return np.abs(a) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a


def _unit_and_factor(s: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """|u| = |s| / |s| (0 at s = 0) and f = |s| / (1 + |s|^2), both overflow-safe."""
    m = np.abs(s).max(axis=axis, keepdims=True)
    safe_m = np.where(m > 0, m, 1.0)
    r = s / safe_m  # rescaled so that squaring cannot under- or overflow
    rn = np.sqrt(np.sum(r * r, axis=axis, keepdims=True))
    n = rn * m
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        f = np.where(n > 0, 1 / (np.where(n > 0, n, 1) + 1 / np.where(n > 0, n, 1)), 0.0)
        unit = np.where(m > 0, np.abs(r) / np.where(rn > 0, rn, 1), 0.0)
    return unit, f


def _squash_terms(s: np.ndarray, g: np.ndarray, axis: int = -1) -> np.ndarray:
    """Term magnitude of the squash VJP at s applied to g >= 0 (see the module docstring)."""
    unit, f = _unit_and_factor(s, axis)
    return f * (g.max(axis=axis, keepdims=True) + unit * np.sum(unit * g, axis=axis, keepdims=True))


# ---------------------------------------------------------------------------------------- ops
def conv2d_forward(args: list[Any], static: Mapping[str, Any]) -> list[np.ndarray]:
    return [ops.conv2d(*_abs(args), **static)]


def conv2d_vjp(g: Any, args: list[Any], static: Mapping[str, Any]) -> list[np.ndarray]:
    return list(ops.conv2d_vjp(np.abs(g), *_abs(args), **static))


def squash_vjp(g: Any, args: list[Any], static: Mapping[str, Any]) -> list[np.ndarray]:
    return [_squash_terms(args[0], np.abs(g), static.get("axis", -1))]


def primary_forward(args: list[Any], static: Mapping[str, Any]) -> list[np.ndarray]:
    d, stride = static["capsule_dim"], static["stride"]
    s_abs = ops._to_capsules(ops.conv2d(*_abs(args), stride), d)
    s = ops._to_capsules(ops.conv2d(*args, stride), d)
    _, f = _unit_and_factor(s)
    return [f * s_abs.max(axis=-1, keepdims=True) + np.abs(ops.squash(s))]


def primary_vjp(g: Any, args: list[Any], static: Mapping[str, Any]) -> list[np.ndarray]:
    h, w, b = args
    d, stride = static["capsule_dim"], static["stride"]
    a = ops.conv2d(h, w, b, stride)
    gs = _squash_terms(ops._to_capsules(a, d), np.abs(g))
    ga = np.ascontiguousarray(ops._from_capsules(gs, a.shape, d))
    return list(ops.conv2d_vjp(ga, *_abs(args), stride))


def predictions_forward(args: list[Any], static: Mapping[str, Any]) -> list[np.ndarray]:
    return [ops.predictions(*_abs(args))]


def predictions_vjp(g: Any, args: list[Any], static: Mapping[str, Any]) -> list[np.ndarray]:
    return list(ops.predictions_vjp(np.abs(g), *_abs(args)))


def routing_terms(u_hat: np.ndarray, iterations: int, g_v: np.ndarray, g_c: np.ndarray | None,
                  none_of_the_above: bool = False) -> np.ndarray:
    """Term magnitude of routing's VJP: its reverse pass through every iteration, on absolute values.

    Forward (per example): c_t = softmax_j(b_t) (with none_of_the_above's 0 logit when set, whose
    softmax VJP has the same form), s_t = sum_i c_t u_hat, v_t = squash(s_t),
    b_{t+1} = b_t + u_hat . v_t. Reverse: each product's factors by their absolute values, the
    softmax's c (gc - sum c gc) by c (gc + sum c gc), the squash by _squash_terms."""
    ut = u_hat.transpose(0, 2, 1, 3)  # (B, J, N, E)
    aut = np.abs(ut)
    logits = np.zeros(ut.shape[:3])
    cs, ss, vs = [], [], []
    for t in range(iterations):
        c = ops._softmax(logits, 1, none_of_the_above)
        s = np.einsum("bjn,bjne->bje", c, ut)
        v = ops.squash(s)
        cs.append(c), ss.append(s), vs.append(v)
        logits = logits + np.einsum("bjne,bje->bjn", ut, v)
    g_ut = np.zeros_like(aut)
    g_logits = None
    for t in reversed(range(iterations)):
        c, s, v = cs[t], ss[t], vs[t]
        gv = np.abs(g_v) if t == iterations - 1 else np.zeros_like(v)
        if g_logits is not None:
            gv = gv + np.einsum("bjn,bjne->bje", g_logits, aut)
            g_ut = g_ut + g_logits[..., None] * np.abs(v)[:, :, None, :]
        gs = _squash_terms(s, gv)
        g_ut = g_ut + c[..., None] * gs[:, :, None, :]
        gc = np.einsum("bjne,bje->bjn", aut, gs)
        if t == iterations - 1 and g_c is not None:
            gc = gc + np.abs(g_c).transpose(0, 2, 1)
        g_prev = c * (gc + np.sum(c * gc, axis=1, keepdims=True))
        g_logits = g_prev if g_logits is None else g_logits + g_prev
    return np.ascontiguousarray(g_ut.transpose(0, 2, 1, 3))


def routing_vjp(g: Any, args: list[Any], static: Mapping[str, Any]) -> list[np.ndarray]:
    return [routing_terms(args[0], static["iterations"], g[0], g[1], static.get("none_of_the_above", False))]


def _decoder_forward_abs(x: np.ndarray, ws: list, bs: list) -> tuple[np.ndarray, list]:
    hs, h = [x], x
    for k, (w, b) in enumerate(zip(ws, bs)):
        z = h @ w.T + b
        h = ops._sigmoid(z) if k == len(ws) - 1 else np.maximum(z, 0)
        hs.append(h)
    return h, hs


def decoder_forward(args: list[Any], static: Mapping[str, Any]) -> list[np.ndarray]:
    return [np.ones((*args[0].shape[:-1], args[1][-1].shape[0]))]


def decoder_terms(g: np.ndarray, x: np.ndarray, ws: list, bs: list) -> tuple[np.ndarray, list, list]:
    lead = x.shape[:-1]  # x (..., width): rows, as the decoder sees them
    x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    out, hs = _decoder_forward_abs(x, ws, bs)
    # The reference's sigmoid, hence out (1 - out), is known to a few absolute roundings only
    # (1 + tanh(z / 2) cancels for z << 0): floor the factor at 1/64, so that with the
    # contraction level's rtol of 512 eps it may be off by 8 roundings.
    gz = np.abs(g) * np.maximum(out * (1 - out), 1 / 64)
    gws, gbs = [None] * len(ws), [None] * len(ws)
    gh = gz
    for k in reversed(range(len(ws))):
        gws[k] = gz.T @ np.abs(hs[k])
        gbs[k] = gz.sum(axis=0)
        gh = gz @ np.abs(ws[k])
        if k > 0:
            gz = gh * (hs[k] > 0)
    return gh.reshape(*lead, gh.shape[-1]), gws, gbs


def decoder_vjp(g: Any, args: list[Any], static: Mapping[str, Any]) -> list[Any]:
    return list(decoder_terms(g, *args))


# ---------------------------------------------------------------------------------------- the model
def model_gradients(params: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray,
                    config: Any, targets: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Term magnitude of every parameter's gradient of the total loss (float64 inputs).

    The reference's reverse pass (capsspec.model.value_and_grad) with each step's terms by their
    absolute values: the losses' gradients as they are (they are well conditioned), the length's
    v / |v|, routing, predictions, PrimaryCaps' squash and convolution, the ReLU's mask and conv1."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    a1 = ops.conv2d(x, p["conv1.weight"], p["conv1.bias"], config.conv1_stride)
    h1 = np.maximum(a1, 0)
    a2 = ops.conv2d(h1, p["primary.weight"], p["primary.bias"], config.primary_stride)
    s2 = ops._to_capsules(a2, config.primary_dim)
    u = ops.squash(s2)
    u_hat = ops.predictions(u, p["digit.weight"])
    v, _ = ops.routing(u_hat, config.routing_iterations, config.none_of_the_above)
    lengths = ops.capsule_lengths(v)
    one = np.ones(())
    (g_len,) = ops.margin_loss_vjp(one, lengths, labels, config.m_plus, config.m_minus, config.lambda_)
    unit, _ = _unit_and_factor(v)
    g_v = np.abs(g_len)[..., None] * unit
    grads: dict[str, np.ndarray] = {}
    if config.use_decoder:
        onehot = ops._mask_onehot(v, labels)  # (B, J), or (B, K, J) for two digits
        masked = ops._apply_mask(v, onehot)
        n = config.num_decoder_layers
        ws = [p[f"decoder.{k}.weight"] for k in range(n)]
        bs = [p[f"decoder.{k}.bias"] for k in range(n)]
        recon = ops.decoder(masked, ws, bs)
        (g_rec,) = ops.reconstruction_loss_vjp(one, recon, x if targets is None else targets,
                                               config.reconstruction_scale)
        g_masked, gws, gbs = decoder_terms(g_rec, masked, ws, bs)
        for k in range(n):
            grads[f"decoder.{k}.weight"], grads[f"decoder.{k}.bias"] = gws[k], gbs[k]
        g_v = g_v + ops._unmask(g_masked, v, onehot)
    g_uhat = routing_terms(u_hat, config.routing_iterations, g_v, None, config.none_of_the_above)
    g_u, grads["digit.weight"] = ops.predictions_vjp(g_uhat, np.abs(u), np.abs(p["digit.weight"]))
    g_s2 = _squash_terms(s2, g_u)
    g_a2 = np.ascontiguousarray(ops._from_capsules(g_s2, a2.shape, config.primary_dim))
    g_h1, grads["primary.weight"], grads["primary.bias"] = ops.conv2d_vjp(
        g_a2, np.abs(h1), np.abs(p["primary.weight"]), np.abs(p["primary.bias"]), config.primary_stride)
    _, grads["conv1.weight"], grads["conv1.bias"] = ops.conv2d_vjp(
        g_h1 * (a1 > 0), np.abs(x), np.abs(p["conv1.weight"]), np.abs(p["conv1.bias"]), config.conv1_stride)
    return {k: grads[k] for k in params}
