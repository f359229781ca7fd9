"""Data-parallel training across processes, GPUs and machines with torch.distributed, started by torchrun.

    torchrun --nproc-per-node N -m capsspec train --backend torch ...

torchrun starts N processes (on each of --nnodes machines) and tells each who it is through the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `launch()` reads it;
`setup()` joins the process group (gloo on CPUs, NCCL on CUDA GPUs, process i of a machine on its
GPU cuda:i) and returns a Distributed, which the trainer and the bench use. A run on one process
is an ordinary run: nothing here is used.

The semantics, which make a run's result independent of the number of processes W:
* `--batch-size` is the global batch B. Every process draws the same global batch as a
  one-process run (the same shuffled indices and the same 2-pixel shifts, from the seed) and
  trains on its own contiguous slice of it (`shard`): process r of W holds images
  [floor(r B / W), floor((r + 1) B / W)). The gradient is the global batch's mean gradient
  (backends/torch/parallel.py weights unequal slices), so the learning rate, its schedule
  (per optimizer step) and Adam are the one-process run's.
* Validation and test images are split the same way; each process counts its correct
  predictions and the counts are summed (`sum`), so the accuracy is exact.
* Rank 0 alone writes checkpoints, metrics.jsonl, summary.json and the progress; the others
  are quiet. Checkpoints hold the canonical parameters and optimizer state, as always, so a
  run checkpointed on W processes resumes on any number (every process reads the same file).
* Decisions taken between steps (stop on a signal, checkpoint now on the time rule) are agreed
  by all processes (`agree`), through a gloo group on the host: no GPU is made to wait for it.
* A collective that fails (a process died, a machine became unreachable, or `timeout` passed
  without an answer) raises PeerFailure, which names the last checkpoint; torchrun then reports
  which process failed and why.

The gradient reduction itself is DistributedDataParallel's (the torch backend's data_parallel);
only the torch backend trains distributed: another backend under torchrun is refused.

What this module must never do: import torch unless a distributed run is asked for (importing
capsspec imports no framework), or let a process write what rank 0 writes.
"""

from __future__ import annotations

import collections
import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

__all__ = ["Launch", "Distributed", "PeerFailure", "DEFAULT_TIMEOUT_SECONDS", "launch", "shard", "plan_device",
           "collective", "setup"]

# How long a process waits in a collective for the others (then it fails with PeerFailure instead
# of hanging forever). Long enough for rank 0 to write a checkpoint while the others wait.
DEFAULT_TIMEOUT_SECONDS = 600.0


class PeerFailure(RuntimeError):
    """A collective operation failed: another process of the run stopped, or did not answer in time."""


@dataclass(frozen=True)
class Launch:
    """Who this process is in a torchrun launch (from its environment)."""

    rank: int
    world_size: int
    local_rank: int


def _env_int(env: Any, name: str, minimum: int) -> int:
    text = env.get(name)
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"the environment variable {name}={text!r} must be an integer >= {minimum}; torchrun sets "
                         "RANK, WORLD_SIZE and LOCAL_RANK for each process it starts")
    return value


def launch(env: Any = None) -> Launch | None:
    """This process's place in a torchrun launch of more than one process; None otherwise.

    torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a WORLD_SIZE of 1 (or none) is an ordinary run.
    A malformed value raises a ValueError naming the variable.
    """
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE") in (None, "", "1"):
        return None
    world = _env_int(env, "WORLD_SIZE", 1)
    rank, local = _env_int(env, "RANK", 0), _env_int(env, "LOCAL_RANK", 0)
    if rank >= world:
        raise ValueError(f"the environment variable RANK={rank} must be below WORLD_SIZE={world}")
    return Launch(rank=rank, world_size=world, local_rank=local)


def shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, stop) of process `rank`'s contiguous slice of n items split over world_size processes.

    Slices differ in size by at most one and depend on (n, rank, world_size) only.
    """
    for name, value, minimum in (("n", n, 0), ("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if rank >= world_size:
        raise ValueError(f"rank must be below world_size={world_size}, got {rank}")
    return n * rank // world_size, n * (rank + 1) // world_size


def plan_device(backend: str | None, device: str | None, where: Launch) -> tuple[str, str]:
    """(backend, device) for this process of a distributed run.

    The backend must be torch (the only one with data-parallel training); left out, torch. A CUDA
    device ("cuda", "cuda:N", or torch's default where it sees a GPU) becomes this process's own,
    cuda:LOCAL_RANK: torchrun starts one process per GPU of a machine.
    """
    if backend is None:
        backend = "torch"
    if backend != "torch":
        raise ValueError(f"--backend {backend} cannot train distributed: under torchrun (WORLD_SIZE="
                         f"{where.world_size}) only the torch backend can (torch.distributed); pass --backend torch, "
                         "or run without torchrun")
    if device is None:
        from ..registry import get_backend

        device = get_backend("torch", check=False).default_device() or "cpu"
    if str(device).startswith("cuda"):
        device = f"cuda:{where.local_rank}"
    return backend, device


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failure of torch.distributed inside the block into a PeerFailure saying what was under way."""
    try:
        yield
    except PeerFailure:
        raise
    except RuntimeError as exc:  # torch.distributed's DistBackendError and gloo's errors are RuntimeErrors
        raise PeerFailure(f"{what} failed: {' '.join(str(exc).split())[:400]}") from exc


class Distributed:
    """This process's part in a running distributed job (built by setup())."""

    def __init__(self, where: Launch, device: str, group_backend: str, control: Any, timeout: float) -> None:
        self.rank, self.world_size, self.local_rank = where.rank, where.world_size, where.local_rank
        self.device = device  # where the collectives' tensors live
        self.group_backend = group_backend  # "gloo" or "nccl"
        self.timeout = timeout
        self._control = control  # a gloo group for host-side decisions (None: the default group is gloo)

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This process's (start, stop) of n items (see the module function)."""
        return shard(n, self.rank, self.world_size)

    def describe(self) -> str:
        return f"{self.world_size} processes ({self.group_backend})"

    # ------------------------------------------------------------------------- the model
    def attach(self, backend: Any, params: Any, state: Any) -> None:
        """Make backend.train_step on (params, state) reduce its gradients over every process."""
        hook = getattr(backend, "data_parallel", None)
        if hook is None:
            raise ValueError(f"backend {backend.name!r} cannot train distributed (it has no data_parallel); use "
                             "--backend torch")
        with collective("wrapping the model in DistributedDataParallel"):
            hook(params, state)

    def begin_step(self, backend: Any, state: Any, local: int, total: int) -> None:
        """The next train_step trains this process's `local` images of a global batch of `total`."""
        backend.set_batch_share(state, local, total)

    # ------------------------------------------------------------------------- collectives
    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true on every process if it is true on any (an all-reduce on the host)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
        with collective("agreeing between steps"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        _keep(t)
        return tuple(bool(v) for v in t.tolist())

    def sum(self, values: Sequence[Any]) -> list[float]:
        """The sum over every process of each value (Python numbers or 0-d tensors), as floats."""
        import torch
        import torch.distributed as dist

        parts = [v.detach().to(device=self.device, dtype=torch.float64).reshape(1) if isinstance(v, torch.Tensor)
                 else torch.tensor([float(v)], dtype=torch.float64, device=self.device) for v in values]
        t = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=self.device)
        with collective("summing metrics over the processes"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        _keep(t)
        return [float(v) for v in t.cpu().tolist()]

    def barrier(self) -> None:
        import torch.distributed as dist

        with collective("waiting for every process"):
            dist.barrier(group=self._control)

    def close(self) -> None:
        """Leave the process group (at the end of the run, or after a failure)."""
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # already broken by a failed peer: nothing left to release cleanly
                pass


# The tensors of the last host-side collectives, kept alive on purpose. A gloo worker thread drops
# its reference to a collective's tensor just after the collective returns; were that the last
# reference, the thread would need the GIL to free the tensor's Python object, while the main thread,
# holding the GIL, may be tearing the process group down and joining that very thread (a DDP
# Reducer freed after destroy_process_group does so): a deadlock, seen under load in
# tests/test_distributed.py. Holding the last few here means a worker never frees a Python object.
_KEPT: collections.deque = collections.deque(maxlen=64)


def _keep(t: Any) -> None:
    _KEPT.append(t)


def setup(backend: Any, where: Launch | None = None, *, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Distributed:
    """Join torchrun's process group for a run on `backend` (a torch backend, its device chosen by plan_device).

    gloo when the backend runs on the CPU, NCCL on CUDA (this process on backend.device). A group
    that torch.distributed already has (a caller initialised it) is used as it is. timeout: seconds
    a collective waits for the other processes before it fails with PeerFailure.
    """
    where = where or launch()
    if where is None:
        raise ValueError("setup: this process is not one of several started by torchrun (WORLD_SIZE is unset or 1)")
    if getattr(backend, "name", None) != "torch":
        raise ValueError(f"backend {getattr(backend, 'name', backend)!r} cannot train distributed: only the torch "
                         "backend can; pass --backend torch")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError("this build of torch has no torch.distributed, so it cannot train distributed")
    device = str(backend.device)
    on_cuda = device.startswith("cuda")
    group_backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(torch.device(device))
    limit = datetime.timedelta(seconds=float(timeout))
    with collective(f"joining the process group ({group_backend}, {where.world_size} processes)"):
        if not dist.is_initialized():
            dist.init_process_group(group_backend, timeout=limit)
        group_backend = str(dist.get_backend())
        if dist.get_world_size() != where.world_size or dist.get_rank() != where.rank:
            raise ValueError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, but the "
                             f"environment says rank {where.rank} of {where.world_size}")
        control = dist.new_group(backend="gloo", timeout=limit) if group_backend != "gloo" else None
    return Distributed(where, device, group_backend, control, float(timeout))
