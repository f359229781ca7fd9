"""The spec's ops as pure JAX functions under jax.jit, and their VJPs from jax.vjp.

Each op has the reference's name, signature and arithmetic on jax.Arrays; static arguments
(stride, axis, capsule_dim, iterations) are jit's. Each ``<op>_vjp`` is generated from its op by
the backend kit's make_vjps around jax.vjp. The door checks every argument before these run.

What this module must never do: import the reference's implementation, or change its inputs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from capsspec.backend_kit import make_vjps
from capsspec.spec import OPS

__all__ = [name for op in OPS for name in (op.name, op.vjp_name)] + ["spec_precision"]


def spec_precision(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn run with jax_enable_x64 on (float64 and int64 exist) and IEEE float32 matmuls, both in JAX's
    thread-local context: the caller's global configuration is not touched. Dtypes come from the inputs."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with jax.enable_x64(True), jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)
    return run


def _spec_op(*static: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return lambda fn: spec_precision(jax.jit(fn, static_argnames=static))


# ============================================================================== the ops
@_spec_op("stride")
def conv2d(x: jax.Array, weight: jax.Array, bias: jax.Array, stride: int = 1) -> jax.Array:
    """Cross-correlation with valid padding: x (B,C,H,W), weight (O,C,kh,kw), bias (O,) -> (B,O,Ho,Wo)."""
    # The sum of s*s stride-1 convolutions, one per phase (p, q) of input and kernel: XLA's CPU gradient
    # of a strided one with respect to its input took ~20x the whole forward (PrimaryCaps, batch 32).
    kh, kw = weight.shape[2:]
    ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    return bias[None, :, None, None] + sum(
        jax.lax.conv_general_dilated(x[:, :, p::stride, q::stride], weight[:, :, p::stride, q::stride], (1, 1),
                                     "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))[:, :, :ho, :wo]
        for p in range(min(stride, kh)) for q in range(min(stride, kw)))


def _norm_parts(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(|x|, the mask x != 0, x / |x|) along axis (kept), for every finite x: the plain sqrt(sum x^2) where
    that sum is a normal number (the spec's arithmetic, unchanged), else the same on x / max|x_i| (the
    scale (a power of two) is a constant to jax.vjp: the results depend on x alone). |.| = sqrt(where(.. > 0, .., 1)),
    masked again by the caller (the "double where"): no sqrt'(0) = inf in jax.vjp."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    info = jnp.finfo(x.dtype)
    ordinary = (sq >= info.tiny) & (sq <= info.max)
    n_plain = jnp.sqrt(jnp.where(ordinary, sq, 1))
    # Scaled by 2^-e, e the exponent of max|x_i|, as two normal powers of two 2^-a 2^-b: XLA turns x / m
    # into x * (1/m), and 1/m (or 2^-e) is subnormal near the top of the range, which XLA flushes to 0.
    _, e = jnp.frexp(jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True)))
    one = jnp.ones_like(e, dtype=x.dtype)
    a, b = e // 2, e - e // 2
    r = (x * jnp.ldexp(one, -a)) * jnp.ldexp(one, -b)  # exact: powers of two
    rsq = jnp.sum(r * r, axis=axis, keepdims=True)  # in [1/4, dim] unless x = 0
    nz = rsq != 0  # NaN counts as non-zero: a NaN input gives NaN, never a clean 0
    rn = jnp.sqrt(jnp.where(nz, rsq, 1))
    # |x| = x . (r / |r|) with r / |r| a constant to jax.vjp: the value m |r|, and the gradient the unit
    # vector itself (scaling |r| back would pass a cotangent times a tiny 2^e through the vjp, flushed to 0).
    n_scaled = jnp.sum(x * jax.lax.stop_gradient(r / rn), axis=axis, keepdims=True)
    return jnp.where(ordinary, n_plain, n_scaled), nz, r / rn


@_spec_op("axis")
def squash(s: jax.Array, axis: int = -1) -> jax.Array:
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|, along `axis`; 0 at s = 0."""
    # |s| / (1 + |s|^2) is n / (1 + n^2) to n = 1, then 1 / (n + 1/n): nothing overflows.
    n, nz, unit = _norm_parts(s, axis)
    # Beyond sqrt(max), |s|^2 / (1 + |s|^2) is 1 to the last bit: v is the unit vector (f may underflow
    # there, and n be inf: f sees 1 instead, so that no inf meets a zero cotangent in jax.vjp).
    big = n > float(np.sqrt(np.finfo(s.dtype).max))
    n = jnp.where(big, 1, n)
    small, large = jnp.minimum(n, 1), jnp.maximum(n, 1)
    f = jnp.where(n <= 1, small / (1 + small * small), 1 / (large + 1 / large))
    return jnp.where(big, unit, jnp.where(nz, f, 0) * s)


@_spec_op("capsule_dim", "stride")
def primary_capsules(h: jax.Array, weight: jax.Array, bias: jax.Array, capsule_dim: int, stride: int) -> jax.Array:
    """PrimaryCaps: conv (no ReLU), channels o = t*D + d regrouped into capsules, squashed:
    h (B,C,H,W), weight (T*D,C,k,k) -> u (B, T*Gh*Gw, D) with capsule i = (t*Gh + y)*Gw + x."""
    a = conv2d(h, weight, bias, stride)
    b, ch, gh, gw = a.shape
    # Channels last before the reshape: one capsule is D channels at one grid position.
    a = a.reshape(b, ch // capsule_dim, capsule_dim, gh, gw).transpose(0, 1, 3, 4, 2)
    return squash(a.reshape(b, -1, capsule_dim))


@_spec_op()
def predictions(u: jax.Array, weight: jax.Array) -> jax.Array:
    """u_hat[b, i, j] = weight[i, j] @ u[b, i]: u (B,N,D), weight (N,J,E,D) -> (B,N,J,E)."""
    return jnp.einsum("njed,bnd->bnje", weight, u)


def _coupling(b: jax.Array, none_of_the_above: bool) -> jax.Array:
    """softmax over the parents (axis 2) of logits (B, N, J); with none_of_the_above over one more logit,
    fixed at 0, that no parent stands for (appended, then dropped: softmax's own shift counts it)."""
    if not none_of_the_above:
        return jax.nn.softmax(b, axis=2)
    return jax.nn.softmax(jnp.concatenate([b, jnp.zeros_like(b[:, :, :1])], axis=2), axis=2)[:, :, :-1]


@_spec_op("iterations", "none_of_the_above")
def routing(u_hat: jax.Array, iterations: int, none_of_the_above: bool = False) -> tuple[jax.Array, jax.Array]:
    """Procedure 1, routing by agreement: u_hat (B,N,J,E) -> (v (B,J,E), c (B,N,J)), c the coupling
    coefficients used in the last iteration (c[b, i] sums to 1 over j, less than 1 with none_of_the_above)."""
    def parents(c: jax.Array) -> jax.Array:  # v_j = squash(sum_i c_ij u_hat_j|i)
        return squash(jnp.einsum("bij,bije->bje", c, u_hat))

    # b starts at 0 for each example, so the first c is softmax(0) = 1/J (1/(J+1) with the extra 0 logit),
    # written as such: XLA would otherwise spend seconds constant-folding the softmax of a large array of zeros.
    first = 1 / (u_hat.shape[2] + (1 if none_of_the_above else 0))
    b, c = jnp.zeros(u_hat.shape[:3], u_hat.dtype), jnp.full(u_hat.shape[:3], first, u_hat.dtype)
    for _ in range(iterations - 1):  # unrolled, not lax.fori_loop: it compiles and runs faster (docs/backends.md)
        b = b + jnp.einsum("bije,bje->bij", u_hat, parents(c))  # b_ij += u_hat_j|i . v_j
        c = _coupling(b, none_of_the_above)  # over the parents j
    return parents(c), c


@_spec_op()
def capsule_lengths(v: jax.Array) -> jax.Array:
    """|v_j| along the last axis: (..., E) -> (...); gradient 0 where v = 0."""
    n, nz, _ = _norm_parts(v, -1)  # scaled where the squares would over- or underflow
    return jnp.where(nz, n, 0)[..., 0]


@_spec_op()
def margin_loss(lengths: jax.Array, labels: jax.Array, m_plus: float = 0.9, m_minus: float = 0.1,
                lambda_: float = 0.5) -> jax.Array:
    """Eq. 4 on the capsule lengths (not a softmax of them), summed over classes, averaged over the batch."""
    present = jax.nn.one_hot(labels, lengths.shape[1], dtype=lengths.dtype)
    if labels.ndim == 2:  # (B, K) distinct classes: all of them present
        present = jnp.sum(present, axis=1)
    up, down = jax.nn.relu(m_plus - lengths), jax.nn.relu(lengths - m_minus)
    return jnp.mean(jnp.sum(present * up * up + lambda_ * (1 - present) * down * down, axis=1))


@_spec_op()
def mask(v: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """Zero every class capsule but the true class's (labels given), else but the longest (ties: the
    lowest index), and flatten class-major: v (B,J,E) -> (B, J*E); (B, K) labels give (B, K, J*E)."""
    if labels is None:
        labels = jnp.argmax(jnp.sum(v * v, axis=-1), axis=1)
    onehot = jax.nn.one_hot(labels, v.shape[1], dtype=v.dtype)
    if onehot.ndim == 3:
        return (v[:, None] * onehot[..., None]).reshape(*onehot.shape[:2], -1)
    return (v * onehot[:, :, None]).reshape(v.shape[0], -1)


@_spec_op()
def decoder(x: jax.Array, weights: Sequence[jax.Array], biases: Sequence[jax.Array]) -> jax.Array:
    """Fully connected layers y = x @ W.T + b, ReLU between them and a sigmoid at the end."""
    for k, (w, b) in enumerate(zip(weights, biases)):
        x = x @ w.T + b
        x = jax.nn.sigmoid(x) if k == len(weights) - 1 else jax.nn.relu(x)
    return x


@_spec_op()
def reconstruction_loss(reconstruction: jax.Array, images: jax.Array, scale: float = 0.0005) -> jax.Array:
    """scale * sum over pixels of (reconstruction - image)^2, averaged over the batch; images
    (B, C, H, W) are flattened row-major from (C, H, W) to match reconstruction (B, C*H*W)."""
    d = reconstruction - images.reshape(reconstruction.shape)
    return jnp.mean(scale * jnp.sum(d * d, axis=tuple(range(1, d.ndim))))  # (B, K, C*H*W): K digits summed


# ============================================================================== VJPs
def _vjp(f: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[[Any], tuple[Any, ...]]]:
    """jax.vjp with the kit's cotangent conventions: None counts as zeros (routing's g_c when only
    v matters), and each cotangent takes its output's dtype."""
    out, pullback = jax.vjp(f, *primals)
    return out, lambda g: tuple(pullback(jax.tree.map(
        lambda o, gi: jnp.zeros_like(o) if gi is None else jnp.asarray(gi, o.dtype), out, g)))


# Every <op>_vjp from the backend kit, around JAX's one VJP primitive.
globals().update({name: spec_precision(fn) for name, fn in make_vjps(globals(), _vjp).items()})
