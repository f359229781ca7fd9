"""The full capsule network on CUDA arrays: forward pass, loss and exact gradients, on the GPU.

The same composition as the reference (capsspec.model), built from this backend's ops:

    x -> conv2d -> ReLU -> primary_capsules -> predictions -> routing -> capsule_lengths
                                                               |-> mask -> decoder
    loss = margin_loss(lengths, labels) + reconstruction_loss(decoder output, targets or x)

With (B, K) labels the decoder runs once per listed class (masks (B, K, J*E)) and targets are
the (B, K, C, H, W) digits' own images (docs/spec.md, section 5).

value_and_grad chains the ops' hand-derived VJPs on the device, reusing the forward pass's
intermediates (CuPy has no autodiff). Parameters are a dict of cupy arrays under the canonical
names of CapsNetConfig.param_shapes; numpy arrays run the same code on the CPU (for tests).
Results stay on the device: losses are 0-d arrays, predict returns an int64 array. The door
(capsspec.validation) has checked every argument before these run.

What this module must never do: import cupy at module level, or import the reference's
implementation.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from capsspec.backend_kit import loss_parts
from capsspec.config import CapsNetConfig
from capsspec.spec import CapsNetOutput, LossParts

from . import ops

__all__ = ["forward", "loss", "value_and_grad", "predict", "decoder_layers", "count_correct"]

Params = Mapping[str, Any]


def decoder_layers(params: Params, config: CapsNetConfig) -> tuple[list[Any], list[Any]]:
    """The decoder's weights and biases in layer order."""
    n = config.num_decoder_layers
    return [params[f"decoder.{k}.weight"] for k in range(n)], [params[f"decoder.{k}.bias"] for k in range(n)]


def _forward(xp: Any, params: Params, x: Any, config: CapsNetConfig, labels: Any | None, decode: bool = True):
    """Forward pass keeping every intermediate that the backward pass needs."""
    a1, conv1_cache = ops._conv2d_fwd(xp, x, params["conv1.weight"], params["conv1.bias"], config.conv1_stride)
    h1 = xp.maximum(a1, 0)
    u, primary_cache = ops._primary_fwd(
        xp, h1, params["primary.weight"], params["primary.bias"], config.primary_dim, config.primary_stride
    )
    u_hat, pred_cache = ops._predictions_fwd(xp, u, params["digit.weight"])
    (v, c), routing_cache = ops._routing_fwd(xp, u_hat, config.routing_iterations, config.none_of_the_above)
    lengths = ops.capsule_lengths(v)
    recon = onehot = hs = None
    if config.use_decoder and decode:
        onehot = ops._mask_onehot(xp, v, labels)
        masked = ops._apply_mask(v, onehot)
        ws, bs = decoder_layers(params, config)
        recon, hs = ops._decoder_fwd(xp, masked, ws, bs)
    out = CapsNetOutput(v=v, lengths=lengths, coupling=c, reconstruction=recon)
    caches = (a1, conv1_cache, primary_cache, pred_cache, routing_cache, onehot, hs)
    return out, caches


def _loss_parts(xp: Any, out: CapsNetOutput, x: Any, labels: Any, config: CapsNetConfig, targets: Any) -> LossParts:
    return loss_parts(ops.margin_loss, ops.reconstruction_loss, out, x, labels, config,
                      lambda: xp.zeros((), dtype=x.dtype), targets)


def _value_and_grad(xp: Any, params: Params, x: Any, labels: Any, config: CapsNetConfig, targets: Any = None):
    out, (a1, conv1_cache, primary_cache, pred_cache, routing_cache, onehot, hs) = _forward(xp, params, x, config, labels)
    targets = x if targets is None else targets
    parts = _loss_parts(xp, out, x, labels, config, targets)
    one = xp.ones((), dtype=x.dtype)
    (g_len,) = ops.margin_loss_vjp(one, out.lengths, labels, config.m_plus, config.m_minus, config.lambda_)
    (g_v,) = ops.capsule_lengths_vjp(g_len, out.v)
    grads: dict[str, Any] = {}
    if config.use_decoder:
        (g_rec,) = ops.reconstruction_loss_vjp(one, out.reconstruction, targets, config.reconstruction_scale)
        ws, _ = decoder_layers(params, config)
        g_masked, gws, gbs = ops._decoder_bwd(xp, hs, ws, g_rec)
        for k, (gw, gb) in enumerate(zip(gws, gbs)):
            grads[f"decoder.{k}.weight"], grads[f"decoder.{k}.bias"] = gw, gb
        g_v = g_v + ops._unmask(xp, g_masked, out.v, onehot)
    g_uhat = ops._routing_bwd(xp, routing_cache, g_v)
    g_u, grads["digit.weight"] = ops._predictions_bwd(xp, pred_cache, g_uhat)
    g_h1, grads["primary.weight"], grads["primary.bias"] = ops._primary_bwd(xp, primary_cache, g_u)
    _, grads["conv1.weight"], grads["conv1.bias"] = ops._conv2d_bwd(
        xp, conv1_cache, g_h1 * (a1 > 0), need_input_grad=False
    )
    grads = {k: grads[k] for k in params}  # the params' order (canonical for params_from_numpy's)
    return parts, grads, out


def forward(params: Params, x: Any, config: CapsNetConfig, labels: Any | None = None) -> CapsNetOutput:
    """The model's outputs. The decoder sees the true class's capsule when labels (B,) are given,
    else the longest capsule; with labels (B, K) it decodes each listed class: (B, K, C*H*W)."""
    xp = ops.array_module(x)
    with ops.device_scope(xp, x):
        return _forward(xp, params, x, config, labels)[0]


def loss(params: Params, x: Any, labels: Any, config: CapsNetConfig, targets: Any = None) -> LossParts:
    """Total loss (margin + reconstruction) with its two terms, averaged over the batch; the
    reconstructions are compared with targets (x itself when None)."""
    xp = ops.array_module(x)
    with ops.device_scope(xp, x):
        out, _ = _forward(xp, params, x, config, labels)
        return _loss_parts(xp, out, x, labels, config, targets)


def value_and_grad(params: Params, x: Any, labels: Any, config: CapsNetConfig,
                   targets: Any = None) -> tuple[Any, dict[str, Any]]:
    """(total loss, gradient of it for every parameter, keyed like params)."""
    xp = ops.array_module(x)
    with ops.device_scope(xp, x):
        parts, grads, _ = _value_and_grad(xp, params, x, labels, config, targets)
    return parts.total, grads


def count_correct(xp: Any, lengths: Any, labels: Any) -> Any:
    """Examples whose K longest class capsules are their K labelled classes (K = 1 for (B,) labels),
    a 0-d array on the device; ties go to the lower class index (a stable sort), as in predict."""
    rows = xp.asarray(labels).reshape(lengths.shape[0], -1)
    top = xp.argsort(-lengths, axis=1, kind="stable")[:, :rows.shape[1]]
    return xp.sum(xp.all(xp.sort(top, axis=1) == xp.sort(rows, axis=1), axis=1))


def predict(params: Params, x: Any, config: CapsNetConfig) -> Any:
    """The class of the longest class capsule, per example (int64)."""
    xp = ops.array_module(x)
    with ops.device_scope(xp, x):
        out = _forward(xp, params, x, config, None, decode=False)[0]
        return xp.argmax(out.lengths, axis=1).astype(np.int64)
