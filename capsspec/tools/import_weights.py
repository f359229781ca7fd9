"""`capsspec import`: a CapsNet trained outside capsspec, its weights turned into a capsspec checkpoint.

The user's weights file (a PyTorch state_dict .pt/.pth, a Keras .weights.h5 or .keras file, an
.npz) is read into NumPy arrays under the user's names; the mapping file (JSON or TOML, the
format of capsspec.conformance.param_mapping, documented in docs/import-your-model.md) says
which is which canonical parameter and in which axis order; every shape is checked against the
config; the canonical arrays are written as a checkpoint (capsspec/training/checkpoint.py,
atomically) that `capsspec eval`, `figures` and `export` accept like any other. The same
mapping holds the model to the reference (capsspec.conformance.user_model.check_model).

A .pt is read with torch.load(weights_only=True): no code in the file runs. Frameworks are
imported only for the format that needs them (torch for .pt, h5py for Keras files).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from capsspec.conformance.param_mapping import load_mapping
from ..training.checkpoint import save_checkpoint

__all__ = ["read_weights", "import_weights", "WEIGHT_SUFFIXES"]

WEIGHT_SUFFIXES = (".pt", ".pth", ".npz", ".h5", ".keras")
_STATE_KEYS = ("state_dict", "model_state_dict", "model")  # where training scripts nest a state_dict


def _torch_weights(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading {path} needs PyTorch (pip install torch), or save the weights as an .npz") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad or unsafe file; each is one line here
        first = str(exc).split(". ")[0].splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a PyTorch file of tensors that torch.load(weights_only=True) reads "
                         f"({first}): save the model's state_dict(), or an .npz of its arrays") from None
    for key in _STATE_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
    out = {}
    for name, t in obj.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        out[str(name)] = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).numpy()
    return out


def _h5_weights(source: Any, where: Path) -> dict[str, np.ndarray]:
    try:
        import h5py
    except ImportError:
        raise ValueError(f"reading {where} needs h5py (pip install h5py), or save the weights as an .npz") from None
    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(source, "r") as f:
            f.visititems(lambda name, obj: out.__setitem__(name, np.asarray(obj)) if isinstance(obj, h5py.Dataset)
                         else None)
    except OSError as exc:
        raise ValueError(f"{where} is not an HDF5 weights file: {exc}") from None
    return out


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a weights file under the names it stores them by; ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no weights file at {path}")
    name = path.name.lower()
    if name.endswith((".pt", ".pth")):
        return _torch_weights(path)
    if name.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path} is not an .npz of arrays: {exc}") from None
    if name.endswith(".h5"):
        return _h5_weights(path, path)
    if name.endswith(".keras"):
        try:
            with zipfile.ZipFile(path) as z:
                data = z.read("model.weights.h5")
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise ValueError(f"{path} is not a .keras file with model.weights.h5 in it: {exc}") from None
        return _h5_weights(io.BytesIO(data), path)
    raise ValueError(f"{path}: unknown weights format; capsspec import reads {', '.join(WEIGHT_SUFFIXES)}")


def import_weights(weights: str | os.PathLike, mapping: str | os.PathLike, out: str | os.PathLike, *,
                   dtype: str | None = None) -> tuple[Path, str]:
    """Convert `weights` with the mapping file into a checkpoint at `out`; returns (path, a one-line summary).

    dtype: the checkpoint's (float32 or float64); default float64 when every mapped array is
    float64, else float32. Nothing is written unless every parameter is found, of the config's
    shape, and finite."""
    if dtype not in (None, "float32", "float64"):
        raise ValueError(f"--dtype must be float32 or float64, got {dtype!r}")
    m = load_mapping(mapping)
    arrays = read_weights(weights)
    params = m.to_canonical(arrays, where=f"the weights in {weights}")
    for name, a in params.items():
        if a.dtype.kind != "f":
            raise ValueError(f"{weights}: {name} holds {a.dtype} values, not floats")
    if dtype is None:
        dtype = "float64" if all(a.dtype == np.float64 for a in params.values()) else "float32"
    params = {k: a.astype(dtype) for k, a in params.items()}
    path = save_checkpoint(out, params, m.config, backend="import",
                           extra={"imported_from": Path(weights).name, "mapping": Path(mapping).name})
    summary = (f"imported {len(params)} parameters ({m.config.parameter_count():,} values, {dtype}) from {weights} "
               f"with {mapping}")
    return path, summary
