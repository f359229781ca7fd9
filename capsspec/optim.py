"""The spec's optimizer and training step: Adam in TensorFlow's form with the official decay.

AdamConfig (capsspec.config) states the update exactly. State is a plain dict
{"step": int, "m": {name: array}, "v": {name: array}} so that any backend's state converts to
and from it for checkpoints. Updates are functional: new arrays, inputs untouched.
The spec's names are `@checked`: the door (capsspec.validation) checks their arguments first.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .config import AdamConfig, CapsNetConfig
from .model import _value_and_grad
from .spec import StepMetrics
from .validation import checked, unchecked

__all__ = ["adam_init", "adam_update", "train_step"]


@checked
def adam_init(params: Mapping[str, np.ndarray]) -> dict:
    """Zero moments for every parameter, step 0."""
    return {
        "step": 0,
        "m": {k: np.zeros_like(p) for k, p in params.items()},
        "v": {k: np.zeros_like(p) for k, p in params.items()},
    }


@checked
def adam_update(params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray], state: Mapping,
                adam: AdamConfig = AdamConfig()) -> tuple[dict[str, np.ndarray], dict]:
    """One Adam update with the scheduled learning rate. Returns (new params, new state)."""
    step = int(state["step"])
    alpha = np.float64(adam.step_size(step))  # a NumPy float64: float32 updates are computed in float64
    new_params, m_new, v_new = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        m = adam.beta1 * state["m"][k] + (1 - adam.beta1) * g
        v = adam.beta2 * state["v"][k] + (1 - adam.beta2) * (g * g)
        new_params[k] = (p - (alpha * m / (np.sqrt(v) + adam.epsilon))).astype(p.dtype, copy=False)
        m_new[k], v_new[k] = m.astype(p.dtype, copy=False), v.astype(p.dtype, copy=False)
    return new_params, {"step": step + 1, "m": m_new, "v": v_new}


def count_correct(lengths: np.ndarray, labels: np.ndarray) -> int:
    """Examples whose K longest class capsules are exactly their K labelled classes (K = 1 for (B,)
    labels: the longest capsule is the label; ties go to the lowest class index, as in predict)."""
    rows = labels.reshape(labels.shape[0], -1)
    top = np.argsort(-lengths, axis=1, kind="stable")[:, :rows.shape[1]]
    return int(np.sum(np.all(np.sort(top, axis=1) == np.sort(rows, axis=1), axis=1)))


@checked
def train_step(params: Mapping[str, np.ndarray], state: Mapping, x: np.ndarray, labels: np.ndarray,
               config: CapsNetConfig, adam: AdamConfig = AdamConfig(),
               targets: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict, StepMetrics]:
    """Loss, gradients and one Adam update on one batch. Returns (params, state, metrics).

    targets as for model.loss: x itself when None ((B,) labels), else one image per listed class.
    """
    parts, grads, out = _value_and_grad(params, x, labels, config, targets)
    lr = adam.learning_rate(int(state["step"]))
    new_params, new_state = unchecked(adam_update)(params, grads, state, adam)
    correct = count_correct(out.lengths, labels)
    metrics = StepMetrics(total=float(parts.total), margin=float(parts.margin),
                          reconstruction=float(parts.reconstruction), correct=correct, lr=lr)
    return new_params, new_state, metrics
