"""capsspec.training.host_memory: freed arrays stay in the process and the next one of the same size
reuses their pages, instead of faulting in fresh ones (the CLI turns this on; the environment turns
it off). Measured by the page faults a second allocation causes, in a fresh interpreter each time,
since the setting is process-wide."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocate, touch and free a 64 MiB array, then count the minor page faults that touching a second one
# of the same size causes (16,384 pages of 4 KiB if every page is new).
PROBE = """
import resource, sys, numpy as np
from capsspec.training.host_memory import reuse_freed_memory, freed_memory_policy
applied = reuse_freed_memory()
a = np.ones(16 * 2**20, np.float32); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(16 * 2**20, np.float32)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults, freed_memory_policy(), sep="|")
"""


def _probe(setting: str | None) -> tuple[bool, int, str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("CAPSSPEC_REUSE_FREED_MEMORY", None)
    if setting is not None:
        env["CAPSSPEC_REUSE_FREED_MEMORY"] = setting
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    applied, faults, policy = r.stdout.strip().split("|")
    return applied == "True", int(faults), policy


glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the setting exists in glibc only")


@glibc
def test_a_freed_array_s_pages_are_reused_by_the_next_one():
    applied, faults, policy = _probe(None)
    assert applied and policy.startswith("reused")
    # A fresh 64 MiB needs at least 32 faults even in 2 MiB huge pages; reused pages need none.
    assert faults < 16, f"{faults} page faults for a 64 MiB array the heap already held"


@glibc
def test_the_environment_turns_it_off_and_then_every_page_is_new():
    applied, faults, policy = _probe("0")
    assert not applied and policy == "system default (CAPSSPEC_REUSE_FREED_MEMORY=0)"
    # Without it glibc maps a fresh 64 MiB and faults in every page: 16,384 of 4 KiB, or at least 32
    # where transparent huge pages of 2 MiB cover it.
    assert faults >= 32
