"""`capsspec export`: a checkpoint's inference graph written to an ONNX file.

The graph itself is the onnxruntime backend's (capsspec.backends.onnxruntime.graph: the
reference's arithmetic spelled in ONNX operators, routing unrolled, batch dimension dynamic,
float32 only). This module reads the checkpoint, checks its parameters and writes the file
atomically. The onnx package is imported when a function here is called, never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..backends.onnxruntime.graph import build_model, load_onnx
from ..config import CapsNetConfig
from ..training.atomic_files import atomic_path

__all__ = ["export_onnx", "export_checkpoint"]


def export_onnx(params: Mapping[str, np.ndarray], config: CapsNetConfig, out: str | os.PathLike, *,
                doc: str = "") -> Path:
    """Write the inference graph of (params, config) to `out`, whole or not at all; returns the path.

    params: the canonical dict (float32 or float64 arrays; float64 are rounded to float32, see the
    module docstring). The model is checked with onnx.checker before it is written.
    """
    from ..validation import check_params

    if not isinstance(config, CapsNetConfig):
        raise ValueError(f"config must be a CapsNetConfig, got {type(config).__name__}")
    check_params(params, config.param_shapes())
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"out: {out} is a folder; give the path of the .onnx file to write")
    onnx = load_onnx()
    model = build_model(params, config, doc=doc)
    onnx.checker.check_model(model)
    try:
        with atomic_path(out) as tmp:
            tmp.write_bytes(model.SerializeToString())
    except OSError as exc:  # a parent that is a file, no permission, a full disk: the user's input or machine
        raise ValueError(f"out: cannot write {out}: {exc}") from exc
    return out


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, format: str = "onnx") -> tuple[Path, str]:
    """Export a capsspec checkpoint; returns (the path written, a note for the user, possibly empty)."""
    from ..training.checkpoint import load_checkpoint

    if format != "onnx":
        raise ValueError(f"format must be 'onnx' (the only export format), got {format!r}")
    ck = load_checkpoint(checkpoint)
    note = ""
    if ck.dtype != "float32":
        note = (f"the checkpoint holds {ck.dtype} parameters; they were rounded to float32 (ONNX Runtime has no "
                f"{ck.dtype} convolution on the CPU)")
    doc = (f"Exported by capsspec from {Path(checkpoint).name} (epoch {ck.epoch}, step {ck.step}, written by "
           f"{ck.backend or '?'}).")
    params = {k: np.asarray(v, dtype=np.float32) for k, v in ck.params.items()}
    return export_onnx(params, ck.config, out, doc=doc), note
