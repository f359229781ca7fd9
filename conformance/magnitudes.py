"""Magnitude hints: how large the terms behind each value are, so tolerances scale with them.

A convolution output that is a small difference of large products, or a squash gradient that is
mostly cancelled (the radial part at large |s|), can only be computed to within a few roundings
of the *terms*, not of the result. For the ops where that happens, these functions evaluate the
same contractions on absolute values (and the squash factor |s| / (1 + |s|^2) on the actual
norms): the comparison then allows rtol times that magnitude instead of rtol times a result
that cancellation made small. The reference's sigmoid (0.5 (1 + tanh(z / 2))) is accurate to an
absolute, not relative, rounding, so decoder values are measured against that too.

What this module must never do: produce a magnitude smaller than the value itself (the caller
takes the larger of the two), or call a backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from capsspec import ops

__all__ = ["forward_magnitude", "vjp_magnitude"]


def _squash_factor(s: np.ndarray, axis: int = -1) -> np.ndarray:
    n = np.sqrt(np.sum(s * s, axis=axis, keepdims=True))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        f = np.where(n > 0, 1 / (np.where(n > 0, n, 1) + 1 / np.where(n > 0, n, 1)), 0.0)
    return f


def _rowmax(a: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.abs(a).max(axis=axis, keepdims=True)


def _decoder_forward_abs(x: np.ndarray, ws: list, bs: list) -> tuple[np.ndarray, list]:
    hs, h = [x], x
    for k, (w, b) in enumerate(zip(ws, bs)):
        z = h @ w.T + b
        h = ops._sigmoid(z) if k == len(ws) - 1 else np.maximum(z, 0)
        hs.append(h)
    return h, hs


def forward_magnitude(name: str, args: list[Any], static: dict[str, Any]) -> list[Any] | None:
    """Per output of op `name`, an array of term magnitudes (float64), or None for "the value's own"."""
    a = [None if x is None else (np.abs(x) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x) for x in args]
    if name == "conv2d":
        return [ops.conv2d(a[0], a[1], a[2], **static)]
    if name == "predictions":
        return [ops.predictions(a[0], a[1])]
    if name == "decoder":
        return [np.ones((args[0].shape[0], args[1][-1].shape[0]))]
    if name == "primary_capsules":
        s_abs = ops._to_capsules(ops.conv2d(a[0], a[1], a[2], static["stride"]), static["capsule_dim"])
        s = ops._to_capsules(ops.conv2d(args[0], args[1], args[2], static["stride"]), static["capsule_dim"])
        return [_squash_factor(s) * _rowmax(s_abs) + np.abs(ops.squash(s))]
    return None


def vjp_magnitude(name: str, g: Any, args: list[Any], static: dict[str, Any]) -> list[Any] | None:
    """Per gradient of op `name`'s VJP, term magnitudes shaped like it (lists for the decoder), or None."""
    if name == "conv2d":
        return list(ops.conv2d_vjp(np.abs(g), np.abs(args[0]), np.abs(args[1]), np.abs(args[2]), **static))
    if name == "predictions":
        return list(ops.predictions_vjp(np.abs(g), np.abs(args[0]), np.abs(args[1])))
    if name == "squash":
        axis = static.get("axis", -1)
        return [_squash_factor(args[0], axis) * _rowmax(g, axis) * np.ones_like(args[0])]
    if name == "primary_capsules":
        h, w, b = args
        a = ops.conv2d(h, w, b, static["stride"])
        s = ops._to_capsules(a, static["capsule_dim"])
        gs = _squash_factor(s) * _rowmax(g) * np.ones_like(s)
        ga = np.ascontiguousarray(ops._from_capsules(gs, a.shape, static["capsule_dim"]))
        return list(ops.conv2d_vjp(ga, np.abs(h), np.abs(w), np.abs(b), static["stride"]))
    if name == "routing":
        # The last iteration's squash gradient, spread over the children by c; the feedback
        # through the logits adds terms no larger than the value itself.
        g_v = g[0]
        (_, _), (_, cs, ss, _) = ops._routing_fwd(args[0], static["iterations"])
        c, s = cs[-1], ss[-1]  # (B, J, N), (B, J, E)
        per_parent = _squash_factor(s) * _rowmax(g_v)  # (B, J, 1)
        return [np.ascontiguousarray((c[..., None] * per_parent[:, :, None, :]).transpose(0, 2, 1, 3))
                * np.ones_like(args[0])]
    if name == "decoder":
        x, ws, bs = args
        out, hs = _decoder_forward_abs(x, ws, bs)
        # The reference's sigmoid, hence out (1 - out), is known to a few absolute roundings only
        # (1 + tanh(z / 2) cancels for z << 0): floor the factor at 1/64, so that with the
        # contraction level's rtol of 512 eps it may be off by 8 roundings.
        gz = np.abs(g) * np.maximum(out * (1 - out), 1 / 64)
        gws, gbs = [None] * len(ws), [None] * len(ws)
        gh = None
        for k in reversed(range(len(ws))):
            gws[k] = gz.T @ np.abs(hs[k])
            gbs[k] = gz.sum(axis=0)
            gh = gz @ np.abs(ws[k])
            if k > 0:
                gz = gh * (hs[k] > 0)
        return [gh, gws, gbs]
    return None
