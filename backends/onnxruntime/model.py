"""The spec's forward and predict, run by ONNX Runtime on the graph that graph.py builds.

An OnnxModel holds the canonical parameters, the graph built from them and an InferenceSession
of it; forward with labels (the decoder sees the true class) runs a second graph that takes the
labels as an input, built on first use and kept. That graph takes (B,) labels; forward with
(B, K) labels (MultiMNIST) runs it on the K copies of each image, one per listed class, and
regroups the reconstructions (B, K, C*H*W): K times the work of one pass, the price of keeping
the exported graph's interface as it is. Argument checks are the door's (the Backend base
class), not this module's: these functions are the computation only.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnxruntime

from capsspec.config import CapsNetConfig
from .graph import INPUT_NAME, LABELS_NAME, model_bytes
from capsspec.spec import CapsNetOutput

__all__ = ["OnnxModel", "forward", "predict"]


def _session(data: bytes) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the runtime's warnings about unused initializers are noise
    return onnxruntime.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


class OnnxModel:
    """The native params of the onnxruntime backend: canonical arrays, their graph, its session."""

    def __init__(self, params: Mapping[str, np.ndarray], config: CapsNetConfig) -> None:
        self.config = config
        self.params = {k: np.array(params[k], dtype=np.float32, copy=True) for k in config.param_shapes()}
        self.session = _session(model_bytes(self.params, config))
        self._labelled: onnxruntime.InferenceSession | None = None

    def labelled_session(self) -> onnxruntime.InferenceSession:
        """The graph whose decoder sees the capsule of the given labels."""
        if self._labelled is None:
            self._labelled = _session(model_bytes(self.params, self.config, with_labels=True))
        return self._labelled

    def __repr__(self) -> str:
        return f"<OnnxModel {self.config.parameter_count():,} parameters, routing {self.config.routing_iterations}>"


def forward(params: OnnxModel, x: np.ndarray, config: CapsNetConfig, labels: np.ndarray | None = None) -> CapsNetOutput:
    """The model's outputs; the decoder sees the true class's capsule when labels are given, else the
    longest; with (B, K) labels it decodes each listed class: reconstruction (B, K, C*H*W)."""
    names = ["v", "lengths", "coupling"] + (["reconstruction"] if config.use_decoder else [])
    feeds = {INPUT_NAME: x}
    session = params.session
    k = None
    if labels is not None and config.use_decoder:
        session = params.labelled_session()
        labels = np.asarray(labels).astype(np.int64)
        if labels.ndim == 2:  # row b*K + k of the repeated batch is image b masked by labels[b, k]
            k = labels.shape[1]
            feeds[INPUT_NAME] = np.repeat(x, k, axis=0)
        feeds[LABELS_NAME] = labels.reshape(-1)
    out = session.run(names, feeds)
    if k is not None:  # every copy of an image has the same capsules: keep the first
        out = [a[::k] for a in out[:3]] + [out[3].reshape(x.shape[0], k, -1)]
    return CapsNetOutput(v=out[0], lengths=out[1], coupling=out[2],
                         reconstruction=out[3] if config.use_decoder else None)


def predict(params: OnnxModel, x: np.ndarray, config: CapsNetConfig) -> np.ndarray:
    """The class of the longest class capsule, per example (int64; ties go to the lowest index)."""
    return params.session.run(["predicted"], {INPUT_NAME: x})[0]
