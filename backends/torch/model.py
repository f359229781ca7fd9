"""The capsule network as torch.nn.Modules, and the spec's model functions on top of them.

    x -> conv1 (nn.Conv2d) -> ReLU -> primary (PrimaryCaps) -> digit (DigitCaps: predictions,
    routing) -> capsule lengths;  mask -> decoder (Decoder, an nn.Sequential) -> reconstruction
    loss = margin_loss(lengths, labels) + reconstruction_loss(decoder output, targets or x)

The backend's native params are one CapsNet. Its submodules are named so that its
state_dict keys *are* the canonical parameter names of CapsNetConfig.param_shapes, in the
same order, with no mapping table:

    conv1.weight, conv1.bias          nn.Conv2d
    primary.weight, primary.bias      PrimaryCaps, an nn.Conv2d whose forward makes capsules
    digit.weight                      DigitCaps, nn.Parameter (N, J, E, D)
    decoder.K.weight, decoder.K.bias  Decoder, an nn.Sequential whose Linear layers are named
                                      "0", "1", ... and its activations "relu0", ..., "sigmoid"
                                      (so decoder[1] is the first ReLU, but decoder.get_submodule("1")
                                      and the state_dict key decoder.1.weight are the second Linear)

Every layer's forward calls the ops of backends/torch/ops.py, so each
piece of the spec's math is written once; value_and_grad is autograd through them.

The spec's functional names take (params, x, config, ...) where params is a CapsNet built for
that config; the door (capsspec.validation) has checked their arguments before they run. They
never mutate params.

What this module must never do: import the reference's implementation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from capsspec.backend_kit import float_dtype, loss_parts
from capsspec.config import CapsNetConfig
from capsspec.spec import CapsNetOutput, LossParts

from . import ops

__all__ = ["CapsNet", "PrimaryCaps", "DigitCaps", "Decoder", "count_correct", "forward", "loss", "value_and_grad",
           "predict"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class PrimaryCaps(nn.Conv2d):
    """PrimaryCaps: a 9x9 convolution (no ReLU) whose T*D channels are regrouped into T*Gh*Gw
    capsules of D dims and squashed. An nn.Conv2d, so its parameters are weight and bias."""

    def __init__(self, in_channels: int, types: int, capsule_dim: int, kernel_size: int, stride: int,
                 **factory: Any) -> None:
        super().__init__(in_channels, types * capsule_dim, kernel_size, stride=stride, **factory)
        self.capsule_dim = capsule_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, T*Gh*Gw, D)
        return ops.primary_capsules(h, self.weight, self.bias, self.capsule_dim, self.stride[0])


class DigitCaps(nn.Module):
    """The class capsules: predictions u_hat = W u (one W per child/parent pair, no bias), then
    routing by agreement. forward(u) -> (v (B, J, E), coupling c (B, N, J))."""

    def __init__(self, num_primary: int, num_classes: int, class_dim: int, primary_dim: int,
                 routing_iterations: int, none_of_the_above: bool = False, **factory: Any) -> None:
        super().__init__()
        self.routing_iterations = routing_iterations
        self.none_of_the_above = none_of_the_above
        self.weight = nn.Parameter(torch.empty(num_primary, num_classes, class_dim, primary_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The spec's initial distribution (capsspec.model.init_params): short class capsules,
        # so routing starts undecided.
        nn.init.normal_(self.weight, 0.0, 0.01)

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.routing(ops.predictions(u, self.weight), self.routing_iterations, self.none_of_the_above)


class Decoder(nn.Sequential):
    """Linear -> ReLU -> ... -> Linear -> Sigmoid, with the Linear layers named "0", "1", ... so
    the state_dict keys are the canonical decoder.K.weight / decoder.K.bias."""

    def __init__(self, widths: list[int], **factory: Any) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        last = len(widths) - 2
        for k in range(len(widths) - 1):
            layers[str(k)] = nn.Linear(widths[k], widths[k + 1], **factory)
            layers["sigmoid" if k == last else f"relu{k}"] = nn.Sigmoid() if k == last else nn.ReLU()
        super().__init__(layers)

    def linears(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The spec's decoder op, on this module's layers (the same math nn.Sequential would do).
        layers = self.linears()
        return ops.decoder(x, [m.weight for m in layers], [m.bias for m in layers])


class CapsNet(nn.Module):
    """The capsule network of Sabour et al. (2017) for one CapsNetConfig.

    CapsNet(config, dtype="float32", device=None) initialises from the spec's distributions
    (conv and linear layers uniform in +-1/sqrt(fan_in), which is PyTorch's default for them;
    digit.weight normal with std 0.01) with torch's RNG; for the spec's exact values build it
    with TorchBackend.params_from_numpy(capsspec.model.init_params(config, seed), config).
    forward(x, labels=None) -> CapsNetOutput; the decoder sees the true class's capsule when
    labels (B,) are given, else the longest one, and each listed class's in turn for labels (B, K).
    """

    def __init__(self, config: CapsNetConfig | None = None, dtype: Any = "float32",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        config = config if config is not None else CapsNetConfig()
        if not isinstance(config, CapsNetConfig):
            raise ValueError(f"config must be a CapsNetConfig, got {type(config).__name__}")
        self.config = config
        factory = {"dtype": float_dtype(dtype, _DTYPES), "device": device}
        c = config
        # Registration order = the canonical order of CapsNetConfig.param_shapes.
        self.conv1 = nn.Conv2d(c.input_channels, c.conv1_channels, c.conv1_kernel, stride=c.conv1_stride, **factory)
        self.primary = PrimaryCaps(c.conv1_channels, c.primary_types, c.primary_dim, c.primary_kernel,
                                   c.primary_stride, **factory)
        self.digit = DigitCaps(c.num_primary, c.num_classes, c.class_dim, c.primary_dim, c.routing_iterations,
                               c.none_of_the_above, **factory)
        self.decoder = (Decoder([c.num_classes * c.class_dim, *c.decoder_widths, c.image_size], **factory)
                        if c.use_decoder else None)
        # Set by TorchBackend (fast=True / compile=True on CUDA): train_step takes the fast path.
        self.fast = False

    @property
    def dtype(self) -> torch.dtype:
        return self.digit.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.digit.weight.device

    def canonical_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters under their canonical names, in the canonical order."""
        return dict(self.named_parameters())

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> CapsNetOutput:
        h1 = torch.relu(self.conv1(x))
        u = self.primary(h1)
        v, c = self.digit(u)
        lengths = ops.capsule_lengths(v)
        recon = self.decoder(ops.mask(v, labels)) if self.decoder is not None else None
        return CapsNetOutput(v=v, lengths=lengths, coupling=c, reconstruction=recon)

    def loss_parts(self, out: CapsNetOutput, x: torch.Tensor, labels: torch.Tensor,
                   targets: torch.Tensor | None = None) -> LossParts:
        """The spec's loss of a forward output (built with these labels), reconstructions against
        targets (x itself when None)."""
        return loss_parts(ops.margin_loss, ops.reconstruction_loss, out, x, labels, self.config,
                          lambda: torch.zeros((), dtype=x.dtype, device=x.device), targets)


def count_correct(lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Examples whose K longest class capsules are their K labelled classes (K = 1 for (B,) labels),
    a 0-d tensor; ties go to the lower class index, as in predict."""
    rows = labels.reshape(labels.shape[0], -1).long()
    top = torch.argsort(-lengths.detach(), dim=1, stable=True)[:, :rows.shape[1]]
    return (torch.sort(top, dim=1).values == torch.sort(rows, dim=1).values).all(dim=1).sum()


# ============================================================================== spec functions
def forward(params: CapsNet, x: torch.Tensor, config: CapsNetConfig, labels: torch.Tensor | None = None) -> CapsNetOutput:
    """The model's outputs. The decoder sees the true class's capsule when labels (B,) are given,
    else the longest capsule; with labels (B, K) it decodes each listed class: (B, K, C*H*W)."""
    return params(x, labels)


def loss(params: CapsNet, x: torch.Tensor, labels: torch.Tensor, config: CapsNetConfig,
         targets: torch.Tensor | None = None) -> LossParts:
    """Total loss (margin + reconstruction) with its two terms (0-d tensors), averaged over the batch."""
    return params.loss_parts(params(x, labels), x, labels, targets)


def value_and_grad(params: CapsNet, x: torch.Tensor, labels: torch.Tensor, config: CapsNetConfig,
                   targets: torch.Tensor | None = None):
    """(total loss, gradient of it for every parameter keyed by canonical name), by autograd.

    The gradients are returned, not accumulated into the parameters' .grad.
    """
    named = params.canonical_parameters()
    with torch.enable_grad():
        total = params.loss_parts(params(x, labels), x, labels, targets).total
        grads = torch.autograd.grad(total, list(named.values()))
    return total.detach(), dict(zip(named, grads))


def predict(params: CapsNet, x: torch.Tensor, config: CapsNetConfig) -> torch.Tensor:
    """The class of the longest class capsule, per example (int64)."""
    with torch.no_grad():
        v, _ = params.digit(params.primary(torch.relu(params.conv1(x))))
        return torch.argmax(ops.capsule_lengths(v), dim=1).to(torch.int64)
