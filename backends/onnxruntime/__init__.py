"""The ONNX Runtime backend: inference only, by running the graph that graph.py builds.

It implements the spec's forward and predict (spec.INFERENCE_NAMES) and nothing that trains
(`trains = False`): the conformance suite reports every other check as not applicable to it.
Native params are a model.OnnxModel: the canonical arrays, the graph built from them with
onnx.helper (no framework round trip), and its onnxruntime.InferenceSession, created by
params_from_numpy. Arrays are NumPy arrays (what ONNX Runtime takes and returns).

float32 only: ONNX Runtime's CPU provider has no float64 Conv (see graph.py).
The CPU only: the CUDA execution provider is not part of the `onnx` extra.

What this module must never do: import onnx or onnxruntime at module level (the registry imports
it to list backends on machines without them).
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import numpy as np

from capsspec.backend import Availability, Backend
from capsspec.config import CapsNetConfig
from capsspec.validation import check_params


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    framework = "onnxruntime"
    install_hint = "pip install 'capsspec[onnx]'"
    dtypes = ("float32",)
    impl_modules = ("capsspec.backends.onnxruntime.model",)
    speed_rank = 0
    trains = False

    def __init__(self, device: str | None = None, **options: Any) -> None:
        if device not in (None, "cpu"):
            raise ValueError(f"the onnxruntime backend runs on the CPU only; got device={device!r}")
        super().__init__(device="cpu", **options)

    def availability(self) -> Availability:
        """Available when both onnxruntime (to run) and onnx (to build the graph) import. Never raises."""
        try:
            ort = importlib.import_module("onnxruntime")
            importlib.import_module("onnx")
        except Exception as exc:  # ImportError, or a broken install raising something else
            return Availability(False, f"onnxruntime or onnx is not importable ({exc}); install them with: "
                                       f"{self.install_hint}")
        return Availability(True, version=getattr(ort, "__version__", None), device="cpu")

    # ------------------------------------------------------------------------- conversions
    def asarray(self, a: np.ndarray) -> np.ndarray:
        return np.array(a, copy=True)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.array(a, copy=True)

    def params_from_numpy(self, params: Mapping[str, np.ndarray], config: CapsNetConfig) -> Any:
        """An OnnxModel: the graph of these canonical parameters and its InferenceSession.

        float64 parameters are rounded to float32 (onnxruntime has no double convolution)."""
        if not isinstance(config, CapsNetConfig):
            raise ValueError(f"config must be a CapsNetConfig, got {type(config).__name__}")
        check_params(params, config.param_shapes())
        self.require_available()
        from .model import OnnxModel

        return OnnxModel(params, config)

    def native_params(self, params: Any) -> tuple[CapsNetConfig, str, str | None] | str:
        """For the door: the config an OnnxModel was built for, its dtype and device."""
        from .model import OnnxModel

        if not isinstance(params, OnnxModel):
            return (f"params must be an OnnxModel (what OnnxRuntimeBackend.params_from_numpy returns), "
                    f"got {type(params).__name__}")
        return params.config, "float32", None

    def params_to_numpy(self, params: Any) -> dict[str, np.ndarray]:
        """The canonical parameters the OnnxModel was built from (copies)."""
        if isinstance(self.native_params(params), str):
            raise ValueError(self.native_params(params))
        return {k: np.array(v, copy=True) for k, v in params.params.items()}

    def state_from_numpy(self, state: Mapping[str, Any], params: Any) -> Any:
        raise NotImplementedError("the onnxruntime backend is inference-only: it has no optimizer state")

    def state_to_numpy(self, state: Any) -> dict[str, Any]:
        raise NotImplementedError("the onnxruntime backend is inference-only: it has no optimizer state")
