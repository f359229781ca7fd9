"""The JAX backend: the spec as pure functions under jax.jit, gradients by jax.vjp / jax.grad.

ops.py has the spec's ops and their VJPs, model.py the network as functions of a parameter
pytree (a dict of jax.Arrays under the canonical names), optim.py the spec's Adam and a
train_step compiled once per batch shape that donates the params and the optimizer state.
float32 is the default; float64 needs no global JAX configuration (ops.spec_precision).

Options: JaxBackend(device=None). device None uses JAX's default device (its GPU when jax has
one, else the CPU); "cpu", "gpu" / "cuda" or "gpu:N" / "cuda:N" name one.

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


class JaxBackend(DictParams, Backend):
    name = "jax"
    framework = "jax"
    install_hint = "pip install 'capsspec[jax]'"
    impl_modules = ("capsspec.backends.jax.ops", "capsspec.backends.jax.model", "capsspec.backends.jax.optim")
    speed_rank = 12
    compiles_per_shape = True  # jax.jit compiles per shape and static argument
    # The door's adapter: dtype, shape and the value reads (on a host copy) are NumPy's answers,
    # which jax.Array supports; only what counts as this backend's array differs.
    array_type = "jax.Array"

    def __init__(self, device: Any = None, **options: Any) -> None:
        if device is not None and not _DEVICE.match(str(device)):
            raise ValueError(f"the jax backend's device must be None, 'cpu', 'gpu', 'cuda' or 'gpu:N', got {device!r}")
        super().__init__(device=None if device is None else str(device), **options)

    def _device(self) -> Any:
        """The jax.Device this backend puts arrays on."""
        import jax

        if self.device is None:
            return jax.devices()[0]
        kind, _, index = self.device.partition(":")
        return jax.devices("cpu" if kind == "cpu" else "gpu")[int(index or 0)]

    def device_availability(self, jax: Any, version: str | None) -> Availability:
        """Available when jax has the named device (an exception says why not)."""
        d = self._device()
        where = "cpu" if d.platform == "cpu" else f"{d.platform}:{d.id} ({d.device_kind})"
        return Availability(True, version=version, device=where)

    def asarray(self, a: np.ndarray) -> Any:
        """A jax.Array on the backend's device with a's dtype (int64 stays int64), a copy."""
        import jax

        with jax.enable_x64(True):
            return jax.device_put(np.array(a, copy=True, order="C"), self._device())

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)

    def is_array(self, a: Any) -> bool:
        import jax

        return isinstance(a, jax.Array)

    def synchronize(self) -> None:
        """Wait until every live jax.Array is computed (JAX dispatches asynchronously, the CPU too)."""
        import jax

        jax.block_until_ready(jax.live_arrays())

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory in use by JAX on a GPU; None on the CPU."""
        try:
            d = self._device()
            return None if d.platform == "cpu" else int(d.memory_stats()["peak_bytes_in_use"])
        except Exception:
            return None
