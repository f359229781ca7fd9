"""The reference as a backend: capsspec's NumPy ops, model and optimizer under the protocol.

It adds nothing to the reference; it exists so that the reference is found, converted and
tested through the same door as every other backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from capsspec.backend import Backend
from capsspec.backend_kit import DictParams


class NumpyBackend(DictParams, Backend):
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
