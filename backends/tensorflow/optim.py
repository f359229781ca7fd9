"""The spec's Adam on a CapsNet's variables, and the compiled training step.

The update is capsspec.config.AdamConfig's, TensorFlow's form of Adam:

    t = step + 1;  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
    p -= lr(step) * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)
    lr(step) = max(lr_floor, lr * decay_rate ** (step / decay_steps))

It is written here with TensorFlow ops rather than taken from keras.optimizers.Adam. Keras 3's
Adam (3.15) has the right form (epsilon added to sqrt(v), bias correction folded into the step
size, and a LearningRateSchedule could carry the floor), but it computes the bias correction as
ops.cast(beta_1, variable.dtype) ** t, and ops.cast of a Python float goes through Keras's
float32 floatx: in a float64 model beta1 = 0.8999999761581421 and beta2 = 0.9990000128746033,
which moves every update by ~1e-6 relative (measured against capsspec.optim over 4 steps). It
also folds m as m + (g - m)(1 - beta1), and would bind the hyperparameters into the optimizer
object. So the spec's update is written out below (a few elementwise ops per variable).

The step size alpha = lr(step) sqrt(1 - beta2^t) / (1 - beta1^t), 1 - beta1 and 1 - beta2 are
computed on the host in float64 from the Python step count, as the reference does, and fed to
the compiled step as one small tensor: the hyperparameters can change between calls without a
retrace, and no step reads anything back from the device.

The spec's state {"step", "m", "v"} is an AdamState: a read-only Mapping over the moments
(tf.Variables in the CapsNet's stored layout, next to its parameters) and a Python step count.
state["m"] / state["v"] give the moments in the canonical layout. adam_update returns a new
CapsNet and state and leaves the caller's as they were; train_step consumes its params and
state (capsspec.spec.CONSUMES): it updates their variables in place and returns them, and
callers use the returned values.

What this module must never do: import the reference's implementation.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from capsspec.backend_kit import AdamStateView, state_from_numpy
from capsspec.config import AdamConfig, CapsNetConfig
from capsspec.spec import StepMetrics

from .model import CapsNet, _rows, to_canonical, to_native

__all__ = ["AdamState", "adam_init", "adam_update", "train_step", "step_hyperparameters"]

# Layout of the hyperparameter vector the compiled steps take.
_ALPHA, _BETA1, _ONE_MINUS_BETA1, _BETA2, _ONE_MINUS_BETA2, _EPSILON = range(6)


def step_hyperparameters(adam: AdamConfig, step: int) -> tuple[float, list[float]]:
    """(lr, the float64 vector the compiled update takes) for the update after `step` updates."""
    b1, b2 = adam.beta1, adam.beta2
    return adam.learning_rate(step), [adam.step_size(step), b1, 1 - b1, b2, 1 - b2, adam.epsilon]


def _apply_adam(params: list[tf.Variable], grads: list[tf.Tensor], ms: list[tf.Variable], vs: list[tf.Variable],
                hyper: tf.Tensor) -> None:
    h = tf.cast(hyper, params[0].dtype)
    alpha, b1, c1, b2, c2, eps = (h[i] for i in range(6))
    for p, g, m, v in zip(params, grads, ms, vs):
        m_new = b1 * m + c1 * g
        v_new = b2 * v + c2 * (g * g)
        m.assign(m_new)
        v.assign(v_new)
        p.assign_sub(alpha * m_new / (tf.sqrt(v_new) + eps))


class AdamState(AdamStateView):
    """The spec's optimizer state {"step", "m", "v"} for one CapsNet, with its compiled steps.

    m and v are tf.Variables laid out like the CapsNet's variables (moments_native); reading
    state["m"] / state["v"] gives them in the canonical layout. step is a Python int.
    """

    def __init__(self, params: CapsNet) -> None:
        self.params = params
        self.variables = params.canonical_variables()  # canonical name -> tf.Variable (stored layout)
        self._step = 0
        with tf.device(params.device):
            self.m = {k: tf.Variable(tf.zeros_like(p), trainable=False, name=f"adam_m/{k}")
                      for k, p in self.variables.items()}
            self.v = {k: tf.Variable(tf.zeros_like(p), trainable=False, name=f"adam_v/{k}")
                      for k, p in self.variables.items()}
        self._build_steps()

    def moments(self, which: str) -> dict[str, tf.Tensor]:
        """m or v under canonical names, in the canonical layout."""
        stored = {"m": self.m, "v": self.v}[which]
        return {k: to_canonical(k, tf.convert_to_tensor(a)) for k, a in stored.items()}

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = int(value)

    # ------------------------------------------------------------------------- compiled steps
    def _build_steps(self) -> None:
        net = self.params
        c = net.config
        x_spec = tf.TensorSpec([None, *c.input_shape], net.dtype, name="x")
        y_spec = tf.TensorSpec([None, None], tf.int64, name="labels")  # (B, K): see model._rows
        t_spec = tf.TensorSpec([None, None, *c.input_shape], net.dtype, name="targets")
        h_spec = tf.TensorSpec([6], tf.float64, name="hyperparameters")
        # Partials, not closures: see CapsNet._build_steps.
        self.train_step_fn = tf.function(functools.partial(_train_step, self),
                                         input_signature=[x_spec, y_spec, t_spec, h_spec])

    def _slots(self) -> tuple[list[tf.Variable], list[tf.Variable], list[tf.Variable]]:
        names = list(self.variables)
        return list(self.variables.values()), [self.m[k] for k in names], [self.v[k] for k in names]

    @classmethod
    def from_numpy(cls, state: Mapping[str, Any], params: CapsNet) -> "AdamState":
        """An AdamState for params from {"step", "m", "v"} of canonical arrays keyed by canonical names."""
        new = adam_init(params)

        def load(which: str, name: str, a: np.ndarray) -> None:
            getattr(new, which)[name].assign(to_native(name, a))

        new.step = state_from_numpy(state, params.config.param_shapes(), params.dtype.name, load)
        return new


# The bodies of AdamState's compiled steps (traces counted in the CapsNet's traces).
def _count_correct(lengths: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Examples whose K longest class capsules are their K labelled classes, labels (B, K); ties go
    to the lower class index (a stable sort of the negated lengths), as in predict."""
    top = tf.argsort(-lengths, axis=1, stable=True)[:, :tf.shape(labels)[1]]
    same = tf.sort(tf.cast(top, tf.int64), axis=1) == tf.sort(labels, axis=1)
    return tf.reduce_sum(tf.cast(tf.reduce_all(same, axis=1), tf.int64))


def _train_step(state: AdamState, x: tf.Tensor, labels: tf.Tensor, targets: tf.Tensor, hyper: tf.Tensor) -> tuple:
    net = state.params
    net.traces["train_step"] += 1
    params, ms, vs = state._slots()
    with tf.device(net.device):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            parts, out = net.loss_and_output(x, labels, targets)
        grads = tape.gradient(parts.total, params)
        # From this step's forward pass, i.e. before the update (automatic control dependencies
        # keep the variable reads above ahead of the assignments below).
        correct = _count_correct(out.lengths, labels)
        _apply_adam(params, grads, ms, vs, hyper)
        return parts.total, parts.margin, parts.reconstruction, correct


def adam_init(params: CapsNet) -> AdamState:
    """Zero moments for every parameter, step 0."""
    return AdamState(params)


def adam_update(params: CapsNet, grads: Mapping[str, tf.Tensor], state: AdamState,
                adam: AdamConfig = AdamConfig()) -> tuple[CapsNet, AdamState]:
    """One Adam update with the scheduled learning rate; grads are keyed by canonical name in the
    canonical layout (as value_and_grad returns them). Returns (new params, new state): the
    caller's CapsNet and state are left as they were (train_step is the in-place form)."""
    new_params = CapsNet(params.config, dtype=params.dtype, initial=params.canonical_numpy(), device=params.device)
    new_state = AdamState(new_params)
    for which in ("m", "v"):
        for k, var in getattr(new_state, which).items():
            var.assign(getattr(state, which)[k])
    _, hyper = step_hyperparameters(adam, state.step)
    with tf.device(new_params.device):  # eager: a new CapsNet would trace a compiled update anew
        variables, ms, vs = new_state._slots()
        _apply_adam(variables, [to_native(k, grads[k]) for k in new_state.variables], ms, vs,
                    tf.constant(hyper, tf.float64))
    new_state.step = state.step + 1
    return new_params, new_state


def train_step(params: CapsNet, state: AdamState, x: tf.Tensor, labels: tf.Tensor, config: CapsNetConfig,
               adam: AdamConfig = AdamConfig(),
               targets: tf.Tensor | None = None) -> tuple[CapsNet, AdamState, StepMetrics]:
    """Loss, gradients and one Adam update on one batch, as one compiled step. Returns
    (params, state, metrics).

    The metrics' total, margin, reconstruction and correct are 0-d tensors (read them when
    needed; nothing here waits for the device); lr is a Python float. On a GPU the door defers
    its value checks to the next host read (capsspec.validation).
    """
    lr, hyper = step_hyperparameters(adam, state.step)
    total, margin, recon, correct = state.train_step_fn(x, *_rows(x, labels, targets), tf.constant(hyper, tf.float64))
    state.step += 1
    metrics = StepMetrics(total=total, margin=margin, reconstruction=recon, correct=correct, lr=lr)
    return params, state, metrics
