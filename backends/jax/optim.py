"""The spec's Adam and the training step, as jitted pure functions of pytrees.

Adam is TensorFlow's form with the official decay, exactly as capsspec.config.AdamConfig states:

    t = step + 1;  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
    p -= lr(step) * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)

(optax.adam adds epsilon to sqrt(v / (1 - beta2^t)) instead, so it is not used.) The step
size is a Python float computed on the host from the Python step count and passed to the
compiled code as an argument, so no step reads the device and no new step count recompiles.

State is the spec's plain dict {"step": int, "m": {name: array}, "v": {name: array}}.
adam_update is functional. train_step is one jax.jit-compiled function (loss, gradients,
update) that DONATES the params and the state's moments: the arrays passed in are consumed
(their buffers are reused for the results) and the caller must use the returned ones.
Arguments are not checked here: the backend's door checks them first.

What this module must never do: import the reference's implementation.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from capsspec.config import AdamConfig, CapsNetConfig
from capsspec.spec import StepMetrics

from . import model
from .ops import spec_precision

__all__ = ["adam_init", "adam_update", "train_step", "TRACES"]

# How many times each compiled function has been traced (Python runs a jitted body only when
# tracing): a new batch of the same shape must not add one (tests/test_backend_jax.py).
TRACES: collections.Counter = collections.Counter()


def _alpha(adam: AdamConfig, step: int) -> float:
    t = step + 1
    return adam.learning_rate(step) * math.sqrt(1 - adam.beta2 ** t) / (1 - adam.beta1 ** t)


def _adam(params: dict, grads: dict, m: dict, v: dict, alpha: jax.Array, hyper: tuple[float, float, float]):
    beta1, beta2, epsilon = hyper
    m = {k: beta1 * m[k] + (1 - beta1) * grads[k] for k in params}
    v = {k: beta2 * v[k] + (1 - beta2) * grads[k] * grads[k] for k in params}
    return {k: params[k] - alpha * m[k] / (jnp.sqrt(v[k]) + epsilon) for k in params}, m, v


_adam_jit = jax.jit(_adam, static_argnames="hyper")


def _ordered(d: Mapping[str, Any], like: Mapping[str, Any]) -> dict:
    return {k: d[k] for k in like}  # a jitted dict comes back with sorted keys


@spec_precision
def adam_init(params: Mapping[str, jax.Array]) -> dict:
    """Zero moments for every parameter, step 0."""
    return {"step": 0, "m": {k: jnp.zeros_like(p) for k, p in params.items()},
            "v": {k: jnp.zeros_like(p) for k, p in params.items()}}


@spec_precision
def adam_update(params: Mapping[str, jax.Array], grads: Mapping[str, jax.Array], state: Mapping,
                adam: AdamConfig = AdamConfig()) -> tuple[dict, dict]:
    """One Adam update with the scheduled learning rate. Returns (new params, new state); inputs untouched."""
    step = int(state["step"])
    p, m, v = _adam_jit(dict(params), dict(grads), dict(state["m"]), dict(state["v"]), _alpha(adam, step),
                        (adam.beta1, adam.beta2, adam.epsilon))
    return _ordered(p, params), {"step": step + 1, "m": _ordered(m, params), "v": _ordered(v, params)}


def _train_step(params: dict, m: dict, v: dict, x: jax.Array, labels: jax.Array, alpha: jax.Array,
                config: CapsNetConfig, hyper: tuple[float, float, float], targets: jax.Array | None = None):
    TRACES["train_step"] += 1
    (_, (parts, out)), grads = jax.value_and_grad(model.loss_and_output, has_aux=True)(params, x, labels, config,
                                                                                       targets)
    # Correct: the K longest capsules are the K labelled classes (ties to the lower index, as in predict).
    rows = labels.reshape(labels.shape[0], -1)
    top = jnp.argsort(-out.lengths, axis=1, stable=True)[:, :rows.shape[1]]
    correct = jnp.sum(jnp.all(jnp.sort(top, axis=1) == jnp.sort(rows, axis=1), axis=1))
    return (*_adam(params, grads, m, v, alpha, hyper), parts, correct)


_train_step_jit = jax.jit(_train_step, static_argnames=("config", "hyper"), donate_argnames=("params", "m", "v"))


@spec_precision
def train_step(params: Mapping[str, jax.Array], state: Mapping, x: jax.Array, labels: jax.Array,
               config: CapsNetConfig, adam: AdamConfig = AdamConfig(),
               targets: jax.Array | None = None) -> tuple[dict, dict, StepMetrics]:
    """Loss, gradients and one Adam update on one batch, compiled once per batch shape.

    Returns (params, state, metrics). The params and the state's moments passed in are donated
    (consumed); use the returned ones. The metrics' total, margin, reconstruction and correct
    are 0-d arrays on the device (nothing here waits for it); lr is a Python float.
    """
    step = int(state["step"])
    p, m, v, parts, correct = _train_step_jit(dict(params), dict(state["m"]), dict(state["v"]), x, labels,
                                              _alpha(adam, step), config, (adam.beta1, adam.beta2, adam.epsilon),
                                              targets)
    metrics = StepMetrics(total=parts.total, margin=parts.margin, reconstruction=parts.reconstruction,
                          correct=correct, lr=adam.learning_rate(step))
    return _ordered(p, params), {"step": step + 1, "m": _ordered(m, params), "v": _ordered(v, params)}, metrics
