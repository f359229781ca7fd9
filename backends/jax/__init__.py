"""The JAX backend: the spec as pure functions under jax.jit, gradients by jax.vjp / jax.grad.

ops.py has every op of the spec as a jitted function, and the VJPs generated from them around
jax.vjp; model.py the network as functions of a parameter pytree; optim.py the spec's Adam and
a train_step compiled once per batch shape that donates the params and optimizer state.

Native params are a dict of jax.Arrays under the canonical names; optimizer state is the spec's
dict {"step": int, "m": {...}, "v": {...}}. float32 (the default) and float64: every function of
the backend runs with jax_enable_x64 on in JAX's thread-local context (ops.spec_precision), so
float64 works without the caller touching JAX's global configuration, and float32 inputs stay
float32 (dtypes come from the inputs).

Options: JaxBackend(device=None). device None uses JAX's default device (its GPU when jax has
one, else the CPU); "cpu", "gpu" / "cuda" or "gpu:N" / "cuda:N" name one.

What this module must never do: import jax at module level (the registry imports it to list
backends on machines without jax).
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Mapping

import numpy as np

from capsspec.backend import Availability, Backend
from capsspec.backend_kit import dict_state_from_numpy, state_to_numpy
from capsspec.config import CapsNetConfig
from capsspec.validation import check_params

_DEVICE = re.compile(r"^(cpu|gpu|cuda)(?::(\d+))?$")


class JaxBackend(Backend):
    name = "jax"
    framework = "jax"
    install_hint = "pip install 'capsspec[jax]'"
    impl_modules = ("capsspec.backends.jax.ops", "capsspec.backends.jax.model", "capsspec.backends.jax.optim")
    speed_rank = 12

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

    def availability(self) -> Availability:
        """Available when jax imports and has the named device. Never raises."""
        try:
            jax = importlib.import_module("jax")
        except Exception as exc:  # ImportError, or a broken install raising something else
            return Availability(False, f"jax is not importable ({exc}); install it with: {self.install_hint}")
        try:
            d = self._device()
        except Exception as exc:  # no such platform or index
            return Availability(False, f"jax {jax.__version__} has no device {self.device!r} ({exc})",
                                version=jax.__version__)
        where = "cpu" if d.platform == "cpu" else f"{d.platform}:{d.id} ({d.device_kind})"
        return Availability(True, version=jax.__version__, device=where)

    # ------------------------------------------------------------------------- conversions
    def asarray(self, a: np.ndarray) -> Any:
        """A jax.Array on the backend's device with a's dtype (int64 stays int64), a copy."""
        import jax

        with jax.enable_x64(True):
            return jax.device_put(np.array(a, copy=True, order="C"), self._device())

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)

    def params_from_numpy(self, params: Mapping[str, np.ndarray], config: CapsNetConfig) -> dict[str, Any]:
        """The canonical dict of jax.Arrays on the backend's device (copied), in the canonical order."""
        check_params(params, config.param_shapes())
        return {k: self.asarray(params[k]) for k in config.param_shapes()}

    def params_to_numpy(self, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {k: self.to_numpy(a) for k, a in params.items()}

    def state_from_numpy(self, state: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
        return dict_state_from_numpy(state, params, self.asarray, self.shape_of, self.dtype_name)

    def state_to_numpy(self, state: Mapping[str, Any]) -> dict:
        return state_to_numpy(state, self.to_numpy)

    # ------------------------------------------------------------------------- the door's adapter
    # dtype, shape and the value reads (np.isfinite / min / max on a host copy) are NumPy's answers,
    # which jax.Array supports; only what counts as this backend's array differs.
    array_type = "jax.Array"

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
