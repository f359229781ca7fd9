"""The JAX backend: the spec as pure functions under jax.jit (ops.py, model.py), gradients by
jax.vjp / jax.value_and_grad, and the spec's Adam in a train_step compiled once per batch shape
that donates the params and optimizer state (optim.py). Params are a dict of jax.Arrays under
the canonical names; float64 needs no global JAX configuration (ops.spec_precision). Options:
JaxBackend(device=None): JAX's default device (its GPU when jax has one, else the CPU); "cpu",
"gpu" / "cuda" or "gpu:N" / "cuda:N" name one.

What this module must never do: import jax at module level (the registry imports it to list
backends on machines without jax).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from capsspec.backend import Availability, Backend
from capsspec.backend_kit import DictParams

_DEVICE = re.compile(r"^(cpu|gpu|cuda)(?::(\d+))?$")


def _jax() -> Any:
    import jax  # on first use: this module is imported where jax is not installed

    return jax


class JaxBackend(DictParams, Backend):
    name = "jax"
    framework = "jax"
    install_hint = "pip install 'capsspec[jax]'"
    impl_modules = ("capsspec.backends.jax.ops", "capsspec.backends.jax.model", "capsspec.backends.jax.optim")
    speed_rank = 12
    compiles_per_shape = True  # jax.jit compiles per shape and static argument
    conformance_cost = 3.5  # compiling under jax.jit: 180-280 s against numpy's 60-85 on a 2-core CPU
    # XLA's cheaper CPU code generation halves the ci suite's compile time; results stay in tolerance.
    ci_environment = {"XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
    # The door's adapter: dtype, shape and all_finite are NumPy's answers (the last on a host copy),
    # which jax.Array supports; what counts as this backend's array and min_max differ.
    array_type = "jax.Array"

    def __init__(self, device: Any = None, **options: Any) -> None:
        if device is not None and not _DEVICE.match(str(device)):
            raise ValueError(f"the jax backend's device must be None, 'cpu', 'gpu', 'cuda' or 'gpu:N', got {device!r}")
        super().__init__(device=None if device is None else str(device), **options)

    def _device(self) -> Any:
        """The jax.Device this backend puts arrays on."""
        if self.device is None:
            return _jax().devices()[0]
        kind, _, index = self.device.partition(":")
        return _jax().devices("cpu" if kind == "cpu" else "gpu")[int(index or 0)]

    def device_availability(self, jax: Any, version: str | None) -> Availability:
        """Available when jax has the named device (an exception says why not)."""
        d = self._device()
        return Availability(True, version=version,
                            device="cpu" if d.platform == "cpu" else f"{d.platform}:{d.id} ({d.device_kind})")

    def asarray(self, a: np.ndarray) -> Any:
        """A jax.Array on the backend's device with a's dtype (int64 stays int64), a copy."""
        with _jax().enable_x64(True):
            return _jax().device_put(np.array(a, copy=True, order="C"), self._device())

    def is_array(self, a: Any) -> bool:
        return isinstance(a, _jax().Array)

    def min_max(self, a: Any) -> tuple[int, int]:
        host = np.asarray(a)  # a.min() would compile a program per shape, and warn for int64 outside x64
        return int(host.min()), int(host.max())

    def synchronize(self) -> None:
        """Wait until every live jax.Array is computed (JAX dispatches asynchronously, the CPU too)."""
        _jax().block_until_ready(_jax().live_arrays())

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory in use by JAX on a GPU; None on the CPU (JAX keeps no statistics there)."""
        stats = self._device().memory_stats()
        return int(stats["peak_bytes_in_use"]) if stats else None

    def clear_compiled(self) -> None:
        """Drop every compiled program JAX keeps (jax.clear_caches): each holds memory and memory maps."""
        _jax().clear_caches()
