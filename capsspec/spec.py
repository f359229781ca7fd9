"""The spec's vocabulary: the names every backend implements, and the result types.

This module lists the ops, model functions and optimizer functions that make up the spec,
once, so that the registry, the conformance suite and the API-surface checks all read from
one table. It imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "OpSpec", "OPS", "OP_NAMES", "MODEL_FUNCTIONS", "OPTIMIZER_FUNCTIONS", "SPEC_NAMES",
    "INFERENCE_NAMES", "CONSUMES",
    "CapsNetOutput", "LossParts", "StepMetrics",
]


@dataclass(frozen=True)
class OpSpec:
    """One op of the spec: its array arguments, which of them are differentiable, its static args."""

    name: str
    array_args: tuple[str, ...]
    differentiable: tuple[str, ...]
    static_args: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("out",)

    @property
    def vjp_name(self) -> str:
        return self.name + "_vjp"


# The VJP of each op takes (g, *args) and returns a tuple with one gradient per name in
# `differentiable`, in that order (decoder's weights and biases gradients are lists).
OPS: tuple[OpSpec, ...] = (
    OpSpec("conv2d", ("x", "weight", "bias"), ("x", "weight", "bias"), ("stride",)),
    OpSpec("squash", ("s",), ("s",), ("axis",)),
    OpSpec("primary_capsules", ("h", "weight", "bias"), ("h", "weight", "bias"), ("capsule_dim", "stride")),
    OpSpec("predictions", ("u", "weight"), ("u", "weight")),
    OpSpec("routing", ("u_hat",), ("u_hat",), ("iterations", "none_of_the_above"), outputs=("v", "c")),
    OpSpec("capsule_lengths", ("v",), ("v",)),
    OpSpec("margin_loss", ("lengths", "labels"), ("lengths",), ("m_plus", "m_minus", "lambda_")),
    OpSpec("mask", ("v", "labels"), ("v",)),
    OpSpec("decoder", ("x", "weights", "biases"), ("x", "weights", "biases")),
    OpSpec("reconstruction_loss", ("reconstruction", "images"), ("reconstruction",), ("scale",)),
)
OP_NAMES: tuple[str, ...] = tuple(op.name for op in OPS)

# Labels are (B,) integers (one class per example) or (B, K) integers with K distinct classes
# per row (MultiMNIST's two digits). With (B, K) labels: margin_loss counts all K classes as
# present; mask(v, labels) is (B, K, J*E), row k masked by class labels[:, k]; decoder applies to
# any leading dims (..., J*E) -> (..., C*H*W); reconstruction_loss takes (B, K, C*H*W) with
# images (B, K, C, H, W) and sums the K rows' squared errors.
#
# forward(params, x, config, labels=None) -> CapsNetOutput
# loss(params, x, labels, config, targets=None) -> LossParts
# value_and_grad(params, x, labels, config, targets=None) -> (total loss, grads keyed like params)
# predict(params, x, config) -> integer class per example
# targets: the images the reconstructions are compared with, shaped like the reconstruction's
# images ((B, C, H, W) for (B,) labels, (B, K, C, H, W) for (B, K) labels). None means x itself,
# which only (B,) labels allow; without the decoder targets are accepted and unused.
MODEL_FUNCTIONS: tuple[str, ...] = ("forward", "loss", "value_and_grad", "predict")

# adam_init(params) -> state; adam_update(params, grads, state, adam) -> (params, state);
# train_step(params, state, x, labels, config, adam, targets=None) -> (params, state, StepMetrics)
OPTIMIZER_FUNCTIONS: tuple[str, ...] = ("adam_init", "adam_update", "train_step")

# Purity: no spec function changes its inputs (arrays, parameter dicts or modules, optimizer
# state), with one exception. train_step *consumes* the params and state it is given: a backend
# may update them in place (an nn.Module or tf.Module and its optimizer, for speed) and returns
# the updated ones, which the caller must use; what it passed in is not to be used again.
# adam_update, like every other name, leaves its inputs as they were.
CONSUMES: dict[str, tuple[str, ...]] = {"train_step": ("params", "state")}

SPEC_NAMES: tuple[str, ...] = (
    *(n for op in OPS for n in (op.name, op.vjp_name)),
    *MODEL_FUNCTIONS,
    *OPTIMIZER_FUNCTIONS,
)

# What an inference-only backend (one whose `trains` is False, e.g. a runtime for an exported
# graph) implements; the conformance suite reports every other name as not applicable to it.
INFERENCE_NAMES: tuple[str, ...] = ("forward", "predict")


class CapsNetOutput(NamedTuple):
    """What forward returns. Arrays are the backend's own."""

    v: Any  # (B, J, E) class capsules
    lengths: Any  # (B, J) their lengths: the class scores
    coupling: Any  # (B, N, J) coupling coefficients of the last routing iteration
    # (B, C*H*W): the decoder on the true class's capsule ((B,) labels) or the longest one (no
    # labels); (B, K, C*H*W) with (B, K) labels, one decoding per listed class; None without the decoder
    reconstruction: Any


class LossParts(NamedTuple):
    """The total loss and its two terms, as scalars of the backend."""

    total: Any
    margin: Any
    reconstruction: Any


class StepMetrics(NamedTuple):
    """What one train_step reports. Scalars may stay on the device until a caller reads them."""

    total: Any
    margin: Any
    reconstruction: Any
    # training examples of the batch classified correctly (before the update): their K longest
    # class capsules are their K labelled classes (K = 1 for (B,) labels)
    correct: Any
    lr: float  # the learning rate this step used
