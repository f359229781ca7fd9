"""The model's configuration: every size of the capsule network, with the paper's as defaults.

A CapsNetConfig is a frozen value: backends, checkpoints and the conformance suite all key
on it, so it must never change under them. Construction validates every field and refuses
an impossible model with a message that names the field and says why. This module derives
all other sizes (grids, capsule counts, parameter shapes) in one place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["CapsNetConfig", "AdamConfig", "PAPER_PARAMETER_COUNT", "from_fields", "smallest_input_side"]

# The paper's model has 8,215,568 parameters, 6,804,224 without the decoder (docs/spec.md, section 1).
PAPER_PARAMETER_COUNT = 8_215_568


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
        if self.num_classes < 2:
            raise ValueError(
                f"CapsNetConfig.num_classes must be at least 2 (routing needs a choice of parents), "
                f"got {self.num_classes}"
            )
        if not isinstance(self.use_decoder, bool):
            raise ValueError(f"CapsNetConfig.use_decoder must be a bool, got {self.use_decoder!r}")
        if not isinstance(self.decoder_widths, tuple) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in self.decoder_widths
        ):
            raise ValueError(
                f"CapsNetConfig.decoder_widths must be a tuple of positive ints, got {self.decoder_widths!r}"
            )
        self._check_input_size()
        for name in ("m_plus", "m_minus", "lambda_", "reconstruction_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"CapsNetConfig.{name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"CapsNetConfig.{name} must be non-negative, got {value}")
        if not self.m_minus < self.m_plus:
            raise ValueError(
                f"CapsNetConfig.m_minus ({self.m_minus}) must be below m_plus ({self.m_plus}): "
                "otherwise no length satisfies the margin loss for both present and absent classes"
            )
        if self.m_plus > 1:
            raise ValueError(
                f"CapsNetConfig.m_plus={self.m_plus} is unreachable: squash keeps every length below 1"
            )

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
