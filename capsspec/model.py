"""The full capsule network of the reference: parameters, forward pass, loss, exact gradients.

The model is a composition of the ops in capsspec.ops:

    x -> conv2d -> ReLU -> primary_capsules -> predictions -> routing -> capsule_lengths
                                                               |-> mask -> decoder
    loss = margin_loss(lengths, labels) + reconstruction_loss(decoder output, targets)

targets are x itself for one digit per image ((B,) labels). With (B, K) labels (MultiMNIST) the
decoder runs once per listed class, on the capsules masked by that class, and targets
(B, K, C, H, W) are the digits' own images (docs/spec.md, section 5).

value_and_grad chains the ops' hand-derived VJPs, reusing the forward pass's intermediates.
Parameters are a dict of NumPy arrays under the canonical names of CapsNetConfig.param_shapes.
This module must never import a framework.
The spec's names are `@checked`: the door (capsspec.validation) checks their arguments first.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from . import ops
from .config import CapsNetConfig
from .spec import CapsNetOutput, LossParts
from .validation import FLOAT_DTYPES, checked, unchecked

__all__ = ["init_params", "forward", "loss", "value_and_grad", "predict", "decoder_layers"]

Params = Mapping[str, np.ndarray]


def init_params(config: CapsNetConfig | None = None, seed: int = 0, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Fresh parameters under the canonical names.

    Initialisation (the spec's, documented here and in docs/spec.md): every weight and bias of
    a convolution or fully connected layer is uniform in +-1/sqrt(fan_in) (fan_in = inputs
    per output unit; PyTorch's default for these layers); digit.weight is normal with std
    0.01, so that the initial class capsules are short and routing starts undecided. Values
    are drawn in float64 in the canonical order from numpy.random.default_rng(seed), then cast,
    so a float32 and a float64 model with one seed are the same model.
    """
    config = config or CapsNetConfig()
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    shapes = config.param_shapes()
    params: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name == "digit.weight":
            a = rng.normal(0.0, 0.01, size=shape)
        else:
            layer = name.rsplit(".", 1)[0]
            w_shape = shapes[layer + ".weight"]
            fan_in = int(np.prod(w_shape[1:]))
            bound = 1.0 / np.sqrt(fan_in)
            a = rng.uniform(-bound, bound, size=shape)
        params[name] = a.astype(dtype)
    return params


def decoder_layers(params: Params, config: CapsNetConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The decoder's weights and biases in layer order."""
    n = config.num_decoder_layers
    return [params[f"decoder.{k}.weight"] for k in range(n)], [params[f"decoder.{k}.bias"] for k in range(n)]


def _forward(params: Params, x: np.ndarray, config: CapsNetConfig, labels: np.ndarray | None, decode: bool = True):
    """Forward pass keeping every intermediate that the backward pass needs."""
    a1, conv1_cache = ops._conv2d_fwd(x, params["conv1.weight"], params["conv1.bias"], config.conv1_stride)
    h1 = np.maximum(a1, 0)
    u, primary_cache = ops._primary_fwd(
        h1, params["primary.weight"], params["primary.bias"], config.primary_dim, config.primary_stride
    )
    u_hat, pred_cache = ops._predictions_fwd(u, params["digit.weight"])
    (v, c), routing_cache = ops._routing_fwd(u_hat, config.routing_iterations, config.none_of_the_above)
    lengths = np.sqrt(np.sum(v * v, axis=-1))
    recon = onehot = hs = None
    if config.use_decoder and decode:
        onehot = ops._mask_onehot(v, labels)
        masked = ops._apply_mask(v, onehot)
        ws, bs = decoder_layers(params, config)
        recon, hs = ops._decoder_fwd(masked, ws, bs)
    out = CapsNetOutput(v=v, lengths=lengths, coupling=c, reconstruction=recon)
    caches = (a1, conv1_cache, primary_cache, pred_cache, routing_cache, onehot, hs)
    return out, caches


def _loss_parts(out: CapsNetOutput, targets: np.ndarray, labels: np.ndarray, config: CapsNetConfig) -> LossParts:
    margin = unchecked(ops.margin_loss)(out.lengths, labels, config.m_plus, config.m_minus, config.lambda_)
    if config.use_decoder:
        recon = unchecked(ops.reconstruction_loss)(out.reconstruction, targets, config.reconstruction_scale)
    else:
        recon = np.zeros((), dtype=out.lengths.dtype)
    return LossParts(total=margin + recon, margin=margin, reconstruction=recon)


@checked
def forward(params: Params, x: np.ndarray, config: CapsNetConfig, labels: np.ndarray | None = None) -> CapsNetOutput:
    """The model's outputs. The decoder sees the true class's capsule when labels (B,) are given,
    else the longest capsule; with labels (B, K) it runs once per listed class and the
    reconstruction is (B, K, C*H*W)."""
    return _forward(params, x, config, labels)[0]


@checked
def loss(params: Params, x: np.ndarray, labels: np.ndarray, config: CapsNetConfig,
         targets: np.ndarray | None = None) -> LossParts:
    """Total loss (margin + reconstruction) with its two terms, averaged over the batch.

    The reconstructions are compared with targets: x itself when None ((B,) labels only), or
    (B, K, C, H, W) images, one per listed class, for (B, K) labels.
    """
    out, _ = _forward(params, x, config, labels)
    return _loss_parts(out, x if targets is None else targets, labels, config)


def _value_and_grad(params: Params, x: np.ndarray, labels: np.ndarray, config: CapsNetConfig,
                    targets: np.ndarray | None = None):
    out, (a1, conv1_cache, primary_cache, pred_cache, routing_cache, onehot, hs) = _forward(params, x, config, labels)
    targets = x if targets is None else targets
    parts = _loss_parts(out, targets, labels, config)
    one = np.ones((), dtype=x.dtype)
    (g_len,) = unchecked(ops.margin_loss_vjp)(one, out.lengths, labels, config.m_plus, config.m_minus, config.lambda_)
    g_v = ops._lengths_bwd(out.v, g_len)
    grads: dict[str, np.ndarray] = {}
    if config.use_decoder:
        (g_rec,) = unchecked(ops.reconstruction_loss_vjp)(one, out.reconstruction, targets, config.reconstruction_scale)
        ws, _ = decoder_layers(params, config)
        g_masked, gws, gbs = ops._decoder_bwd(hs, ws, g_rec)
        for k, (gw, gb) in enumerate(zip(gws, gbs)):
            grads[f"decoder.{k}.weight"], grads[f"decoder.{k}.bias"] = gw, gb
        g_v = g_v + ops._unmask(g_masked, out.v, onehot)
    g_uhat = ops._routing_bwd(routing_cache, g_v)
    g_u, grads["digit.weight"] = ops._predictions_bwd(pred_cache, g_uhat)
    g_h1, grads["primary.weight"], grads["primary.bias"] = ops._primary_bwd(primary_cache, g_u)
    _, grads["conv1.weight"], grads["conv1.bias"] = ops._conv2d_bwd(conv1_cache, g_h1 * (a1 > 0), need_input_grad=False)
    grads = {k: grads[k] for k in params}  # canonical order
    return parts, grads, out


@checked
def value_and_grad(params: Params, x: np.ndarray, labels: np.ndarray, config: CapsNetConfig,
                   targets: np.ndarray | None = None):
    """(total loss, gradient of it for every parameter, keyed like params); targets as for loss."""
    parts, grads, _ = _value_and_grad(params, x, labels, config, targets)
    return parts.total, grads


@checked
def predict(params: Params, x: np.ndarray, config: CapsNetConfig) -> np.ndarray:
    """The class of the longest class capsule, per example (int64)."""
    out = _forward(params, x, config, None, decode=False)[0]
    return np.argmax(out.lengths, axis=1).astype(np.int64)
