"""Data-parallel training for the torch backend: DistributedDataParallel around a CapsNet.

TorchBackend.data_parallel(params, state) wraps the CapsNet in torch's DistributedDataParallel
(DDP) and hangs the wrapper on the optimizer state, where optim.train_step (and the compiled
step of fast.py) find it: the forward pass then goes through DDP, whose autograd hooks all-reduce
the gradients bucket by bucket while the backward pass is still running, and the spec's Adam
(SpecAdam) updates every process's copy of the parameters with the same reduced gradients, so
the copies stay identical without ever being sent again.

Each process trains on its own slice of a global batch of B images. DDP averages the processes'
gradients (their sum divided by the world size W); when the slices are unequal (B not a multiple
of W) that average is not the gradient of the global batch's mean loss. So each process scales
its loss by W n / B, n its slice's size: the average of the scaled gradients is then
sum_r (n_r / B) grad_r, exactly the gradient of the mean loss over the global batch. A process
with an empty slice (the last batch of an epoch may be smaller than W) runs one image with a
scale of 0, so that it still takes part in the reduction and adds nothing to it.

What this module must never do: be imported except for a distributed run (it imports
torch.distributed), or change what a step computes beyond the gradient's reduction.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .model import CapsNet

__all__ = ["DataParallel"]


class DataParallel:
    """A CapsNet wrapped in DistributedDataParallel, and the weight of this process's slice of the batch."""

    def __init__(self, params: CapsNet, process_group: Any = None) -> None:
        device_ids = [params.device.index] if params.device.type == "cuda" else None
        # Every process starts from the same parameters (DDP broadcasts rank 0's at construction
        # anyway); the CapsNet has no buffers to keep in step.
        self.module = DistributedDataParallel(params, device_ids=device_ids, process_group=process_group)
        self.params = params
        self.world_size = dist.get_world_size(process_group)
        self.loss_scale = 1.0  # W n / B of the current step (1 for equal slices)

    def set_share(self, local: int, total: int) -> None:
        """This process holds `local` of the step's `total` images (0 <= local <= total, total >= 1)."""
        if not 0 <= local <= total or total < 1:
            raise ValueError(f"a process's share of a batch must satisfy 0 <= local <= total and total >= 1, got "
                             f"local={local}, total={total}")
        self.loss_scale = self.world_size * local / total
