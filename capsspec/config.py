"""The model's configuration: every size of the capsule network, with the paper's as defaults.

A CapsNetConfig is a frozen value: backends, checkpoints and the conformance suite all key
on it, so it must never change under them. Construction validates every field and refuses
an impossible model with a message that names the field and says why. This module derives
all other sizes (grids, capsule counts, parameter shapes) in one place.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["CapsNetConfig", "AdamConfig", "PAPER_PARAMETER_COUNT", "from_fields", "MAX_ROUTING_ITERATIONS",
           "FIELD_LIMITS", "MAX_PARAMETERS", "MAX_ROUTING_ENTRIES", "Cost", "estimate_cost", "check_affordable",
           "available_memory_bytes", "check_loss_constants", "smallest_input_side"]

# The paper's model has 8,215,568 parameters, 6,804,224 without the decoder (docs/spec.md, section 1).
PAPER_PARAMETER_COUNT = 8_215_568

# Documented bounds (docs/hostile-inputs.md): far above any model the paper or its follow-ups use,
# far below what would take a machine's memory or days of arithmetic. A config beyond one is refused
# at construction, so a checkpoint's config and an ONNX export (which unrolls the routing loop) get
# the same bound as the command line.
MAX_ROUTING_ITERATIONS = 100  # the paper uses 3; routing converges in a handful
FIELD_LIMITS = {
    "input_channels": 64, "input_height": 1024, "input_width": 1024, "conv1_channels": 4096, "conv1_kernel": 64,
    "conv1_stride": 64, "primary_types": 1024, "primary_dim": 256, "primary_kernel": 64, "primary_stride": 64,
    "num_classes": 10_000, "class_dim": 256, "routing_iterations": MAX_ROUTING_ITERATIONS,
}
MAX_DECODER_WIDTH = 65_536
MAX_PARAMETERS = 1_000_000_000  # 4 GB of float32 parameters, 16 GB with Adam's moments and the gradients
MAX_ROUTING_ENTRIES = 50_000_000  # primary capsules x classes x class_dim: the u_hat one image routes


def from_fields(cls: type, d: Mapping[str, Any]) -> Any:
    """cls(**d) for a dataclass, refusing (ValueError) any field the class does not have."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} got unknown fields {unknown}; known fields are {sorted(known)}")
    return cls(**dict(d))


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def smallest_input_side(conv1_kernel: int, conv1_stride: int, primary_kernel: int) -> int:
    """The smallest image side the convolution stack admits: conv1 must leave at least primary_kernel pixels."""
    return conv1_kernel + conv1_stride * (primary_kernel - 1)


def check_loss_constants(prefix: str = "", **values: Any) -> None:
    """The rule for the losses' constants, wherever they come from (a CapsNetConfig, or the spec's
    margin_loss and reconstruction_loss called directly): finite, non-negative, m_minus below m_plus,
    m_plus reachable. prefix: how the caller's user names them (e.g. "CapsNetConfig.")."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{prefix}{name} must be a finite number, got {value!r}")
        if value < 0:
            raise ValueError(f"{prefix}{name} must be non-negative, got {value}")
    m_plus, m_minus = values.get("m_plus"), values.get("m_minus")
    if m_plus is not None and m_minus is not None and not m_minus < m_plus:
        raise ValueError(
            f"{prefix}m_minus ({m_minus}) must be below m_plus ({m_plus}): "
            "otherwise no length satisfies the margin loss for both present and absent classes"
        )
    if m_plus is not None and m_plus > 1:
        raise ValueError(f"{prefix}m_plus={m_plus} is unreachable: squash keeps every length below 1")


@dataclass(frozen=True)
class CapsNetConfig:
    """Sizes and constants of the capsule network. The defaults are the paper's MNIST model."""

    input_channels: int = 1
    input_height: int = 28
    input_width: int = 28
    conv1_channels: int = 256
    conv1_kernel: int = 9
    conv1_stride: int = 1
    primary_types: int = 32
    primary_dim: int = 8
    primary_kernel: int = 9
    primary_stride: int = 2
    num_classes: int = 10
    class_dim: int = 16
    routing_iterations: int = 3
    # The paper's section 7 (CIFAR10): routing's softmax over the classes gets one more logit, fixed at 0,
    # that no class capsule stands for, so a primary capsule may send part of itself nowhere.
    none_of_the_above: bool = False
    use_decoder: bool = True
    decoder_widths: tuple[int, ...] = (512, 1024)
    m_plus: float = 0.9
    m_minus: float = 0.1
    lambda_: float = 0.5
    reconstruction_scale: float = 0.0005

    def __post_init__(self) -> None:
        # A list is accepted for convenience (JSON round trips give lists) but stored as a tuple
        # so the config stays hashable.
        if isinstance(self.decoder_widths, list):
            object.__setattr__(self, "decoder_widths", tuple(self.decoder_widths))
        self._validate()

    # ----------------------------------------------------------------------------------------
    def _validate(self) -> None:
        positive_ints = [
            "input_channels", "input_height", "input_width", "conv1_channels", "conv1_kernel",
            "conv1_stride", "primary_types", "primary_dim", "primary_kernel", "primary_stride",
            "num_classes", "class_dim", "routing_iterations",
        ]
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"CapsNetConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
            if value < 1:
                raise ValueError(f"CapsNetConfig.{name} must be at least 1, got {value}")
            if value > FIELD_LIMITS[name]:
                raise ValueError(f"CapsNetConfig.{name}={value} is beyond the documented bound of {FIELD_LIMITS[name]} "
                                 f"(docs/hostile-inputs.md)")
        if self.num_classes < 2:
            raise ValueError(
                f"CapsNetConfig.num_classes must be at least 2 (routing needs a choice of parents), "
                f"got {self.num_classes}"
            )
        for name in ("use_decoder", "none_of_the_above"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CapsNetConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.decoder_widths, tuple) or not all(
            isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= MAX_DECODER_WIDTH for w in self.decoder_widths
        ) or len(self.decoder_widths) > 16:
            raise ValueError(
                f"CapsNetConfig.decoder_widths must be a tuple of at most 16 positive ints of at most "
                f"{MAX_DECODER_WIDTH}, got {self.decoder_widths!r}"
            )
        self._check_input_size()
        check_loss_constants("CapsNetConfig.", m_plus=self.m_plus, m_minus=self.m_minus, lambda_=self.lambda_,
                             reconstruction_scale=self.reconstruction_scale)
        self._validate_size()

    def _validate_size(self) -> None:
        """Bounds on what the fields make together: parameters, and the predictions one image routes."""
        entries = self.num_primary * self.num_classes * self.class_dim
        if entries > MAX_ROUTING_ENTRIES:
            raise ValueError(
                f"CapsNetConfig routes {self.num_primary} primary capsules to {self.num_classes} classes of "
                f"{self.class_dim} dims ({entries:,} predictions per image), beyond the documented bound of "
                f"{MAX_ROUTING_ENTRIES:,} (docs/hostile-inputs.md)"
            )
        count = self.parameter_count()
        if count > MAX_PARAMETERS:
            raise ValueError(f"CapsNetConfig has {count:,} parameters, beyond the documented bound of "
                             f"{MAX_PARAMETERS:,} (docs/hostile-inputs.md)")

    def _check_input_size(self) -> None:
        """Refuse an input the convolution stack cannot take, in one line naming the smallest that works."""
        h1, w1 = self.conv1_output_hw
        if min(h1, w1) >= self.primary_kernel:
            return
        need = smallest_input_side(self.conv1_kernel, self.conv1_stride, self.primary_kernel)
        raise ValueError(
            f"CapsNetConfig: a {self.input_height}x{self.input_width} input is too small for conv1_kernel="
            f"{self.conv1_kernel}, conv1_stride={self.conv1_stride}, primary_kernel={self.primary_kernel}: the "
            f"smallest input these admit is {need}x{need} (resize with --image-size {need} {need}, or choose smaller "
            f"kernels or strides with --conv1-kernel, --conv1-stride, --primary-kernel)"
        )

    # ---------------------------------------------------------------------------- derived sizes
    @property
    def conv1_output_hw(self) -> tuple[int, int]:
        """Height and width of conv1's output (valid padding)."""
        return (
            _conv_out(self.input_height, self.conv1_kernel, self.conv1_stride),
            _conv_out(self.input_width, self.conv1_kernel, self.conv1_stride),
        )

    @property
    def primary_grid(self) -> tuple[int, int]:
        """Height and width of the PrimaryCaps grid (6x6 in the paper)."""
        h1, w1 = self.conv1_output_hw
        return (
            _conv_out(h1, self.primary_kernel, self.primary_stride),
            _conv_out(w1, self.primary_kernel, self.primary_stride),
        )

    @property
    def primary_channels(self) -> int:
        """Output channels of the PrimaryCaps convolution: types times capsule dims."""
        return self.primary_types * self.primary_dim

    @property
    def num_primary(self) -> int:
        """Number of primary (child) capsules: 1152 in the paper."""
        gh, gw = self.primary_grid
        return self.primary_types * gh * gw

    @property
    def image_size(self) -> int:
        """Pixels per image, channels included: the decoder's output width."""
        return self.input_channels * self.input_height * self.input_width

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.input_channels, self.input_height, self.input_width)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The canonical parameter names and shapes, in a fixed order. Part of the spec."""
        c = self
        shapes: dict[str, tuple[int, ...]] = {
            "conv1.weight": (c.conv1_channels, c.input_channels, c.conv1_kernel, c.conv1_kernel),
            "conv1.bias": (c.conv1_channels,),
            "primary.weight": (c.primary_channels, c.conv1_channels, c.primary_kernel, c.primary_kernel),
            "primary.bias": (c.primary_channels,),
            "digit.weight": (c.num_primary, c.num_classes, c.class_dim, c.primary_dim),
        }
        if c.use_decoder:
            widths = [c.num_classes * c.class_dim, *c.decoder_widths, c.image_size]
            for k in range(len(widths) - 1):
                shapes[f"decoder.{k}.weight"] = (widths[k + 1], widths[k])
                shapes[f"decoder.{k}.bias"] = (widths[k + 1],)
        return shapes

    @property
    def num_decoder_layers(self) -> int:
        return len(self.decoder_widths) + 1 if self.use_decoder else 0

    def parameter_count(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    # ----------------------------------------------------------------------------- conversions
    def replace(self, **changes: Any) -> "CapsNetConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decoder_widths"] = list(self.decoder_widths)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CapsNetConfig":
        return from_fields(cls, d)


@dataclass(frozen=True)
class AdamConfig:
    """The spec's optimizer: Adam with TensorFlow's defaults and the official decay schedule.

    lr(step) = max(lr_floor, lr * decay_rate ** (step / decay_steps)), with step the number of
    updates already applied (so the first update uses lr itself). The update uses TensorFlow's
    form of Adam (epsilon added to sqrt(v) before bias correction is folded into the step size):
        t = step + 1
        m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
        p -= lr(step) * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    decay_rate: float = 0.96
    decay_steps: int = 2000
    lr_floor: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("lr", "epsilon", "decay_rate", "lr_floor"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"AdamConfig.{name} must be a positive finite number, got {v!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"AdamConfig.{name} must be in [0, 1), got {v!r}")
        if isinstance(self.decay_steps, bool) or not isinstance(self.decay_steps, int) or self.decay_steps < 1:
            raise ValueError(f"AdamConfig.decay_steps must be a positive int, got {self.decay_steps!r}")

    def learning_rate(self, step: int) -> float:
        """The learning rate for the update that follows `step` completed updates."""
        return max(self.lr_floor, self.lr * self.decay_rate ** (step / self.decay_steps))

    def step_size(self, step: int) -> float:
        """alpha = lr(step) sqrt(1 - beta2^t) / (1 - beta1^t), t = step + 1: the update's step size
        with the bias correction folded in (every backend's Adam takes it from here)."""
        t = step + 1
        return self.learning_rate(step) * math.sqrt(1 - self.beta2 ** t) / (1 - self.beta1 ** t)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AdamConfig":
        return from_fields(cls, d)


# ===================================================================================== what a run costs
@dataclass(frozen=True)
class Cost:
    """What one batch of a configuration costs, estimated before any work (estimate_cost)."""

    memory_bytes: int  # parameters (with gradients and Adam's moments when training) and one batch's activations
    flops_per_image: float  # multiply-adds counted as 2, forward (x3 when training: forward and backward)

    def describe(self) -> str:
        return f"about {self.memory_bytes / 2**30:.2f} GiB and {self.flops_per_image / 1e9:.2f} GFLOP per image"


def forward_flops(c: CapsNetConfig) -> float:
    """Multiply-adds counted as 2 FLOPs, per image, of one forward pass."""
    h1, w1 = c.conv1_output_hw
    gh, gw = c.primary_grid
    conv1 = 2 * h1 * w1 * c.conv1_channels * c.input_channels * c.conv1_kernel ** 2
    primary = 2 * gh * gw * c.primary_channels * c.conv1_channels * c.primary_kernel ** 2
    preds = 2 * c.num_primary * c.num_classes * c.class_dim * c.primary_dim
    # Each iteration: s = sum_i c u_hat, and (but the last) the agreement u_hat . v.
    routing = 2 * c.num_primary * c.num_classes * c.class_dim * (2 * c.routing_iterations - 1)
    decoder = 0
    if c.use_decoder:
        widths = [c.num_classes * c.class_dim, *c.decoder_widths, c.image_size]
        decoder = sum(2 * a * b for a, b in zip(widths, widths[1:]))
    return float(conv1 + primary + preds + routing + decoder)


def estimate_cost(config: CapsNetConfig, batch_size: int, *, dtype: str = "float32", training: bool = True) -> Cost:
    """A lower estimate of a batch's memory and arithmetic: if this does not fit, the run cannot.

    Activations per image: the input, conv1's and PrimaryCaps' outputs, the predictions u_hat
    (kept, with one temporary of their size per routing iteration) and the routing logits of each
    iteration; training keeps their gradients too (x2) and the parameters' gradients and moments (x4).
    """
    c = config
    item = 8 if dtype == "float64" else 4
    h1, w1 = c.conv1_output_hw
    u_hat = c.num_primary * c.num_classes * c.class_dim
    per_image = (c.image_size + 2 * h1 * w1 * c.conv1_channels + 2 * c.num_primary * c.primary_dim
                 + u_hat * (2 + c.routing_iterations) + 2 * c.routing_iterations * c.num_primary * c.num_classes)
    per_image *= 2 if training else 1
    params = c.parameter_count() * (4 if training else 1)
    flops = forward_flops(c) * (3 if training else 1)
    return Cost(memory_bytes=int((params + batch_size * per_image) * item), flops_per_image=flops)


def available_memory_bytes() -> int:
    """This machine's physical memory (what no run can exceed, whatever else is running)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no limit known
        return 1 << 62


def check_affordable(config: CapsNetConfig, batch_size: int, *, dtype: str = "float32", training: bool = True,
                     flags: Mapping[str, str] | None = None) -> Cost:
    """Refuse (ValueError, one line with the estimate and the limit) a batch that cannot fit in memory.

    flags: how the caller's user spells batch_size (e.g. {"batch_size": "--batch-size"}), for the message.
    """
    cost = estimate_cost(config, batch_size, dtype=dtype, training=training)
    limit = available_memory_bytes()
    if cost.memory_bytes > limit:
        name = (flags or {}).get("batch_size", "batch_size")
        raise ValueError(f"{name} {batch_size} with this model ({config.parameter_count():,} parameters, "
                         f"{config.routing_iterations} routing iterations) needs {cost.describe()} for "
                         f"{'training' if training else 'inference'}, more than this machine's "
                         f"{limit / 2**30:.1f} GiB of memory: use a smaller {name}")
    return cost
