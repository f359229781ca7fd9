"""JAX pieces in the style of functional CapsNets: capsules laid out (batch, dim, caps) with the
capsule axis last, u_hat (batch, in_caps, classes, dim), W (in_caps, in_dim, classes, out_dim),
routing with a num_iters keyword, channels-last images."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _safe_norm(x, axis):
    """(|x|, x / |x|) with both exact at and around 0 (value and gradient), and no overflow for huge x."""
    m = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True))  # |x| does not depend on the scale
    nonzero = m > 0
    t = x / jnp.where(nonzero, m, 1.0)
    nt = jnp.sqrt(jnp.where(nonzero, jnp.sum(t * t, axis=axis, keepdims=True), 1.0))
    return jnp.where(nonzero, m * nt, 0.0), t / nt


def squash(s, axis=1):
    n, unit = _safe_norm(s, axis)
    big = n > 1
    inv = 1.0 / jnp.where(big, n, 1.0)
    small = jnp.where(big, 0.0, n)
    return unit * jnp.where(big, 1.0 / (1.0 + inv * inv), small * small / (1.0 + small * small))


def squash_unguarded(s, axis=1):
    m = jax.lax.stop_gradient(jnp.max(jnp.abs(s), axis=axis, keepdims=True))
    t = s / m  # scaled against overflow, but 0 / 0 at s = 0
    nt = jnp.sqrt(jnp.sum(t * t, axis=axis, keepdims=True))
    n, unit = m * nt, t / nt
    big = n > 1
    inv = 1.0 / jnp.where(big, n, 1.0)
    small = jnp.where(big, 0.0, n)
    return unit * jnp.where(big, 1.0 / (1.0 + inv * inv), small * small / (1.0 + small * small))


def squash_norm_not_squared(s, axis=1):
    n, unit = _safe_norm(s, axis)
    return n / (1 + n) * unit  # |s| / (1 + |s|) instead of |s|^2 / (1 + |s|^2)


def lengths(v, axis=1):
    return _safe_norm(v, axis)[0].squeeze(axis)


def lengths_eps(v, axis=1):
    return jnp.sqrt(jnp.sum(v ** 2, axis=axis) + 1e-9)


def predictions(u, W):
    """u (batch, in_caps, in_dim), W (in_caps, in_dim, classes, out_dim) -> (batch, in_caps, classes, out_dim)."""
    return jnp.einsum("bnd,ndje->bnje", u, W)


def _route_one(u_hat, num_iters):
    """One example: u_hat (in_caps, classes, dim)."""
    b = jnp.zeros(u_hat.shape[:2], u_hat.dtype)
    for r in range(num_iters):
        c = jax.nn.softmax(b, axis=1)
        v = squash(jnp.einsum("nj,nje->je", c, u_hat), axis=-1)
        if r < num_iters - 1:
            b = b + jnp.einsum("nje,je->nj", u_hat, v)
    return v, c


@functools.partial(jax.jit, static_argnames=("num_iters",))
def routing(u_hat, num_iters=3):
    return jax.vmap(lambda x: _route_one(x, num_iters))(u_hat)


def routing_shared_logits(u_hat, num_iters=3):
    b = jnp.zeros(u_hat.shape[1:3], u_hat.dtype)  # one b for the whole batch
    for r in range(num_iters):
        c = jax.nn.softmax(b, axis=1)
        v = squash(jnp.einsum("nj,bnje->bje", c, u_hat), axis=-1)
        if r < num_iters - 1:
            b = b + jnp.einsum("bnje,bje->nj", u_hat, v)
    return v, jnp.broadcast_to(c, u_hat.shape[:3])


def reconstruction_loss_summed(reconstruction, images):
    """Channels-last images (batch, height, width, channels); the batch's errors summed, not averaged."""
    return 0.0005 * jnp.sum((reconstruction - images.reshape(images.shape[0], -1)) ** 2)


ROUTE = {"layout": "batch in_caps classes dim", "iterations": "num_iters"}
CAPS = {"layout": "batch dim caps"}
CASES = [
    ("squash", "squash", squash, CAPS, None),
    ("squash_unguarded", "squash", squash_unguarded, {**CAPS, "max_examples": 20}, "nan_at_zero"),
    ("squash_norm_not_squared", "squash", squash_norm_not_squared, CAPS, "caught"),
    ("lengths", "capsule_lengths", lengths, CAPS, None),
    ("lengths_eps", "capsule_lengths", lengths_eps, {**CAPS, "extremes": False, "max_examples": 20},
     "lengths_epsilon_in_sqrt"),
    ("predictions", "predictions", predictions, {"layout": "batch in_caps in_dim classes out_dim"}, None),
    ("routing", "routing", routing, ROUTE, None),
    ("routing_shared_logits", "routing", routing_shared_logits, {**ROUTE, "max_examples": 20},
     "shared_routing_logits"),
    ("reconstruction_loss_summed", "reconstruction_loss", reconstruction_loss_summed,
     {"layout": "batch height width channels"}, "reconstruction_sum_over_batch"),
]
