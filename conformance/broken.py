"""Deliberately broken backends: the reference with ONE of the paper's known mistakes each.

These exist to test the tester: every one of them must fail the conformance suite, and the
numpy backend must pass it (tests/test_conformance_meta.py runs both). Each is a subclass of
the numpy backend whose implementing modules are private copies of capsspec.ops, .model and
.optim (loaded afresh from the reference's files) with one function replaced, so the mistake
reaches every path that uses it: the op, its VJP, forward, loss, value_and_grad, predict and
train_step alike. Select one with its import path, e.g.

    capsspec conformance --backend capsspec.conformance.broken:SoftmaxOverChildren

The mistakes (docs/spec.md, section 4, "Mistakes earlier implementations made"):
  SoftmaxOverChildren       routing's softmax over the children i instead of the parents j (1)
  SquashNanAtZero           squash divides by |s| with no guard: NaN for a zero vector (2)
  PrimaryNoChannelsLast     PrimaryCaps reshaped without moving channels last (3)
  MarginOnSoftmax           margin loss on softmax(lengths) instead of the lengths (4)
  SharedRoutingLogits       routing logits b shared across the batch (7)
  DetachedRoutingGradient   gradients only through the last iteration (b and earlier c detached)
  IterationsAlwaysOne       the routing-iterations setting ignored: always 1 (8)
  IterationsAlwaysThree     the routing-iterations setting ignored: always 3 (8)
  NoneOfTheAboveIgnored     the none_of_the_above setting ignored: the softmax over the classes alone
  DecodesFirstDigitOnly     with two digits per image, every decoding masked by the first digit's
                            class (docs/spec.md, section 5)

and two breaches of the contract around the math (these wrap the numpy backend's functions
instead of patching the reference's):
  NanImagesAccepted         NaN or inf images accepted silently (replaced by 0): the error contract
  InPlaceAdam               adam_update writes the new values into the caller's parameters: purity

What this module must never do: change the real reference modules (the copies are separate
module objects), or be registered as a backend.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any, Callable, Mapping

import numpy as np

import capsspec.model
import capsspec.ops
import capsspec.optim
from capsspec.backend import Backend
from capsspec.backends.numpy import NumpyBackend
from capsspec.config import AdamConfig

__all__ = ["BROKEN", "BrokenBackend", "SoftmaxOverChildren", "SquashNanAtZero", "PrimaryNoChannelsLast",
           "MarginOnSoftmax", "SharedRoutingLogits", "DetachedRoutingGradient", "IterationsAlwaysOne",
           "IterationsAlwaysThree", "NoneOfTheAboveIgnored", "DecodesFirstDigitOnly", "NanImagesAccepted", "InPlaceAdam"]

_PREFIX = "capsspec.conformance._broken"


def _load_copy(module: ModuleType, name: str) -> ModuleType:
    """A fresh module object executed from `module`'s source file, whose relative imports resolve in capsspec."""
    spec = importlib.util.spec_from_file_location(name, module.__file__)
    assert spec is not None and spec.loader is not None
    copy = importlib.util.module_from_spec(spec)
    copy.__package__ = "capsspec"
    spec.loader.exec_module(copy)
    return copy


def _build(key: str, patch: Callable[[ModuleType], None]) -> tuple[str, str, str]:
    """Copies of ops, model and optim, wired to each other, with `patch` applied to the ops copy."""
    names = (f"{_PREFIX}.{key}.ops", f"{_PREFIX}.{key}.model", f"{_PREFIX}.{key}.optim")
    if names[0] in sys.modules:
        return names
    ops = _load_copy(capsspec.ops, names[0])
    patch(ops)
    model = _load_copy(capsspec.model, names[1])
    model.ops = ops  # model calls ops.<private> at run time: now the broken copy
    optim = _load_copy(capsspec.optim, names[2])
    optim._value_and_grad = model._value_and_grad
    for name, mod in zip(names, (ops, model, optim)):
        sys.modules[name] = mod
    return names


class BrokenBackend(NumpyBackend):
    """The numpy backend with one mistake; subclasses set `key`, `mistake` and `patch`."""

    key = ""
    mistake = ""

    @staticmethod
    def patch(ops: ModuleType) -> None:
        raise NotImplementedError

    @property
    def impl_modules(self) -> tuple[str, ...]:  # type: ignore[override]
        return _build(self.key, type(self).patch)

    def __init__(self, device: str | None = None, **options: Any) -> None:
        super().__init__(device, **options)
        self.name = f"broken-{self.key}"


# ------------------------------------------------------------------------------ the mistakes
def _softmax_over_children(ops: ModuleType) -> None:
    original = ops._softmax
    # Routing keeps logits as (B, J, N) and asks for axis 1 (parents); take the children's axis.
    ops._softmax = lambda b, axis, none_of_the_above=False: original(b, 2 if b.ndim == 3 else axis,
                                                                      none_of_the_above)


def _squash_nan_at_zero(ops: ModuleType) -> None:
    def norm_terms(s: np.ndarray, axis: int):
        n = np.sqrt(np.sum(s * s, axis=axis, keepdims=True))
        with np.errstate(invalid="ignore", divide="ignore"):
            unit = s / n  # no guard: 0 / 0 for a zero vector
            f = (n / (1 + n * n)).astype(s.dtype, copy=False)
        return n, unit, f

    def squash_fwd(s: np.ndarray, axis: int = -1):
        n, unit, f = norm_terms(s, axis)
        return n * n / (1 + n * n) * unit, (s, axis)

    ops._norm_terms = norm_terms
    ops._squash_fwd = squash_fwd


def _primary_no_channels_last(ops: ModuleType) -> None:
    def to_capsules(a: np.ndarray, capsule_dim: int) -> np.ndarray:
        b, ch, gh, gw = a.shape
        return a.reshape(b, (ch // capsule_dim) * gh * gw, capsule_dim)  # mixes positions into a capsule

    def from_capsules(g: np.ndarray, shape: tuple[int, ...], capsule_dim: int) -> np.ndarray:
        return g.reshape(shape)

    ops._to_capsules = to_capsules
    ops._from_capsules = from_capsules


def _margin_on_softmax(ops: ModuleType) -> None:
    margin_loss, margin_loss_vjp = ops.margin_loss, ops.margin_loss_vjp

    def softmax(lengths: np.ndarray) -> np.ndarray:
        return ops._softmax(lengths, axis=1)

    def broken_loss(lengths, labels, m_plus=0.9, m_minus=0.1, lambda_=0.5):
        return margin_loss(softmax(lengths), labels, m_plus, m_minus, lambda_)

    def broken_vjp(g, lengths, labels, m_plus=0.9, m_minus=0.1, lambda_=0.5):
        p = softmax(lengths)
        (gp,) = margin_loss_vjp(g, p, labels, m_plus, m_minus, lambda_)
        return ((p * (gp - np.sum(p * gp, axis=1, keepdims=True))).astype(lengths.dtype),)

    ops.margin_loss, ops.margin_loss_vjp = broken_loss, broken_vjp


def _shared_routing_logits(ops: ModuleType) -> None:
    def routing_fwd(u_hat, iterations, none_of_the_above=False):
        bsz, n, j, e = u_hat.shape
        ut = np.ascontiguousarray(u_hat.transpose(0, 2, 1, 3))
        logits = np.zeros((1, j, n), dtype=u_hat.dtype)  # one b for the whole batch
        cs, ss, vs = [], [], []
        for t in range(iterations):
            c = np.broadcast_to(ops._softmax(logits, 1, none_of_the_above), (bsz, j, n))
            s = np.matmul(c[:, :, None, :], ut)[:, :, 0, :]
            v, _ = ops._squash_fwd(s)
            cs.append(c), ss.append(s), vs.append(v)
            if t + 1 < iterations:
                logits = logits + np.matmul(ut, v[:, :, :, None])[..., 0].sum(axis=0, keepdims=True)
        return (vs[-1], np.ascontiguousarray(cs[-1].transpose(0, 2, 1))), (ut, cs, ss, vs)

    ops._routing_fwd = routing_fwd


def _detached_routing_gradient(ops: ModuleType) -> None:
    def routing_bwd(cache, g_v, g_c=None):
        ut, cs, ss, vs = cache
        gs = ops._squash_bwd((ss[-1], -1), g_v)  # only the last iteration, c treated as a constant
        g_ut = cs[-1][..., None] * gs[:, :, None, :]
        return np.ascontiguousarray(g_ut.transpose(0, 2, 1, 3))

    ops._routing_bwd = routing_bwd


def _iterations(fixed: int) -> Callable[[ModuleType], None]:
    def patch(ops: ModuleType) -> None:
        original = ops._routing_fwd
        ops._routing_fwd = lambda u_hat, iterations, none_of_the_above=False: original(u_hat, fixed,
                                                                                      none_of_the_above)

    return patch


def _none_of_the_above_ignored(ops: ModuleType) -> None:
    original = ops._routing_fwd
    ops._routing_fwd = lambda u_hat, iterations, none_of_the_above=False: original(u_hat, iterations, False)


def _decodes_first_digit_only(ops: ModuleType) -> None:
    original = ops._mask_onehot

    def mask_onehot(v: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        if labels is not None and labels.ndim == 2:  # every row masked by the first listed class
            labels = np.repeat(labels[:, :1], labels.shape[1], axis=1)
        return original(v, labels)

    ops._mask_onehot = mask_onehot


class SoftmaxOverChildren(BrokenBackend):
    key, mistake, patch = "softmax_over_children", "routing softmax over children", staticmethod(
        _softmax_over_children)


class SquashNanAtZero(BrokenBackend):
    key, mistake, patch = "squash_nan_at_zero", "squash NaN at zero", staticmethod(_squash_nan_at_zero)


class PrimaryNoChannelsLast(BrokenBackend):
    key, mistake, patch = "primary_no_channels_last", "PrimaryCaps reshape without channels last", staticmethod(
        _primary_no_channels_last)


class MarginOnSoftmax(BrokenBackend):
    key, mistake, patch = "margin_on_softmax", "margin loss on softmax(lengths)", staticmethod(_margin_on_softmax)


class SharedRoutingLogits(BrokenBackend):
    key, mistake, patch = "shared_routing_logits", "routing logits shared across the batch", staticmethod(
        _shared_routing_logits)


class DetachedRoutingGradient(BrokenBackend):
    key, mistake, patch = "detached_routing_gradient", "gradient through the last routing iteration only", \
        staticmethod(_detached_routing_gradient)


class IterationsAlwaysOne(BrokenBackend):
    key, mistake, patch = "iterations_always_1", "routing iterations ignored (always 1)", staticmethod(_iterations(1))


class IterationsAlwaysThree(BrokenBackend):
    key, mistake, patch = "iterations_always_3", "routing iterations ignored (always 3)", staticmethod(
        _iterations(3))


class NoneOfTheAboveIgnored(BrokenBackend):
    key, mistake, patch = "none_of_the_above_ignored", "none_of_the_above ignored (softmax over the classes only)", \
        staticmethod(_none_of_the_above_ignored)


class DecodesFirstDigitOnly(BrokenBackend):
    key, mistake, patch = "decodes_first_digit_only", "two-digit decoder masked by the first digit only", \
        staticmethod(_decodes_first_digit_only)


class _ContractBreach(NumpyBackend):
    """The numpy backend with some spec functions wrapped (subclasses set `key` and `mistake`)."""

    key = ""
    mistake = ""

    def __init__(self, device: str | None = None, **options: Any) -> None:
        super().__init__(device, **options)
        self.name = f"broken-{self.key}"

    def _spec(self, name: str) -> Callable[..., Any]:
        return Backend.__getattr__(self, name)  # the numpy backend's own function


def _silence(x: Any) -> Any:
    """NaN and inf replaced by 0, as a backend that never looks at its input's values would let them through."""
    if isinstance(x, np.ndarray) and x.dtype.kind == "f":
        return np.where(np.isfinite(x), x, 0).astype(x.dtype)
    return x


class NanImagesAccepted(_ContractBreach):
    key, mistake = "nan_images_accepted", "NaN or inf images accepted silently"

    def forward(self, params, x, config, labels=None):
        return self._spec("forward")(params, _silence(x), config, labels)

    def loss(self, params, x, labels, config, targets=None):
        return self._spec("loss")(params, _silence(x), labels, config, targets)

    def value_and_grad(self, params, x, labels, config, targets=None):
        return self._spec("value_and_grad")(params, _silence(x), labels, config, targets)

    def predict(self, params, x, config):
        return self._spec("predict")(params, _silence(x), config)

    def train_step(self, params, state, x, labels, config, adam=AdamConfig(), targets=None):
        return self._spec("train_step")(params, state, _silence(x), labels, config, adam, targets)


class InPlaceAdam(_ContractBreach):
    key, mistake = "in_place_adam", "adam_update writes into the caller's parameters"

    def adam_update(self, params, grads, state, adam=AdamConfig()):
        new_params, new_state = self._spec("adam_update")(params, grads, state, adam)
        for k, v in new_params.items():
            params[k][...] = v
        return new_params, new_state


BROKEN: Mapping[str, type[NumpyBackend]] = {
    cls.key: cls for cls in (SoftmaxOverChildren, SquashNanAtZero, PrimaryNoChannelsLast, MarginOnSoftmax,
                             SharedRoutingLogits, DetachedRoutingGradient, IterationsAlwaysOne,
                             IterationsAlwaysThree, NoneOfTheAboveIgnored, DecodesFirstDigitOnly, NanImagesAccepted, InPlaceAdam)
}
