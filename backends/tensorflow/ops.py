"""The spec's ops on TensorFlow tensors, with VJPs computed by tf.GradientTape.

Every op of capsspec.spec.OPS has the reference's name and signature (capsspec.ops), takes the
reference's canonical layouts (NCHW images, OIHW convolution kernels, (out, in) dense weights)
and does the same arithmetic with TensorFlow operations, so that a GradientTape differentiates
it. Each ``<op>_vjp(g, *args)`` runs the op under a tape that watches its differentiable
arguments and returns ``tape.gradient(out, args, output_gradients=g)``.

TensorFlow's CPU convolutions only run channels-last, so the convolution ops move NCHW/OIHW to
NHWC/HWIO, convolve, and move back. The model (model.py) stays channels-last all the way and
calls the private, unchecked NHWC forms below (``_conv2d_nhwc``, ``_primary_capsules_nhwc``,
``_predictions_bjne``, ``_routing_bjne``, ...), so each piece of math is written once and the
public ops are thin layout adapters around it.

Numerics the spec fixes (capsspec.ops states them) and how they are met under autodiff:
* squash(s) = s |s| / (1 + |s|^2), value and gradient exactly 0 at s = 0. tf.norm's gradient
  at 0 is NaN (0 * inf), so |s| is sqrt(where(|s|^2 > 0, |s|^2, 1)) and the factor is masked
  again afterwards ("double where"): the tape never differentiates sqrt at 0. The factor
  |s| / (1 + |s|^2) is n / (1 + n^2) for n <= 1 and 1 / (n + 1/n) for n > 1, each branch on a
  clamped n, so neither value nor gradient overflows for any s whose |s|^2 is finite.
* capsule_lengths has gradient 0 at v = 0 (same double where).
* Routing: b starts at 0 for each example (shape (B, J, N)), the softmax runs over the parents
  j, nothing is stopped (gradients flow through every iteration), the returned coupling
  coefficients are the last iteration's; only the iterations are a Python loop.
* PrimaryCaps in NHWC: the conv output (B, Gh, Gw, T*D) has channel o = t*D + d last already,
  but capsule i = (t*Gh + y)*Gw + x puts the *type* before the grid, so the type axis is moved
  in front of (Gh, Gw) before flattening. Flattening (Gh, Gw, T) directly would give a
  different capsule order (PAPER.md, mistake 3, in its channels-last form).
* Argmax ties (mask at inference, predict) go to the lowest class index, stated explicitly
  rather than left to tf.math.argmax (whose docs leave ties unspecified).

Inputs are validated like the reference's (ValueError naming the argument, what was expected
and what came) on type, shape and dtype. Values are not checked for NaN/inf (that would read
every tensor back to the host); label ranges are checked (a host read of the labels).

What this module must never do: import the reference's implementation, or change its inputs.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import; a user's setting wins

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from capsspec.validation import check_same_dtype  # noqa: E402

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
    "check_tensor", "check_label_tensor",
]

_FLOATS = (tf.float32, tf.float64)
_INTS = (tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8, tf.uint16, tf.uint32, tf.uint64)

# Layout permutations between the spec's canonical layouts and TensorFlow's channels-last ones.
NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)
OIHW_TO_HWIO = (2, 3, 1, 0)
HWIO_TO_OIHW = (3, 2, 0, 1)


# ============================================================================== validation
def _shape_text(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _is_tensor(t: Any) -> bool:
    return tf.is_tensor(t) and not isinstance(t, (tf.SparseTensor, tf.RaggedTensor))


def check_tensor(name: str, t: Any, *, ndim: int | None = None, shape: Sequence[int | None] | None = None) -> Any:
    """A float32/float64 tf.Tensor (or tf.Variable) of the given rank/shape (values are not read)."""
    if not _is_tensor(t):
        raise ValueError(f"{name} must be a tf.Tensor of float32 or float64, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must have dtype float32 or float64, got {t.dtype.name}")
    if shape is not None:
        ndim = len(shape)
    got = tuple(t.shape)
    if ndim is not None and len(got) != ndim:
        want = f"shape {_shape_text(shape)}" if shape is not None else f"{ndim} dimensions"
        raise ValueError(f"{name} must have {want}, got shape {got}")
    if shape is not None and any(w is not None and w != g for w, g in zip(shape, got)):
        raise ValueError(f"{name} must have shape {_shape_text(shape)}, got shape {got}")
    return t


def check_label_tensor(name: str, labels: Any, batch: int, num_classes: int, *, check_range: bool = True) -> Any:
    """Integer class labels of shape (batch,) in [0, num_classes). The range check reads the
    labels back to the host; check_range=False skips it, and so do symbolic labels (an op
    called inside a user's tf.function), which have no values to read."""
    if not _is_tensor(labels):
        raise ValueError(f"{name} must be a tf.Tensor of integers, got {type(labels).__name__}")
    if labels.dtype not in _INTS:
        raise ValueError(f"{name} must have an integer dtype, got {labels.dtype.name}")
    if tuple(labels.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got shape {tuple(labels.shape)}")
    if check_range and batch and hasattr(labels, "numpy") and tf.executing_eagerly():
        values = labels.numpy()
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got a label {lo if lo < 0 else hi}")
    return labels


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_cotangent(name: str, g: Any, like: Any) -> Any:
    check_tensor(name, g, shape=tuple(like.shape))
    check_same_dtype(**{name: g, "the op's output": like})
    return g


def _scalar_cotangent(g: Any, like: Any) -> Any:
    """The cotangent of a scalar loss: a 0-d tensor or a Python/NumPy number, in like's dtype."""
    if _is_tensor(g):
        if g.shape.rank != 0:
            raise ValueError(f"g must be a scalar (the loss is a scalar), got shape {tuple(g.shape)}")
        return tf.cast(g, like.dtype)
    if isinstance(g, (np.ndarray, np.generic)) and np.shape(g) != ():
        raise ValueError(f"g must be a scalar (the loss is a scalar), got shape {np.shape(g)}")
    if isinstance(g, bool) or not isinstance(g, (int, float, np.ndarray, np.generic)):
        raise ValueError(f"g must be a scalar tensor or number, got {type(g).__name__}")
    return tf.constant(float(g), dtype=like.dtype)


# ============================================================================== tape plumbing
def _vjp(fn: Callable[..., Any], args: Sequence[Any], cotangents: Callable[[Any], Sequence[Any]]) -> list[Any]:
    """Runs fn(*args) under a tape and returns the VJP of the cotangents with every arg.

    cotangents(outputs) -> a list pairing each output with its cotangent (None to skip it); it
    sees the outputs so that it can check the cotangents' shapes against them. Arguments the
    outputs do not depend on (routing's c after one iteration) get zeros, not None.
    """
    args = [tf.convert_to_tensor(a) for a in args]  # a tf.Variable becomes a watched tensor
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        for a in args:
            tape.watch(a)
        outs = fn(*args)
    pairs = [(o, g) for o, g in cotangents(outs) if g is not None]
    grads = tape.gradient([o for o, _ in pairs], args, output_gradients=[g for _, g in pairs],
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return list(grads)


# ============================================================================== conv2d
def _conv2d_nhwc(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor, stride: int) -> tf.Tensor:
    """Valid cross-correlation in TensorFlow's layouts: x (B,H,W,C), kernel (kh,kw,C,O) -> (B,Ho,Wo,O)."""
    return tf.nn.bias_add(tf.nn.conv2d(x, kernel, strides=stride, padding="VALID"), bias)


def _conv2d(x: tf.Tensor, weight: tf.Tensor, bias: tf.Tensor, stride: int) -> tf.Tensor:
    y = _conv2d_nhwc(tf.transpose(x, NCHW_TO_NHWC), tf.transpose(weight, OIHW_TO_HWIO), bias, stride)
    return tf.transpose(y, NHWC_TO_NCHW)


def _check_conv2d(x, weight, bias, stride) -> int:
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    stride = _check_int("stride", stride)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must have shape (out, {x.shape[1]}, kh, kw) to match x's {x.shape[1]} channels, "
            f"got {tuple(weight.shape)}"
        )
    check_tensor("bias", bias, shape=(weight.shape[0],))
    if weight.shape[2] > x.shape[2] or weight.shape[3] > x.shape[3]:
        raise ValueError(f"weight's kernel {tuple(weight.shape[2:])} is larger than x's spatial size {tuple(x.shape[2:])}")
    check_same_dtype(x=x, weight=weight, bias=bias)
    return stride


def conv2d(x: tf.Tensor, weight: tf.Tensor, bias: tf.Tensor, stride: int = 1) -> tf.Tensor:
    """Cross-correlation with valid padding: x (B,C,H,W), weight (O,C,kh,kw), bias (O,) -> (B,O,Ho,Wo)."""
    stride = _check_conv2d(x, weight, bias, stride)
    return _conv2d(x, weight, bias, stride)


def conv2d_vjp(g: tf.Tensor, x: tf.Tensor, weight: tf.Tensor, bias: tf.Tensor, stride: int = 1):
    """Gradients of conv2d with respect to (x, weight, bias)."""
    stride = _check_conv2d(x, weight, bias, stride)
    return tuple(_vjp(lambda *a: _conv2d(*a, stride), [x, weight, bias],
                      lambda y: [(y, _check_cotangent("g", g, y))]))


# ============================================================================== squash
def _safe_norm(sq: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(|s| where |s|^2 > 0 else 1, the mask |s|^2 > 0): a norm whose gradient is finite everywhere."""
    nz = sq > 0
    return tf.sqrt(tf.where(nz, sq, tf.ones_like(sq))), nz


def _squash(s: tf.Tensor, axis: int = -1) -> tf.Tensor:
    n, nz = _safe_norm(tf.reduce_sum(s * s, axis=axis, keepdims=True))
    one = tf.ones_like(n)
    small = tf.minimum(n, one)
    large = tf.maximum(n, one)
    # n / (1 + n^2), written as 1 / (n + 1/n) above 1 so that a huge n gives ~1/n, not inf/inf.
    f = tf.where(n <= 1, small / (1 + small * small), 1 / (large + 1 / large))
    return tf.where(nz, f, tf.zeros_like(f)) * s


def _check_axis(axis: object, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be an int in [{-ndim}, {ndim}), got {axis!r}")
    return int(axis)


def squash(s: tf.Tensor, axis: int = -1) -> tf.Tensor:
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|, along `axis`; 0 at s = 0."""
    check_tensor("s", s)
    return _squash(s, _check_axis(axis, max(s.shape.rank, 1)))


def squash_vjp(g: tf.Tensor, s: tf.Tensor, axis: int = -1):
    """Gradient of squash with respect to (s,); 0 at s = 0."""
    check_tensor("s", s)
    axis = _check_axis(axis, max(s.shape.rank, 1))
    return tuple(_vjp(lambda a: _squash(a, axis), [s], lambda out: [(out, _check_cotangent("g", g, out))]))


# ============================================================================== primary capsules
def _to_capsules_nhwc(a: tf.Tensor, capsule_dim: int) -> tf.Tensor:
    """(B, Gh, Gw, T*D) -> (B, T*Gh*Gw, D) with capsule i = (t*Gh + y)*Gw + x and dim d = channel t*D + d."""
    _, gh, gw, ch = a.shape
    t = ch // capsule_dim
    # Split channels into (type, dim), then move the type axis in front of the grid: the spec's
    # capsule index runs over (type, row, column), not (row, column, type).
    caps = tf.transpose(tf.reshape(a, [-1, gh, gw, t, capsule_dim]), (0, 3, 1, 2, 4))
    return tf.reshape(caps, [-1, t * gh * gw, capsule_dim])


def _primary_capsules_nhwc(h: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor, capsule_dim: int,
                           stride: int) -> tf.Tensor:
    # No ReLU before squash: the spec's PrimaryCaps is the convolution, regrouped, squashed.
    return _squash(_to_capsules_nhwc(_conv2d_nhwc(h, kernel, bias, stride), capsule_dim))


def _primary_capsules(h, weight, bias, capsule_dim: int, stride: int) -> tf.Tensor:
    return _primary_capsules_nhwc(tf.transpose(h, NCHW_TO_NHWC), tf.transpose(weight, OIHW_TO_HWIO), bias,
                                  capsule_dim, stride)


def _check_primary(h, weight, bias, capsule_dim, stride) -> tuple[int, int]:
    stride = _check_conv2d(h, weight, bias, stride)
    capsule_dim = _check_int("capsule_dim", capsule_dim)
    if weight.shape[0] % capsule_dim:
        raise ValueError(
            f"weight's {weight.shape[0]} output channels are not a whole number of {capsule_dim}-D capsule types"
        )
    return capsule_dim, stride


def primary_capsules(h: tf.Tensor, weight: tf.Tensor, bias: tf.Tensor, capsule_dim: int, stride: int) -> tf.Tensor:
    """PrimaryCaps: conv (no ReLU), channels o = t*D + d regrouped into capsules, squashed.

    h (B,C,H,W), weight (T*D,C,k,k) -> u (B, T*Gh*Gw, D) with capsule i = (t*Gh + y)*Gw + x.
    """
    capsule_dim, stride = _check_primary(h, weight, bias, capsule_dim, stride)
    return _primary_capsules(h, weight, bias, capsule_dim, stride)


def primary_capsules_vjp(g: tf.Tensor, h: tf.Tensor, weight: tf.Tensor, bias: tf.Tensor, capsule_dim: int,
                         stride: int):
    """Gradients of primary_capsules with respect to (h, weight, bias)."""
    capsule_dim, stride = _check_primary(h, weight, bias, capsule_dim, stride)
    return tuple(_vjp(lambda *a: _primary_capsules(*a, capsule_dim, stride), [h, weight, bias],
                      lambda u: [(u, _check_cotangent("g", g, u))]))


# ============================================================================== predictions
def _predictions_nbje(u: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """(N, B, J, E): one (B, D) x (D, J*E) product per child capsule, batched over the children."""
    n, j, e, d = weight.shape
    out = tf.matmul(tf.transpose(u, (1, 0, 2)), tf.reshape(weight, [n, j * e, d]), transpose_b=True)
    return tf.reshape(out, [n, -1, j, e])


def _predictions(u: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    return tf.transpose(_predictions_nbje(u, weight), (1, 0, 2, 3))


def _predictions_bjne(u: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """u_hat laid out (B, J, N, E), the layout routing works in (one transpose instead of two)."""
    return tf.transpose(_predictions_nbje(u, weight), (1, 2, 0, 3))


def _check_predictions(u, weight) -> None:
    check_tensor("u", u, ndim=3)
    check_tensor("weight", weight, ndim=4)
    n, d = u.shape[1], u.shape[2]
    if weight.shape[0] != n or weight.shape[3] != d:
        raise ValueError(
            f"weight must have shape ({n}, J, E, {d}) to match u's {n} capsules of {d} dims, got {tuple(weight.shape)}"
        )
    check_same_dtype(u=u, weight=weight)


def predictions(u: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """u_hat[b, i, j] = weight[i, j] @ u[b, i]: u (B,N,D), weight (N,J,E,D) -> (B,N,J,E)."""
    _check_predictions(u, weight)
    return _predictions(u, weight)


def predictions_vjp(g: tf.Tensor, u: tf.Tensor, weight: tf.Tensor):
    """Gradients of predictions with respect to (u, weight)."""
    _check_predictions(u, weight)
    return tuple(_vjp(_predictions, [u, weight], lambda out: [(out, _check_cotangent("g", g, out))]))


# ============================================================================== routing
def _routing_bjne(ut: tf.Tensor, iterations: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Routing on u_hat laid out (B, J, N, E), so both contractions are batched matmuls over (B, J).

    Returns v (B, J, E) and the last iteration's coupling coefficients c (B, N, J).
    """
    logits = tf.zeros(tf.shape(ut)[:3], dtype=ut.dtype)  # b_ij, one set per example, starting at 0
    for t in range(iterations):
        c = tf.nn.softmax(logits, axis=1)  # over the parents j, never over the children i
        s = tf.squeeze(tf.matmul(c[:, :, tf.newaxis, :], ut), axis=2)  # (B, J, E)
        v = _squash(s)
        if t + 1 < iterations:  # the last update of b cannot change any output
            # Nothing is stopped: gradients flow through every iteration.
            logits = logits + tf.squeeze(tf.matmul(ut, v[:, :, :, tf.newaxis]), axis=3)
    return v, tf.transpose(c, (0, 2, 1))


def _routing(u_hat: tf.Tensor, iterations: int) -> tuple[tf.Tensor, tf.Tensor]:
    return _routing_bjne(tf.transpose(u_hat, (0, 2, 1, 3)), iterations)


def routing(u_hat: tf.Tensor, iterations: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Procedure 1, routing by agreement. u_hat (B,N,J,E) -> (v (B,J,E), c (B,N,J)).

    c are the coupling coefficients used in the last iteration: c[b, i] sums to 1 over j.
    """
    check_tensor("u_hat", u_hat, ndim=4)
    return _routing(u_hat, _check_int("iterations", iterations))


def routing_vjp(g: tuple[tf.Tensor, tf.Tensor | None], u_hat: tf.Tensor, iterations: int):
    """Gradient of routing with respect to (u_hat,), given g = (g_v, g_c); g_c may be None."""
    check_tensor("u_hat", u_hat, ndim=4)
    iterations = _check_int("iterations", iterations)
    if not isinstance(g, (tuple, list)) or len(g) != 2:
        raise ValueError(f"g must be a pair (g_v, g_c) with g_c possibly None, got {type(g).__name__}")
    g_v, g_c = g
    bsz, n, j, e = u_hat.shape
    check_tensor("g_v", g_v, shape=(bsz, j, e))
    if g_c is not None:
        check_tensor("g_c", g_c, shape=(bsz, n, j))
    check_same_dtype(u_hat=u_hat, g_v=g_v, g_c=g_c)
    return tuple(_vjp(lambda a: _routing(a, iterations), [u_hat], lambda out: [(out[0], g_v), (out[1], g_c)]))


# ============================================================================== lengths
def _lengths(v: tf.Tensor) -> tf.Tensor:
    n, nz = _safe_norm(tf.reduce_sum(v * v, axis=-1))
    return tf.where(nz, n, tf.zeros_like(n))


def capsule_lengths(v: tf.Tensor) -> tf.Tensor:
    """|v_j| along the last axis: (..., E) -> (...)."""
    check_tensor("v", v)
    if v.shape.rank == 0:
        raise ValueError("v must have at least 1 dimension (the capsule's), got a 0-d tensor")
    return _lengths(v)


def capsule_lengths_vjp(g: tf.Tensor, v: tf.Tensor):
    """Gradient of capsule_lengths with respect to (v,): g v / |v|, and 0 where v = 0."""
    capsule_lengths(v)
    return tuple(_vjp(_lengths, [v], lambda out: [(out, _check_cotangent("g", g, out))]))


# ============================================================================== margin loss
def _margin_loss(lengths: tf.Tensor, labels: tf.Tensor, m_plus: float, m_minus: float, lambda_: float) -> tf.Tensor:
    present = tf.one_hot(labels, lengths.shape[1], dtype=lengths.dtype)
    up = tf.nn.relu(m_plus - lengths)
    down = tf.nn.relu(lengths - m_minus)
    # On the lengths themselves, never on a softmax of them.
    per_class = present * up * up + lambda_ * (1 - present) * down * down
    return tf.reduce_mean(tf.reduce_sum(per_class, axis=1))


def _check_margin(lengths, labels, m_plus, m_minus, lambda_) -> tuple[float, float, float]:
    check_tensor("lengths", lengths, ndim=2)
    check_label_tensor("labels", labels, lengths.shape[0], lengths.shape[1])
    return _check_number("m_plus", m_plus), _check_number("m_minus", m_minus), _check_number("lambda_", lambda_)


def margin_loss(lengths: tf.Tensor, labels: tf.Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                lambda_: float = 0.5) -> tf.Tensor:
    """Eq. 4 on the capsule lengths (not a softmax of them), summed over classes, averaged over the batch."""
    m_plus, m_minus, lambda_ = _check_margin(lengths, labels, m_plus, m_minus, lambda_)
    return _margin_loss(lengths, labels, m_plus, m_minus, lambda_)


def margin_loss_vjp(g: Any, lengths: tf.Tensor, labels: tf.Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                    lambda_: float = 0.5):
    """Gradient of margin_loss with respect to (lengths,)."""
    m_plus, m_minus, lambda_ = _check_margin(lengths, labels, m_plus, m_minus, lambda_)
    g = _scalar_cotangent(g, lengths)
    return tuple(_vjp(lambda a: _margin_loss(a, labels, m_plus, m_minus, lambda_), [lengths],
                      lambda out: [(out, g)]))


# ============================================================================== masking
def _first_argmax(scores: tf.Tensor) -> tf.Tensor:
    """argmax over axis 1 with ties going to the lowest index, as int64."""
    top = tf.reduce_max(scores, axis=1, keepdims=True)
    classes = tf.range(scores.shape[1], dtype=tf.int64)
    return tf.reduce_min(tf.where(scores == top, classes, tf.constant(scores.shape[1], tf.int64)), axis=1)


def _mask(v: tf.Tensor, labels: tf.Tensor | None) -> tf.Tensor:
    _, j, e = v.shape
    if labels is None:
        labels = _first_argmax(tf.reduce_sum(v * v, axis=-1))  # the longest capsule
    onehot = tf.one_hot(labels, j, dtype=v.dtype)
    return tf.reshape(v * onehot[:, :, tf.newaxis], [-1, j * e])  # class-major: feature j * E + e


def _check_mask(v, labels) -> None:
    check_tensor("v", v, ndim=3)
    if labels is not None:
        check_label_tensor("labels", labels, v.shape[0], v.shape[1])


def mask(v: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
    """Zero every class capsule but one and flatten class-major: v (B,J,E) -> (B, J*E).

    The kept capsule is the true class's when labels are given, else the longest.
    """
    _check_mask(v, labels)
    return _mask(v, labels)


def mask_vjp(g: tf.Tensor, v: tf.Tensor, labels: tf.Tensor | None = None):
    """Gradient of mask with respect to (v,) (the choice of capsule is piecewise constant)."""
    _check_mask(v, labels)
    return tuple(_vjp(lambda a: _mask(a, labels), [v], lambda out: [(out, _check_cotangent("g", g, out))]))


# ============================================================================== decoder
def _decoder(x: tf.Tensor, weights: Sequence[tf.Tensor], biases: Sequence[tf.Tensor], *,
             in_out: bool = False) -> tf.Tensor:
    """Dense layers, ReLU between them, sigmoid last. Weights are (out, in) as the spec lays them
    out, or (in, out) as TensorFlow stores dense kernels when in_out is set (the model's)."""
    h = x
    last = len(weights) - 1
    for k, (w, b) in enumerate(zip(weights, biases)):
        z = tf.matmul(h, w, transpose_b=not in_out) + b
        h = tf.sigmoid(z) if k == last else tf.nn.relu(z)
    return h


def _check_decoder(x, weights, biases) -> None:
    check_tensor("x", x, ndim=2)
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise ValueError("weights and biases must be sequences of tensors, one per layer")
    if len(weights) == 0 or len(weights) != len(biases):
        raise ValueError(f"weights and biases must be non-empty and of equal length, got {len(weights)} and {len(biases)}")
    width = x.shape[1]
    for k, (w, b) in enumerate(zip(weights, biases)):
        check_tensor(f"weights[{k}]", w, shape=(None, width))
        check_tensor(f"biases[{k}]", b, shape=(w.shape[0],))
        check_same_dtype(x=x, **{f"weights[{k}]": w, f"biases[{k}]": b})
        width = w.shape[0]


def decoder(x: tf.Tensor, weights: Sequence[tf.Tensor], biases: Sequence[tf.Tensor]) -> tf.Tensor:
    """Fully connected layers y = x @ W.T + b, ReLU between them and a sigmoid at the end."""
    _check_decoder(x, weights, biases)
    return _decoder(x, weights, biases)


def decoder_vjp(g: tf.Tensor, x: tf.Tensor, weights: Sequence[tf.Tensor], biases: Sequence[tf.Tensor]):
    """Gradients of decoder with respect to (x, weights, biases); the last two are lists."""
    _check_decoder(x, weights, biases)
    k = len(weights)
    grads = _vjp(lambda a, *wb: _decoder(a, wb[:k], wb[k:]), [x, *weights, *biases],
                 lambda out: [(out, _check_cotangent("g", g, out))])
    return grads[0], list(grads[1:1 + k]), list(grads[1 + k:])


# ============================================================================== reconstruction loss
def _reconstruction_loss(reconstruction: tf.Tensor, images: tf.Tensor, scale: float) -> tf.Tensor:
    # NCHW images flatten row-major from (C, H, W), the spec's pixel order.
    d = reconstruction - tf.reshape(images, tf.shape(reconstruction))
    return tf.reduce_mean(scale * tf.reduce_sum(d * d, axis=1))


def _check_reconstruction(reconstruction, images, scale) -> float:
    check_tensor("reconstruction", reconstruction, ndim=2)
    check_tensor("images", images)
    shape = tuple(images.shape)
    if len(shape) == 0 or shape[0] != reconstruction.shape[0] or math.prod(shape[1:]) != reconstruction.shape[1]:
        raise ValueError(
            f"images {shape} do not match reconstruction {tuple(reconstruction.shape)}: "
            "each image must flatten to one reconstruction row"
        )
    check_same_dtype(reconstruction=reconstruction, images=images)
    return _check_number("scale", scale)


def reconstruction_loss(reconstruction: tf.Tensor, images: tf.Tensor, scale: float = 0.0005) -> tf.Tensor:
    """scale * sum over pixels of (reconstruction - image)^2, averaged over the batch.

    images (B, C, H, W) are flattened row-major from (C, H, W) to match reconstruction (B, C*H*W).
    """
    scale = _check_reconstruction(reconstruction, images, scale)
    return _reconstruction_loss(reconstruction, images, scale)


def reconstruction_loss_vjp(g: Any, reconstruction: tf.Tensor, images: tf.Tensor, scale: float = 0.0005):
    """Gradient of reconstruction_loss with respect to (reconstruction,)."""
    scale = _check_reconstruction(reconstruction, images, scale)
    g = _scalar_cotangent(g, reconstruction)
    return tuple(_vjp(lambda a: _reconstruction_loss(a, images, scale), [reconstruction], lambda out: [(out, g)]))
