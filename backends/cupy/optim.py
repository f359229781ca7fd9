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

import math
from typing import Any, Mapping

import numpy as np

from capsspec.config import AdamConfig, CapsNetConfig
from capsspec.spec import StepMetrics

from . import kernels, ops
from .model import _value_and_grad, check_model_inputs

__all__ = ["adam_init", "adam_update", "train_step"]


def adam_init(params: Mapping[str, Any]) -> dict:
    """Zero moments for every parameter, step 0."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict of arrays, got {type(params).__name__}")
    m, v = {}, {}
    for k, p in params.items():
        xp = ops.array_module(f"params[{k!r}]", p)
        with ops.device_scope(xp, p):
            m[k], v[k] = xp.zeros_like(p), xp.zeros_like(p)
    return {"step": 0, "m": m, "v": v}


def _check_state(state: Mapping, params: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or not {"step", "m", "v"} <= set(state):
        raise ValueError("state must be a dict with 'step', 'm' and 'v', as adam_init returns")
    for part in ("m", "v"):
        if not isinstance(state[part], Mapping) or set(state[part]) != set(params):
            got = sorted(state[part]) if isinstance(state[part], Mapping) else type(state[part]).__name__
            raise ValueError(f"state[{part!r}] has keys {got} but params have {sorted(params)}")
        for k, p in params.items():
            a = state[part][k]
            if type(a) is not type(p) or a.shape != p.shape or a.dtype != p.dtype:
                raise ValueError(
                    f"state[{part!r}][{k!r}] must be a {type(p).__name__} matching the parameter's shape "
                    f"{tuple(p.shape)} and dtype {p.dtype}"
                )
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"state['step'] must be a non-negative int, got {step!r}")


def adam_update(params: Mapping[str, Any], grads: Mapping[str, Any], state: Mapping,
                adam: AdamConfig = AdamConfig()) -> tuple[dict[str, Any], dict]:
    """One Adam update with the scheduled learning rate. Returns (new params, new state)."""
    if not isinstance(adam, AdamConfig):
        raise ValueError(f"adam must be an AdamConfig, got {type(adam).__name__}")
    _check_state(state, params)
    if not isinstance(grads, Mapping) or set(grads) != set(params):
        got = sorted(grads) if isinstance(grads, Mapping) else type(grads).__name__
        raise ValueError(f"grads have keys {got} but params have {sorted(params)}")
    step = int(state["step"])
    t = step + 1
    lr = adam.learning_rate(step)
    alpha = lr * math.sqrt(1 - adam.beta2 ** t) / (1 - adam.beta1 ** t)
    new_params, m_new, v_new = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        if type(g) is not type(p) or g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(
                f"grads[{k!r}] must be a {type(p).__name__} of the parameter's shape {tuple(p.shape)} and dtype "
                f"{p.dtype}, got {type(g).__name__} {tuple(getattr(g, 'shape', ()))} {getattr(g, 'dtype', '')}"
            )
        xp = ops.array_module(f"params[{k!r}]", p)
        with ops.device_scope(xp, p):
            new_params[k], m_new[k], v_new[k] = kernels.adam_step(
                xp, p, g, state["m"][k], state["v"][k], alpha, adam.beta1, adam.beta2, adam.epsilon
            )
    return new_params, {"step": t, "m": m_new, "v": v_new}


def train_step(params: Mapping[str, Any], state: Mapping, x: Any, labels: Any, config: CapsNetConfig,
               adam: AdamConfig = AdamConfig()) -> tuple[dict[str, Any], dict, StepMetrics]:
    """Loss, gradients and one Adam update on one batch. Returns (params, state, metrics)."""
    if labels is None:
        raise ValueError("labels are required for train_step")
    xp, labels = check_model_inputs(params, x, config, labels)
    _check_state(state, params)
    with ops.device_scope(xp, x):
        parts, grads, out = _value_and_grad(xp, params, x, labels, config)
        lr = adam.learning_rate(int(state["step"]))
        new_params, new_state = adam_update(params, grads, state, adam)
        correct = xp.sum(xp.argmax(out.lengths, axis=1) == labels)
    metrics = StepMetrics(total=parts.total, margin=parts.margin, reconstruction=parts.reconstruction,
                          correct=correct, lr=lr)
    return new_params, new_state, metrics
