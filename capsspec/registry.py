"""Finding backends by name: a table of built-ins merged with the `capsspec.backends` entry points.

A third-party package joins by declaring, in its pyproject.toml,

    [project.entry-points."capsspec.backends"]
    mybackend = "mypackage.capsspec_backend:MyBackend"

where MyBackend subclasses capsspec.Backend (or is any factory returning such an object).
The built-in backends are declared the same way in capsspec's own pyproject.toml; the table
below repeats them so that a source checkout without installed metadata still finds them,
and so that an error can say which extra installs a missing framework.

Loading an entry point imports only the backend's small __init__ module; frameworks are
imported when the backend is used (or its availability checked).
"""

from __future__ import annotations

import functools
import importlib
from importlib import metadata
from typing import Any, Callable

from .backend import Backend, BackendUnavailable

__all__ = ["ENTRY_POINT_GROUP", "BUILTIN_BACKENDS", "get_backend", "backend_names", "available_backends",
           "describe_backends"]

ENTRY_POINT_GROUP = "capsspec.backends"

BUILTIN_BACKENDS: dict[str, str] = {
    "numpy": "capsspec.backends.numpy:NumpyBackend",
    "torch": "capsspec.backends.torch:TorchBackend",
    "tensorflow": "capsspec.backends.tensorflow:TensorFlowBackend",
    "cupy": "capsspec.backends.cupy:CupyBackend",
    "onnxruntime": "capsspec.backends.onnxruntime:OnnxRuntimeBackend",
    "jax": "capsspec.backends.jax:JaxBackend",
}


def _load(target: str) -> Callable[..., Backend]:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@functools.lru_cache(maxsize=None)
def _entry_points() -> dict[str, str]:
    found: dict[str, str] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def _table() -> dict[str, str]:
    table = dict(BUILTIN_BACKENDS)
    for name, target in _entry_points().items():
        # An installed capsspec declares its built-ins as entry points too; a third party may
        # not take a built-in's name.
        if name in BUILTIN_BACKENDS and target != BUILTIN_BACKENDS[name]:
            continue
        table[name] = target
    return table


def backend_names() -> list[str]:
    """Every known backend name, available here or not."""
    return sorted(_table())


def get_backend(name: str, *, device: str | None = None, check: bool = True, **options: Any) -> Backend:
    """The backend called `name`, constructed with `device` and backend-specific options.

    Raises ValueError for an unknown name (listing the known ones) and BackendUnavailable for a
    known backend that cannot run here (saying what to install), unless check=False.
    """
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str):
        raise ValueError(f"backend name must be a string, got {type(name).__name__}")
    table = _table()
    if name not in table:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(sorted(table))}")
    try:
        factory = _load(table[name])
    except Exception as exc:
        raise BackendUnavailable(f"backend {name!r} could not be loaded from {table[name]!r}: {exc}") from exc
    backend = factory(device=device, **options)
    if check:
        backend.require_available()
    return backend


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    names = []
    for name in backend_names():
        try:
            if get_backend(name, check=False).is_available():
                names.append(name)
        except Exception:  # a broken third-party plugin must not hide the others
            continue
    return names


def describe_backends() -> list[dict[str, Any]]:
    """One row per known backend: name, available, reason, version, device."""
    rows = []
    for name in backend_names():
        try:
            b = get_backend(name, check=False)
            a = b.availability()
            rows.append({"name": name, "available": a.available, "reason": a.reason, "version": a.version,
                         "device": a.device, "speed_rank": b.speed_rank})
        except Exception as exc:
            rows.append({"name": name, "available": False, "reason": f"failed to load: {exc}", "version": None,
                         "device": None, "speed_rank": -1})
    return rows
