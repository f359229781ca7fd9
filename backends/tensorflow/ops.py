"""The spec's ops on TensorFlow tensors, with VJPs computed by tf.GradientTape.

Every op of capsspec.spec.OPS has the reference's name and signature (capsspec.ops), takes the
reference's canonical layouts (NCHW images, OIHW convolution kernels, (out, in) dense weights)
and does the same arithmetic with TensorFlow operations, so that a GradientTape differentiates
it. Each ``<op>_vjp(g, *args)`` runs the op under a tape that watches its differentiable
arguments and returns ``tape.gradient(out, args, output_gradients=g)``: capsspec.backend_kit's
make_vjps generates every one of them from `vjp` below, TensorFlow's one VJP primitive.

TensorFlow's CPU convolutions only run channels-last, so the convolution ops move NCHW/OIHW to
NHWC/HWIO, convolve, and move back. The model (model.py) stays channels-last all the way and
calls the private NHWC forms below (``_conv2d_nhwc``, ``_primary_capsules_nhwc``,
``_predictions_bjne``, ``_routing_bjne``, ...), so each piece of math is written once and the
public ops are thin layout adapters around it.

Numerics the spec fixes (docs/spec.md) and how they are met under autodiff:
* squash(s) = s |s| / (1 + |s|^2), value and gradient exactly 0 at s = 0. tf.norm's gradient
  at 0 is NaN (0 * inf), so |s| is sqrt(where(|s|^2 > 0, |s|^2, 1)) and the factor is masked
  again afterwards ("double where"): the tape never differentiates sqrt at 0. The factor
  |s| / (1 + |s|^2) is n / (1 + n^2) for n <= 1 and 1 / (n + 1/n) for n > 1, each branch on a
  clamped n, so neither value nor gradient overflows for any s whose |s|^2 is finite.
* capsule_lengths has gradient 0 at v = 0 (same double where).
* Both hold over the whole finite range: where |s|^2 over- or underflows, |s| is max|s_i| |s / max|s_i||
  (_norm_parts), and beyond sqrt(max) squash is the unit vector; elsewhere the arithmetic is the above.
* Routing: b starts at 0 for each example (shape (B, J, N)), the softmax runs over the parents
  j, nothing is stopped (gradients flow through every iteration), the returned coupling
  coefficients are the last iteration's; only the iterations are a Python loop.
* PrimaryCaps in NHWC: the conv output (B, Gh, Gw, T*D) has channel o = t*D + d last already,
  but capsule i = (t*Gh + y)*Gw + x puts the *type* before the grid, so the type axis is moved
  in front of (Gh, Gw) before flattening. Flattening (Gh, Gw, T) directly would give a
  different capsule order (docs/spec.md, mistake 3, in its channels-last form).
* Argmax ties (mask at inference, predict) go to the lowest class index, stated explicitly
  rather than left to tf.math.argmax (whose docs leave ties unspecified).

Nothing here checks arguments: the door (capsspec.validation) does, before any of these runs.

What this module must never do: import the reference's implementation, or change its inputs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf  # the package's import has set the environment first (its docstring says why)

from capsspec.backend_kit import make_vjps

# Layout permutations between the spec's canonical layouts and TensorFlow's channels-last ones.
NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)
OIHW_TO_HWIO = (2, 3, 1, 0)
HWIO_TO_OIHW = (3, 2, 0, 1)


def vjp(f: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[[Any], tuple[Any, ...]]]:
    """jax.vjp's contract on TensorFlow (see capsspec.backend_kit): f under a tape watching the primals.

    Primals the outputs do not depend on (routing's c after one iteration) get zeros, not None.
    """
    primals = tuple(tf.convert_to_tensor(p) for p in primals)  # a tf.Variable becomes a watched tensor
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        for p in primals:
            tape.watch(p)
        out = f(*primals)

    def pullback(g: Any) -> tuple[Any, ...]:
        outs, gs = (out, g) if isinstance(out, tuple) else ((out,), (g,))
        pairs = [(o, tf.cast(c, o.dtype)) for o, c in zip(outs, gs) if c is not None]
        return tuple(tape.gradient([o for o, _ in pairs], list(primals), output_gradients=[c for _, c in pairs],
                                   unconnected_gradients=tf.UnconnectedGradients.ZERO))

    return out, pullback



def _conv2d_nhwc(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor, stride: int) -> tf.Tensor:
    """Valid cross-correlation in TensorFlow's layouts: x (B,H,W,C), kernel (kh,kw,C,O) -> (B,Ho,Wo,O)."""
    if stride > 1 and kernel.shape[0] == 1 and kernel.shape[1] == 1:
        # TensorFlow 2.21's CPU (oneDNN) gradient of a 1x1 convolution of stride 2 corrupts the heap (abort or
        # segfault, found by the conformance suite). The same arithmetic: the 1x1 convolution of every stride-th pixel.
        x, stride = x[:, ::stride, ::stride], 1
    return tf.nn.bias_add(tf.nn.conv2d(x, kernel, strides=stride, padding="VALID"), bias)


def conv2d(x: tf.Tensor, weight: tf.Tensor, bias: tf.Tensor, stride: int = 1) -> tf.Tensor:
    """Cross-correlation with valid padding: x (B,C,H,W), weight (O,C,kh,kw), bias (O,) -> (B,O,Ho,Wo)."""
    y = _conv2d_nhwc(tf.transpose(x, NCHW_TO_NHWC), tf.transpose(weight, OIHW_TO_HWIO), bias, stride)
    return tf.transpose(y, NHWC_TO_NCHW)


def _safe_norm(sq: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(|s| where |s|^2 > 0 else 1, the mask |s|^2 > 0): a norm whose gradient is finite everywhere."""
    nz = sq > 0
    return tf.sqrt(tf.where(nz, sq, tf.ones_like(sq))), nz


def _norm_parts(x: tf.Tensor, axis: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(|x|, the mask x != 0, x / |x|) along axis (kept), for every finite x: the plain sqrt(sum x^2) where
    that sum is a normal number (the spec's arithmetic, unchanged), else the same on x / max|x_i| (the
    scale is a constant to the tape: the results depend on x alone). The unit vector is the scaled one."""
    sq = tf.reduce_sum(x * x, axis=axis, keepdims=True)
    info = np.finfo(x.dtype.as_numpy_dtype)
    ordinary = tf.logical_and(sq >= info.tiny, sq <= info.max)
    n_plain, _ = _safe_norm(tf.where(ordinary, sq, tf.ones_like(sq)))
    m = tf.stop_gradient(tf.reduce_max(tf.abs(x), axis=axis, keepdims=True))
    r = x / tf.where(m > 0, m, tf.ones_like(m))
    rsq = tf.reduce_sum(r * r, axis=axis, keepdims=True)  # in [1, dim] unless x = 0
    nz = tf.not_equal(rsq, 0)  # NaN counts as non-zero: a NaN input gives NaN, never a clean 0
    rn = tf.sqrt(tf.where(nz, rsq, tf.ones_like(rsq)))
    # |x| = x . (r / |r|) with r / |r| a constant to the tape: the value m |r|, and the gradient the unit
    # vector itself (m * |r| would pass a cotangent times a tiny m through the tape, flushed to 0).
    n_scaled = tf.reduce_sum(x * tf.stop_gradient(r / rn), axis=axis, keepdims=True)
    return tf.where(ordinary, n_plain, n_scaled), nz, r / rn


def squash(s: tf.Tensor, axis: int = -1) -> tf.Tensor:
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|, along `axis`; 0 at s = 0."""
    n, nz, unit = _norm_parts(s, axis)
    one = tf.ones_like(n)
    small = tf.minimum(n, one)
    large = tf.maximum(n, one)
    # n / (1 + n^2), written as 1 / (n + 1/n) above 1 so that a huge n gives ~1/n, not inf/inf.
    f = tf.where(n <= 1, small / (1 + small * small), 1 / (large + 1 / large))
    # Beyond sqrt(max), |s|^2 / (1 + |s|^2) is 1 to the last bit: v is the unit vector (f may underflow there).
    big = n > float(np.sqrt(np.finfo(s.dtype.as_numpy_dtype).max))
    return tf.where(big, unit, tf.where(nz, f, tf.zeros_like(f)) * s)


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
    return squash(_to_capsules_nhwc(_conv2d_nhwc(h, kernel, bias, stride), capsule_dim))


def primary_capsules(h: tf.Tensor, weight: tf.Tensor, bias: tf.Tensor, capsule_dim: int, stride: int) -> tf.Tensor:
    """PrimaryCaps: conv (no ReLU), channels o = t*D + d regrouped into capsules, squashed.

    h (B,C,H,W), weight (T*D,C,k,k) -> u (B, T*Gh*Gw, D) with capsule i = (t*Gh + y)*Gw + x.
    """
    return _primary_capsules_nhwc(tf.transpose(h, NCHW_TO_NHWC), tf.transpose(weight, OIHW_TO_HWIO), bias,
                                  capsule_dim, stride)


def _predictions_nbje(u: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """(N, B, J, E): one (B, D) x (D, J*E) product per child capsule, batched over the children."""
    n, j, e, d = weight.shape
    out = tf.matmul(tf.transpose(u, (1, 0, 2)), tf.reshape(weight, [n, j * e, d]), transpose_b=True)
    return tf.reshape(out, [n, -1, j, e])


def predictions(u: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """u_hat[b, i, j] = weight[i, j] @ u[b, i]: u (B,N,D), weight (N,J,E,D) -> (B,N,J,E)."""
    return tf.transpose(_predictions_nbje(u, weight), (1, 0, 2, 3))


def _predictions_bjne(u: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """u_hat laid out (B, J, N, E), the layout routing works in (one transpose instead of two)."""
    return tf.transpose(_predictions_nbje(u, weight), (1, 2, 0, 3))


def _coupling(logits: tf.Tensor, none_of_the_above: bool) -> tf.Tensor:
    """softmax over the parents (axis 1) of logits (B, J, N); with none_of_the_above over one more logit,
    fixed at 0, that no parent stands for (appended, then dropped: softmax's own shift counts it)."""
    if not none_of_the_above:
        return tf.nn.softmax(logits, axis=1)
    nowhere = tf.zeros_like(logits[:, :1])
    return tf.nn.softmax(tf.concat([logits, nowhere], axis=1), axis=1)[:, :-1]


def _routing_bjne(ut: tf.Tensor, iterations: int, none_of_the_above: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """Routing on u_hat laid out (B, J, N, E), so both contractions are batched matmuls over (B, J).

    Returns v (B, J, E) and the last iteration's coupling coefficients c (B, N, J).
    """
    logits = tf.zeros(tf.shape(ut)[:3], dtype=ut.dtype)  # b_ij, one set per example, starting at 0
    for t in range(iterations):
        c = _coupling(logits, none_of_the_above)  # over the parents j, never over the children i
        s = tf.squeeze(tf.matmul(c[:, :, tf.newaxis, :], ut), axis=2)  # (B, J, E)
        v = squash(s)
        if t + 1 < iterations:  # the last update of b cannot change any output
            # Nothing is stopped: gradients flow through every iteration.
            logits = logits + tf.squeeze(tf.matmul(ut, v[:, :, :, tf.newaxis]), axis=3)
    return v, tf.transpose(c, (0, 2, 1))


def routing(u_hat: tf.Tensor, iterations: int, none_of_the_above: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """Procedure 1, routing by agreement. u_hat (B,N,J,E) -> (v (B,J,E), c (B,N,J)).

    c are the coupling coefficients used in the last iteration: c[b, i] sums to 1 over j (less than 1
    with none_of_the_above).
    """
    return _routing_bjne(tf.transpose(u_hat, (0, 2, 1, 3)), iterations, none_of_the_above)


def capsule_lengths(v: tf.Tensor) -> tf.Tensor:
    """|v_j| along the last axis: (..., E) -> (...); gradient 0 where v = 0."""
    n, nz, _ = _norm_parts(v, -1)  # scaled where the squares would over- or underflow
    return tf.squeeze(tf.where(nz, n, tf.zeros_like(n)), -1)


def margin_loss(lengths: tf.Tensor, labels: tf.Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                lambda_: float = 0.5) -> tf.Tensor:
    """Eq. 4 on the capsule lengths (not a softmax of them), summed over classes, averaged over the batch.

    labels (B,) or (B, K) with K distinct classes: every listed class is present.
    """
    present = tf.one_hot(labels, lengths.shape[1], dtype=lengths.dtype)
    if labels.shape.rank == 2:  # (B, K, J) -> (B, J): the classes are distinct, so the sum is 0 or 1
        present = tf.reduce_sum(present, axis=1)
    up = tf.nn.relu(m_plus - lengths)
    down = tf.nn.relu(lengths - m_minus)
    per_class = present * up * up + lambda_ * (1 - present) * down * down
    return tf.reduce_mean(tf.reduce_sum(per_class, axis=1))


def _first_argmax(scores: tf.Tensor) -> tf.Tensor:
    """argmax over axis 1 with ties going to the lowest index, as int64."""
    top = tf.reduce_max(scores, axis=1, keepdims=True)
    classes = tf.range(scores.shape[1], dtype=tf.int64)
    return tf.reduce_min(tf.where(scores == top, classes, tf.constant(scores.shape[1], tf.int64)), axis=1)


def mask(v: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
    """Zero every class capsule but one and flatten class-major: v (B,J,E) -> (B, J*E).

    The kept capsule is the true class's when labels (B,) are given, else the longest. With
    (B, K) labels: (B, K, J*E), row k keeping class labels[:, k].
    """
    _, j, e = v.shape
    if labels is None:
        labels = _first_argmax(tf.reduce_sum(v * v, axis=-1))  # the longest capsule
    onehot = tf.one_hot(labels, j, dtype=v.dtype)
    if labels.shape.rank == 2:  # (B, K, J): one masked copy of v per listed class
        return tf.reshape(v[:, tf.newaxis] * onehot[..., tf.newaxis], [-1, tf.shape(labels)[1], j * e])
    return tf.reshape(v * onehot[:, :, tf.newaxis], [-1, j * e])  # class-major: feature j * E + e


def decoder(x: tf.Tensor, weights: Sequence[tf.Tensor], biases: Sequence[tf.Tensor]) -> tf.Tensor:
    """Fully connected layers y = x @ W.T + b, ReLU between them and a sigmoid at the end;
    x (..., width) -> (..., out), the same layers on every row."""
    return _decoder(x, weights, biases)


def _decoder(x: tf.Tensor, weights: Sequence[tf.Tensor], biases: Sequence[tf.Tensor], *,
             in_out: bool = False) -> tf.Tensor:
    """The decoder with weights (out, in) as the spec lays them out, or (in, out) as TensorFlow
    stores dense kernels when in_out is set (the model's). Leading dims are flattened to rows."""
    lead = tf.shape(x)[:-1]
    h = tf.reshape(x, [-1, x.shape[-1]]) if x.shape.rank != 2 else x
    last = len(weights) - 1
    for k, (w, b) in enumerate(zip(weights, biases)):
        z = tf.matmul(h, w, transpose_b=not in_out) + b
        h = tf.sigmoid(z) if k == last else tf.nn.relu(z)
    return tf.reshape(h, tf.concat([lead, [h.shape[-1]]], axis=0)) if x.shape.rank != 2 else h


def reconstruction_loss(reconstruction: tf.Tensor, images: tf.Tensor, scale: float = 0.0005) -> tf.Tensor:
    """scale * sum over pixels of (reconstruction - image)^2, averaged over the batch.

    images (B, C, H, W) are flattened row-major from (C, H, W) to match reconstruction (B, C*H*W);
    with (B, K, C*H*W) and (B, K, C, H, W) the K digits' squared errors are summed too.
    """
    d = reconstruction - tf.reshape(images, tf.shape(reconstruction))
    return tf.reduce_mean(scale * tf.reduce_sum(d * d, axis=list(range(1, reconstruction.shape.rank))))


globals().update(make_vjps(globals(), vjp))
