"""The spec's Adam and training step on the GPU: one fused kernel per parameter per update.

Adam is TensorFlow's form with the official decay (capsspec.config.AdamConfig states it); the
update of each parameter (both moments and the step) is the adam_step kernel of
backends/cupy/kernels.py. State is {"step": int, "m": {name: array}, "v": {name: array}}, the
reference's layout with cupy arrays. Updates are functional: new arrays, inputs untouched.
train_step keeps its metrics on the device (0-d arrays) so that a training loop is not stalled
by a device-to-host copy every step; only lr is a Python float.

What this module must never do: import cupy at module level, or import the reference's
implementation.
"""

from __future__ import annotations

from typing import Any, Mapping


from capsspec.config import AdamConfig, CapsNetConfig
from capsspec.spec import StepMetrics

from . import kernels, ops
from .model import _value_and_grad, count_correct

__all__ = ["adam_init", "adam_update", "train_step"]


def adam_init(params: Mapping[str, Any]) -> dict:
    """Zero moments for every parameter, step 0."""
    m, v = {}, {}
    for k, p in params.items():
        xp = ops.array_module(p)
        with ops.device_scope(xp, p):
            m[k], v[k] = xp.zeros_like(p), xp.zeros_like(p)
    return {"step": 0, "m": m, "v": v}


def adam_update(params: Mapping[str, Any], grads: Mapping[str, Any], state: Mapping,
                adam: AdamConfig = AdamConfig()) -> tuple[dict[str, Any], dict]:
    """One Adam update with the scheduled learning rate. Returns (new params, new state)."""
    step = int(state["step"])
    alpha = adam.step_size(step)
    new_params, m_new, v_new = {}, {}, {}
    for k, p in params.items():
        xp = ops.array_module(p)
        with ops.device_scope(xp, p):
            new_params[k], m_new[k], v_new[k] = kernels.adam_step(
                xp, p, grads[k], state["m"][k], state["v"][k], alpha, adam.beta1, adam.beta2, adam.epsilon
            )
    return new_params, {"step": step + 1, "m": m_new, "v": v_new}


def train_step(params: Mapping[str, Any], state: Mapping, x: Any, labels: Any, config: CapsNetConfig,
               adam: AdamConfig = AdamConfig(), targets: Any = None) -> tuple[dict[str, Any], dict, StepMetrics]:
    """Loss, gradients and one Adam update on one batch. Returns (params, state, metrics).

    targets as for model.loss: x itself when None ((B,) labels), else one image per listed class.
    """
    xp = ops.array_module(x)
    with ops.device_scope(xp, x):
        parts, grads, out = _value_and_grad(xp, params, x, labels, config, targets)
        lr = adam.learning_rate(int(state["step"]))
        new_params, new_state = adam_update(params, grads, state, adam)
        correct = count_correct(xp, out.lengths, labels)
    metrics = StepMetrics(total=parts.total, margin=parts.margin, reconstruction=parts.reconstruction,
                          correct=correct, lr=lr)
    return new_params, new_state, metrics
