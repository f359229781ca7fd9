"""The spec's ops: every layer of the capsule network as a pure NumPy function, with its VJP.

This module *is* the specification of the model's arithmetic. Every backend implements the
same names with the same signatures, and the conformance suite compares them to these.

Conventions
-----------
* Arrays are batch-first; images are NCHW. float32 and float64 are supported and never mixed
  within a call; results keep the input dtype.
* For each op ``f(*args)`` there is ``f_vjp(g, *args) -> tuple``: the vector-Jacobian product of
  the cotangent ``g`` (shaped like f's output) with respect to f's differentiable arguments, in
  the order listed in ``capsspec.spec.OPS``. Gradients are derived by hand (no autodiff) and are
  checked against central finite differences in float64 by the tests.
* No Python loop runs over examples or capsules. (conv2d's VJP loops over kernel offsets, and
  routing over its iterations, which are the only sequential dimensions.)

What the spec decides where the paper is silent (docs/spec.md, section 2, says it in full)
-----------------------------------------------------------------------------------------
* squash(s) = s |s| / (1 + |s|^2) exactly, with value and gradient 0 at s = 0: no epsilon.
  Its domain is every s whose |s|^2 is finite in the dtype (up to ~1e19 per vector in float32,
  ~1e154 in float64); within it no intermediate overflows.
* The length |v| has gradient 0 at v = 0.
* Routing: b starts at 0 for each example; the softmax runs over the parents (classes) j (with
  none_of_the_above, over j and one more logit fixed at 0 that no class stands for);
  gradients flow through every iteration (b, c and v are never detached); the returned
  coupling coefficients are those used in the last iteration.
* No bias on the class capsules; no 1/32 scaling of PrimaryCaps; no ReLU before squash in
  PrimaryCaps (conv1 has a ReLU).
* Primary capsule i = (t * Gh + y) * Gw + x for type t at grid position (y, x); its dim d is
  conv channel t * D + d (channels moved last before the reshape).
* The margin loss sums over classes and averages over the batch; the reconstruction loss is
  the per-image sum of squared pixel errors times the scale, averaged over the batch.
* Masking keeps the true class's capsule (training) or the longest one (inference; ties go to
  the lowest class index), flattened class-major: feature j * E + e.
* Labels are (B,) (one class per example) or (B, K) (K distinct classes per example: MultiMNIST's
  two digits). With (B, K) labels the margin loss counts every listed class as present, mask
  gives one masked row per listed class, (B, K, J*E), the decoder runs on each row, and the
  reconstruction loss sums the K rows' squared errors (docs/spec.md, section 5).

Arguments are checked at the door (capsspec.validation): each public name is marked `@checked`,
which runs its checks (written once, in capsspec.validation) before the body; the bodies check
nothing. `capsspec.validation.unchecked(name)` is the body alone, for callers that checked already.

What this module must never do: import a framework, keep state, or change its inputs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .validation import checked

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




# ============================================================================== conv2d
# im2col with the kernel offset outermost and the batch innermost:
#   cols[(i, j, c), (y, x, b)] = x[b, c, y*stride + i, x*stride + j].
# The image is first laid out (C, H, W, B), so for each kernel offset im2col (and its adjoint,
# col2im) moves whole runs of B contiguous numbers, and the layout changes before and after are
# plain two-dimensional transposes; the loops run over kernel offsets, never over examples or
# positions. (With the batch outside the positions instead, every run is one output row of Wo
# numbers taken at the stride, 6 for the paper's PrimaryCaps: that made im2col and col2im several
# times slower on a 2-core CPU, docs/performance.md.) Layouts move numbers, never the products and
# sums: the one matrix product per direction below is the whole convolution.
def _transposed(a: np.ndarray) -> np.ndarray:
    """a.T of a 2-D array as a new C-contiguous array. Copied a band of 256 source rows at a time:
    numpy's own copy of a.T writes the output a whole row of a apart per element, and was four times
    slower on a tall array such as the (C*H*W, B) gradient of an image batch."""
    n, m = a.shape
    out = np.empty((m, n), dtype=a.dtype)
    for r in range(0, n, 256):
        out[:, r:r + 256] = a[r:r + 256].T
    return out


def _im2col(x: np.ndarray, kh: int, kw: int, stride: int) -> tuple[np.ndarray, int, int]:
    b, c, h, w = x.shape
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    xt = _transposed(x.reshape(b, c * h * w)).reshape(c, h, w, b)
    cols = np.empty((kh, kw, c, ho, wo, b), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[i, j] = xt[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
    return cols.reshape(kh * kw * c, ho * wo * b), ho, wo


def _weight_matrix(weight: np.ndarray) -> np.ndarray:
    """(O, C, kh, kw) -> (O, kh*kw*C), matching the rows of _im2col."""
    o = weight.shape[0]
    return weight.transpose(0, 2, 3, 1).reshape(o, -1)


def _conv2d_fwd(x, weight, bias, stride):
    o, _, kh, kw = weight.shape
    cols, ho, wo = _im2col(x, kh, kw, stride)
    y = _weight_matrix(weight) @ cols  # (O, Ho*Wo*B)
    y += bias[:, None]
    y = _transposed(y.reshape(o * ho * wo, x.shape[0])).reshape(x.shape[0], o, ho, wo)
    return y, (x.shape, cols, weight, stride)


def _conv2d_bwd(cache, g, need_input_grad=True):
    x_shape, cols, weight, stride = cache
    b, c, h, w = x_shape
    o, _, kh, kw = weight.shape
    ho, wo = g.shape[2], g.shape[3]
    g2 = _transposed(g.reshape(b, o * ho * wo)).reshape(o, ho * wo * b)
    gweight = (g2 @ cols.T).reshape(o, kh, kw, c).transpose(0, 3, 1, 2)
    gbias = g2.sum(axis=1)
    if not need_input_grad:
        return None, np.ascontiguousarray(gweight), gbias
    gcols = (_weight_matrix(weight).T @ g2).reshape(kh, kw, c, ho, wo, b)
    gxt = np.zeros((c, h, w, b), dtype=g.dtype)
    for i in range(kh):
        for j in range(kw):
            gxt[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] += gcols[i, j]
    return _transposed(gxt.reshape(c * h * w, b)).reshape(b, c, h, w), np.ascontiguousarray(gweight), gbias




@checked
def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int = 1) -> np.ndarray:
    """Cross-correlation with valid padding: x (B,C,H,W), weight (O,C,kh,kw), bias (O,) -> (B,O,Ho,Wo)."""
    return _conv2d_fwd(x, weight, bias, stride)[0]


@checked
def conv2d_vjp(g: np.ndarray, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int = 1):
    """Gradients of conv2d with respect to (x, weight, bias)."""
    return _conv2d_bwd(_conv2d_fwd(x, weight, bias, stride)[1], g)


# ============================================================================== squash
def _norm(x: np.ndarray, axis: int) -> np.ndarray:
    """|x| along axis (kept): sqrt(sum x^2) where that sum neither overflows nor underflows, else
    scaled first by the largest |x_i| (so every finite x has its accurate, finite norm)."""
    with np.errstate(over="ignore", under="ignore"):
        sq = np.sum(x * x, axis=axis, keepdims=True)
        n = np.sqrt(sq)
        risky = ~(sq >= np.finfo(x.dtype).tiny) | np.isinf(sq)  # under- or overflowed (0 and NaN too)
        if np.any(risky):
            m = np.max(np.abs(x), axis=axis, keepdims=True)
            m = np.where(m > 0, m, 1)
            n = np.where(risky, m * np.sqrt(np.sum((x / m) * (x / m), axis=axis, keepdims=True)), n)
    return n


def _norm_terms(s: np.ndarray, axis: int):
    """|s|, the unit direction (0 where s = 0) and f(|s|) = |s| / (1 + |s|^2), overflow-safe."""
    n = _norm(s, axis)
    nz = n > 0
    safe_n = np.where(nz, n, 1)
    unit = np.where(nz, s / safe_n, 0)
    # n / (1 + n^2) written as 1 / (n + 1/n) so that a huge n gives ~1/n instead of inf/inf.
    f = np.where(nz, 1 / (safe_n + 1 / safe_n), 0).astype(s.dtype, copy=False)
    if np.any(np.isinf(n)):  # |s| beyond the float range though every s_i is finite: from s / max|s_i|
        m = np.max(np.abs(s), axis=axis, keepdims=True)
        r = np.sqrt(np.sum((s / m) * (s / m), axis=axis, keepdims=True))  # |s| / m, in [1, sqrt(dim)]
        unit = np.where(np.isinf(n), (s / m) / r, unit)
        f = np.where(np.isinf(n), (1 / m) / r, f).astype(s.dtype, copy=False)  # 1/|s|, as 1/(n + 1/n) is there
    return n, unit, f


def _squash_fwd(s, axis=-1):
    n, unit, f = _norm_terms(s, axis)
    # Beyond sqrt(max) (|s|^2 would overflow), |s|^2 / (1 + |s|^2) is 1 to the last bit: v is the unit
    # direction (f * s would lose bits to a subnormal f near the top of the range).
    return np.where(n > np.sqrt(np.finfo(s.dtype).max), unit, f * s).astype(s.dtype, copy=False), (s, axis)


def _squash_bwd(cache, g):
    s, axis = cache
    n, unit, f = _norm_terms(s, axis)
    # d/ds [f(n) s] applied to g: f g + n f'(n) unit (unit . g), with n f'(n) = f q and
    # q = (1 - n^2) / (1 + n^2) = 2 / (1 + n^2) - 1 (finite even when n^2 overflows).
    with np.errstate(over="ignore"):
        q = 2 / (1 + n * n) - 1
    return f * (g + q * unit * np.sum(unit * g, axis=axis, keepdims=True))


@checked
def squash(s: np.ndarray, axis: int = -1) -> np.ndarray:
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|, along `axis`; 0 at s = 0."""
    return _squash_fwd(s, axis)[0]


@checked
def squash_vjp(g: np.ndarray, s: np.ndarray, axis: int = -1):
    """Gradient of squash with respect to (s,); 0 at s = 0."""
    return (_squash_bwd((s, axis), g),)


# ============================================================================== primary capsules
def _to_capsules(a: np.ndarray, capsule_dim: int) -> np.ndarray:
    b, ch, gh, gw = a.shape
    t = ch // capsule_dim
    # Channels to the last axis *before* the reshape, so one capsule is D channels at one
    # grid position (not D neighbouring positions of one channel).
    return a.reshape(b, t, capsule_dim, gh, gw).transpose(0, 1, 3, 4, 2).reshape(b, t * gh * gw, capsule_dim)


def _from_capsules(g: np.ndarray, shape: tuple[int, ...], capsule_dim: int) -> np.ndarray:
    b, ch, gh, gw = shape
    t = ch // capsule_dim
    return g.reshape(b, t, gh, gw, capsule_dim).transpose(0, 1, 4, 2, 3).reshape(shape)


def _primary_fwd(h, weight, bias, capsule_dim, stride):
    a, conv_cache = _conv2d_fwd(h, weight, bias, stride)
    s = _to_capsules(a, capsule_dim)
    u, sq_cache = _squash_fwd(s)
    return u, (conv_cache, sq_cache, a.shape, capsule_dim)


def _primary_bwd(cache, g, need_input_grad=True):
    conv_cache, sq_cache, a_shape, capsule_dim = cache
    gs = _squash_bwd(sq_cache, g)
    ga = _from_capsules(gs, a_shape, capsule_dim)
    return _conv2d_bwd(conv_cache, np.ascontiguousarray(ga), need_input_grad)




@checked
def primary_capsules(h: np.ndarray, weight: np.ndarray, bias: np.ndarray, capsule_dim: int, stride: int) -> np.ndarray:
    """PrimaryCaps: conv (no ReLU), channels o = t*D + d regrouped into capsules, squashed.

    h (B,C,H,W), weight (T*D,C,k,k) -> u (B, T*Gh*Gw, D) with capsule i = (t*Gh + y)*Gw + x.
    """
    return _primary_fwd(h, weight, bias, capsule_dim, stride)[0]


@checked
def primary_capsules_vjp(g: np.ndarray, h: np.ndarray, weight: np.ndarray, bias: np.ndarray, capsule_dim: int, stride: int):
    """Gradients of primary_capsules with respect to (h, weight, bias)."""
    return _primary_bwd(_primary_fwd(h, weight, bias, capsule_dim, stride)[1], g)


# ============================================================================== predictions
def _predictions_fwd(u, weight):
    n, j, e, d = weight.shape
    b = u.shape[0]
    w = weight.reshape(n, j * e, d)
    # One (B, D) x (D, J*E) matmul per child capsule, batched over children by BLAS.
    out = np.matmul(u.transpose(1, 0, 2), w.transpose(0, 2, 1))  # (N, B, J*E)
    return out.transpose(1, 0, 2).reshape(b, n, j, e), (u, weight)


def _predictions_bwd(cache, g):
    u, weight = cache
    n, j, e, d = weight.shape
    g_t = g.reshape(g.shape[0], n, j * e).transpose(1, 0, 2)  # (N, B, J*E)
    u_t = u.transpose(1, 0, 2)  # (N, B, D)
    gw = np.matmul(g_t.transpose(0, 2, 1), u_t).reshape(weight.shape)
    gu = np.matmul(g_t, weight.reshape(n, j * e, d)).transpose(1, 0, 2)
    return np.ascontiguousarray(gu), gw




@checked
def predictions(u: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """u_hat[b, i, j] = weight[i, j] @ u[b, i]: u (B,N,D), weight (N,J,E,D) -> (B,N,J,E)."""
    return _predictions_fwd(u, weight)[0]


@checked
def predictions_vjp(g: np.ndarray, u: np.ndarray, weight: np.ndarray):
    """Gradients of predictions with respect to (u, weight)."""
    return _predictions_bwd((u, weight), g)


# ============================================================================== routing
def _softmax(b: np.ndarray, axis: int, none_of_the_above: bool = False) -> np.ndarray:
    """softmax along axis; with none_of_the_above, over the entries and one more logit fixed at 0 that
    stands for no entry (so the result sums to less than 1). The shift that keeps exp from overflowing
    counts that 0 logit too."""
    top = b.max(axis=axis, keepdims=True)
    if none_of_the_above:
        top = np.maximum(top, 0)
    z = np.exp(b - top)
    total = z.sum(axis=axis, keepdims=True)
    if none_of_the_above:
        total = total + np.exp(-top)
    return z / total


def _routing_fwd(u_hat, iterations, none_of_the_above=False):
    bsz, n, j, e = u_hat.shape
    # Work in (B, J, N, E) so both contractions below are batched BLAS matmuls.
    ut = np.ascontiguousarray(u_hat.transpose(0, 2, 1, 3))
    logits = np.zeros((bsz, j, n), dtype=u_hat.dtype)  # b_ij, one per example, starts at 0
    cs, ss, vs = [], [], []
    for t in range(iterations):
        c = _softmax(logits, 1, none_of_the_above)  # over the parents j, never over the children
        s = np.matmul(c[:, :, None, :], ut)[:, :, 0, :]  # (B, J, E)
        v, _ = _squash_fwd(s)
        cs.append(c), ss.append(s), vs.append(v)
        if t + 1 < iterations:  # the last update of b cannot change any output
            logits = logits + np.matmul(ut, v[:, :, :, None])[..., 0]
    c_out = np.ascontiguousarray(cs[-1].transpose(0, 2, 1))
    return (vs[-1], c_out), (ut, cs, ss, vs)


def _routing_bwd(cache, g_v, g_c=None):
    ut, cs, ss, vs = cache
    bsz, j, n, e = ut.shape
    iterations = len(cs)
    # The gradient with respect to u_hat is a sum of outer products, one per use of u_hat: c_t (x) g_s_t
    # for every s_t = sum_i c_t u_hat, and g_b (x) v_t for every update b += <u_hat, v_t>. Their factors
    # are gathered here and summed in one batched matrix product at the end (left[..., k] times
    # right[..., k, :], over k): the same sum, without a (B, J, N, E) temporary per term.
    left, right = [], []
    g_logits = None  # gradient with respect to b after the current iteration's update
    for t in reversed(range(iterations)):
        c, s, v = cs[t], ss[t], vs[t]
        gv = g_v.copy() if t == iterations - 1 else np.zeros_like(v)
        if g_logits is not None:
            # b_t = b_{t-1} + <u_hat, v_t>
            gv += np.matmul(g_logits[:, :, None, :], ut)[:, :, 0, :]
            left.append(g_logits), right.append(v)
        gs = _squash_bwd((s, -1), gv)
        # s_t = sum_i c_t u_hat
        left.append(c), right.append(gs)
        gc = np.matmul(ut, gs[:, :, :, None])[..., 0]
        if t == iterations - 1 and g_c is not None:
            gc = gc + g_c.transpose(0, 2, 1)
        # c_t = softmax_j(b_{t-1}); b_{t-1} also passes straight through to b_t. With none_of_the_above
        # the softmax's extra logit is a constant, so dc_j/db_k = c_j (delta_jk - c_k) all the same.
        g_prev = c * (gc - np.sum(c * gc, axis=1, keepdims=True))
        g_logits = g_prev if g_logits is None else g_logits + g_prev
    g_u_hat = np.empty((bsz, n, j, e), dtype=ut.dtype)  # written through its (B, J, N, E) view
    np.matmul(np.stack(left, axis=-1), np.stack(right, axis=-2), out=g_u_hat.transpose(0, 2, 1, 3))
    return g_u_hat


@checked
def routing(u_hat: np.ndarray, iterations: int, none_of_the_above: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Procedure 1, routing by agreement. u_hat (B,N,J,E) -> (v (B,J,E), c (B,N,J)).

    c are the coupling coefficients used in the last iteration: c[b, i] sums to 1 over j, or, with
    none_of_the_above, to less than 1: the softmax over j then has one more logit, fixed at 0, that no
    class capsule stands for (the paper's section 7; docs/spec.md, section 2).
    """
    return _routing_fwd(u_hat, iterations, none_of_the_above)[0]


@checked
def routing_vjp(g: tuple[np.ndarray, np.ndarray | None], u_hat: np.ndarray, iterations: int,
                none_of_the_above: bool = False):
    """Gradient of routing with respect to (u_hat,), given g = (g_v, g_c); g_c may be None."""
    return (_routing_bwd(_routing_fwd(u_hat, iterations, none_of_the_above)[1], *g),)


# ============================================================================== lengths
@checked
def capsule_lengths(v: np.ndarray) -> np.ndarray:
    """|v_j| along the last axis: (..., E) -> (...)."""
    return _norm(v, -1)[..., 0]  # scaled where the squares would over- or underflow


def _lengths_bwd(v, g):
    _, unit, _ = _norm_terms(v, -1)  # v / |v|, 0 at v = 0, also where |v| itself overflows
    return unit * g[..., None]


@checked
def capsule_lengths_vjp(g: np.ndarray, v: np.ndarray):
    """Gradient of capsule_lengths with respect to (v,): g v / |v|, and 0 where v = 0."""
    return (_lengths_bwd(v, g),)


# ============================================================================== margin loss
def _present(labels, num_classes, dtype):
    """T[b, j] = 1 for every class j in row b of labels ((B,): one class, (B, K): K distinct ones)."""
    rows = labels.reshape(labels.shape[0], -1)
    present = np.zeros((labels.shape[0], num_classes), dtype=dtype)
    present[np.arange(rows.shape[0])[:, None], rows] = 1
    return present


def _margin_terms(lengths, labels, m_plus, m_minus):
    present = _present(labels, lengths.shape[1], lengths.dtype)
    up = np.maximum(m_plus - lengths, 0)
    down = np.maximum(lengths - m_minus, 0)
    return present, up, down


@checked
def margin_loss(lengths: np.ndarray, labels: np.ndarray, m_plus: float = 0.9, m_minus: float = 0.1,
                lambda_: float = 0.5) -> np.ndarray:
    """Eq. 4 on the capsule lengths (not a softmax of them), summed over classes, averaged over the batch.

    labels (B,) name one present class per example; (B, K) name K distinct present classes
    (MultiMNIST: T_j = 1 for both digits' classes).
    """
    t, up, down = _margin_terms(lengths, labels, m_plus, m_minus)
    per_class = t * up * up + lambda_ * (1 - t) * down * down
    return per_class.sum(axis=1).mean(dtype=lengths.dtype)


@checked
def margin_loss_vjp(g: np.ndarray, lengths: np.ndarray, labels: np.ndarray, m_plus: float = 0.9,
                    m_minus: float = 0.1, lambda_: float = 0.5):
    """Gradient of margin_loss with respect to (lengths,)."""
    g = np.asarray(g, dtype=lengths.dtype)
    t, up, down = _margin_terms(lengths, labels, m_plus, m_minus)
    grad = (-2 * t * up + 2 * lambda_ * (1 - t) * down) * (g / lengths.shape[0])
    return (grad.astype(lengths.dtype, copy=False),)


# ============================================================================== masking
def _mask_onehot(v, labels):
    """(B, J) one-hot of the kept class, or (B, K, J) for (B, K) labels (row k keeps labels[:, k])."""
    if labels is None:
        labels = np.argmax(np.sum(v * v, axis=-1), axis=1)  # ties: the lowest class index
    return (labels[..., None] == np.arange(v.shape[1])).astype(v.dtype)


def _apply_mask(v, onehot):
    """v (B,J,E) masked by a (B,J) one-hot -> (B, J*E), or by a (B,K,J) one -> (B, K, J*E)."""
    if onehot.ndim == 2:
        return (v * onehot[:, :, None]).reshape(v.shape[0], -1)
    return (v[:, None] * onehot[..., None]).reshape(*onehot.shape[:2], -1)


def _unmask(g, v, onehot):
    """The adjoint of _apply_mask: g shaped like its output -> (B, J, E) (the K rows' terms summed)."""
    if onehot.ndim == 2:
        return g.reshape(v.shape) * onehot[:, :, None]
    return np.sum(g.reshape(*onehot.shape, v.shape[2]) * onehot[..., None], axis=1)


@checked
def mask(v: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Zero every class capsule but one and flatten class-major: v (B,J,E) -> (B, J*E).

    The kept capsule is the true class's when labels (B,) are given, else the longest. With
    (B, K) labels the result is (B, K, J*E): row k keeps the capsule of class labels[:, k].
    """
    return _apply_mask(v, _mask_onehot(v, labels))


@checked
def mask_vjp(g: np.ndarray, v: np.ndarray, labels: np.ndarray | None = None):
    """Gradient of mask with respect to (v,) (the choice of capsule is piecewise constant)."""
    return (_unmask(g, v, _mask_onehot(v, labels)),)


# ============================================================================== decoder
def _sigmoid(z):
    # The tanh form never overflows, for any finite z.
    return 0.5 * (1 + np.tanh(0.5 * z))


def _decoder_fwd(x, weights, biases):
    """The MLP on x (..., width): leading dims are flattened to rows, run as one batch, restored."""
    lead = x.shape[:-1]
    h = x.reshape(-1, x.shape[-1])
    hs = [h]
    last = len(weights) - 1
    for k, (w, b) in enumerate(zip(weights, biases)):
        z = h @ w.T + b
        h = _sigmoid(z) if k == last else np.maximum(z, 0)
        hs.append(h)
    return h.reshape(*lead, h.shape[-1]), (hs, lead)


def _decoder_bwd(cache, weights, g):
    hs, lead = cache
    gws, gbs = [None] * len(weights), [None] * len(weights)
    out = hs[-1]
    gz = g.reshape(out.shape) * out * (1 - out)
    for k in reversed(range(len(weights))):
        gws[k] = gz.T @ hs[k]
        gbs[k] = gz.sum(axis=0)
        gh = gz @ weights[k]
        if k > 0:
            gz = gh * (hs[k] > 0)
    return gh.reshape(*lead, gh.shape[-1]), gws, gbs


@checked
def decoder(x: np.ndarray, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]) -> np.ndarray:
    """Fully connected layers y = x @ W.T + b, ReLU between them and a sigmoid at the end.

    x (..., width) -> (..., out): the same MLP on every row (MultiMNIST decodes (B, K, J*E)).
    """
    return _decoder_fwd(x, weights, biases)[0]


@checked
def decoder_vjp(g: np.ndarray, x: np.ndarray, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray]):
    """Gradients of decoder with respect to (x, weights, biases); the last two are lists."""
    return _decoder_bwd(_decoder_fwd(x, weights, biases)[1], weights, g)


# ============================================================================== reconstruction loss
def _recon_diff(reconstruction, images):
    return reconstruction - images.reshape(reconstruction.shape)


@checked
def reconstruction_loss(reconstruction: np.ndarray, images: np.ndarray, scale: float = 0.0005) -> np.ndarray:
    """scale * sum over pixels of (reconstruction - image)^2, averaged over the batch.

    images (B, C, H, W) are flattened row-major from (C, H, W) to match reconstruction (B, C*H*W).
    With K reconstructions per example, reconstruction (B, K, C*H*W) and images (B, K, C, H, W):
    the squared error is summed over every axis but the batch, so the K digits' terms add up.
    """
    d = _recon_diff(reconstruction, images)
    return (scale * np.sum(d * d, axis=tuple(range(1, d.ndim)))).mean(dtype=d.dtype)


@checked
def reconstruction_loss_vjp(g: np.ndarray, reconstruction: np.ndarray, images: np.ndarray, scale: float = 0.0005):
    """Gradient of reconstruction_loss with respect to (reconstruction,)."""
    g = np.asarray(g, dtype=reconstruction.dtype)
    d = _recon_diff(reconstruction, images)
    return ((2 * scale / reconstruction.shape[0]) * g * d,)
