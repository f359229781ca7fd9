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
import math
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
           "load_checkpoint", "read_metadata", "tensors_sha256", "run_folder"]

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


def run_folder(out_dir: str | os.PathLike) -> Path:
    """The run folder out_dir, created if need be; ValueError (naming --out) if it cannot be one."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output folder {out} is an existing file; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a parent folder should be, no permission, ...
        raise ValueError(f"cannot create the output folder {out}: {exc.strerror or exc}") from exc
    return out


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
        _check_optimizer_state(state["m"], state["v"], "refusing to write a checkpoint")
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


# ===================================================================================== reading
# The metadata's schema: exactly what save_checkpoint writes. Each value is a string; the kinds say
# what the string must hold. Keys marked optional may be absent (older writers), never of another kind.
_META_SCHEMA = {"format": "str", "format_version": "str", "config": "json-object", "dtype": "dtype",
                "adam": "json-object-or-empty", "has_optimizer": "flag", "step": "count", "epoch": "count",
                "rng": "json-object", "training": "json-object", "extra": "json-object", "backend": "str",
                "capsspec_version": "str", "tensors_sha256": "sha256"}
_KIND_WORDS = {"json-object": "a JSON object", "json-object-or-empty": "a JSON object or nothing",
               "dtype": "float32 or float64, the dtypes a checkpoint is written in", "flag": "0 or 1",
               "count": "a non-negative integer", "sha256": "64 hex digits"}
_META_REQUIRED = ("format", "format_version", "config", "dtype", "step", "epoch", "tensors_sha256")
# The trainer's record (metadata "extra") and what each field must be: "int" a non-negative integer,
# "num" a finite number, "num?" one or null, a dict a nested object, ("map", kind) an object of kind.
_EXTRA_SCHEMA: dict[str, Any] = {
    "n_train": "int", "n_val": "int", "n_test": "int", "data_fingerprint": "str", "train_seconds": "num",
    "seconds_by_backend": ("map", "num"), "best_val_accuracy": "num", "best_epoch": "int", "device": "str?",
    "backend_options": "object", "world_size": "int", "dataset": "object", "history": ("list", "object"),
    "curve": ("list", "object"),
    "progress": {"epoch": "int", "batch": "int", "sums": ("map", "num"), "seen": "int", "seconds": "num",
                 "lr": "num", "window": ("map", "list")},
}


def _kind_ok(value: Any, kind: Any) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind in ("num", "num?"):
        if value is None:
            return kind == "num?"
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind in ("str", "str?"):
        return isinstance(value, str) or (value is None and kind == "str?")
    if kind == "object":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    if isinstance(kind, tuple):
        container, inner = kind
        items = value.values() if container == "map" and isinstance(value, dict) else (
            value if container == "list" and isinstance(value, list) else None)
        return items is not None and all(_kind_ok(v, inner) for v in items)
    raise AssertionError(kind)


def _check_fields(d: Mapping[str, Any], schema: Mapping[str, Any], where: str, prefix: str) -> None:
    """Refuse (ValueError naming the field) a field of d whose value is not of its schema's kind."""
    for key, kind in schema.items():
        if key not in d:
            continue
        if isinstance(kind, dict):
            if not isinstance(d[key], dict):
                raise ValueError(f"{where}: metadata field {prefix}{key} must be a JSON object, got "
                                 f"{type(d[key]).__name__}")
            _check_fields(d[key], kind, where, f"{prefix}{key}.")
        elif not _kind_ok(d[key], kind):
            raise ValueError(f"{where}: metadata field {prefix}{key} has an invalid value {str(d[key])[:60]!r} "
                             f"(expected {kind if isinstance(kind, str) else ' of '.join(kind)})")


def _parse_metadata(meta: Any, where: str) -> dict[str, Any]:
    """The metadata checked against _META_SCHEMA, its JSON fields parsed; ValueError naming the first bad field."""
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{where} is not a capsspec checkpoint: its __metadata__ is not a map of strings")
    _check_format(meta, where)
    missing = [k for k in _META_REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{where} has invalid metadata: missing field(s) {', '.join(missing)}")
    parsed: dict[str, Any] = {}
    for key, kind in _META_SCHEMA.items():
        text = meta.get(key, "")
        bad = ValueError(f"{where}: metadata field {key} has an invalid value {text[:60]!r} (expected "
                         f"{_KIND_WORDS.get(kind, kind)})")
        if kind.startswith("json-object"):
            if text == "" and key != "config":
                parsed[key] = None if kind.endswith("empty") else {}
                continue
            try:
                parsed[key] = json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                raise bad from None
            if not isinstance(parsed[key], dict):
                raise bad
        elif kind == "count":
            if not (text.isascii() and text.isdigit() and len(text) <= 18):
                raise bad
            parsed[key] = int(text)
        elif ((kind == "dtype" and text not in _SAFETENSORS_DTYPES.values()) or (kind == "flag" and text not in
              ("", "0", "1")) or (kind == "sha256" and not (len(text) == 64 and all(c in "0123456789abcdef"
                                                                                     for c in text)))):
            raise bad
        else:
            parsed[key] = text
    _check_fields(parsed["extra"], _EXTRA_SCHEMA, where, "extra.")
    parsed["has_optimizer"] = parsed["has_optimizer"] == "1"
    return parsed


def _check_format(meta: Mapping[str, Any], where: str) -> None:
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{where} is not a capsspec checkpoint (metadata format={str(meta.get('format'))[:40]!r}, "
                         f"expected {FORMAT_NAME!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"{where} has checkpoint format version {str(meta.get('format_version'))[:40]!r}; this "
                         f"capsspec reads version {FORMAT_VERSION} only")


def _read_header(f: Any, size: int, where: str) -> dict[str, Any]:
    """The safetensors header of an open file of `size` bytes, its length checked against the file's
    before a byte more than 8 is read (so a hostile length costs nothing)."""
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{where} is not a checkpoint: {size} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
        raise ValueError(f"{where} is corrupt or truncated: its header claims {n} bytes, the file has {size}")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{where} is corrupt: its safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where} is corrupt: its safetensors header is not a JSON object")
    header["__header_bytes__"] = 8 + n
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata strings of a checkpoint, after checking its format and schema (tensors not read)."""
    path = Path(path)
    with open(path, "rb") as f:
        header = _read_header(f, os.fstat(f.fileno()).st_size, f"checkpoint {path}")
    meta = header.get("__metadata__")
    _parse_metadata(meta, f"checkpoint {path}")
    return meta


def _tensor_layout(header: Mapping[str, Any], body_size: int, shapes: Mapping[str, tuple[int, ...]], dtype: str,
                   where: str) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{name: (offset, shape)} of the header's tensors, checked against the config's shapes, the dtype and
    the body's size (every byte of the body belongs to exactly one tensor), before the body is read."""
    layout, spans = {}, []
    item = np.dtype(dtype).itemsize
    for name, entry in header.items():
        if name in ("__metadata__", "__header_bytes__"):
            continue
        base = name.removeprefix(M_PREFIX).removeprefix(V_PREFIX)
        if base not in shapes:
            raise ValueError(f"{where} does not match its config: unexpected tensor {name[:60]!r}")
        if not isinstance(entry, dict) or _SAFETENSORS_DTYPES.get(str(entry.get("dtype"))) != dtype:
            got = entry.get("dtype") if isinstance(entry, dict) else entry
            raise ValueError(f"{where}: tensor {name!r} has dtype {str(got)[:20]}, the metadata says {dtype}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape) or tuple(shape) != shapes[base]:
            raise ValueError(f"{where}: tensor {name!r} has shape {str(shape)[:60]}, its config expects {shapes[base]}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
                or offsets[1] - offsets[0] != math.prod(shapes[base]) * item):
            raise ValueError(f"{where} is corrupt: tensor {name!r} has data offsets {str(offsets)[:60]}")
        layout[name] = (offsets[0], shapes[base])
        spans.append(tuple(offsets))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise ValueError(f"{where} is corrupt: its tensors overlap or leave gaps in the file")
        end = stop
    if end != body_size:
        raise ValueError(f"{where} is corrupt or truncated: its tensors take {end} bytes, the file holds {body_size}")
    return layout


def _check_optimizer_state(m: Mapping[str, np.ndarray], v: Mapping[str, np.ndarray], where: str) -> None:
    """Adam's moments as training leaves them: finite, and the second moments (running means of squares)
    non-negative; anything else makes the first resumed step NaN."""
    for name in m:
        if not np.all(np.isfinite(m[name])):
            raise ValueError(f"{where}: optimizer first moment adam.m.{name} holds NaN or inf")
        if not np.all(np.isfinite(v[name])) or np.any(v[name] < 0):
            raise ValueError(f"{where}: optimizer second moment adam.v.{name} holds NaN, inf or negative values "
                             f"(a running mean of squared gradients is never negative)")


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
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header = _read_header(f, size, where)
        meta = _parse_metadata(header.get("__metadata__"), where)
        try:
            file_config = CapsNetConfig.from_dict(meta["config"])
            adam = AdamConfig.from_dict(meta["adam"]) if meta["adam"] else None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where} has invalid metadata: {' '.join(str(exc).split())}") from None
        if config is not None and file_config != config:
            raise ValueError(f"{where} was written for another model: {_config_diff(file_config, config)}")
        dtype, step, has_optimizer = meta["dtype"], meta["step"], meta["has_optimizer"]
        shapes = file_config.param_shapes()
        expected_names = set(shapes)
        if has_optimizer:
            expected_names |= {M_PREFIX + n for n in shapes} | {V_PREFIX + n for n in shapes}
        layout = _tensor_layout(header, size - header["__header_bytes__"], shapes, dtype, where)
        if set(layout) != expected_names:
            raise ValueError(f"{where} does not match its config: missing tensors "
                             f"{sorted(expected_names - set(layout))[:6]}")
        if require_optimizer and not has_optimizer:
            raise ValueError(f"{where} holds no optimizer state, so a run cannot resume from it")
        # Only now, every size checked, is the body read: exactly the bytes its tensors declare.
        body = bytearray(size - header["__header_bytes__"])
        if f.readinto(body) != len(body):
            raise ValueError(f"{where} is truncated: it changed while being read")
    tensors = {name: np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)
               for name, (start, shape) in layout.items()}
    if tensors_sha256(tensors) != meta["tensors_sha256"]:
        raise ValueError(f"{where} is corrupt: its tensors do not match the hash stored in its metadata")
    params = {n: tensors[n] for n in shapes}
    state = None
    if has_optimizer:
        state = {"step": step, "m": {n: tensors[M_PREFIX + n] for n in shapes},
                 "v": {n: tensors[V_PREFIX + n] for n in shapes}}
        _check_optimizer_state(state["m"], state["v"], where)
    return Checkpoint(
        path=path, config=file_config, params=params, dtype=dtype, step=step, epoch=meta["epoch"], adam=adam,
        state=state, rng=meta["rng"], training=meta["training"], extra=meta["extra"], backend=meta["backend"],
        capsspec_version=meta["capsspec_version"],
    )
