"""The PyTorch backend: the spec's ops, model and Adam as torch code, gradients by autograd.

ops.py has every op of the spec on torch tensors (VJPs by torch.autograd.grad); model.py the
network as torch.nn.Modules (CapsNet, whose state_dict keys are the canonical parameter names)
and the spec's model functions; optim.py the spec's Adam as a torch.optim.Optimizer (SpecAdam)
and train_step; fast.py an optional compiled training step for CUDA; parallel.py the
DistributedDataParallel wrapper of a data-parallel run (data_parallel, used by capsspec.training.distributed).

Native params are a model.CapsNet; optimizer state is an optim.AdamState (a Mapping view
{"step", "m", "v"} over a SpecAdam). float32 and float64.

Options: TorchBackend(device=None, allow_tf32=False, compile=False, fast=False)
* device: "cpu" (the default: a CUDA device is never picked silently), "cuda" or "cuda:N".
* allow_tf32: on CUDA, whether float32 matmuls and cuDNN convolutions may use TF32. The spec's
  float32 is IEEE float32, so the default is False. PyTorch keeps these switches per process
  (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32): a CUDA backend
  sets both to its allow_tf32 on first use and leaves them so (PyTorch's own default turns
  TF32 *on* for cuDNN convolutions, which this undoes for the whole process). On the CPU
  nothing is touched.
* compile / fast (two spellings of one switch: `capsspec bench --fast` passes fast=True):
  train_step takes fast.py's path (channels-last convolutions, the loss and its backward
  compiled by torch.compile, no host synchronisation per batch). CUDA only: asking for it on
  the CPU is a ValueError rather than a flag silently ignored.

What this module must never do: import torch at module level (the registry imports it to list
backends on machines without torch).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from capsspec.backend import Availability, Backend
from capsspec.backend_kit import ModuleParams
from capsspec.config import CapsNetConfig
from capsspec.validation import check_params

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def _parse_device(device: Any) -> str:
    if device is None:
        return "cpu"
    text = str(device)  # a torch.device prints as "cuda:0"
    match = _DEVICE.match(text)
    if match is None or (match.group(1) == "cpu" and match.group(2) not in (None, "0")):
        raise ValueError(f"the torch backend's device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return "cpu" if match.group(1) == "cpu" else text


class TorchBackend(ModuleParams, Backend):
    name = "torch"
    framework = "torch"
    install_hint = "pip install 'capsspec[torch]'"
    impl_modules = ("capsspec.backends.torch.ops", "capsspec.backends.torch.model", "capsspec.backends.torch.optim")
    speed_rank = 20

    def __init__(self, device: Any = None, allow_tf32: bool = False, compile: bool = False,
                 fast: bool = False, **options: Any) -> None:
        for name, value in (("allow_tf32", allow_tf32), ("compile", compile), ("fast", fast)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        super().__init__(device=_parse_device(device), **options)
        self.allow_tf32 = allow_tf32
        self.fast = compile or fast
        if self.fast and not self.device.startswith("cuda"):
            raise ValueError(
                f"the torch backend's fast path (compile=True / fast=True) runs on CUDA only; got device={self.device!r}. "
                "Pass device='cuda', or leave it off on the CPU"
            )
        self._configured = False

    # ------------------------------------------------------------------------- availability
    def device_availability(self, torch: Any, version: str | None) -> Availability:
        """Available when torch imports and, for a CUDA device, sees it."""
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        why = f"is built with CUDA {torch.version.cuda} but sees no device" if torch.version.cuda else \
            "is built without CUDA"
        index = None  # the CPU
        if self.device.startswith("cuda"):
            index = int(self.device.partition(":")[2] or (torch.cuda.current_device() if gpus else 0))
        return self.gpu_report(version, gpus, index, why, "cuda")

    # ------------------------------------------------------------------------- plumbing
    def _torch(self) -> Any:
        import torch

        if not self._configured:
            self._configured = True
            if self.device.startswith("cuda"):
                # Process-wide switches (see the module docstring).
                torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
                torch.backends.cudnn.allow_tf32 = self.allow_tf32
        return torch

    def _implementations(self) -> list[Mapping[str, Any]]:
        self._torch()
        return super()._implementations()

    # ------------------------------------------------------------------------- the door's adapter
    array_type = "torch.Tensor"

    def is_array(self, a: Any) -> bool:
        return isinstance(a, self._torch().Tensor)

    def dtype_name(self, a: Any) -> str:
        return str(a.dtype).replace("torch.", "")

    def device_of(self, a: Any) -> str | None:
        return str(a.device)

    def all_finite(self, a: Any) -> bool:
        return bool(self._torch().isfinite(a).all())

    def min_max(self, a: Any) -> tuple[int, int]:
        lo, hi = self._torch().aminmax(a)
        return int(lo), int(hi)

    def defers(self, a: Any) -> bool:
        return a.device.type != "cpu"  # a CUDA read stalls the queue: settle at the next host read

    def deferred_flags(self, a: Any, num_classes: int | None) -> Any:
        torch = self._torch()
        return ~torch.isfinite(a).all() if num_classes is None else ((a < 0) | (a >= num_classes)).any()

    def deferred_repeats(self, a: Any) -> Any:
        rows = self._torch().sort(a, dim=1).values
        return (rows[:, 1:] == rows[:, :-1]).any()

    def params_class(self) -> type:
        from .model import CapsNet

        return CapsNet

    def state_class(self) -> type:
        from .optim import AdamState

        return AdamState

    def module_device(self, params: Any) -> str | None:
        return str(params.device)

    # ------------------------------------------------------------------------- conversions
    def asarray(self, a: np.ndarray) -> Any:
        """A tensor on the backend's device with a's dtype (int64 labels stay int64), a copy."""
        torch = self._torch()
        return torch.from_numpy(np.array(a, copy=True, order="C")).to(self.device)

    def to_numpy(self, a: Any) -> np.ndarray:
        torch = self._torch()
        if isinstance(a, torch.Tensor):
            return np.array(a.detach().cpu().numpy(), order="C", copy=True)
        return np.array(a, copy=True)

    def params_from_numpy(self, params: Mapping[str, np.ndarray], config: CapsNetConfig) -> Any:
        """A CapsNet on the backend's device holding these canonical parameters (copied)."""
        if not isinstance(config, CapsNetConfig):
            raise ValueError(f"config must be a CapsNetConfig, got {type(config).__name__}")
        dtype = check_params(params, config.param_shapes())
        torch = self._torch()
        from .model import CapsNet

        # Built on the meta device, then allocated: no time spent drawing values that are overwritten.
        net = CapsNet(config, dtype=dtype, device="meta").to_empty(device=self.device)
        with torch.no_grad():
            for k, p in net.canonical_parameters().items():
                p.copy_(torch.from_numpy(np.array(params[k], order="C", copy=True)))
        if self.fast:
            net = net.to(memory_format=torch.channels_last)
            net.fast = True
        return net

    def params_to_numpy(self, params: Any) -> dict[str, np.ndarray]:
        """The canonical dict {name: float array} of a CapsNet, in the canonical order."""
        self.check_native(params)
        return {k: self.to_numpy(p) for k, p in params.canonical_parameters().items()}

    def default_device(self) -> str | None:
        """"cuda" where torch sees a CUDA device, else "cpu": what a training run uses by default."""
        try:
            return "cuda" if self._torch().cuda.is_available() else "cpu"
        except Exception:  # a broken CUDA install must not stop a CPU run from starting
            return "cpu"

    def synchronize(self) -> None:
        """Wait for queued CUDA work (a no-op on the CPU, where torch runs synchronously)."""
        if self.device.startswith("cuda"):
            self._torch().cuda.synchronize(self.device)

    # ------------------------------------------------------------------------- data-parallel training
    def data_parallel(self, params: Any, state: Any, process_group: Any = None) -> None:
        """Make train_step on (params, state) data-parallel over torch.distributed's process group:
        the CapsNet goes through DistributedDataParallel (parallel.py). The group must be initialised
        (capsspec.training.distributed does it for a torchrun launch)."""
        self.check_native(params, state)
        from .parallel import DataParallel

        state.data_parallel = DataParallel(params, process_group)
        state.fast_step = None  # a compiled step built before must go through the wrapper: build it again

    def set_batch_share(self, state: Any, local: int, total: int) -> None:
        """The next train_step on `state` runs `local` of a global batch of `total` images (data-parallel runs)."""
        if getattr(state, "data_parallel", None) is None:
            raise ValueError("set_batch_share: this optimizer state is not data-parallel (call data_parallel first)")
        state.data_parallel.set_share(local, total)

    def peak_memory_bytes(self) -> int | None:
        """Peak CUDA memory allocated by torch on the device; None on the CPU."""
        if not self.device.startswith("cuda"):
            return None
        try:
            return int(self._torch().cuda.max_memory_allocated(self.device))
        except Exception:
            return None
