"""The spec's Adam (capsspec.config.AdamConfig; not optax.adam, which puts epsilon elsewhere) and
the training step, as jitted pure functions of pytrees. The step size is computed on the host
(AdamConfig.step_size) and passed in as an argument: no step reads the device, and no new step
or learning rate recompiles. State is the spec's dict {"step": int, "m": {...}, "v": {...}}. The
door checks every argument first.

What this module must never do: import the reference's implementation.
"""

from __future__ import annotations

import collections
import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from capsspec.config import AdamConfig, CapsNetConfig
from capsspec.spec import StepMetrics

from . import model
from .ops import spec_precision

__all__ = ["adam_init", "adam_update", "train_step", "TRACES"]

# Traces of each compiled function (its Python body runs only then): tests/test_backend_jax.py.
TRACES: collections.Counter = collections.Counter()


@functools.partial(jax.jit, static_argnames="hyper")
def _adam(params: dict, grads: dict, m: dict, v: dict, alpha: jax.Array, hyper: tuple[float, float, float]):
    beta1, beta2, epsilon = hyper
    m = {k: beta1 * m[k] + (1 - beta1) * grads[k] for k in params}
    v = {k: beta2 * v[k] + (1 - beta2) * grads[k] * grads[k] for k in params}
    return {k: params[k] - alpha * m[k] / (jnp.sqrt(v[k]) + epsilon) for k in params}, m, v


@functools.partial(jax.jit, static_argnames=("hyper", "config"), donate_argnames=("params", "m", "v"))
def _train_step(params: dict, m: dict, v: dict, x: jax.Array, labels: jax.Array, alpha: jax.Array,
                hyper: tuple[float, float, float], config: CapsNetConfig, targets: jax.Array | None = None):
    TRACES["train_step"] += 1
    (_, (parts, out)), grads = jax.value_and_grad(model.loss_and_output, has_aux=True)(params, x, labels, config,
                                                                                       targets)
    # Correct: the K longest capsules are the K labelled classes (ties to the lower index, as in predict).
    rows = labels.reshape(labels.shape[0], -1)
    top = jnp.argsort(-out.lengths, axis=1, stable=True)[:, :rows.shape[1]]
    correct = jnp.sum(jnp.all(jnp.sort(top, axis=1) == jnp.sort(rows, axis=1), axis=1))
    return (*_adam(params, grads, m, v, alpha, hyper), parts, correct)


def _spec_state(step: int, p: dict, m: dict, v: dict, like: Mapping) -> tuple[dict, dict]:
    """(params, state) in the canonical order: a jitted dict comes back with sorted keys."""
    p, m, v = ({k: d[k] for k in like} for d in (p, m, v))
    return p, {"step": step + 1, "m": m, "v": v}


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
    p, m, v = _adam(dict(params), dict(grads), dict(state["m"]), dict(state["v"]), adam.step_size(step),
                    (adam.beta1, adam.beta2, adam.epsilon))
    return _spec_state(step, p, m, v, params)


@spec_precision
def train_step(params: Mapping[str, jax.Array], state: Mapping, x: jax.Array, labels: jax.Array,
               config: CapsNetConfig, adam: AdamConfig = AdamConfig(),
               targets: jax.Array | None = None) -> tuple[dict, dict, StepMetrics]:
    """Loss, gradients and one Adam update on one batch: one jax.jit program per batch shape. The params
    and moments passed in are DONATED (their buffers hold the results): use the returned ones. The
    metrics are 0-d arrays on the device (nothing here waits for it), but lr, a Python float."""
    step = int(state["step"])
    p, m, v, parts, correct = _train_step(dict(params), dict(state["m"]), dict(state["v"]), x, labels,
                                          adam.step_size(step), (adam.beta1, adam.beta2, adam.epsilon), config, targets)
    metrics = StepMetrics(total=parts.total, margin=parts.margin, reconstruction=parts.reconstruction,
                          correct=correct, lr=adam.learning_rate(step))
    return (*_spec_state(step, p, m, v, params), metrics)
