"""The reference's whole model with its intermediates, and the known whole-model deviations from it (NumPy).

A user's model that disagrees with the reference is compared here with the reference's *deviant*
forms, each one mistake that public implementations make (docs/spec.md, sections 2 and 4): a
model whose outputs, loss and gradients all match one deviant form within the suite's
tolerance makes that mistake, and the report names it with the paper's rule and the section of
the spec that states it.

reference_outputs(params, x, labels, config, deviation) computes every stage in float64 and
canonical layouts: conv1 (after its ReLU), primary (the squashed primary capsules), u_hat,
coupling (the last iteration's), v, lengths, reconstruction (decoded from the true class's
capsule), and loss / margin_loss / reconstruction_loss. deviant_gradients gives the gradients
of a deviation that changes only the backward pass (detached routing).

This module imports NumPy and capsspec's root only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from capsspec import model as ref_model
from capsspec import ops
from capsspec.config import CapsNetConfig

__all__ = ["Deviation", "DEVIATIONS", "STAGES", "reference_outputs", "deviant_gradients"]

SPEC = "docs/spec.md"

# The stages of the forward pass in order: the first one that differs is where the model goes wrong.
STAGES = ("conv1", "primary", "u_hat", "coupling", "v", "lengths", "reconstruction")
LOSSES = ("loss",)


@dataclass(frozen=True)
class Deviation:
    name: str
    mistake: str  # what the model does
    rule: str  # what the paper (and the spec) says instead
    where: str  # the spec's section
    gradient_only: bool = False  # the forward pass and the loss are the reference's

    def describe(self) -> str:
        return f"{self.name}: {self.mistake}. {self.rule} ({SPEC}, {self.where})"


DEVIATIONS: dict[str, Deviation] = {d.name: d for d in (
    Deviation("primary-no-channels-last", "PrimaryCaps' convolution output is reshaped into capsules without moving "
              "the channels last, so a capsule holds neighbouring grid positions of one channel",
              "A primary capsule is the D channels of one capsule type at one grid position", "section 4, item 3"),
    Deviation("primary-no-channels-last-dim-major", "PrimaryCaps' channels are ordered dimension-major (d*T + t, e.g. "
              "D convolutions of T channels stacked) and reshaped into capsules without moving them last, so a "
              "capsule holds neighbouring grid positions of one channel",
              "A primary capsule is the D channels of one capsule type at one grid position", "section 4, item 3"),
    Deviation("primary-relu", "a ReLU is applied to PrimaryCaps before the squash",
              "PrimaryCaps has no ReLU: squash is its non-linearity", "section 2, item 7"),
    Deviation("routing-softmax-over-children", "the routing softmax runs over the child capsules i",
              "Each child's coupling coefficients sum to 1 over the parents j", "section 4, item 1"),
    Deviation("routing-logits-shared", "the routing logits b are shared by the batch (the agreement averaged "
              "over the examples)", "Routing logits start at 0 for each example and are never shared",
              "section 4, item 7"),
    Deviation("routing-iterations-ignored", "routing runs one iteration whatever the configured number",
              "Routing runs config.routing_iterations iterations (3 in the paper)", "section 4, item 8"),
    Deviation("decoder-unmasked", "the decoder is fed every class capsule, unmasked",
              "The decoder sees only the true class's capsule in training (the others masked to zero)",
              "section 2, item 10"),
    Deviation("mask-by-prediction", "the decoder is fed the longest class capsule in training",
              "In training the decoder sees the true class's capsule", "section 2, item 10"),
    Deviation("margin-on-softmax", "the margin loss is applied to a softmax of the capsule lengths",
              "The margin loss applies to the lengths themselves", "section 4, item 4"),
    Deviation("margin-mean-over-classes", "the margin loss is averaged over the classes",
              "The margin loss sums over the classes and averages over the batch", "section 2, item 9"),
    Deviation("reconstruction-mean-over-pixels", "the reconstruction loss averages the squared errors over the pixels",
              "The reconstruction loss is the per-image sum of squared errors times 0.0005, averaged over the batch",
              "section 2, item 9"),
    Deviation("routing-detached", "gradients flow through the last routing iteration only (b and the earlier c "
              "detached)", "Gradients flow through every routing iteration", "section 2, item 5", gradient_only=True),
)}


def _routing(u_hat: np.ndarray, iterations: int, softmax_axis: int = 2,
             shared: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Routing by agreement with the softmax over a chosen axis of b (B, N, J): 2 the parents, 1 the children;
    shared: b is one (N, J) for the batch, updated by the agreement's mean over the examples."""
    b = np.zeros((1, *u_hat.shape[1:3]) if shared else u_hat.shape[:3])
    for t in range(iterations):
        z = np.exp(b - b.max(axis=softmax_axis, keepdims=True))
        c = np.broadcast_to(z / z.sum(axis=softmax_axis, keepdims=True), u_hat.shape[:3])
        v = ops.squash(np.einsum("bnj,bnje->bje", c, u_hat))
        if t + 1 < iterations:
            a = np.einsum("bnje,bje->bnj", u_hat, v)
            b = b + (a.mean(axis=0, keepdims=True) if shared else a)
    return v, c


def _capsules(params: Mapping[str, np.ndarray], x: np.ndarray, config: CapsNetConfig, dev: str) -> dict:
    """conv1, primary, u_hat, coupling, v and lengths, with the deviation `dev` ("" for none)."""
    h1 = np.maximum(ops.conv2d(x, params["conv1.weight"], params["conv1.bias"], config.conv1_stride), 0)
    a2 = ops.conv2d(h1, params["primary.weight"], params["primary.bias"], config.primary_stride)
    if dev == "primary-relu":
        a2 = np.maximum(a2, 0)
    bsz, t, d = a2.shape[0], config.primary_types, config.primary_dim
    if dev == "primary-no-channels-last":
        s2 = a2.reshape(bsz, -1, d)
    elif dev == "primary-no-channels-last-dim-major":
        s2 = a2.reshape(bsz, t, d, *a2.shape[2:]).transpose(0, 2, 1, 3, 4).reshape(bsz, -1, d)
    else:
        s2 = ops._to_capsules(a2, config.primary_dim)
    u = ops.squash(s2)
    u_hat = ops.predictions(u, params["digit.weight"])
    if dev == "routing-softmax-over-children":
        v, c = _routing(u_hat, config.routing_iterations, softmax_axis=1)
    elif dev == "routing-logits-shared":
        v, c = _routing(u_hat, config.routing_iterations, shared=True)
    elif dev == "routing-iterations-ignored":
        v, c = ops.routing(u_hat, 1)
    else:
        v, c = ops.routing(u_hat, config.routing_iterations)
    return {"conv1": h1, "primary": u, "u_hat": u_hat, "coupling": c, "v": v, "lengths": ops.capsule_lengths(v)}


def reference_outputs(params: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray, config: CapsNetConfig,
                      deviation: str = "") -> dict[str, np.ndarray]:
    """Every stage and the loss terms of the reference (float64 inputs), or of one deviation's form of it."""
    out = _capsules(params, x, config, deviation)
    lengths, v = out["lengths"], out["v"]
    if deviation == "margin-on-softmax":
        z = np.exp(lengths - lengths.max(axis=1, keepdims=True))
        margin = ops.margin_loss(z / z.sum(axis=1, keepdims=True), labels, config.m_plus, config.m_minus,
                                 config.lambda_)
    else:
        margin = ops.margin_loss(lengths, labels, config.m_plus, config.m_minus, config.lambda_)
        if deviation == "margin-mean-over-classes":
            margin = margin / config.num_classes
    recon_loss = np.zeros(())
    if config.use_decoder:
        masked = (v.reshape(v.shape[0], -1) if deviation == "decoder-unmasked" else
                  ops.mask(v, None if deviation == "mask-by-prediction" else labels))
        ws, bs = ref_model.decoder_layers(params, config)
        out["reconstruction"] = ops.decoder(masked, ws, bs)
        recon_loss = ops.reconstruction_loss(out["reconstruction"], x, config.reconstruction_scale)
        if deviation == "reconstruction-mean-over-pixels":
            recon_loss = recon_loss / config.image_size
    out.update(loss=margin + recon_loss, margin_loss=margin, reconstruction_loss=recon_loss)
    return out


def deviant_gradients(params: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray, config: CapsNetConfig,
                      deviation: str) -> dict[str, np.ndarray] | None:
    """The gradient of the total loss of a gradient-only deviation (routing-detached), canonical names; None
    for the others (whose forward pass differs and is compared instead)."""
    if deviation != "routing-detached":
        return None
    out, (a1, conv1_cache, primary_cache, pred_cache, routing_cache, onehot, hs) = ref_model._forward(
        params, x, config, labels)
    one = np.ones((), dtype=x.dtype)
    (g_len,) = ops.margin_loss_vjp(one, out.lengths, labels, config.m_plus, config.m_minus, config.lambda_)
    g_v = ops._lengths_bwd(out.v, g_len)
    grads: dict[str, np.ndarray] = {}
    if config.use_decoder:
        (g_rec,) = ops.reconstruction_loss_vjp(one, out.reconstruction, x, config.reconstruction_scale)
        ws, _ = ref_model.decoder_layers(params, config)
        g_masked, gws, gbs = ops._decoder_bwd(hs, ws, g_rec)
        for k, (gw, gb) in enumerate(zip(gws, gbs)):
            grads[f"decoder.{k}.weight"], grads[f"decoder.{k}.bias"] = gw, gb
        g_v = g_v + ops._unmask(g_masked, out.v, onehot)
    # Only the last iteration's s = sum_i c_ij u_hat_j|i carries a gradient, c held constant.
    _, cs, ss, _ = routing_cache
    g_s = ops.squash_vjp(g_v, ss[-1])[0]  # (B, J, E)
    g_uhat = np.ascontiguousarray((cs[-1][:, :, :, None] * g_s[:, :, None, :]).transpose(0, 2, 1, 3))
    g_u, grads["digit.weight"] = ops._predictions_bwd(pred_cache, g_uhat)
    g_h1, grads["primary.weight"], grads["primary.bias"] = ops._primary_bwd(primary_cache, g_u)
    _, grads["conv1.weight"], grads["conv1.bias"] = ops._conv2d_bwd(conv1_cache, g_h1 * (a1 > 0),
                                                                    need_input_grad=False)
    return {k: grads[k] for k in params}
