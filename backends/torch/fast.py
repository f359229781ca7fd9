"""The fast training step for CUDA: the spec's math, compiled.

Used by optim.train_step when the CapsNet's .fast is set, which TorchBackend does for
fast=True / compile=True, and only on a CUDA device. What it changes is how the math runs,
never what it computes:
* the CapsNet's 4-D weights (and so their gradients and Adam moments) are channels-last
  (params_from_numpy converts them), and so are the images, which is cuDNN's fastest layout;
* the forward pass and loss are compiled by torch.compile (Inductor), which fuses the routing
  iterations' softmax / weighted sums / squash / agreement and the losses into a few kernels,
  and AOTAutograd compiles the backward likewise; the compiled function is built once per
  AdamState and cached on it (a new batch size compiles once more);
* the metrics stay on the device and nothing reads the device, so batches queue back to back.
The Adam update stays SpecAdam's multi-tensor update (a few kernels over all parameters).
CUDA graphs (mode="reduce-overhead") are not used: the parameters are updated in place by the
optimizer between replays, which cudagraph trees handle, but this path has not been measured
with them yet.

What this module must never do: be imported by the CPU path (optim imports it lazily, only
for a CapsNet whose .fast is set).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .model import CapsNet, count_correct

__all__ = ["fast_train_step"]


def _compiled_loss(params: CapsNet, module: Any) -> Callable[..., tuple[torch.Tensor, ...]]:
    # module: params itself, or the DistributedDataParallel around it in a distributed run (torch.compile
    # then splits the graph at DDP's gradient buckets, so the all-reduces still overlap the backward).
    # targets None (one digit per image, compared with x) and a tensor (MultiMNIST's digits) are
    # two graphs: torch.compile guards on it and compiles each once.
    def loss_and_metrics(x: torch.Tensor, labels: torch.Tensor,
                         targets: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        out = module(x, labels)
        parts = params.loss_parts(out, x, labels, targets)
        return parts.total, parts.margin.detach(), parts.reconstruction.detach(), count_correct(out.lengths, labels)

    return torch.compile(loss_and_metrics, dynamic=False)


def fast_train_step(params: CapsNet, state: Any, x: torch.Tensor, labels: torch.Tensor,
                    targets: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Loss, backward and one SpecAdam update, in place. Returns (total, margin, reconstruction,
    correct) as 0-d device tensors. The caller (optim.train_step) has validated the arguments."""
    dp = state.data_parallel
    if state.fast_step is None:
        state.fast_step = _compiled_loss(params, params if dp is None else dp.module)
    x = x.contiguous(memory_format=torch.channels_last)
    params.zero_grad(set_to_none=True)
    with torch.enable_grad():
        total, margin, recon, correct = state.fast_step(x, labels, targets)
        # A distributed run weights this process's share of the batch (parallel.py), outside the
        # compiled graph so that a new share does not recompile it.
        (total if dp is None else total * dp.loss_scale).backward()
    state.optimizer.step()
    params.zero_grad(set_to_none=True)
    return total.detach(), margin, recon, correct
