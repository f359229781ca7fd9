"""The TensorFlow backend: the spec's ops, model and Adam as TensorFlow 2 code, gradients by GradientTape.

ops.py has every op of the spec on tf tensors in the spec's canonical layouts (VJPs by
tf.GradientTape); model.py the network as tf.Modules (CapsNet: channels-last activations, HWIO
and (in, out) kernels inside, canonical names and layouts at its edges) with its steps compiled
by tf.function; optim.py the spec's Adam written out on tf.Variables (keras.optimizers.Adam
rounds beta1/beta2 to float32; optim.py says why that matters) and the compiled train_step.

Native params are a model.CapsNet; optimizer state is an optim.AdamState (a Mapping view
{"step", "m", "v"} over tf.Variables). float32 and float64.

TensorFlowBackend(device=None, tf32=False):
* tf32: whether float32 matrix products and convolutions may run in TF32 on a GPU that has it.
  TensorFlow's own default is yes on every Ampere or newer GPU (an H100 too), which the spec's
  float32 is not: the backend turns it off on its first use unless tf32=True (`--backend-option
  tf32=true`), a speed mode held to its own tolerances ("tf32" in conformance/tolerances.py). The
  switch is process-wide, so a second backend asking for the other setting is refused.
* device: None or "cpu" (the default: a GPU is never picked silently) runs on "/CPU:0";
  "gpu", "cuda", "gpu:N" or "cuda:N" runs on "/GPU:N" when TensorFlow sees that GPU
  (availability() says why not otherwise). Variables are created on that device and every
  compiled step places its ops there.

When this package is imported (before TensorFlow is: the registry imports it when the backend is
asked for or listed), it sets two variables of the environment, each only where the user has not set
it (set_environment): TF_CPP_MIN_LOG_LEVEL=2 quiets its C++ logging, and
TF_ENABLE_ONEDNN_OPTS=0 keeps its CPU kernels off oneDNN. The second is for correctness, not speed:
TensorFlow 2.21's oneDNN batched matmul corrupts the heap on rank-4 operands (tensorflow/tensorflow
issue 117700), the shape of the capsule transform, and the suite saw it kill a train step with
SIGSEGV. A process that imported tensorflow before asking for this backend keeps TensorFlow's own
setting (docs/backends.md).

What this module must never do: import tensorflow at module level (the registry imports it to
list backends on machines without TensorFlow); only availability() and use import it.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any, Mapping

import numpy as np

from capsspec.backend import Availability, Backend
from capsspec.backend_kit import ModuleParams
from capsspec.config import CapsNetConfig
from capsspec.validation import check_params

__all__ = ["TensorFlowBackend"]

_DEVICE = re.compile(r"^(cpu|gpu|cuda)(?::(\d+))?$", re.IGNORECASE)


def _parse_device(device: Any) -> tuple[str, str]:
    """(the backend's device name, TensorFlow's device string) for a user's device argument."""
    if device is None:
        return "cpu", "/CPU:0"
    text = str(device).strip().lstrip("/")
    match = _DEVICE.match(text)
    if match is None or (match.group(1).lower() == "cpu" and match.group(2) not in (None, "0")):
        raise ValueError(
            f"the tensorflow backend's device must be None, 'cpu', 'gpu', 'cuda', 'gpu:N' or 'cuda:N', got {device!r}"
        )
    if match.group(1).lower() == "cpu":
        return "cpu", "/CPU:0"
    index = int(match.group(2) or 0)
    return f"gpu:{index}", f"/GPU:{index}"


# What the backend puts in the environment before TensorFlow's first import (the module docstring says
# why); a user's own setting of either wins.
ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def set_environment() -> None:
    """Set ENVIRONMENT's variables that the user has not set; TensorFlow reads them at its first import."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)


# On the package's import, which comes before any of its modules' `import tensorflow` (ops.py, model.py,
# optim.py are submodules): the registry imports this package only when the tensorflow backend is asked
# for or listed.
set_environment()


def _import_tensorflow() -> Any:
    return importlib.import_module("tensorflow")


_TF32_IN_FORCE: list[bool] = []  # the process-wide TF32 switch as this module set it (empty: not yet)


def _set_tf32(tf: Any, on: bool) -> None:
    """Set TensorFlow's process-wide TF32 switch, or refuse a second backend asking for the other setting
    (the first one's results would silently change)."""
    if _TF32_IN_FORCE and _TF32_IN_FORCE[0] != on:
        raise ValueError(f"a tensorflow backend with tf32={_TF32_IN_FORCE[0]} is already in use in this process, "
                         f"and TF32 is a process-wide switch: use tf32={_TF32_IN_FORCE[0]} here too, or another process")
    tf.config.experimental.enable_tensor_float_32_execution(on)
    _TF32_IN_FORCE[:] = [on]


class TensorFlowBackend(ModuleParams, Backend):
    name = "tensorflow"
    framework = "tensorflow"
    install_hint = "pip install 'capsspec[tensorflow]'"
    impl_modules = ("capsspec.backends.tensorflow.ops", "capsspec.backends.tensorflow.model",
                    "capsspec.backends.tensorflow.optim")
    speed_rank = 10
    conformance_cost = 4.0  # tracing under tf.function: 215-290 s against numpy's 60-85 on a 2-core CPU

    def __init__(self, device: Any = None, tf32: bool = False, **options: Any) -> None:
        name, tf_device = _parse_device(device)
        if not isinstance(tf32, bool):
            raise ValueError(f"the tensorflow backend's tf32 option must be true or false, got {tf32!r}")
        super().__init__(device=name, **options)
        self.tf_device = tf_device
        self.tf32 = tf32
        # What float32 matmuls and convolutions compute: IEEE float32, or TF32 (10-bit mantissa) when
        # asked for; the conformance suite holds "tf32" to its own tolerances (conformance/tolerances.py).
        self.float32_precision = "tf32" if tf32 else "ieee"

    def _implementations(self) -> list[Mapping[str, Any]]:
        _set_tf32(self._tf(), self.tf32)  # before any op runs: TensorFlow's default is TF32 on Ampere and newer
        return super()._implementations()

    # ------------------------------------------------------------------------- availability
    def device_availability(self, tf: Any, version: str | None) -> Availability:
        """Available when tensorflow imports and, for a GPU device, sees it."""
        gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
        why = "is built with CUDA and sees no GPU" if tf.test.is_built_with_cuda() else \
            "is built without CUDA (tensorflow-cpu?)"
        index = int(self.device.partition(":")[2]) if self.device.startswith("gpu") else None
        return self.gpu_report(version, gpus, index, why, "gpu")

    def _tf(self) -> Any:
        return _import_tensorflow()

    # ------------------------------------------------------------------------- the door's adapter
    array_type = "tf.Tensor"

    def is_array(self, a: Any) -> bool:
        tf = self._tf()
        return tf.is_tensor(a) and not isinstance(a, (tf.SparseTensor, tf.RaggedTensor))

    def dtype_name(self, a: Any) -> str:
        return a.dtype.name

    def shape_of(self, a: Any) -> tuple[int, ...]:
        return tuple(a.shape)  # a None stays None inside a user's tf.function (and matches nothing)

    def _symbolic(self, a: Any) -> bool:
        # Inside a user's tf.function a tensor has no values yet: the value checks apply to eager calls.
        return not hasattr(a, "numpy") or not self._tf().executing_eagerly()

    def all_finite(self, a: Any) -> bool:
        tf = self._tf()
        return self._symbolic(a) or bool(tf.reduce_all(tf.math.is_finite(a)))

    def min_max(self, a: Any) -> tuple[int, int]:
        if self._symbolic(a):
            return 0, 0
        tf = self._tf()
        return int(tf.reduce_min(a)), int(tf.reduce_max(a))

    def defers(self, a: Any) -> bool:
        return not self._symbolic(a) and "GPU" in (a.device or "").upper()

    def deferred_flags(self, a: Any, num_classes: int | None) -> Any:
        tf = self._tf()
        if num_classes is None:
            return tf.logical_not(tf.reduce_all(tf.math.is_finite(a)))
        return tf.reduce_any((a < 0) | (a >= num_classes))

    def repeated_row(self, a: Any) -> int | None:
        return None if self._symbolic(a) else super().repeated_row(a)

    def deferred_repeats(self, a: Any) -> Any:
        tf = self._tf()
        rows = tf.sort(a, axis=1)
        return tf.reduce_any(tf.equal(rows[:, 1:], rows[:, :-1]))

    def _read_flag(self, flag: Any) -> Any:
        return flag.numpy()

    def params_class(self) -> type:
        from .model import CapsNet

        return CapsNet

    def state_class(self) -> type:
        from .optim import AdamState

        return AdamState

    # ------------------------------------------------------------------------- conversions

    def asarray(self, a: np.ndarray) -> Any:
        """A tf.Tensor on the backend's device with a's dtype (int64 labels stay int64), a copy."""
        tf = self._tf()
        with tf.device(self.tf_device):
            return tf.identity(tf.constant(np.array(a, copy=True, order="C")))

    def to_numpy(self, a: Any) -> np.ndarray:
        tf = self._tf()
        if tf.is_tensor(a) or isinstance(a, tf.Variable):
            return np.array(a.numpy(), copy=True, order="C")
        return np.array(a, copy=True)

    def params_from_numpy(self, params: Mapping[str, np.ndarray], config: CapsNetConfig) -> Any:
        """A CapsNet on the backend's device holding these canonical parameters (copied)."""
        if not isinstance(config, CapsNetConfig):
            raise ValueError(f"config must be a CapsNetConfig, got {type(config).__name__}")
        dtype = check_params(params, config.param_shapes())
        self.require_available()
        from .model import CapsNet

        arrays = {k: np.asarray(params[k]) for k in config.param_shapes()}
        return CapsNet(config, dtype=dtype, initial=arrays, device=self.tf_device)

    def params_to_numpy(self, params: Any) -> dict[str, np.ndarray]:
        """The canonical dict {name: float array} of a CapsNet, in the canonical order and layouts."""
        self.check_native(params)
        return params.canonical_numpy()

    def synchronize(self) -> None:
        """Wait for queued device work: TensorFlow's eager async queues, if any."""
        tf = self._tf()
        try:
            tf.experimental.async_wait()  # TensorFlow's public "wait for pending eager ops"
        except Exception:
            pass  # nothing pending / not in async mode: eager execution is synchronous here

    def peak_memory_bytes(self) -> int | None:
        """Peak GPU memory TensorFlow allocated on the device; None on the CPU."""
        if not self.device.startswith("gpu"):
            return None
        try:
            info = self._tf().config.experimental.get_memory_info(self.tf_device.lstrip("/"))
            return int(info["peak"])
        except Exception:
            return None
