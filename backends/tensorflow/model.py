"""The capsule network as tf.Modules, and the spec's model functions on top of them.

    x (NCHW) -> NHWC -> conv1 (Conv2D) -> ReLU -> primary (PrimaryCaps) -> digit (DigitCaps:
    predictions, routing) -> capsule lengths;  mask -> decoder (Decoder of Dense) -> reconstruction
    loss = margin_loss(lengths, labels) + reconstruction_loss(decoder output, targets or x)

The backend's native params are one CapsNet. Inside it everything is laid out the way
TensorFlow wants it: activations channels-last (NHWC), convolution kernels HWIO
(kh, kw, in, out) and dense kernels (in, out), so no weight is transposed in a training step.
The spec's canonical layouts (OIHW, (out, in)) exist only at the edges: CapsNet(initial=...)
and CapsNet.canonical_numpy() convert whole parameter sets, value_and_grad returns canonical
gradients, and CANONICAL_TO_NATIVE / to_native / to_canonical say which names are permuted how.
digit.weight (N, J, E, D) and the biases are stored as the spec lays them out.

Every layer calls the private forms of the ops in backends/tensorflow/ops.py, so the spec's
math is written once. The steps the spec names are compiled per CapsNet with tf.function and an
input_signature whose batch dimension is None: a new batch size (1, 7, 128, a last partial
batch) reuses the one trace. Labels go into the compiled steps as (B, K) (K = 1 for the (B,)
labels of one digit per image, whose targets are x) and K is a None dimension too, so MNIST and
MultiMNIST batches share one trace per step. CapsNet.traces counts traces per step (it grows only while
TensorFlow traces, since it is a Python side effect), which the tests read.

The spec's functional names take (params, x, config, ...) where params is a CapsNet built for
that config; the door (capsspec.validation) has checked their arguments before they run. They
never change params.

What this module must never do: import the reference's implementation, or use TF1 APIs.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from capsspec.backend_kit import float_dtype, loss_parts
from capsspec.config import CapsNetConfig
from capsspec.spec import CapsNetOutput, LossParts

from . import ops

__all__ = ["CapsNet", "Conv2D", "PrimaryCaps", "DigitCaps", "Dense", "Decoder",
           "CANONICAL_TO_NATIVE", "to_native", "to_canonical",
           "forward", "loss", "value_and_grad", "predict"]

_DTYPES = {"float32": tf.float32, "float64": tf.float64}

# How each parameter kind is permuted from the canonical layout to the stored one; names not
# listed (biases, digit.weight) are stored as the spec lays them out.
CANONICAL_TO_NATIVE = {"conv": ops.OIHW_TO_HWIO, "dense": (1, 0)}
_NATIVE_TO_CANONICAL = {"conv": ops.HWIO_TO_OIHW, "dense": (1, 0)}


def _kind(name: str) -> str | None:
    if name in ("conv1.weight", "primary.weight"):
        return "conv"
    if name.startswith("decoder.") and name.endswith(".weight"):
        return "dense"
    return None


def _permuted(name: str, a: Any, perms: dict[str, tuple[int, ...]]) -> Any:
    kind = _kind(name)
    if kind is None:
        return a
    perm = perms[kind]
    return np.ascontiguousarray(np.transpose(a, perm)) if isinstance(a, np.ndarray) else tf.transpose(a, perm)


def to_native(name: str, a: Any) -> Any:
    """A canonical parameter (or gradient, or moment) in the layout CapsNet stores it in."""
    return _permuted(name, a, CANONICAL_TO_NATIVE)


def to_canonical(name: str, a: Any) -> Any:
    """The inverse of to_native."""
    return _permuted(name, a, _NATIVE_TO_CANONICAL)


# ============================================================================== layers
class Conv2D(tf.Module):
    """A valid-padding convolution on NHWC activations; kernel (kh, kw, in, out), bias (out,)."""

    def __init__(self, kernel: Any, bias: Any, stride: int, name: str | None = None) -> None:
        super().__init__(name=name)
        self.stride = stride
        self.kernel = tf.Variable(kernel, name="kernel")
        self.bias = tf.Variable(bias, name="bias")

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return ops._conv2d_nhwc(x, self.kernel, self.bias, self.stride)


class PrimaryCaps(Conv2D):
    """PrimaryCaps: a convolution (no ReLU) whose T*D channels are regrouped into T*Gh*Gw capsules
    of D dims (capsule i = (t*Gh + y)*Gw + x, dim d = channel t*D + d) and squashed."""

    def __init__(self, kernel: Any, bias: Any, stride: int, capsule_dim: int, name: str | None = None) -> None:
        super().__init__(kernel, bias, stride, name=name)
        self.capsule_dim = capsule_dim

    def __call__(self, h: tf.Tensor) -> tf.Tensor:  # (B, H, W, C) -> (B, T*Gh*Gw, D)
        return ops._primary_capsules_nhwc(h, self.kernel, self.bias, self.capsule_dim, self.stride)


class DigitCaps(tf.Module):
    """The class capsules: u_hat = W u (one W (E, D) per child/parent pair, no bias), then routing
    by agreement. __call__(u) -> (v (B, J, E), coupling c (B, N, J))."""

    def __init__(self, weight: Any, routing_iterations: int, none_of_the_above: bool = False,
                 name: str | None = None) -> None:
        super().__init__(name=name)
        self.routing_iterations = routing_iterations
        self.none_of_the_above = none_of_the_above
        self.weight = tf.Variable(weight, name="weight")  # (N, J, E, D)

    def __call__(self, u: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return ops._routing_bjne(ops._predictions_bjne(u, self.weight), self.routing_iterations,
                                 self.none_of_the_above)


class Dense(tf.Module):
    """y = x @ kernel + bias with kernel (in, out), TensorFlow's layout (the spec's W is its transpose)."""

    def __init__(self, kernel: Any, bias: Any, name: str | None = None) -> None:
        super().__init__(name=name)
        self.kernel = tf.Variable(kernel, name="kernel")
        self.bias = tf.Variable(bias, name="bias")


class Decoder(tf.Module):
    """Dense -> ReLU -> ... -> Dense -> sigmoid, from the masked class capsules to the pixels."""

    def __init__(self, layers: list[Dense], name: str | None = None) -> None:
        super().__init__(name=name)
        self.layers = layers

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        return ops._decoder(x, [d.kernel for d in self.layers], [d.bias for d in self.layers], in_out=True)


# ============================================================================== the network
def _spec_initial(config: CapsNetConfig, dtype: tf.DType, seed: int) -> dict[str, tf.Tensor]:
    """Canonical initial values from the spec's distributions (capsspec.model.init_params states
    them): conv and dense layers uniform in +-1/sqrt(fan_in), digit.weight normal with std 0.01.
    Drawn with TensorFlow's stateless RNG, so the values differ from the reference's for a seed."""
    shapes = config.param_shapes()
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        key = tf.constant([seed, i], dtype=tf.int64)
        if name == "digit.weight":
            out[name] = tf.random.stateless_normal(shape, key, stddev=0.01, dtype=tf.float64)
        else:
            fan_in = math.prod(shapes[name.rsplit(".", 1)[0] + ".weight"][1:])
            bound = 1 / math.sqrt(fan_in)
            out[name] = tf.random.stateless_uniform(shape, key, -bound, bound, dtype=tf.float64)
        out[name] = tf.cast(out[name], dtype)
    return out


class CapsNet(tf.Module):
    """The capsule network of Sabour et al. (2017) for one CapsNetConfig.

    CapsNet(config=None, dtype="float32", initial=None, seed=0, device="/CPU:0"):
    initial, when given, is a dict of canonical parameters (what capsspec.model.init_params
    returns, already validated); otherwise the spec's distributions are drawn with `seed`.
    Variables are created on `device` and every step runs there.

    __call__(x, labels=None) takes NCHW images (the spec's layout) and returns CapsNetOutput;
    the decoder sees the true class's capsule when labels (B,) are given, else the longest one,
    and each listed class's in turn for labels (B, K).
    """

    def __init__(self, config: CapsNetConfig | None = None, dtype: Any = "float32",
                 initial: Mapping[str, Any] | None = None, seed: int = 0, device: str = "/CPU:0") -> None:
        super().__init__(name="capsnet")
        config = config if config is not None else CapsNetConfig()
        if not isinstance(config, CapsNetConfig):
            raise ValueError(f"config must be a CapsNetConfig, got {type(config).__name__}")
        self.config = config
        self.device = device
        tf_dtype = float_dtype(dtype, _DTYPES)
        c = config
        with tf.device(device):
            if initial is None:
                initial = _spec_initial(c, tf_dtype, seed)
            p = {k: tf.convert_to_tensor(to_native(k, initial[k]), dtype=tf_dtype) for k in c.param_shapes()}
            self.conv1 = Conv2D(p["conv1.weight"], p["conv1.bias"], c.conv1_stride, name="conv1")
            self.primary = PrimaryCaps(p["primary.weight"], p["primary.bias"], c.primary_stride, c.primary_dim,
                                       name="primary")
            self.digit = DigitCaps(p["digit.weight"], c.routing_iterations, c.none_of_the_above, name="digit")
            self.decoder = (Decoder([Dense(p[f"decoder.{k}.weight"], p[f"decoder.{k}.bias"], name=f"decoder_{k}")
                                     for k in range(c.num_decoder_layers)], name="decoder")
                            if c.use_decoder else None)
        self.traces: collections.Counter[str] = collections.Counter()
        self._build_steps(tf_dtype)

    @property
    def dtype(self) -> tf.DType:
        return self.digit.weight.dtype

    def canonical_variables(self) -> dict[str, tf.Variable]:
        """The variables under their canonical names, in the canonical order, in the stored layout
        (to_canonical turns one into the spec's layout)."""
        named = {"conv1.weight": self.conv1.kernel, "conv1.bias": self.conv1.bias,
                 "primary.weight": self.primary.kernel, "primary.bias": self.primary.bias,
                 "digit.weight": self.digit.weight}
        if self.decoder is not None:
            for k, layer in enumerate(self.decoder.layers):
                named[f"decoder.{k}.weight"], named[f"decoder.{k}.bias"] = layer.kernel, layer.bias
        return named

    def canonical_numpy(self) -> dict[str, np.ndarray]:
        """The parameters as the spec's canonical dict of NumPy arrays (copies)."""
        return {k: to_canonical(k, np.array(v.numpy(), copy=True)) for k, v in self.canonical_variables().items()}

    # ------------------------------------------------------------------------- the math
    def _encode(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        h1 = tf.nn.relu(self.conv1(tf.transpose(x, ops.NCHW_TO_NHWC)))
        return self.digit(self.primary(h1))

    def __call__(self, x: tf.Tensor, labels: tf.Tensor | None = None) -> CapsNetOutput:
        v, c = self._encode(x)
        recon = self.decoder(ops.mask(v, labels)) if self.decoder is not None else None
        return CapsNetOutput(v=v, lengths=ops.capsule_lengths(v), coupling=c, reconstruction=recon)

    def loss_parts(self, out: CapsNetOutput, x: tf.Tensor, labels: tf.Tensor,
                   targets: tf.Tensor | None = None) -> LossParts:
        """The spec's loss of a forward output (built with these labels); x and targets are NCHW."""
        return loss_parts(ops.margin_loss, ops.reconstruction_loss, out, x, labels, self.config,
                          lambda: tf.zeros((), dtype=x.dtype), targets)

    def loss_and_output(self, x: tf.Tensor, labels: tf.Tensor,
                        targets: tf.Tensor | None = None) -> tuple[LossParts, CapsNetOutput]:
        out = self(x, labels)
        return self.loss_parts(out, x, labels, targets), out

    # ------------------------------------------------------------------------- compiled steps
    def _build_steps(self, dtype: tf.DType) -> None:
        c = self.config
        x_spec = tf.TensorSpec([None, *c.input_shape], dtype, name="x")
        y_spec = tf.TensorSpec([None, None], tf.int64, name="labels")  # (B, K): see _rows
        t_spec = tf.TensorSpec([None, None, *c.input_shape], dtype, name="targets")
        # One tf.function per step and CapsNet, over a partial rather than a closure: TensorFlow
        # keys its "frequent retracing" warning on a function's code object, which every CapsNet's
        # closure would share, so building many networks (tests, the conformance suite) would
        # warn although each step is traced once.
        self.forward_labels_step = tf.function(functools.partial(_forward_labels_step, self),
                                               input_signature=[x_spec, y_spec])
        self.forward_longest_step = tf.function(functools.partial(_forward_longest_step, self),
                                                input_signature=[x_spec])
        self.loss_step = tf.function(functools.partial(_loss_step, self), input_signature=[x_spec, y_spec, t_spec])
        self.value_and_grad_step = tf.function(functools.partial(_value_and_grad_step, self),
                                               input_signature=[x_spec, y_spec, t_spec])
        self.predict_step = tf.function(functools.partial(_predict_step, self), input_signature=[x_spec])


# The bodies of CapsNet's compiled steps. Each counts its traces in net.traces: a Python side
# effect, so it runs only while TensorFlow traces, never when a trace is reused.
def _forward_labels_step(net: CapsNet, x: tf.Tensor, labels: tf.Tensor) -> tuple:
    net.traces["forward_labels"] += 1
    with tf.device(net.device):
        return tuple(net(x, labels))


def _forward_longest_step(net: CapsNet, x: tf.Tensor) -> tuple:
    net.traces["forward_longest"] += 1
    with tf.device(net.device):
        return tuple(net(x))


def _loss_step(net: CapsNet, x: tf.Tensor, labels: tf.Tensor, targets: tf.Tensor) -> tuple:
    net.traces["loss"] += 1
    with tf.device(net.device):
        return tuple(net.loss_and_output(x, labels, targets)[0])


def _value_and_grad_step(net: CapsNet, x: tf.Tensor, labels: tf.Tensor, targets: tf.Tensor) -> tuple:
    net.traces["value_and_grad"] += 1
    with tf.device(net.device):
        named = net.canonical_variables()
        variables = list(named.values())
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            total = net.loss_and_output(x, labels, targets)[0].total
        grads = tape.gradient(total, variables)
        return total, [to_canonical(k, g) for k, g in zip(named, grads)]


def _predict_step(net: CapsNet, x: tf.Tensor) -> tf.Tensor:
    net.traces["predict"] += 1
    with tf.device(net.device):
        v, _ = net._encode(x)
        return ops._first_argmax(ops.capsule_lengths(v))


# ============================================================================== spec functions
def _labels64(labels: tf.Tensor) -> tf.Tensor:
    # The compiled steps take int64 labels (one signature); any integer dtype is accepted.
    return labels if labels.dtype == tf.int64 else tf.cast(labels, tf.int64)


def _rows(x: tf.Tensor, labels: tf.Tensor, targets: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """What the compiled steps take: labels (B, K) int64 and targets (B, K, C, H, W). (B,) labels
    are (B, 1) rows, and x their targets: the same loss (a (B, 1) row is a (B,) label, and the
    reconstruction term sums over the K axis), one trace for one digit per image and for two."""
    if labels.shape.rank == 1:
        labels = labels[:, tf.newaxis]
        targets = x if targets is None else targets
        targets = tf.expand_dims(targets, 1)
    elif targets is None:  # no decoder: the door let targets out, and the steps never read them
        targets = tf.expand_dims(x, 1)
    return _labels64(labels), targets


def forward(params: CapsNet, x: tf.Tensor, config: CapsNetConfig, labels: tf.Tensor | None = None) -> CapsNetOutput:
    """The model's outputs. The decoder sees the true class's capsule when labels (B,) are given,
    else the longest capsule; with labels (B, K) it decodes each listed class: (B, K, C*H*W)."""
    if labels is None:
        return CapsNetOutput(*params.forward_longest_step(x))
    out = CapsNetOutput(*params.forward_labels_step(x, _rows(x, labels)[0]))
    if labels.shape.rank == 1 and out.reconstruction is not None:
        out = out._replace(reconstruction=out.reconstruction[:, 0])
    return out


def loss(params: CapsNet, x: tf.Tensor, labels: tf.Tensor, config: CapsNetConfig,
         targets: tf.Tensor | None = None) -> LossParts:
    """Total loss (margin + reconstruction) with its two terms (0-d tensors), averaged over the batch."""
    return LossParts(*params.loss_step(x, *_rows(x, labels, targets)))


def value_and_grad(params: CapsNet, x: tf.Tensor, labels: tf.Tensor, config: CapsNetConfig,
                   targets: tf.Tensor | None = None):
    """(total loss, gradient of it for every parameter keyed by canonical name, in the canonical
    layout), by tf.GradientTape in one compiled step."""
    total, grads = params.value_and_grad_step(x, *_rows(x, labels, targets))
    return total, dict(zip(params.canonical_variables(), grads))


def predict(params: CapsNet, x: tf.Tensor, config: CapsNetConfig) -> tf.Tensor:
    """The class of the longest class capsule, per example (int64; ties to the lowest class)."""
    return params.predict_step(x)
