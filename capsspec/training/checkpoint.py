"""Checkpoints that belong to no framework: one safetensors file of canonical NumPy arrays.

Layout of a checkpoint file:
  * tensors: every parameter under its canonical name (CapsNetConfig.param_shapes), and, when
    the optimizer is saved, its moments as "adam.m.<name>" and "adam.v.<name>";
  * metadata (safetensors' string map; structured values are JSON): format, format_version,
    config, dtype, adam (AdamConfig), step (optimizer updates applied), epoch (epochs
    completed), rng (the NumPy generator states where the run stands, which may be mid-epoch),
    training (the run's settings), extra (the trainer's record: where in the epoch it stands,
    the epoch's running sums, the metrics history, the device), backend (which wrote it),
    capsspec_version, and
    tensors_sha256 (a hash over every tensor's name, dtype, shape and bytes, so a flipped
    bit is caught, not only a truncation).

Because every backend converts its parameters to and from these canonical arrays, a checkpoint
written by any backend loads in any other.

Writing is atomic: the bytes go to a temporary file in the same folder, are fsync'ed, and
replace the target with os.replace, so a crash leaves either the old checkpoint or the new one.
Loading validates everything before returning anything: a truncated or corrupt file, a file of
another format or format version, or one whose names, shapes or dtypes disagree with its own
config (or with the config the caller expects) is refused with a ValueError naming the file
and the problem. Nothing is ever half-loaded.

This module must never import a framework (safetensors is used through its NumPy API).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..config import AdamConfig, CapsNetConfig
from ..version import __version__
from .atomic_files import atomic_write_bytes

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "CHECKPOINT_NAME", "FINAL_NAME", "Checkpoint", "save_checkpoint",
           "load_checkpoint", "read_metadata", "tensors_sha256"]

FORMAT_NAME = "capsspec-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.safetensors"  # written during and at the end of every epoch
FINAL_NAME = "final.safetensors"  # the model at the end of a run
BEST_VAL_NAME = "best-val.safetensors"  # the epoch with the best validation accuracy
METRICS_NAME = "metrics.jsonl"  # the run's metrics, one JSON row each
SUMMARY_NAME = "summary.json"  # what the run reports at its end
M_PREFIX, V_PREFIX = "adam.m.", "adam.v."

_SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float64"}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint holds, as NumPy arrays and plain values."""

    path: Path
    config: CapsNetConfig
    params: dict[str, np.ndarray]
    dtype: str
    step: int
    epoch: int
    adam: AdamConfig | None = None
    state: dict[str, Any] | None = None  # {"step", "m", "v"} as adam_init returns, or None
    rng: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    backend: str = ""
    capsspec_version: str = ""


def tensors_sha256(tensors: Mapping[str, np.ndarray]) -> str:
    """A hash over every tensor's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn
    except ImportError as exc:  # an optional dependency (the "train" extra)
        raise ValueError("checkpoints need the safetensors package: pip install 'capsspec[train]'") from exc
    return stn



def save_checkpoint(path: str | os.PathLike, params: Mapping[str, np.ndarray], config: CapsNetConfig, *,
                    state: Mapping[str, Any] | None = None, adam: AdamConfig | None = None, step: int | None = None,
                    epoch: int = 0, rng: Mapping[str, Any] | None = None, training: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None, backend: str = "") -> Path:
    """Write a checkpoint atomically. params (and state's m/v) are canonical NumPy arrays.

    step defaults to state["step"] (0 without a state). Refuses non-finite parameters, so a
    diverged model can never replace a good checkpoint.
    """

    if not isinstance(config, CapsNetConfig):
        raise ValueError(f"config must be a CapsNetConfig, got {type(config).__name__}")
    shapes = config.param_shapes()
    if set(params) != set(shapes):
        raise ValueError(f"params have names {sorted(params)}, the config expects {sorted(shapes)}")
    tensors: dict[str, np.ndarray] = {}
    dtypes = set()
    for name, shape in shapes.items():
        a = np.ascontiguousarray(params[name])
        if a.shape != shape:
            raise ValueError(f"params[{name!r}] has shape {a.shape}, the config expects {shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"params[{name!r}] holds NaN or inf: refusing to write a checkpoint of a diverged model")
        tensors[name] = a
        dtypes.add(a.dtype.name)
    if len(dtypes) != 1 or not dtypes <= {"float32", "float64"}:
        raise ValueError(f"params must all be float32 or all float64, got {sorted(dtypes)}")
    dtype = dtypes.pop()
    if state is not None:
        for prefix, part in ((M_PREFIX, "m"), (V_PREFIX, "v")):
            moments = state[part]
            if set(moments) != set(shapes):
                raise ValueError(f"state[{part!r}] has names {sorted(moments)}, the config expects {sorted(shapes)}")
            for name in shapes:
                a = np.ascontiguousarray(moments[name])
                if a.shape != shapes[name] or a.dtype.name != dtype:
                    raise ValueError(f"state[{part!r}][{name!r}] has {a.dtype.name} {a.shape}, expected {dtype} "
                                     f"{shapes[name]}")
                tensors[prefix + name] = a
        if step is None:
            step = int(state["step"])
        elif int(state["step"]) != step:
            raise ValueError(f"step={step} disagrees with state['step']={state['step']}")
    step = 0 if step is None else int(step)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "dtype": dtype,
        "adam": json.dumps(adam.to_dict(), sort_keys=True) if adam is not None else "",
        "has_optimizer": "1" if state is not None else "0",
        "step": str(step),
        "epoch": str(int(epoch)),
        "rng": json.dumps(dict(rng or {}), sort_keys=True),
        "training": json.dumps(dict(training or {}), sort_keys=True),
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
        "backend": str(backend),
        "capsspec_version": __version__,
        "tensors_sha256": tensors_sha256(tensors),
    }
    data = _safetensors_numpy().save(tensors, metadata=metadata)
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


def _header(data: bytes, where: str) -> dict[str, Any]:
    if len(data) < 8:
        raise ValueError(f"{where} is not a checkpoint: {len(data)} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise ValueError(f"{where} is corrupt or truncated: its header claims {n} bytes, the file has {len(data)}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where} is corrupt: its safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{where} is corrupt: its safetensors header is not a JSON object")
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata strings of a checkpoint, after checking its format (tensors not loaded)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            head += f.read(min(n, _MAX_HEADER))
    meta = _header(head, str(path)).get("__metadata__") or {}
    _check_format(meta, str(path))
    return meta


def _check_format(meta: Mapping[str, Any], where: str) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{where} is not a capsspec checkpoint (metadata format={meta.get('format')!r}, "
                         f"expected {FORMAT_NAME!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"{where} has checkpoint format version {meta.get('format_version')!r}; this capsspec "
                         f"reads version {FORMAT_VERSION} only")


def _json(meta: Mapping[str, str], key: str, where: str) -> Any:
    try:
        return json.loads(meta[key]) if meta.get(key) else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: metadata {key!r} is not valid JSON ({exc})") from exc


def _config_diff(a: CapsNetConfig, b: CapsNetConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}: {da[k]!r} in the file vs {db[k]!r} expected" for k in da if da[k] != db[k])


def load_checkpoint(path: str | os.PathLike, *, config: CapsNetConfig | None = None,
                    require_optimizer: bool = False) -> Checkpoint:
    """Read and fully validate a checkpoint. Raises ValueError (never half-loads) when anything is off.

    config: when given, the checkpoint's config must equal it.
    require_optimizer: refuse a checkpoint without Adam state (resuming needs it).
    """
    path = Path(path)
    where = f"checkpoint {path}"
    if not path.is_file():
        raise ValueError(f"{where} does not exist or is not a file")
    data = path.read_bytes()
    header = _header(data, where)
    meta = header.get("__metadata__") or {}
    _check_format(meta, where)
    try:
        tensors = _safetensors_numpy().load(data)
    except Exception as exc:  # safetensors' own error type: a truncated or inconsistent file
        raise ValueError(f"{where} is corrupt or truncated: {exc}") from exc
    if tensors_sha256(tensors) != meta.get("tensors_sha256"):
        raise ValueError(f"{where} is corrupt: its tensors do not match the hash stored in its metadata")

    try:
        file_config = CapsNetConfig.from_dict(_json(meta, "config", where) or {})
        adam_dict = _json(meta, "adam", where)
        adam = AdamConfig.from_dict(adam_dict) if adam_dict else None
        step, epoch = int(meta["step"]), int(meta["epoch"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where} has invalid metadata: {exc}") from exc
    if config is not None and file_config != config:
        raise ValueError(f"{where} was written for another model: {_config_diff(file_config, config)}")

    dtype = meta.get("dtype")
    shapes = file_config.param_shapes()
    has_optimizer = meta.get("has_optimizer") == "1"
    expected_names = set(shapes)
    if has_optimizer:
        expected_names |= {M_PREFIX + n for n in shapes} | {V_PREFIX + n for n in shapes}
    if set(tensors) != expected_names:
        extra_names, missing = sorted(set(tensors) - expected_names), sorted(expected_names - set(tensors))
        raise ValueError(f"{where} does not match its config: missing tensors {missing[:6]}, unexpected tensors "
                         f"{extra_names[:6]}")
    for name, a in tensors.items():
        base = name.removeprefix(M_PREFIX).removeprefix(V_PREFIX)
        if a.shape != shapes[base]:
            raise ValueError(f"{where}: tensor {name!r} has shape {a.shape}, its config expects {shapes[base]}")
        if a.dtype.name != dtype:
            raise ValueError(f"{where}: tensor {name!r} has dtype {a.dtype.name}, the metadata says {dtype}")
    if require_optimizer and not has_optimizer:
        raise ValueError(f"{where} holds no optimizer state, so a run cannot resume from it")

    params = {n: tensors[n] for n in shapes}
    state = None
    if has_optimizer:
        state = {"step": step, "m": {n: tensors[M_PREFIX + n] for n in shapes},
                 "v": {n: tensors[V_PREFIX + n] for n in shapes}}
    return Checkpoint(
        path=path, config=file_config, params=params, dtype=str(dtype), step=step, epoch=epoch, adam=adam,
        state=state, rng=_json(meta, "rng", where) or {}, training=_json(meta, "training", where) or {},
        extra=_json(meta, "extra", where) or {}, backend=meta.get("backend", ""),
        capsspec_version=meta.get("capsspec_version", ""),
    )
