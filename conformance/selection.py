"""Choosing the backend under test: a registered name or a "module:attr" factory, checked loudly.

Every entry point of the suite (the `capsspec conformance` command, the pytest plugin, the
reproduction line printed on failure) goes through resolve_backend, so a name that is
unknown, a factory that does not return a capsspec.Backend, or a backend that cannot run here
stops the run with the reason. Nothing here ever falls back to another backend: testing the
reference against itself by accident is the failure this module exists to prevent.

What this module must never do: import a framework itself (the backend's own availability
check may), or choose a backend the user did not name.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

from capsspec.backend import Backend, BackendUnavailable
from capsspec.registry import backend_names, describe_backends, get_backend

__all__ = ["ENV_VAR", "SelectionError", "Selected", "resolve_backend", "backend_from_environment", "skipped_backends"]

ENV_VAR = "CAPSSPEC_BACKEND"


class SelectionError(ValueError):
    """The backend under test cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Selected:
    """The backend under test and the exact text that selects it again (for the reproduction line)."""

    spec: str
    device: str | None
    backend: Backend

    @property
    def name(self) -> str:
        return self.backend.name or self.spec


def _load_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SelectionError(f"backend {spec!r}: an import path must look like 'package.module:Factory'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise SelectionError(f"backend {spec!r}: cannot import module {module_name!r}: {exc!r}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SelectionError(f"backend {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise SelectionError(f"backend {spec!r}: {attr!r} is not callable (expected a Backend class or factory)")
    return obj


def resolve_backend(spec: str, device: str | None = None) -> Selected:
    """The backend that `spec` names ("numpy", "torch", ... or "module:attr"), ready to run.

    Raises SelectionError, with the reason, for an unknown name, a failing import, a factory
    that does not return a capsspec.Backend, or a backend that is unavailable here.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SelectionError(f"backend must be a non-empty name or 'module:attr', got {spec!r}")
    spec = spec.strip()
    if spec == "all":
        raise SelectionError("backend 'all' means one session per backend: run `capsspec conformance --backend all`")
    if ":" in spec:
        factory = _load_factory(spec)
        try:
            backend = factory(device=device) if device is not None else factory()
        except Exception as exc:
            raise SelectionError(f"backend {spec!r}: the factory raised {exc!r}") from exc
        if not isinstance(backend, Backend):
            raise SelectionError(
                f"backend {spec!r}: the factory returned {type(backend).__name__}, not a capsspec.Backend")
        try:
            backend.require_available()
        except BackendUnavailable as exc:
            raise SelectionError(str(exc)) from exc
        except Exception as exc:  # availability() must not raise; say so instead of crashing
            raise SelectionError(f"backend {spec!r}: availability() raised {exc!r}") from exc
        return Selected(spec, device, backend)
    try:
        backend = get_backend(spec, device=device)
    except (ValueError, BackendUnavailable) as exc:
        raise SelectionError(str(exc)) from exc
    except Exception as exc:
        raise SelectionError(f"backend {spec!r} could not be constructed: {exc!r}") from exc
    return Selected(spec, device, backend)


def backend_from_environment() -> str | None:
    """The backend named by $CAPSSPEC_BACKEND, or None."""
    value = os.environ.get(ENV_VAR, "").strip()
    return value or None


def skipped_backends() -> list[tuple[str, str]]:
    """(name, reason) for every known backend that cannot run here."""
    return [(row["name"], row["reason"] or "unavailable") for row in describe_backends() if not row["available"]]


def known_backend_names() -> list[str]:
    return backend_names()
