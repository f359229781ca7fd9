"""The spec's ops and their VJPs on CUDA arrays: the CuPy backend's own implementation.

Same names, signatures and results as capsspec.ops (the spec; its module docstring fixes every
numerical choice: exact squash with value and gradient 0 at 0, softmax over the parents, b per
example, gradients through every routing iteration, capsule and mask order). CuPy has no
autodiff, so every VJP here is the hand-derived one, evaluated on the device:

* convolutions are im2col (one strided-view copy) + a cuBLAS GEMM; their input gradient is a
  GEMM + the col2im kernel;
* predictions and the routing contractions are batched cuBLAS matmuls;
* squash, the routing softmax / agreement updates and their VJPs are custom kernels
  (backends/cupy/kernels.py);
* the decoder is cuBLAS GEMMs with elementwise ReLU / sigmoid.

The array module is taken from the inputs: cupy.ndarray inputs run on the GPU (on the device
that holds them); numpy.ndarray inputs run the very same code with NumPy and the kernels'
fallbacks, which is how this module is tested on machines without a GPU. Inputs of one call
must all be of one kind. Shapes and dtypes are validated (ValueError); finiteness is checked
only for NumPy inputs, since checking device arrays would stall the GPU.

What this module must never do: import cupy at module level, import the reference's
implementation (capsspec.ops), keep state, or change its inputs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np

from capsspec.validation import FLOAT_DTYPES, check_float_array, check_labels, check_same_dtype

from . import kernels

__all__ = [
    "conv2d", "conv2d_vjp",
    "squash", "squash_vjp",
    "primary_capsules", "primary_capsules_vjp",
    "predictions", "predictions_vjp",
    "routing", "routing_vjp",
    "capsule_lengths", "capsule_lengths_vjp",
    "margin_loss", "margin_loss_vjp",
    "mask", "mask_vjp",
    "decoder", "decoder_vjp",
    "reconstruction_loss", "reconstruction_loss_vjp",
]

Array = Any  # cupy.ndarray, or numpy.ndarray on the CPU path


# ============================================================================== validation helpers
def array_module(name: str, a: Any) -> Any:
    """cupy for a cupy.ndarray, numpy for a numpy.ndarray; ValueError for anything else."""
    if isinstance(a, np.ndarray):
        return np
    if type(a).__module__.split(".", 1)[0] == "cupy":
        import cupy

        if isinstance(a, cupy.ndarray):
            return cupy
    raise ValueError(
        f"{name} must be a cupy.ndarray (or a numpy.ndarray, which runs the same code on the CPU) "
        f"of float32 or float64, got {type(a).__name__}"
    )


def device_scope(xp: Any, a: Any):
    """Run on the device that holds `a` (a no-op for NumPy)."""
    return contextlib.nullcontext() if xp is np else a.device


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_float(xp: Any, name: str, a: Any, *, ndim: int | None = None,
                shape: Sequence[int | None] | None = None) -> Array:
    """A float32/float64 array of module xp with the given rank/shape (finite, for NumPy)."""
    if xp is np:
        return check_float_array(name, a, ndim=ndim, shape=shape)
    if not isinstance(a, xp.ndarray):
        raise ValueError(f"{name} must be a {xp.__name__}.ndarray like the call's other inputs, got {type(a).__name__}")
    if a.dtype.name not in FLOAT_DTYPES:
        raise ValueError(f"{name} must have dtype float32 or float64, got {a.dtype.name}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and a.ndim != ndim:
        want = f"shape {_fmt_shape(shape)}" if shape is not None else f"{ndim} dimensions"
        raise ValueError(f"{name} must have {want}, got shape {tuple(a.shape)}")
    if shape is not None and any(w is not None and w != g for w, g in zip(shape, a.shape)):
        raise ValueError(f"{name} must have shape {_fmt_shape(shape)}, got shape {tuple(a.shape)}")
    return a


def check_int_labels(xp: Any, name: str, labels: Any, batch: int, num_classes: int) -> Array:
    """Integer labels (batch,) in [0, num_classes), as an int64 array of module xp.

    NumPy labels are accepted on the GPU path too (moved to the device).
    """
    if isinstance(labels, np.ndarray):
        check_labels(name, labels, batch, num_classes)
        return xp.asarray(labels, dtype=np.int64)
    if xp is np or not isinstance(labels, xp.ndarray):
        want = "a numpy.ndarray" if xp is np else f"a {xp.__name__}.ndarray or numpy.ndarray"
        raise ValueError(f"{name} must be {want} of integers, got {type(labels).__name__}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{name} must have an integer dtype, got {labels.dtype.name}")
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got shape {tuple(labels.shape)}")
    if labels.size:
        # One small device-to-host copy: an out-of-range label must not silently select nothing.
        lo, hi = (int(z) for z in xp.asnumpy(xp.stack([labels.min(), labels.max()])))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got a label {lo if lo < 0 else hi}")
    return labels.astype(np.int64, copy=False)


def check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def _scalar_cotangent(xp: Any, g: Any, dtype: Any) -> Array:
    g = xp.asarray(g, dtype=dtype)
    if g.shape != ():
        raise ValueError(f"g must be a scalar (the loss is a scalar), got shape {tuple(g.shape)}")
    return g


def _onehot(xp: Any, labels: Array, num_classes: int, dtype: Any) -> Array:
    return (xp.arange(num_classes)[None, :] == labels[:, None]).astype(dtype)


# ============================================================================== conv2d
def _im2col(xp: Any, x: Array, kh: int, kw: int, stride: int) -> tuple[Array, int, int]:
    """Rows are output positions (b, y, x); columns (c, i, j) like weight.reshape(O, -1)."""
    b, c, h, w = x.shape
    x = xp.ascontiguousarray(x)
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    sb, sc, sh, sw = x.strides
    win = xp.lib.stride_tricks.as_strided(
        x, shape=(b, ho, wo, c, kh, kw), strides=(sb, sh * stride, sw * stride, sc, sh, sw)
    )
    return win.reshape(b * ho * wo, c * kh * kw), ho, wo  # the reshape is the one copy


def _conv_rows_fwd(xp, x, weight, bias, stride):
    """The convolution as a GEMM: (B*Ho*Wo, O) rows, channels last."""
    o, _, kh, kw = weight.shape
    cols, ho, wo = _im2col(xp, x, kh, kw, stride)
    y = cols @ weight.reshape(o, -1).T
    y += bias
    return y, (x.shape, cols, weight, stride, ho, wo)


def _conv_rows_bwd(xp, cache, g_rows, need_input_grad=True):
    x_shape, cols, weight, stride, ho, wo = cache
    b, c, _, _ = x_shape
    o, _, kh, kw = weight.shape
    gweight = (g_rows.T @ cols).reshape(weight.shape)
    gbias = g_rows.sum(axis=0)
    if not need_input_grad:
        return None, gweight, gbias
    gcols = (g_rows @ weight.reshape(o, -1)).reshape(b, ho, wo, c, kh, kw)
    return kernels.col2im(xp, gcols, tuple(x_shape), stride), gweight, gbias


def _conv2d_fwd(xp, x, weight, bias, stride):
    y, cache = _conv_rows_fwd(xp, x, weight, bias, stride)
    _, _, _, _, ho, wo = cache
    y = y.reshape(x.shape[0], ho, wo, weight.shape[0]).transpose(0, 3, 1, 2)
    return xp.ascontiguousarray(y), cache


def _conv2d_bwd(xp, cache, g, need_input_grad=True):
    g_rows = g.transpose(0, 2, 3, 1).reshape(-1, g.shape[1])
    return _conv_rows_bwd(xp, cache, g_rows, need_input_grad)


def _check_conv2d(xp, x, weight, bias, stride):
    check_float(xp, "x", x, ndim=4)
    check_float(xp, "weight", weight, ndim=4)
    stride = check_int("stride", stride)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must have shape (out, {x.shape[1]}, kh, kw) to match x's {x.shape[1]} channels, "
            f"got {tuple(weight.shape)}"
        )
    check_float(xp, "bias", bias, shape=(weight.shape[0],))
    if weight.shape[2] > x.shape[2] or weight.shape[3] > x.shape[3]:
        raise ValueError(f"weight's kernel {tuple(weight.shape[2:])} is larger than x's spatial size {tuple(x.shape[2:])}")
    check_same_dtype(x=x, weight=weight, bias=bias)
    return stride


def conv2d(x: Array, weight: Array, bias: Array, stride: int = 1) -> Array:
    """Cross-correlation with valid padding: x (B,C,H,W), weight (O,C,kh,kw), bias (O,) -> (B,O,Ho,Wo)."""
    xp = array_module("x", x)
    stride = _check_conv2d(xp, x, weight, bias, stride)
    with device_scope(xp, x):
        return _conv2d_fwd(xp, x, weight, bias, stride)[0]


def conv2d_vjp(g: Array, x: Array, weight: Array, bias: Array, stride: int = 1):
    """Gradients of conv2d with respect to (x, weight, bias)."""
    xp = array_module("x", x)
    stride = _check_conv2d(xp, x, weight, bias, stride)
    b, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    check_float(xp, "g", g, shape=(b, o, (h - kh) // stride + 1, (w - kw) // stride + 1))
    check_same_dtype(x=x, g=g)
    with device_scope(xp, x):
        _, cache = _conv_rows_fwd(xp, x, weight, bias, stride)  # the columns, for the weight's gradient
        return _conv2d_bwd(xp, cache, g)


# ============================================================================== squash
def _moved_to_last(xp, a, axis):
    return xp.ascontiguousarray(xp.moveaxis(a, axis, -1))


def _check_axis(s, axis):
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -s.ndim <= axis < s.ndim:
        raise ValueError(f"axis must be an int in [{-s.ndim}, {s.ndim}) for s of shape {tuple(s.shape)}, got {axis!r}")
    return int(axis)


def squash(s: Array, axis: int = -1) -> Array:
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|, along `axis`; 0 at s = 0."""
    xp = array_module("s", s)
    check_float(xp, "s", s)
    axis = _check_axis(s, axis)
    with device_scope(xp, s):
        v = kernels.squash_forward(xp, _moved_to_last(xp, s, axis))
        return xp.ascontiguousarray(xp.moveaxis(v, -1, axis))


def squash_vjp(g: Array, s: Array, axis: int = -1):
    """Gradient of squash with respect to (s,); 0 at s = 0."""
    xp = array_module("s", s)
    check_float(xp, "s", s)
    check_float(xp, "g", g, shape=s.shape)
    check_same_dtype(s=s, g=g)
    axis = _check_axis(s, axis)
    with device_scope(xp, s):
        gs = kernels.squash_backward(xp, _moved_to_last(xp, s, axis), _moved_to_last(xp, g, axis))
        return (xp.ascontiguousarray(xp.moveaxis(gs, -1, axis)),)


# ============================================================================== primary capsules
def _primary_fwd(xp, h, weight, bias, capsule_dim, stride):
    y, conv_cache = _conv_rows_fwd(xp, h, weight, bias, stride)
    b = h.shape[0]
    ho, wo = conv_cache[4], conv_cache[5]
    types = weight.shape[0] // capsule_dim
    # Conv channel o = t*D + d of grid cell (y, x) -> capsule (t*Gh + y)*Gw + x, dim d. The GEMM's
    # rows are already channels-last, so one transpose regroups them (no NCHW round trip).
    s = y.reshape(b, ho, wo, types, capsule_dim).transpose(0, 3, 1, 2, 4).reshape(b, types * ho * wo, capsule_dim)
    s = xp.ascontiguousarray(s)
    return kernels.squash_forward(xp, s), (conv_cache, s, types)


def _primary_bwd(xp, cache, g, need_input_grad=True):
    conv_cache, s, types = cache
    b, _, d = s.shape
    ho, wo = conv_cache[4], conv_cache[5]
    gs = kernels.squash_backward(xp, s, g)
    g_rows = gs.reshape(b, types, ho, wo, d).transpose(0, 2, 3, 1, 4).reshape(b * ho * wo, types * d)
    return _conv_rows_bwd(xp, conv_cache, g_rows, need_input_grad)


def _check_primary(xp, h, weight, bias, capsule_dim, stride):
    stride = _check_conv2d(xp, h, weight, bias, stride)
    capsule_dim = check_int("capsule_dim", capsule_dim)
    if weight.shape[0] % capsule_dim:
        raise ValueError(
            f"weight's {weight.shape[0]} output channels are not a whole number of {capsule_dim}-D capsule types"
        )
    return capsule_dim, stride


def primary_capsules(h: Array, weight: Array, bias: Array, capsule_dim: int, stride: int) -> Array:
    """PrimaryCaps: conv (no ReLU), channels o = t*D + d regrouped into capsules, squashed.

    h (B,C,H,W), weight (T*D,C,k,k) -> u (B, T*Gh*Gw, D) with capsule i = (t*Gh + y)*Gw + x.
    """
    xp = array_module("h", h)
    capsule_dim, stride = _check_primary(xp, h, weight, bias, capsule_dim, stride)
    with device_scope(xp, h):
        return _primary_fwd(xp, h, weight, bias, capsule_dim, stride)[0]


def primary_capsules_vjp(g: Array, h: Array, weight: Array, bias: Array, capsule_dim: int, stride: int):
    """Gradients of primary_capsules with respect to (h, weight, bias)."""
    xp = array_module("h", h)
    capsule_dim, stride = _check_primary(xp, h, weight, bias, capsule_dim, stride)
    b, _, hh, ww = h.shape
    o, _, kh, kw = weight.shape
    n = (o // capsule_dim) * ((hh - kh) // stride + 1) * ((ww - kw) // stride + 1)
    check_float(xp, "g", g, shape=(b, n, capsule_dim))
    check_same_dtype(h=h, g=g)
    with device_scope(xp, h):
        _, cache = _primary_fwd(xp, h, weight, bias, capsule_dim, stride)
        return _primary_bwd(xp, cache, g)


# ============================================================================== predictions
def _predictions_fwd(xp, u, weight):
    n, j, e, d = weight.shape
    b = u.shape[0]
    w = weight.reshape(n, j * e, d)
    # One (B, D) x (D, J*E) product per child capsule, batched over the children by cuBLAS.
    out = xp.matmul(u.transpose(1, 0, 2), w.transpose(0, 2, 1))  # (N, B, J*E)
    return xp.ascontiguousarray(out.transpose(1, 0, 2)).reshape(b, n, j, e), (u, weight)


def _predictions_bwd(xp, cache, g):
    u, weight = cache
    n, j, e, d = weight.shape
    g_t = g.reshape(g.shape[0], n, j * e).transpose(1, 0, 2)  # (N, B, J*E)
    gw = xp.matmul(g_t.transpose(0, 2, 1), u.transpose(1, 0, 2)).reshape(weight.shape)
    gu = xp.matmul(g_t, weight.reshape(n, j * e, d)).transpose(1, 0, 2)
    return xp.ascontiguousarray(gu), gw


def _check_predictions(xp, u, weight):
    check_float(xp, "u", u, ndim=3)
    check_float(xp, "weight", weight, ndim=4)
    n, d = u.shape[1], u.shape[2]
    if weight.shape[0] != n or weight.shape[3] != d:
        raise ValueError(
            f"weight must have shape ({n}, J, E, {d}) to match u's {n} capsules of {d} dims, got {tuple(weight.shape)}"
        )
    check_same_dtype(u=u, weight=weight)


def predictions(u: Array, weight: Array) -> Array:
    """u_hat[b, i, j] = weight[i, j] @ u[b, i]: u (B,N,D), weight (N,J,E,D) -> (B,N,J,E)."""
    xp = array_module("u", u)
    _check_predictions(xp, u, weight)
    with device_scope(xp, u):
        return _predictions_fwd(xp, u, weight)[0]


def predictions_vjp(g: Array, u: Array, weight: Array):
    """Gradients of predictions with respect to (u, weight)."""
    xp = array_module("u", u)
    _check_predictions(xp, u, weight)
    b, n, _ = u.shape
    check_float(xp, "g", g, shape=(b, n, weight.shape[1], weight.shape[2]))
    check_same_dtype(u=u, g=g)
    with device_scope(xp, u):
        return _predictions_bwd(xp, (u, weight), g)


# ============================================================================== routing
def _routing_fwd(xp, u_hat, iterations):
    bsz, n, j, e = u_hat.shape
    # (B, J, N, E): the contractions over children are batched matmuls and the kernels read
    # children contiguously.
    ut = xp.ascontiguousarray(u_hat.transpose(0, 2, 1, 3))
    logits = xp.zeros((bsz, j, n), dtype=u_hat.dtype)  # b_ij, one per example, starts at 0
    cs, ss, vs = [], [], []
    for t in range(iterations):
        c = kernels.routing_softmax(xp, logits)  # over the parents j, never over the children
        s = xp.ascontiguousarray(xp.matmul(c[:, :, None, :], ut)[:, :, 0, :])  # (B, J, E)
        v = kernels.squash_forward(xp, s)
        cs.append(c), ss.append(s), vs.append(v)
        if t + 1 < iterations:  # the last update of b cannot change any output
            logits = kernels.routing_agreement(xp, logits, ut, v)
    c_out = xp.ascontiguousarray(cs[-1].transpose(0, 2, 1))
    return (vs[-1], c_out), (ut, cs, ss, vs)


def _routing_bwd(xp, cache, g_v, g_c=None):
    ut, cs, ss, vs = cache
    iterations = len(cs)
    g_ut = xp.zeros_like(ut)
    g_c_t = None if g_c is None else xp.ascontiguousarray(g_c.transpose(0, 2, 1))
    g_logits = None  # gradient with respect to b after the current iteration's update
    for t in reversed(range(iterations)):
        c, s, v = cs[t], ss[t], vs[t]
        last = t == iterations - 1
        gv = g_v if last else xp.zeros_like(v)
        if g_logits is not None:
            # b_t = b_{t-1} + <u_hat, v_t>: v_t's share of the logits' gradient.
            gv = gv + xp.matmul(g_logits[:, :, None, :], ut)[:, :, 0, :]
        gs = kernels.squash_backward(xp, s, gv)
        # s_t = sum_i c_t u_hat, and (when t is not last) the agreement b_t = b_{t-1} + <u_hat, v_t>.
        g_ut = kernels.routing_grad_ut(xp, g_ut, g_logits, v, c, gs)
        if t > 0:  # b_0 = 0 is a constant: its gradient is never used
            # c_t = softmax_j(b_{t-1}); b_{t-1} also passes straight through to b_t.
            g_logits = kernels.routing_softmax_backward(xp, ut, gs, c, g_c_t if last else None, g_logits)
    return xp.ascontiguousarray(g_ut.transpose(0, 2, 1, 3))


def routing(u_hat: Array, iterations: int) -> tuple[Array, Array]:
    """Procedure 1, routing by agreement. u_hat (B,N,J,E) -> (v (B,J,E), c (B,N,J)).

    c are the coupling coefficients used in the last iteration: c[b, i] sums to 1 over j.
    """
    xp = array_module("u_hat", u_hat)
    check_float(xp, "u_hat", u_hat, ndim=4)
    iterations = check_int("iterations", iterations)
    with device_scope(xp, u_hat):
        return _routing_fwd(xp, u_hat, iterations)[0]


def routing_vjp(g: tuple[Array, Array | None], u_hat: Array, iterations: int):
    """Gradient of routing with respect to (u_hat,), given g = (g_v, g_c); g_c may be None."""
    xp = array_module("u_hat", u_hat)
    check_float(xp, "u_hat", u_hat, ndim=4)
    iterations = check_int("iterations", iterations)
    if not isinstance(g, (tuple, list)) or len(g) != 2:
        raise ValueError(f"g must be a pair (g_v, g_c) with g_c possibly None, got {type(g).__name__}")
    g_v, g_c = g
    bsz, n, j, e = u_hat.shape
    check_float(xp, "g_v", g_v, shape=(bsz, j, e))
    if g_c is not None:
        check_float(xp, "g_c", g_c, shape=(bsz, n, j))
    check_same_dtype(u_hat=u_hat, g_v=g_v, g_c=g_c)
    with device_scope(xp, u_hat):
        _, cache = _routing_fwd(xp, u_hat, iterations)
        return (_routing_bwd(xp, cache, g_v, g_c),)


# ============================================================================== lengths
def _lengths_fwd(xp, v):
    return xp.sqrt(xp.sum(v * v, axis=-1))


def _lengths_bwd(xp, v, g):
    n = xp.sqrt(xp.sum(v * v, axis=-1, keepdims=True))
    nz = n > 0
    return xp.where(nz, v / xp.where(nz, n, 1), 0) * g[..., None]


def capsule_lengths(v: Array) -> Array:
    """|v_j| along the last axis: (..., E) -> (...)."""
    xp = array_module("v", v)
    check_float(xp, "v", v)
    if v.ndim == 0:
        raise ValueError("v must have at least 1 dimension (the capsule's), got a 0-d array")
    with device_scope(xp, v):
        return _lengths_fwd(xp, v)


def capsule_lengths_vjp(g: Array, v: Array):
    """Gradient of capsule_lengths with respect to (v,): g v / |v|, and 0 where v = 0."""
    xp = array_module("v", v)
    check_float(xp, "v", v)
    if v.ndim == 0:
        raise ValueError("v must have at least 1 dimension (the capsule's), got a 0-d array")
    check_float(xp, "g", g, shape=v.shape[:-1])
    check_same_dtype(v=v, g=g)
    with device_scope(xp, v):
        return (_lengths_bwd(xp, v, g),)


# ============================================================================== margin loss
def _check_margin(xp, lengths, labels, m_plus, m_minus, lambda_):
    check_float(xp, "lengths", lengths, ndim=2)
    labels = check_int_labels(xp, "labels", labels, lengths.shape[0], lengths.shape[1])
    for name, value in (("m_plus", m_plus), ("m_minus", m_minus), ("lambda_", lambda_)):
        _check_number(name, value)
    return labels


def _margin_terms(xp, lengths, labels, m_plus, m_minus):
    present = _onehot(xp, labels, lengths.shape[1], lengths.dtype)
    up = xp.maximum(m_plus - lengths, 0)
    down = xp.maximum(lengths - m_minus, 0)
    return present, up, down


def _margin_fwd(xp, lengths, labels, m_plus, m_minus, lambda_):
    t, up, down = _margin_terms(xp, lengths, labels, m_plus, m_minus)
    per_class = t * up * up + lambda_ * (1 - t) * down * down
    return per_class.sum(axis=1).mean(dtype=lengths.dtype)


def _margin_bwd(xp, g, lengths, labels, m_plus, m_minus, lambda_):
    t, up, down = _margin_terms(xp, lengths, labels, m_plus, m_minus)
    grad = (-2 * t * up + 2 * lambda_ * (1 - t) * down) * (g / lengths.shape[0])
    return grad.astype(lengths.dtype, copy=False)


def margin_loss(lengths: Array, labels: Array, m_plus: float = 0.9, m_minus: float = 0.1,
                lambda_: float = 0.5) -> Array:
    """Eq. 4 on the capsule lengths (not a softmax of them), summed over classes, averaged over the batch."""
    xp = array_module("lengths", lengths)
    labels = _check_margin(xp, lengths, labels, m_plus, m_minus, lambda_)
    with device_scope(xp, lengths):
        return _margin_fwd(xp, lengths, labels, m_plus, m_minus, lambda_)


def margin_loss_vjp(g: Array, lengths: Array, labels: Array, m_plus: float = 0.9,
                    m_minus: float = 0.1, lambda_: float = 0.5):
    """Gradient of margin_loss with respect to (lengths,)."""
    xp = array_module("lengths", lengths)
    labels = _check_margin(xp, lengths, labels, m_plus, m_minus, lambda_)
    with device_scope(xp, lengths):
        g = _scalar_cotangent(xp, g, lengths.dtype)
        return (_margin_bwd(xp, g, lengths, labels, m_plus, m_minus, lambda_),)


# ============================================================================== masking
def _mask_onehot(xp, v, labels):
    if labels is None:
        labels = xp.argmax(xp.sum(v * v, axis=-1), axis=1)  # ties: the lowest class index
    return _onehot(xp, labels, v.shape[1], v.dtype)


def _check_mask(xp, v, labels):
    check_float(xp, "v", v, ndim=3)
    if labels is not None:
        labels = check_int_labels(xp, "labels", labels, v.shape[0], v.shape[1])
    return labels


def mask(v: Array, labels: Array | None = None) -> Array:
    """Zero every class capsule but one and flatten class-major: v (B,J,E) -> (B, J*E).

    The kept capsule is the true class's when labels are given, else the longest.
    """
    xp = array_module("v", v)
    labels = _check_mask(xp, v, labels)
    with device_scope(xp, v):
        return (v * _mask_onehot(xp, v, labels)[:, :, None]).reshape(v.shape[0], -1)


def mask_vjp(g: Array, v: Array, labels: Array | None = None):
    """Gradient of mask with respect to (v,) (the choice of capsule is piecewise constant)."""
    xp = array_module("v", v)
    labels = _check_mask(xp, v, labels)
    check_float(xp, "g", g, shape=(v.shape[0], v.shape[1] * v.shape[2]))
    check_same_dtype(v=v, g=g)
    with device_scope(xp, v):
        return (g.reshape(v.shape) * _mask_onehot(xp, v, labels)[:, :, None],)


# ============================================================================== decoder
def _sigmoid(xp, z):
    # The tanh form never overflows, for any finite z.
    return 0.5 * (1 + xp.tanh(0.5 * z))


def _decoder_fwd(xp, x, weights, biases):
    hs = [x]
    h = x
    last = len(weights) - 1
    for k, (w, b) in enumerate(zip(weights, biases)):
        z = h @ w.T + b
        h = _sigmoid(xp, z) if k == last else xp.maximum(z, 0)
        hs.append(h)
    return h, hs


def _decoder_bwd(xp, hs, weights, g, need_input_grad=True):
    gws, gbs = [None] * len(weights), [None] * len(weights)
    out = hs[-1]
    gz = g * out * (1 - out)
    gh = None
    for k in reversed(range(len(weights))):
        gws[k] = gz.T @ hs[k]
        gbs[k] = gz.sum(axis=0)
        if k == 0 and not need_input_grad:
            return None, gws, gbs
        gh = gz @ weights[k]
        if k > 0:
            gz = gh * (hs[k] > 0)
    return gh, gws, gbs


def _check_decoder(xp, x, weights, biases):
    check_float(xp, "x", x, ndim=2)
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise ValueError("weights and biases must be sequences of arrays, one per layer")
    if len(weights) == 0 or len(weights) != len(biases):
        raise ValueError(f"weights and biases must be non-empty and of equal length, got {len(weights)} and {len(biases)}")
    width = x.shape[1]
    for k, (w, b) in enumerate(zip(weights, biases)):
        check_float(xp, f"weights[{k}]", w, shape=(None, width))
        check_float(xp, f"biases[{k}]", b, shape=(w.shape[0],))
        check_same_dtype(x=x, **{f"weights[{k}]": w, f"biases[{k}]": b})
        width = w.shape[0]


def decoder(x: Array, weights: Sequence[Array], biases: Sequence[Array]) -> Array:
    """Fully connected layers y = x @ W.T + b, ReLU between them and a sigmoid at the end."""
    xp = array_module("x", x)
    _check_decoder(xp, x, weights, biases)
    with device_scope(xp, x):
        return _decoder_fwd(xp, x, weights, biases)[0]


def decoder_vjp(g: Array, x: Array, weights: Sequence[Array], biases: Sequence[Array]):
    """Gradients of decoder with respect to (x, weights, biases); the last two are lists."""
    xp = array_module("x", x)
    _check_decoder(xp, x, weights, biases)
    check_float(xp, "g", g, shape=(x.shape[0], weights[-1].shape[0]))
    check_same_dtype(x=x, g=g)
    with device_scope(xp, x):
        _, hs = _decoder_fwd(xp, x, weights, biases)
        return _decoder_bwd(xp, hs, weights, g)


# ============================================================================== reconstruction loss
def _check_reconstruction(xp, reconstruction, images, scale):
    check_float(xp, "reconstruction", reconstruction, ndim=2)
    check_float(xp, "images", images)
    if images.ndim == 0 or images.shape[0] != reconstruction.shape[0] or \
            int(np.prod(images.shape[1:])) != reconstruction.shape[1]:
        raise ValueError(
            f"images {tuple(images.shape)} do not match reconstruction {tuple(reconstruction.shape)}: "
            "each image must flatten to one reconstruction row"
        )
    check_same_dtype(reconstruction=reconstruction, images=images)
    _check_number("scale", scale)


def _reconstruction_fwd(xp, reconstruction, images, scale):
    d = reconstruction - images.reshape(reconstruction.shape)
    return (scale * xp.sum(d * d, axis=1)).mean(dtype=d.dtype)


def _reconstruction_bwd(xp, g, reconstruction, images, scale):
    d = reconstruction - images.reshape(reconstruction.shape)
    return (2 * scale / reconstruction.shape[0]) * g * d


def reconstruction_loss(reconstruction: Array, images: Array, scale: float = 0.0005) -> Array:
    """scale * sum over pixels of (reconstruction - image)^2, averaged over the batch.

    images (B, C, H, W) are flattened row-major from (C, H, W) to match reconstruction (B, C*H*W).
    """
    xp = array_module("reconstruction", reconstruction)
    _check_reconstruction(xp, reconstruction, images, scale)
    with device_scope(xp, reconstruction):
        return _reconstruction_fwd(xp, reconstruction, images, scale)


def reconstruction_loss_vjp(g: Array, reconstruction: Array, images: Array, scale: float = 0.0005):
    """Gradient of reconstruction_loss with respect to (reconstruction,)."""
    xp = array_module("reconstruction", reconstruction)
    _check_reconstruction(xp, reconstruction, images, scale)
    with device_scope(xp, reconstruction):
        g = _scalar_cotangent(xp, g, reconstruction.dtype)
        return (_reconstruction_bwd(xp, g, reconstruction, images, scale),)
