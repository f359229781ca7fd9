"""The capsule network as pure JAX functions of a parameter pytree, compiled with jax.jit.

The reference's composition (capsspec.model) of this backend's ops. Params are a dict of
jax.Arrays under the canonical names; the config is a static argument of every compiled function
(a frozen, hashable value), so one compilation serves every batch of one shape. The door checks
every argument first.

What this module must never do: import the reference's implementation, or change its inputs.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from capsspec.backend_kit import loss_parts
from capsspec.config import CapsNetConfig
from capsspec.spec import CapsNetOutput, LossParts

from . import ops

__all__ = ["forward", "loss", "value_and_grad", "predict", "loss_and_output"]

Params = Mapping[str, jax.Array]


def loss_and_output(params: Params, x: jax.Array, labels: jax.Array, config: CapsNetConfig,
                    targets: jax.Array | None = None) -> tuple[jax.Array, tuple[LossParts, CapsNetOutput]]:
    """(total loss, (its parts, the forward output)): the shape jax.value_and_grad(has_aux=True) wants.
    targets: the digits' own images with (B, K) labels; None compares the reconstruction with x."""
    out = forward(params, x, config, labels)
    parts = loss_parts(ops.margin_loss, ops.reconstruction_loss, out, x, labels, config, lambda: jnp.zeros((), x.dtype),
                       targets)
    return parts.total, (parts, out)


@ops._spec_op("config")
def forward(params: Params, x: jax.Array, config: CapsNetConfig, labels: jax.Array | None = None) -> CapsNetOutput:
    """The model's outputs. The decoder sees the true class's capsule when labels are given,
    else the longest capsule."""
    h1 = jax.nn.relu(ops.conv2d(x, params["conv1.weight"], params["conv1.bias"], config.conv1_stride))
    u = ops.primary_capsules(h1, params["primary.weight"], params["primary.bias"], config.primary_dim,
                             config.primary_stride)
    v, c = ops.routing(ops.predictions(u, params["digit.weight"]), config.routing_iterations,
                       config.none_of_the_above)
    n = config.num_decoder_layers
    recon = ops.decoder(ops.mask(v, labels), [params[f"decoder.{k}.weight"] for k in range(n)],
                        [params[f"decoder.{k}.bias"] for k in range(n)]) if config.use_decoder else None
    return CapsNetOutput(v=v, lengths=ops.capsule_lengths(v), coupling=c, reconstruction=recon)


@ops._spec_op("config")
def loss(params: Params, x: jax.Array, labels: jax.Array, config: CapsNetConfig,
         targets: jax.Array | None = None) -> LossParts:
    """Total loss (margin + reconstruction) with its two terms (0-d arrays), averaged over the batch."""
    return loss_and_output(params, x, labels, config, targets)[1][0]


@ops.spec_precision
def value_and_grad(params: Params, x: jax.Array, labels: jax.Array, config: CapsNetConfig,
                   targets: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """(total loss, gradient of it for every parameter keyed by canonical name), by jax.value_and_grad."""
    (total, _), grads = _value_and_grad(params, x, labels, config, targets)
    return total, {k: grads[k] for k in params}  # a jitted dict comes back with sorted keys


_value_and_grad = jax.jit(jax.value_and_grad(loss_and_output, has_aux=True), static_argnames="config")


@ops._spec_op("config")
def predict(params: Params, x: jax.Array, config: CapsNetConfig) -> jax.Array:
    """The class of the longest class capsule, per example (int64). The decoder's output is unused,
    so XLA drops the decoder from the compiled program."""
    return jnp.argmax(forward(params, x, config).lengths, axis=1).astype(jnp.int64)
