"""The spec's Adam as a torch.optim.Optimizer, and the training step.

SpecAdam is Adam in TensorFlow's form with the official decay schedule, as
capsspec.config.AdamConfig states it:

    t = step + 1;  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
    p -= lr(step) * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)

torch.optim.Adam cannot express it: it adds epsilon to sqrt(v / (1 - beta2^t)), i.e. its
epsilon is effectively epsilon * sqrt(1 - beta2^t) in this form, which differs from the spec in
the first thousands of steps (where v is tiny, that is where it matters). The update runs as
a handful of multi-tensor (torch._foreach_*) kernels over all parameters, the step size is a
Python float computed on the host from a Python step count, so no step reads the device.

The spec's state {"step", "m", "v"} is an AdamState: a read-only Mapping view over a SpecAdam
bound to one CapsNet (m and v are the optimizer's exp_avg / exp_avg_sq tensors, keyed by
canonical names). adam_update returns a new CapsNet and state and leaves the caller's as they
were; train_step consumes its params and state (capsspec.spec.CONSUMES): it updates them in
place and returns them, and callers use the returned values.

What this module must never do: import the reference's implementation, or import the fast
path (fast.py) unless a CapsNet asks for it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Iterable

import numpy as np
import torch

from capsspec.backend_kit import AdamStateView, state_from_numpy
from capsspec.config import AdamConfig, CapsNetConfig
from capsspec.spec import StepMetrics

from .model import CapsNet, count_correct

__all__ = ["SpecAdam", "AdamState", "adam_init", "adam_update", "train_step"]


class SpecAdam(torch.optim.Optimizer):
    """Adam with epsilon added to sqrt(v) and the bias correction folded into the step size
    (TensorFlow's form, the spec's), and lr(step) = max(lr_floor, lr * decay_rate ** (step /
    decay_steps)). See the module docstring for why torch.optim.Adam is not used.

    Every parameter keeps state {"step": int, "exp_avg", "exp_avg_sq"}, created (zero) at
    construction; the step count is shared by all parameters and is a Python int.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], adam: AdamConfig = AdamConfig()) -> None:
        if not isinstance(adam, AdamConfig):
            raise ValueError(f"adam must be an AdamConfig, got {type(adam).__name__}")
        super().__init__(params, {"adam": adam})
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {"step": 0, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    @property
    def step_count(self) -> int:
        """Updates applied so far (the spec's state["step"])."""
        return int(next(iter(self.state.values()))["step"])

    def set_step_count(self, step: int) -> None:
        for s in self.state.values():
            s["step"] = int(step)

    def configure(self, adam: AdamConfig) -> None:
        """Use these hyperparameters and schedule from the next update on."""
        if not isinstance(adam, AdamConfig):
            raise ValueError(f"adam must be an AdamConfig, got {type(adam).__name__}")
        for group in self.param_groups:
            group["adam"] = adam

    def current_lr(self) -> float:
        """The learning rate the next update will use (its first group's schedule)."""
        return self.param_groups[0]["adam"].learning_rate(self.step_count)

    @torch.no_grad()
    def apply_gradients(self, grads: list[torch.Tensor], params: list[torch.Tensor] | None = None) -> None:
        """One update of `params` (default: every parameter, in order) with these gradients."""
        groups_params = [p for g in self.param_groups for p in g["params"]] if params is None else params
        by_group: dict[int, tuple[list, list]] = {}
        owner = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        for p, g in zip(groups_params, grads):
            ps, gs = by_group.setdefault(owner[id(p)], ([], []))
            ps.append(p), gs.append(g)
        for gi, (ps, gs) in by_group.items():
            self._update(self.param_groups[gi]["adam"], ps, gs)

    def _update(self, adam: AdamConfig, ps: list[torch.Tensor], gs: list[torch.Tensor]) -> None:
        states = [self.state[p] for p in ps]
        step = states[0]["step"]
        alpha = adam.step_size(step)
        ms = [s["exp_avg"] for s in states]
        vs = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(ms, adam.beta1)
        torch._foreach_add_(ms, gs, alpha=1 - adam.beta1)
        torch._foreach_mul_(vs, adam.beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - adam.beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, adam.epsilon)
        torch._foreach_addcdiv_(ps, ms, denom, value=-alpha)
        for s in states:
            s["step"] = step + 1

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """torch.optim's step: one update from every parameter's .grad (all must have one)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ps = [p for p in group["params"]]
            missing = [i for i, p in enumerate(ps) if p.grad is None]
            if missing:
                raise ValueError(f"SpecAdam.step: {len(missing)} parameter(s) have no .grad; the spec updates "
                                 "every parameter (and its step count) together")
            self._update(group["adam"], ps, [p.grad for p in ps])
        return loss


class AdamState(AdamStateView):
    """The spec's optimizer state {"step", "m", "v"} as a view over a SpecAdam bound to one CapsNet."""

    def __init__(self, params: CapsNet, optimizer: SpecAdam) -> None:
        self.params = params
        self.optimizer = optimizer
        self.names = params.canonical_parameters()  # canonical name -> Parameter
        self.fast_step: Any = None  # the compiled step of the fast path, built on first use
        # parallel.DataParallel when the trainer runs data-parallel (TorchBackend.data_parallel), else None
        self.data_parallel: Any = None

    @property
    def step(self) -> int:
        return self.optimizer.step_count

    def moments(self, which: str) -> dict[str, torch.Tensor]:
        key = {"m": "exp_avg", "v": "exp_avg_sq"}[which]
        return {k: self.optimizer.state[p][key] for k, p in self.names.items()}

    @classmethod
    def from_numpy(cls, state: Mapping[str, Any], params: CapsNet) -> "AdamState":
        """An AdamState for params from {"step", "m", "v"} of NumPy arrays keyed by canonical names."""
        new = adam_init(params)

        def load(which: str, name: str, a: np.ndarray) -> None:
            with torch.no_grad():
                new.moments(which)[name].copy_(torch.from_numpy(np.array(a, copy=True)))

        new.optimizer.set_step_count(state_from_numpy(state, params.config.param_shapes(),
                                                      str(params.dtype).replace("torch.", ""), load))
        return new


def adam_init(params: CapsNet) -> AdamState:
    """Zero moments for every parameter, step 0."""
    return AdamState(params, SpecAdam(params.parameters()))


def adam_update(params: CapsNet, grads: Mapping[str, torch.Tensor], state: AdamState,
                adam: AdamConfig = AdamConfig()) -> tuple[CapsNet, AdamState]:
    """One Adam update with the scheduled learning rate. Returns (new params, new state); the
    caller's CapsNet and state are left as they were (train_step is the in-place form)."""
    new_params = copy.deepcopy(params)
    new_state = adam_init(new_params)
    with torch.no_grad():
        for which in ("m", "v"):
            for k, a in new_state.moments(which).items():
                a.copy_(state.moments(which)[k])
    new_state.optimizer.set_step_count(state.step)
    new_state.optimizer.configure(adam)
    new_state.optimizer.apply_gradients([grads[k] for k in new_state.names], list(new_state.names.values()))
    return new_params, new_state


def train_step(params: CapsNet, state: AdamState, x: torch.Tensor, labels: torch.Tensor, config: CapsNetConfig,
               adam: AdamConfig = AdamConfig(),
               targets: torch.Tensor | None = None) -> tuple[CapsNet, AdamState, StepMetrics]:
    """Loss, gradients and one Adam update on one batch. Returns (params, state, metrics).

    The metrics' total, margin, reconstruction and correct are 0-d tensors on the device (read
    them when needed; nothing here waits for the device); lr is a Python float. On CUDA the door
    defers its value checks to the next host read (capsspec.validation). A CapsNet with .fast set (the
    backend's fast=True / compile=True on CUDA) takes the compiled path of fast.py. With
    state.data_parallel set (a distributed run), the forward pass goes through DistributedDataParallel
    and the gradients are all-reduced during the backward pass (parallel.py).
    """
    state.optimizer.configure(adam)
    lr = state.optimizer.current_lr()
    dp = state.data_parallel
    if params.fast:
        from .fast import fast_train_step  # only here: the CPU path never imports it

        total, margin, recon, correct = fast_train_step(params, state, x, labels, targets)
    else:
        params.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = params(x, labels) if dp is None else dp.module(x, labels)
            parts = params.loss_parts(out, x, labels, targets)
            (parts.total if dp is None else parts.total * dp.loss_scale).backward()
        correct = count_correct(out.lengths, labels)
        state.optimizer.step()
        params.zero_grad(set_to_none=True)  # the spec's params carry no gradients between calls
        total, margin, recon = parts.total.detach(), parts.margin.detach(), parts.reconstruction.detach()
    metrics = StepMetrics(total=total, margin=margin, reconstruction=recon, correct=correct, lr=lr)
    return params, state, metrics
