"""The suite's profiles: how many examples each kind of check draws, and Hypothesis's settings.

* ci   -- derandomised (the same examples on every run, so a failing draw is drawn again by
          every run: nothing to keep), no deadline, small budgets: one backend in a few minutes on
          two CPU cores. For a backend that compiles per shape (Backend.compiles_per_shape: JAX),
          the sizes of each example come from a pool of four per recipe (strategies.py says
          which), while values, seeds and scales are drawn as for any backend, and `capsspec
          conformance` adds the backend's Backend.ci_environment (JAX: cheaper XLA code
          generation). Otherwise nearly every example is a new XLA compilation: JAX's run used
          884 CPU seconds and then crashed, against ~200 CPU seconds with both, on two cores.
* full -- random examples and budgets ~10x larger, for release checks. Every failing draw is kept
          in Hypothesis' example database (DATABASE_ENV_VAR, default ~/.cache/capsspec/
          conformance-examples) and replayed first by the next run; a draw worth keeping for
          good becomes an entry of regressions.py, run by every profile.
* meta -- a handful of derandomised examples and no shrinking, for the tests of the tester (a
          broken backend must fail even this; shrinking its failure would only cost time).

The plugin calls activate() in pytest_configure, before any test module is imported, so the
settings that budget() builds at import time are the chosen profile's.

What this module must never do: write a Hypothesis database into the installed package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["PROFILES", "ENV_VAR", "DATABASE_ENV_VAR", "database_path", "activate", "active", "budget", "pools_shapes"]

ENV_VAR = "CAPSSPEC_CONFORMANCE_PROFILE"
DATABASE_ENV_VAR = "CAPSSPEC_CONFORMANCE_DB"

PROFILES: dict[str, dict[str, int]] = {
    "ci": {"ops": 20, "model": 12, "optimizer": 8, "trajectory": 4, "properties": 12, "interchange": 3, "purity": 2},
    "full": {"ops": 200, "model": 100, "optimizer": 60, "trajectory": 25, "properties": 100, "interchange": 10,
             "purity": 10},
    "meta": {"ops": 6, "model": 5, "optimizer": 3, "trajectory": 2, "properties": 4, "interchange": 1, "purity": 1},
}



def _settings(name: str) -> Any:
    """Hypothesis settings of profile `name` (Hypothesis is imported here, not at module import, so
    that the command line can read PROFILES before pytest starts and rewrites assertions)."""
    from hypothesis import HealthCheck, Phase, settings

    key = f"capsspec-conformance-{name}"
    try:
        return settings.get_profile(key)
    except Exception:  # not registered yet in this process
        pass
    phases = (Phase.explicit, Phase.reuse, Phase.generate) if name == "meta" else tuple(Phase)
    database = None
    if name == "full":
        from hypothesis.database import DirectoryBasedExampleDatabase

        database = DirectoryBasedExampleDatabase(str(database_path()))
    settings.register_profile(key, derandomize=name != "full", database=database, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much],
                              print_blob=False, max_examples=PROFILES[name]["ops"], phases=phases)
    return settings.get_profile(key)

def database_path() -> Path:
    """Where the full profile keeps its failing draws (a user's cache, never the installed package)."""
    env = os.environ.get(DATABASE_ENV_VAR, "").strip()
    return Path(env) if env else Path.home() / ".cache" / "capsspec" / "conformance-examples"


_active = os.environ.get(ENV_VAR, "ci") if os.environ.get(ENV_VAR, "ci") in PROFILES else "ci"


def activate(name: str) -> None:
    """Make `name` the profile for the suite's tests in this process.

    Hypothesis's global default profile is left alone: budget() passes the profile explicitly, so
    running the suite inside another pytest session does not change that session's settings.
    """
    global _active
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {name!r}")
    _active = name


def active() -> str:
    return _active


def pools_shapes(profile: str, backend: Any) -> bool:
    """Whether `profile` draws sizes from the pools for `backend` (see the module docstring)."""
    return profile == "ci" and bool(getattr(backend, "compiles_per_shape", False))


def budget(kind: str) -> Callable[[Any], Any]:
    """A Hypothesis settings decorator with the active profile's example budget for `kind`."""
    from hypothesis import settings

    return settings(_settings(_active), max_examples=PROFILES[_active][kind])
