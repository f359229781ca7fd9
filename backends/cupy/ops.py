"""The spec's ops and their VJPs on CUDA arrays: the CuPy backend's own implementation.

Same names, signatures and results as capsspec.ops (the spec; docs/spec.md fixes every
numerical choice: exact squash with value and gradient 0 at 0, softmax over the parents, b per
example, gradients through every routing iteration, capsule and mask order). CuPy has no
autodiff, so every VJP here is the hand-derived one, evaluated on the device:

* convolutions are im2col (one strided-view copy) + a cuBLAS GEMM; their input gradient is a
  GEMM + the col2im kernel;
* predictions and the routing contractions are batched cuBLAS matmuls;
* squash, the routing softmax / agreement updates and their VJPs are custom kernels
  (backends/cupy/kernels.py);
* the decoder is cuBLAS GEMMs with elementwise ReLU / sigmoid (its forward is the reference's).

The array module is taken from the inputs: cupy.ndarray inputs run on the GPU (on the device
that holds them); numpy.ndarray inputs run the very same code with NumPy and the kernels'
fallbacks, which is how this module is tested on machines without a GPU. Inputs of one call
must all be of one kind (NumPy labels may go with device arrays: they are moved). Nothing here
checks arguments: the door (capsspec.validation) does, and on the GPU it defers its value checks
(NaN/inf, label ranges) to the next host read rather than stalling the device.

The decoder's forward is the reference's own (capsspec.ops._decoder_fwd), which runs on cupy
arrays as it is: its only NumPy calls are ufuncs, and NumPy hands ufuncs on cupy arrays to cupy.

What this module must never do: import cupy at module level, keep state, or change its inputs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from typing import Any, Callable, Sequence

import numpy as np

from capsspec import ops as reference_ops

from . import kernels

Array = Any  # cupy.ndarray, or numpy.ndarray on the CPU path


def array_module(a: Any) -> Any:
    """cupy for a cupy.ndarray, numpy otherwise (the door has checked the kind of every input)."""
    return importlib.import_module("cupy") if type(a).__module__.split(".", 1)[0] == "cupy" else np


def device_scope(xp: Any, a: Any):
    """Run on the device that holds `a` (a no-op for NumPy)."""
    return contextlib.nullcontext() if xp is np else a.device


def on_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn(xp, *args) as the spec's fn(*args): xp from the first array argument, run on its device."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        first = next(a for a in (*args, *kwargs.values()) if getattr(a, "ndim", 0) > 0)
        xp = array_module(first)
        with device_scope(xp, first):
            return fn(xp, *args, **kwargs)

    sig = inspect.signature(fn)
    run.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # type: ignore[attr-defined]
    return run


def _onehot(xp: Any, labels: Array, num_classes: int, dtype: Any) -> Array:
    """labels (B,) -> (B, J); (B, K) -> (B, K, J)."""
    return (xp.arange(num_classes) == xp.asarray(labels)[..., None]).astype(dtype)


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


@on_device
def conv2d(xp: Any, x: Array, weight: Array, bias: Array, stride: int = 1) -> Array:
    """Cross-correlation with valid padding: x (B,C,H,W), weight (O,C,kh,kw), bias (O,) -> (B,O,Ho,Wo)."""
    return _conv2d_fwd(xp, x, weight, bias, stride)[0]


@on_device
def conv2d_vjp(xp: Any, g: Array, x: Array, weight: Array, bias: Array, stride: int = 1):
    """Gradients of conv2d with respect to (x, weight, bias)."""
    _, cache = _conv_rows_fwd(xp, x, weight, bias, stride)  # the columns, for the weight's gradient
    return _conv2d_bwd(xp, cache, g)


# ============================================================================== squash
def _moved_to_last(xp, a, axis):
    return xp.ascontiguousarray(xp.moveaxis(a, axis, -1))


@on_device
def squash(xp: Any, s: Array, axis: int = -1) -> Array:
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|, along `axis`; 0 at s = 0."""
    v = kernels.squash_forward(xp, _moved_to_last(xp, s, axis))
    return xp.ascontiguousarray(xp.moveaxis(v, -1, axis))


@on_device
def squash_vjp(xp: Any, g: Array, s: Array, axis: int = -1):
    """Gradient of squash with respect to (s,); 0 at s = 0."""
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


@on_device
def primary_capsules(xp: Any, h: Array, weight: Array, bias: Array, capsule_dim: int, stride: int) -> Array:
    """PrimaryCaps: conv (no ReLU), channels o = t*D + d regrouped into capsules, squashed.

    h (B,C,H,W), weight (T*D,C,k,k) -> u (B, T*Gh*Gw, D) with capsule i = (t*Gh + y)*Gw + x.
    """
    return _primary_fwd(xp, h, weight, bias, capsule_dim, stride)[0]


@on_device
def primary_capsules_vjp(xp: Any, g: Array, h: Array, weight: Array, bias: Array, capsule_dim: int, stride: int):
    """Gradients of primary_capsules with respect to (h, weight, bias)."""
    return _primary_bwd(xp, _primary_fwd(xp, h, weight, bias, capsule_dim, stride)[1], g)


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


@on_device
def predictions(xp: Any, u: Array, weight: Array) -> Array:
    """u_hat[b, i, j] = weight[i, j] @ u[b, i]: u (B,N,D), weight (N,J,E,D) -> (B,N,J,E)."""
    return _predictions_fwd(xp, u, weight)[0]


@on_device
def predictions_vjp(xp: Any, g: Array, u: Array, weight: Array):
    """Gradients of predictions with respect to (u, weight)."""
    return _predictions_bwd(xp, (u, weight), g)


# ============================================================================== routing
def _routing_fwd(xp, u_hat, iterations, none_of_the_above=False):
    bsz, n, j, e = u_hat.shape
    # (B, J, N, E): the contractions over children are batched matmuls and the kernels read
    # children contiguously.
    ut = xp.ascontiguousarray(u_hat.transpose(0, 2, 1, 3))
    logits = xp.zeros((bsz, j, n), dtype=u_hat.dtype)  # b_ij, one per example, starts at 0
    cs, ss, vs = [], [], []
    for t in range(iterations):
        c = kernels.routing_softmax(xp, logits, none_of_the_above)  # over the parents j, never the children
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
            # c_t = softmax_j(b_{t-1}); b_{t-1} also passes straight through to b_t. (none_of_the_above's
            # extra logit is a constant: the softmax's VJP c (gc - sum_j c gc) is the same.)
            g_logits = kernels.routing_softmax_backward(xp, ut, gs, c, g_c_t if last else None, g_logits)
    return xp.ascontiguousarray(g_ut.transpose(0, 2, 1, 3))


@on_device
def routing(xp: Any, u_hat: Array, iterations: int, none_of_the_above: bool = False) -> tuple[Array, Array]:
    """Procedure 1, routing by agreement. u_hat (B,N,J,E) -> (v (B,J,E), c (B,N,J)).

    c are the coupling coefficients used in the last iteration: c[b, i] sums to 1 over j (less than 1
    with none_of_the_above).
    """
    return _routing_fwd(xp, u_hat, iterations, none_of_the_above)[0]


@on_device
def routing_vjp(xp: Any, g: tuple[Array, Array | None], u_hat: Array, iterations: int,
                none_of_the_above: bool = False):
    """Gradient of routing with respect to (u_hat,), given g = (g_v, g_c); g_c may be None."""
    return (_routing_bwd(xp, _routing_fwd(xp, u_hat, iterations, none_of_the_above)[1], *g),)


# ============================================================================== lengths
@on_device
def capsule_lengths(xp: Any, v: Array) -> Array:
    """|v_j| along the last axis: (..., E) -> (...); scaled where the squares would over- or underflow."""
    risky, n, nz, _, _ = kernels.extreme_norms(xp, v)
    with kernels._errstate(xp):  # an extreme row's plain norm is replaced by its scaled one
        plain = xp.sqrt(xp.sum(v * v, axis=-1, keepdims=True))
    return xp.where(risky, xp.where(nz, n, 0), plain)[..., 0]


@on_device
def capsule_lengths_vjp(xp: Any, g: Array, v: Array):
    """Gradient of capsule_lengths with respect to (v,): g v / |v|, and 0 where v = 0."""
    with kernels._errstate(xp):
        n = xp.sqrt(xp.sum(v * v, axis=-1, keepdims=True))
    nz = n > 0
    risky, _, nz_scaled, unit, _ = kernels.extreme_norms(xp, v)
    plain = xp.where(nz, v / xp.where(nz, n, 1), 0)
    return (xp.where(risky, xp.where(nz_scaled, unit, 0), plain) * g[..., None],)


# ============================================================================== margin loss
def _margin_terms(xp, lengths, labels, m_plus, m_minus):
    # Every listed class is present: (B, K, J) one-hots summed over the K distinct classes.
    bsz, j = lengths.shape
    present = _onehot(xp, labels, j, lengths.dtype).reshape(bsz, -1, j).sum(axis=1)
    up = xp.maximum(m_plus - lengths, 0)
    down = xp.maximum(lengths - m_minus, 0)
    return present, up, down


@on_device
def margin_loss(xp: Any, lengths: Array, labels: Array, m_plus: float = 0.9, m_minus: float = 0.1,
                lambda_: float = 0.5) -> Array:
    """Eq. 4 on the capsule lengths (not a softmax of them), summed over classes, averaged over the batch.

    labels (B,) or (B, K) with K distinct classes: every listed class is present.
    """
    t, up, down = _margin_terms(xp, lengths, labels, m_plus, m_minus)
    per_class = t * up * up + lambda_ * (1 - t) * down * down
    return per_class.sum(axis=1).mean(dtype=lengths.dtype)


@on_device
def margin_loss_vjp(xp: Any, g: Array, lengths: Array, labels: Array, m_plus: float = 0.9,
                    m_minus: float = 0.1, lambda_: float = 0.5):
    """Gradient of margin_loss with respect to (lengths,)."""
    t, up, down = _margin_terms(xp, lengths, labels, m_plus, m_minus)
    grad = (-2 * t * up + 2 * lambda_ * (1 - t) * down) * (xp.asarray(g, dtype=lengths.dtype) / lengths.shape[0])
    return (grad.astype(lengths.dtype, copy=False),)


# ============================================================================== masking
def _mask_onehot(xp, v, labels):
    """(B, J) one-hot of the kept class, or (B, K, J) for (B, K) labels (row k keeps labels[:, k])."""
    if labels is None:
        labels = xp.argmax(xp.sum(v * v, axis=-1), axis=1)  # ties: the lowest class index
    return _onehot(xp, labels, v.shape[1], v.dtype)


def _apply_mask(v, onehot):
    """v (B,J,E) masked by a (B,J) one-hot -> (B, J*E), or by a (B,K,J) one -> (B, K, J*E)."""
    if onehot.ndim == 2:
        return (v * onehot[:, :, None]).reshape(v.shape[0], -1)
    return (v[:, None] * onehot[..., None]).reshape(*onehot.shape[:2], -1)


def _unmask(xp, g, v, onehot):
    """The adjoint of _apply_mask: g shaped like its output -> (B, J, E) (the K rows' terms summed)."""
    if onehot.ndim == 2:
        return g.reshape(v.shape) * onehot[:, :, None]
    return xp.sum(g.reshape(*onehot.shape, v.shape[2]) * onehot[..., None], axis=1)


@on_device
def mask(xp: Any, v: Array, labels: Array | None = None) -> Array:
    """Zero every class capsule but one and flatten class-major: v (B,J,E) -> (B, J*E).

    The kept capsule is the true class's when labels (B,) are given, else the longest. With
    (B, K) labels: (B, K, J*E), row k keeping class labels[:, k].
    """
    return _apply_mask(v, _mask_onehot(xp, v, labels))


@on_device
def mask_vjp(xp: Any, g: Array, v: Array, labels: Array | None = None):
    """Gradient of mask with respect to (v,) (the choice of capsule is piecewise constant)."""
    return (_unmask(xp, g, v, _mask_onehot(xp, v, labels)),)


# ============================================================================== decoder
def _decoder_fwd(xp, x, weights, biases):
    """The reference's decoder forward itself (capsspec.ops._decoder_fwd), the cache included: its
    np.maximum and np.tanh are NumPy ufuncs, which hand cupy arrays to cupy's own (cupy.ndarray's
    __array_ufunc__), and its `@` and `+` are the arrays' own, so on the GPU every layer is the same
    cuBLAS GEMM and elementwise kernels as cupy.maximum / cupy.tanh would run. xp is unused (kept so
    that every forward helper here has one calling convention)."""
    return reference_ops._decoder_fwd(x, weights, biases)


def _decoder_bwd(xp, cache, weights, g):
    """Layer by layer from the output: through the sigmoid, then each dense layer and its ReLU."""
    hs, lead = cache
    gz = g.reshape(hs[-1].shape) * hs[-1] * (1 - hs[-1])
    gws, gbs = [], []
    for k in reversed(range(len(weights))):
        gws.insert(0, gz.T @ hs[k])
        gbs.insert(0, gz.sum(axis=0))
        gh = gz @ weights[k]
        gz = gh * (hs[k] > 0) if k else gz  # the ReLU that made layer k's input (none before layer 0)
    return gh.reshape(*lead, gh.shape[-1]), gws, gbs


@on_device
def decoder(xp: Any, x: Array, weights: Sequence[Array], biases: Sequence[Array]) -> Array:
    """Fully connected layers y = x @ W.T + b, ReLU between them and a sigmoid at the end;
    x (..., width) -> (..., out), the same layers on every row."""
    return _decoder_fwd(xp, x, weights, biases)[0]


@on_device
def decoder_vjp(xp: Any, g: Array, x: Array, weights: Sequence[Array], biases: Sequence[Array]):
    """Gradients of decoder with respect to (x, weights, biases); the last two are lists."""
    return _decoder_bwd(xp, _decoder_fwd(xp, x, weights, biases)[1], weights, g)


# ============================================================================== reconstruction loss
@on_device
def reconstruction_loss(xp: Any, reconstruction: Array, images: Array, scale: float = 0.0005) -> Array:
    """scale * sum over pixels of (reconstruction - image)^2, averaged over the batch.

    images (B, C, H, W) are flattened row-major from (C, H, W) to match reconstruction (B, C*H*W);
    with (B, K, C*H*W) and (B, K, C, H, W) the K digits' squared errors are summed too.
    """
    d = reconstruction - images.reshape(reconstruction.shape)
    return (scale * xp.sum(d * d, axis=tuple(range(1, d.ndim)))).mean(dtype=d.dtype)


@on_device
def reconstruction_loss_vjp(xp: Any, g: Array, reconstruction: Array, images: Array, scale: float = 0.0005):
    """Gradient of reconstruction_loss with respect to (reconstruction,)."""
    d = reconstruction - images.reshape(reconstruction.shape)
    return ((2 * scale / reconstruction.shape[0]) * xp.asarray(g, dtype=reconstruction.dtype) * d,)
