"""The reference as a backend: capsspec's NumPy ops, model and optimizer under the protocol.

It adds nothing to the reference; it exists so that the reference is found, converted and
tested through the same door as every other backend.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from capsspec.backend import Backend
from capsspec.backend_kit import dict_state_from_numpy, state_to_numpy
from capsspec.config import CapsNetConfig
from capsspec.validation import check_params


class NumpyBackend(Backend):
    name = "numpy"
    framework = None
    install_hint = "pip install capsspec"
    impl_modules = ("capsspec.ops", "capsspec.model", "capsspec.optim")
    speed_rank = 0

    def __init__(self, device: str | None = None, **options: Any) -> None:
        if device not in (None, "cpu"):
            raise ValueError(f"the numpy backend runs on the CPU only; got device={device!r}")
        super().__init__(device="cpu", **options)

    def asarray(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)

    def params_from_numpy(self, params: Mapping[str, np.ndarray], config: CapsNetConfig) -> dict[str, np.ndarray]:
        check_params(params, config.param_shapes())
        return {k: np.array(params[k], copy=True) for k in config.param_shapes()}

    def params_to_numpy(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.array(v, copy=True) for k, v in params.items()}

    def state_from_numpy(self, state: Mapping[str, Any], params: Any) -> dict:
        return dict_state_from_numpy(state, params, self.asarray, self.shape_of, self.dtype_name)

    def state_to_numpy(self, state: Mapping[str, Any]) -> dict:
        return state_to_numpy(state, self.to_numpy)
