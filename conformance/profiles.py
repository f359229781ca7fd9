"""The suite's profiles: how many examples each kind of check draws, and Hypothesis's settings.

* ci   -- derandomised (the same examples on every run), no example database, no deadline,
          small budgets: one backend in a few minutes on two CPU cores.
* full -- random examples and budgets ~15x larger, for release checks.
* meta -- a handful of derandomised examples and no shrinking, for the tests of the tester (a
          broken backend must fail even this; shrinking its failure would only cost time).

The plugin calls activate() in pytest_configure, before any test module is imported, so the
settings that budget() builds at import time are the chosen profile's.

What this module must never do: write a Hypothesis database into the installed package.
"""

from __future__ import annotations

import os
from typing import Any, Callable

__all__ = ["PROFILES", "ENV_VAR", "activate", "active", "budget"]

ENV_VAR = "CAPSSPEC_CONFORMANCE_PROFILE"

PROFILES: dict[str, dict[str, int]] = {
    "ci": {"ops": 20, "model": 12, "optimizer": 8, "trajectory": 4, "properties": 12, "interchange": 3},
    "full": {"ops": 200, "model": 100, "optimizer": 60, "trajectory": 25, "properties": 100, "interchange": 10},
    "meta": {"ops": 6, "model": 5, "optimizer": 3, "trajectory": 2, "properties": 4, "interchange": 1},
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
    settings.register_profile(key, derandomize=name != "full", database=None, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.filter_too_much],
                              print_blob=False, max_examples=PROFILES[name]["ops"], phases=phases)
    return settings.get_profile(key)

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


def budget(kind: str) -> Callable[[Any], Any]:
    """A Hypothesis settings decorator with the active profile's example budget for `kind`."""
    from hypothesis import settings

    return settings(_settings(_active), max_examples=PROFILES[_active][kind])
