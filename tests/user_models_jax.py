"""A CapsNet written the way functional JAX code writes one (a parameter tree and pure functions), for the
whole-model check's tests: channels-last images ("batch h w channels"), HWIO kernels ("kh kw in out"),
dense weights "in out", capsules ordered (h w types) as a channels-last reshape gives them, and the
class capsules' W stored (classes, in_caps, out_dim, in_dim). softmax_axis picks the routing softmax's
axis: the parents' (correct) or the children's (the mistake).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from user_models import SMALL

MAPPING = {
    "params": {"conv1.kernel": "conv1.weight", "conv1.bias": "conv1.bias",
               "primary.kernel": "primary.weight", "primary.bias": "primary.bias",
               "caps.W": {"name": "digit.weight", "layout": "classes (h w types) out_dim in_dim"},
               "dec.0.w": "decoder.0.weight", "dec.0.b": "decoder.0.bias", "dec.1.w": "decoder.1.weight",
               "dec.1.b": "decoder.1.bias", "dec.2.w": "decoder.2.weight", "dec.2.b": "decoder.2.bias"},
    "layouts": {"conv": "kh kw in out", "dense": "in out"},
}
INPUT_LAYOUT = "batch h w channels"
OUTPUT_LAYOUTS = {"lengths": "batch classes", "reconstruction": "batch h w channels"}


def init(c=SMALL, seed: int = 0) -> dict:
    """A parameter tree of the right shapes (the check loads its own values into it)."""
    rng = np.random.default_rng(seed)
    gh, gw = c.primary_grid
    widths = [c.num_classes * c.class_dim, *c.decoder_widths, c.image_size]
    w = lambda *s: jnp.asarray(rng.normal(0, 0.1, s), jnp.float32)  # noqa: E731
    return {"conv1": {"kernel": w(c.conv1_kernel, c.conv1_kernel, c.input_channels, c.conv1_channels),
                      "bias": w(c.conv1_channels)},
            "primary": {"kernel": w(c.primary_kernel, c.primary_kernel, c.conv1_channels, c.primary_channels),
                        "bias": w(c.primary_channels)},
            "caps": {"W": w(c.num_classes, gh * gw * c.primary_types, c.class_dim, c.primary_dim)},
            "dec": [{"w": w(a, b), "b": w(b)} for a, b in zip(widths, widths[1:])]}


def _conv(x, kernel, bias, stride):
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def squash(s, axis=-1):
    sq = jnp.sum(s * s, axis=axis, keepdims=True)
    return s * jnp.sqrt(sq) / (1.0 + sq)


def make_apply(c=SMALL, softmax_axis: int = 2):
    def apply(params, x, labels):
        h = jax.nn.relu(_conv(x, params["conv1"]["kernel"], params["conv1"]["bias"], c.conv1_stride))
        p = _conv(h, params["primary"]["kernel"], params["primary"]["bias"], c.primary_stride)  # (B, Gh, Gw, T*D)
        u = squash(p.reshape(p.shape[0], -1, c.primary_dim))  # capsules (y, x, t)
        u_hat = jnp.einsum("jned,bnd->bnje", params["caps"]["W"], u)
        b = jnp.zeros(u_hat.shape[:3])
        for it in range(c.routing_iterations):
            cc = jax.nn.softmax(b, axis=softmax_axis)
            v = squash(jnp.einsum("bnj,bnje->bje", cc, u_hat))
            if it + 1 < c.routing_iterations:
                b = b + jnp.einsum("bnje,bje->bnj", u_hat, v)
        lengths = jnp.linalg.norm(v, axis=-1)
        masked = (v * jax.nn.one_hot(labels, c.num_classes)[:, :, None]).reshape(v.shape[0], -1)
        for k, layer in enumerate(params["dec"]):
            masked = masked @ layer["w"] + layer["b"]
            masked = jax.nn.sigmoid(masked) if k == len(params["dec"]) - 1 else jax.nn.relu(masked)
        return lengths, masked.reshape(x.shape)
    return apply


def make_loss(c=SMALL):
    def loss(apply, params, x, labels):
        lengths, recon = apply(params, x, labels)
        t = jax.nn.one_hot(labels, c.num_classes)
        margin = t * jax.nn.relu(0.9 - lengths) ** 2 + 0.5 * (1 - t) * jax.nn.relu(lengths - 0.1) ** 2
        err = jnp.sum((recon - x).reshape(x.shape[0], -1) ** 2, axis=1)
        return jnp.mean(jnp.sum(margin, axis=1) + 0.0005 * err)
    return loss
