"""Host memory on the CPU: keep freed arrays in the process for reuse, instead of handing each one
back to the operating system.

glibc's malloc serves every request over its mmap threshold (32 MiB at most) with a fresh mapping
and unmaps it when it is freed. A training step of the paper's model allocates and frees arrays of
up to 380 MB on every step (the PrimaryCaps im2col and its gradient, routing's (B, N, J, E)
tensors), so every step the kernel maps, zeroes and faults in about a gigabyte again, 4 KiB at a
time: on a 2-core x86 CPU that was a quarter of torch's training step (docs/performance.md).
Serving them from malloc's own heap and keeping what is freed there makes the next step reuse the
same pages. It moves no number: the arithmetic, and so the conformance suite's view of it, is
unchanged. The cost is that the process keeps its peak memory until it exits.

The command line (train, eval, figures, predict, export, bench) calls reuse_freed_memory() before
any work; CAPSSPEC_REUSE_FREED_MEMORY=0 in the environment turns it off. Only glibc (Linux) has
these settings; elsewhere it does nothing and says so. Nothing here imports a framework.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["reuse_freed_memory", "freed_memory_policy", "ENV_VAR"]

ENV_VAR = "CAPSSPEC_REUSE_FREED_MEMORY"

# mallopt's parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# mallopt takes an int: 2 GiB - 1 is the largest trim threshold it can be given. Free memory at the
# top of the heap beyond it still goes back to the system.
_TRIM_THRESHOLD = 2 ** 31 - 1

_policy = "system default (not changed by capsspec)"


def reuse_freed_memory() -> bool:
    """Make glibc's malloc serve large arrays from its heap and keep freed memory for reuse.

    Returns True where the setting took effect; False where it was turned off (CAPSSPEC_REUSE_FREED_MEMORY=0),
    where the C library is not glibc, or where glibc refused it. Safe to call more than once.
    """
    global _policy
    if os.environ.get(ENV_VAR, "1").strip() in ("0", "false", "no", "off"):
        _policy = f"system default ({ENV_VAR}=0)"
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _policy = "system default (not glibc: nothing to set)"
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _policy = "system default (mallopt not found)"
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) != 1:
        _policy = "system default (glibc refused mallopt)"
        return False
    _policy = "reused (glibc mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"
    return True


def freed_memory_policy() -> str:
    """What this process does with freed host memory, in words (for benchmark records)."""
    return _policy
