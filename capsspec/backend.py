"""The backend protocol: what a capsspec backend is, and the base class backends derive from.

A backend is an object with
  * ``name``, ``framework`` (the import name it needs) and ``install_hint``;
  * ``availability()`` -> Availability(available, reason, version, device), which must not
    raise, and ``is_available()``;
  * ``dtypes``: the float dtypes it supports ("float32", "float64");
  * conversions: ``asarray(np_array)`` / ``to_numpy(array)`` for arrays, and
    ``params_from_numpy(params, config)`` / ``params_to_numpy(params)`` for the canonical
    parameter dict, ``state_from_numpy`` / ``state_to_numpy`` for optimizer state. What a backend
    uses as "params" is its own business (a dict of arrays, an nn.Module, a tf.Module); callers
    only pass it back to the same backend or convert it;
  * every name in ``capsspec.spec.SPEC_NAMES`` with the reference's signature: the ops and their
    VJPs on the backend's arrays, forward / loss / value_and_grad / predict on its params, and
    adam_init / adam_update / train_step.

Backends subclass ``Backend`` and list the modules that implement the spec's names in
``impl_modules``; those modules are imported on first use, so constructing a backend or asking
for its availability never imports more than the availability check needs. Every name resolved
from them is put behind the door (capsspec.validation.guard): the implementations check
nothing, and a Backend is the door's adapter (capsspec.validation.ArrayAdapter: is this one of
my arrays, its dtype, shape and device, the host reads a value check needs). The defaults are
NumPy's. A backend that defers value checks on a device settles them at its next host read:
to_numpy, params_to_numpy, state_to_numpy and synchronize do so before anything else.
Importing this module imports no framework.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .config import CapsNetConfig
from .spec import INFERENCE_NAMES, SPEC_NAMES
from .validation import ArrayAdapter, guard

__all__ = ["Availability", "Backend", "BackendUnavailable"]


class BackendUnavailable(RuntimeError):
    """The backend exists but cannot run here (framework missing, no device). The message says why."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""  # why not, when not available
    version: str | None = None  # the framework's version, when importable
    device: str | None = None  # where it would run (e.g. "cpu", "cuda:0 (NVIDIA H100)")


# The host reads after which no deferred value check may stay pending (see the module docstring).
_HOST_READS = ("to_numpy", "params_to_numpy", "state_to_numpy", "synchronize")


def _settling(read: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(read)
    def settled_first(self: "Backend", *args: Any, **kwargs: Any) -> Any:
        self.settle_checks()
        return read(self, *args, **kwargs)

    settled_first.__capsspec_settles__ = True  # type: ignore[attr-defined]
    return settled_first


class Backend(ArrayAdapter):
    """Base class: lazy loading of the implementing modules behind the door, availability, plumbing."""

    name: str = ""
    framework: str | None = None  # import name of the framework, None for NumPy only
    install_hint: str = ""
    dtypes: tuple[str, ...] = ("float32", "float64")
    impl_modules: tuple[str, ...] = ()  # modules that define the spec's names, searched in order
    # Relative speed for choosing a default training backend (higher is faster).
    speed_rank: int = 0
    # False for an inference-only backend: it implements spec.INFERENCE_NAMES (and the
    # conversions of arrays and parameters) only, is never chosen for training, and the
    # conformance suite reports its training checks as not applicable, never as passed.
    trains: bool = True
    # True where every new shape or static argument costs a compilation (JAX under jax.jit): the
    # conformance suite's ci profile then draws sizes from small pools (conformance/strategies.py).
    compiles_per_shape: bool = False
    # Environment variables for the conformance suite's ci profile, which then runs the backend in
    # a process of its own; each value is appended (after a space) to one the user has set.
    ci_environment: Mapping[str, str] = {}
    # How long the conformance suite's ci profile runs on this backend, relative to the reference's (1):
    # `capsspec conformance --backend all --jobs N` starts the longest first, so that the short ones fill
    # in beside them instead of one long suite running alone at the end.
    conformance_cost: float = 1.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _HOST_READS:  # defined here or taken from a mixin (backend_kit.ModuleParams)
            read = getattr(cls, name)
            if not getattr(read, "__capsspec_settles__", False):
                setattr(cls, name, _settling(read))

    def __init__(self, device: str | None = None, **options: Any) -> None:
        if options:
            raise ValueError(f"backend {self.name!r} takes no options {sorted(options)}")
        self.device = device

    # ------------------------------------------------------------------------- availability
    def availability(self) -> Availability:
        """Whether this backend can run here, and if not, why. Never raises."""
        if self.framework is None:
            return Availability(True, version=np.__version__, device="cpu")
        mod, missing = self.import_framework()
        if missing is not None:
            return missing
        version = getattr(mod, "__version__", None)
        try:
            return self.device_availability(mod, version)
        except Exception as exc:  # a broken driver or runtime: say so rather than raise
            return Availability(False, f"{self.framework} {version} imports, but checking its device failed: {exc}",
                                version=version)

    def gpu_report(self, version: str | None, gpus: list[str], index: int | None, why_none: str,
                   name: str) -> Availability:
        """Availability said the same way by every GPU-capable backend: on the CPU (index None), with a
        note when GPUs are there; else GPU `index` among `gpus` (their names), named `name` if there."""
        label = f"{self.framework} {version}"
        if index is None:
            note = f" ({len(gpus)} GPU(s) available; pass device={name!r} to use one)" if gpus else ""
            return Availability(True, version=version, device="cpu" + note)
        if not gpus:
            return Availability(False, f"no GPU ({label} {why_none})", version=version)
        if index >= len(gpus):
            return Availability(False, f"no GPU {index} ({label} sees {len(gpus)})", version=version)
        return Availability(True, version=version, device=f"{name}:{index} ({gpus[index]})")

    def device_availability(self, framework: Any, version: str | None) -> Availability:
        """Whether the backend's device is there, once its framework imports (override for a GPU).

        It may raise: availability() turns an exception into a reason.
        """
        return Availability(True, version=version, device=self.device or "cpu")

    def import_framework(self) -> tuple[Any, Availability | None]:
        """(the framework's module, None), or (None, an Availability saying why it does not import).

        The first step of every availability(); never raises.
        """
        try:
            return importlib.import_module(str(self.framework)), None
        except Exception as exc:  # ImportError, or a broken install raising something else
            return None, Availability(False, f"{self.framework} is not importable ({exc}); install it with: "
                                             f"{self.install_hint}")

    def is_available(self) -> bool:
        return self.availability().available

    def require_available(self) -> None:
        a = self.availability()
        if not a.available:
            raise BackendUnavailable(f"backend {self.name!r} is unavailable: {a.reason}")

    # ------------------------------------------------------------------------- spec names
    def __getattr__(self, attr: str) -> Callable[..., Any]:
        # Only reached when normal lookup fails: resolve the spec's names from impl_modules.
        if attr.startswith("_") or attr not in SPEC_NAMES:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {attr!r}")
        for fn in self._implementations():
            if attr in fn:
                checked = guard(attr, fn[attr], self)
                # Resolved once; later lookups never come here. Not where the class defines the name
                # itself (a subclass wrapping the implementation, which it reaches by calling this
                # method directly): an instance entry would shadow the subclass's method.
                if not hasattr(type(self), attr):
                    self.__dict__[attr] = checked
                return checked
        raise AttributeError(f"backend {self.name!r} does not implement the spec's {attr!r}")

    def _implementations(self) -> list[Mapping[str, Any]]:
        cache = self.__dict__.get("_impl_cache")
        if cache is None:
            self.require_available()
            cache = [vars(importlib.import_module(m)) for m in self.impl_modules]
            self.__dict__["_impl_cache"] = cache
        return cache

    def required_names(self) -> tuple[str, ...]:
        """The spec names this backend must provide: all of them, or INFERENCE_NAMES if it does not train."""
        return SPEC_NAMES if self.trains else INFERENCE_NAMES

    def missing_names(self) -> list[str]:
        """Spec names this backend must provide but does not (empty for a complete backend)."""
        return [n for n in self.required_names() if not _has(self, n)]

    # ------------------------------------------------------------------------- conversions
    def asarray(self, a: np.ndarray) -> Any:
        raise NotImplementedError

    def to_numpy(self, a: Any) -> np.ndarray:
        raise NotImplementedError

    def params_from_numpy(self, params: Mapping[str, np.ndarray], config: CapsNetConfig) -> Any:
        raise NotImplementedError

    def params_to_numpy(self, params: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def state_from_numpy(self, state: Mapping[str, Any], params: Any) -> Any:
        """Optimizer state from {"step", "m", "v"} of NumPy arrays, for these (native) params."""
        raise NotImplementedError

    def state_to_numpy(self, state: Any) -> dict[str, Any]:
        raise NotImplementedError

    def default_device(self) -> str | None:
        """The device a run should use when the user names none (None: the backend's own default).

        A training run asks this rather than importing a framework itself; a backend with a
        faster device that it does not pick silently for array work (torch's CUDA) says so here.
        """
        return None

    def synchronize(self) -> None:
        """Wait for queued device work (for timing). A no-op where work is synchronous."""

    def peak_memory_bytes(self) -> int | None:
        """Peak device memory this process allocated through the backend, if it can tell (else None)."""
        return None

    def clear_compiled(self) -> None:
        """Release the programs the backend has compiled and keeps (a no-op where it keeps none)."""

    def __repr__(self) -> str:
        dev = f", device={self.device!r}" if self.device else ""
        return f"<capsspec backend {self.name!r}{dev}>"


def _has(obj: Any, name: str) -> bool:
    try:
        getattr(obj, name)
        return True
    except AttributeError:
        return False


for _name in _HOST_READS:  # the base class's own reads settle too (a subclass may inherit them)
    setattr(Backend, _name, _settling(getattr(Backend, _name)))
