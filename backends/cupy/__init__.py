"""The CuPy backend: the spec's ops, model and Adam on an NVIDIA GPU, with hand-derived gradients.

CuPy has no autodiff, so this backend evaluates the reference's exact VJPs itself on CUDA
arrays: cuBLAS GEMMs for the convolutions (im2col) and the decoder, batched matmuls for the
capsule predictions and routing contractions, and custom kernels (kernels.py) for squash, the
routing softmax / agreement updates and their VJPs, col2im and Adam. float32 and float64.

Native params are a dict of cupy arrays under the canonical names; optimizer state is
{"step": int, "m": {...}, "v": {...}} of cupy arrays.

What this module must never do: import cupy at module level. Importing it (the registry does,
to list backends) must work on a machine without cupy or without a GPU; cupy is imported by
availability() and by the implementation modules, which load on first use.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from capsspec.backend import Availability, Backend
from capsspec.backend_kit import DictParams

_DEVICE = re.compile(r"^(?:cuda|gpu)(?::(\d+))?$")


def _device_index(device: str | int | None) -> int:
    if device is None:
        return 0
    if isinstance(device, (int, np.integer)) and not isinstance(device, bool) and device >= 0:
        return int(device)
    match = _DEVICE.match(device) if isinstance(device, str) else None
    if match is None:
        raise ValueError(
            f"the cupy backend runs on a CUDA device: device must be None, 'cuda', 'cuda:N' or an int N >= 0, "
            f"got {device!r}"
        )
    return int(match.group(1) or 0)


class CupyBackend(DictParams, Backend):
    name = "cupy"
    framework = "cupy"
    install_hint = "pip install 'capsspec[cupy]' (or the cupy-cudaXXx wheel matching your CUDA)"
    impl_modules = ("capsspec.backends.cupy.ops", "capsspec.backends.cupy.model", "capsspec.backends.cupy.optim")
    speed_rank = 15

    def __init__(self, device: str | int | None = None, **options: Any) -> None:
        self.device_index = _device_index(device)
        super().__init__(device=f"cuda:{self.device_index}", **options)

    # ------------------------------------------------------------------------- availability
    def device_availability(self, cupy: Any, version: str | None) -> Availability:
        """Available when cupy imports and sees the chosen CUDA device."""
        if not cupy.cuda.is_available():
            try:
                cupy.cuda.runtime.getDeviceCount()
                why = "it sees no CUDA device"
            except Exception as exc:  # the driver's own words say why (none, too old, ...)
                why = f"CUDA says: {exc}"
            return Availability(False, f"no CUDA device (cupy {version} imports, but {why})", version=version)
        count = cupy.cuda.runtime.getDeviceCount()
        if self.device_index >= count:
            return Availability(
                False, f"no CUDA device {self.device_index} (cupy {version} sees {count} device(s))", version=version
            )
        name = cupy.cuda.runtime.getDeviceProperties(self.device_index)["name"]
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        return Availability(True, version=version, device=f"cuda:{self.device_index} ({name})")

    def _cupy(self) -> Any:
        import cupy

        return cupy

    # ------------------------------------------------------------------------- the door's adapter
    # cupy.ndarray inputs run on their GPU; numpy.ndarray inputs run the same code on the host
    # (how the ops are tested without a GPU). Value checks of device arrays are deferred: a
    # host read per call would stall the queue (capsspec.validation states the policy).
    array_type = "cupy.ndarray (or numpy.ndarray)"

    def is_array(self, a: Any) -> bool:
        return isinstance(a, np.ndarray) or (type(a).__module__.split(".", 1)[0] == "cupy"
                                             and isinstance(a, self._cupy().ndarray))

    def device_of(self, a: Any) -> str | None:
        if isinstance(a, np.ndarray):
            # NumPy labels may go with device arrays (they are moved); NumPy floats may not.
            return None if a.dtype.kind in "iu" else "cpu"
        return f"cuda:{a.device.id}"

    def defers(self, a: Any) -> bool:
        return not isinstance(a, np.ndarray)

    def deferred_flags(self, a: Any, num_classes: int | None) -> Any:
        cupy = self._cupy()
        return ~cupy.isfinite(a).all() if num_classes is None else ((a < 0) | (a >= num_classes)).any()

    def deferred_repeats(self, a: Any) -> Any:
        rows = self._cupy().sort(a, axis=1)
        return (rows[:, 1:] == rows[:, :-1]).any()

    # ------------------------------------------------------------------------- conversions
    def asarray(self, a: np.ndarray) -> Any:
        cupy = self._cupy()
        with cupy.cuda.Device(self.device_index):
            return cupy.array(a, copy=True)

    def to_numpy(self, a: Any) -> np.ndarray:
        return self._cupy().asnumpy(a)

    def synchronize(self) -> None:
        """Wait for every queued kernel on the backend's device."""
        self._cupy().cuda.Device(self.device_index).synchronize()

    def peak_memory_bytes(self) -> int | None:
        """Bytes held by CuPy's default memory pool on the backend's device.

        CuPy keeps no peak counter, but its pool gives nothing back to the driver unless asked
        (free_all_blocks), so what it holds is at least the peak in use: an upper bound, since
        cached blocks that no later request fitted count too. None where cupy cannot tell.
        """
        try:
            cupy = self._cupy()
            with cupy.cuda.Device(self.device_index):
                return int(cupy.get_default_memory_pool().total_bytes())
        except Exception:
            return None
