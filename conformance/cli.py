"""The conformance suite's command line: `capsspec conformance` and `python -m capsspec.conformance`.

    capsspec conformance --backend NAME [--profile ci|full|meta] [--device DEV] [-- PYTEST ARGS...]
    capsspec conformance --backend package.module:Factory     (a backend not registered yet)
    capsspec conformance --backend all                         (every available backend in turn)

The backend is checked before any test runs: an unknown or unavailable one prints the reason and
exits with status 2. With `all`, the known backends that cannot run here are listed with the
reason, each available backend runs in its own pytest process (one session per backend, so no
state leaks between them), and the exit status is non-zero if any of them failed.
Arguments after `--` go to pytest unchanged (e.g. `-- -x -k routing`). A backend that names
environment variables for the ci profile (Backend.ci_environment: JAX's cheaper XLA compiler
settings) runs in a pytest process of its own with them added.

What this module must never do: fall back to another backend than the one named.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any, NoReturn, Sequence

from .profiles import PROFILES
from .selection import SelectionError, resolve_backend, skipped_backends

__all__ = ["main", "build_parser", "pytest_args", "environment"]


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line naming the flag (exit 2), never the whole usage; no abbreviated flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="capsspec conformance",
        description="Hold a backend to the capsspec reference, forward and backward, within stated tolerances.",
        epilog="Arguments after `--` are passed to pytest unchanged.")
    p.add_argument("--backend", required=True, metavar="NAME",
                   help="a registered backend name, 'module:attr' (a factory returning a capsspec.Backend), or 'all'")
    p.add_argument("--profile", default="ci", choices=sorted(PROFILES),
                   help="example budget: ci (derandomised, minutes; the default), full (release checks), meta")
    p.add_argument("--device", default=None, help="device for the backend under test (e.g. cuda:0)")
    return p


def pytest_args(backend: str, profile: str, device: str | None, extra: Sequence[str]) -> list[str]:
    """The pytest command line that runs the installed suite against one backend."""
    args = ["--pyargs", "capsspec.conformance", "-p", "capsspec.conformance.plugin", "--backend", backend,
            "--conformance-profile", profile, "-p", "no:cacheprovider"]
    if device is not None:
        args += ["--device", device]
    return args + list(extra)


def environment(backend: Any, profile: str) -> dict[str, str] | None:
    """The environment of the suite's process for this backend, or None to keep the current one."""
    extra = getattr(backend, "ci_environment", {}) if profile == "ci" else {}
    if not extra:
        return None
    env = dict(os.environ)
    for key, value in extra.items():
        env[key] = f"{env[key]} {value}" if env.get(key) else value
    return env


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns the exit status (0: every tested backend conforms)."""
    own, extra = _split(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args = parser.parse_args(own)
    except SystemExit as exc:  # argparse's usage error (2) or --help (0)
        return int(exc.code or 0)
    if args.backend == "all":
        return _run_all(args.profile, args.device, extra)
    try:
        selected = resolve_backend(args.backend, args.device)
    except SelectionError as exc:
        print(f"capsspec conformance: {exc}", file=sys.stderr)
        return 2
    env = environment(selected.backend, args.profile)
    if env is not None:
        return subprocess.call([sys.executable, "-m", "pytest", *pytest_args(args.backend, args.profile, args.device,
                                                                             extra)], env=env)
    import pytest

    return int(pytest.main(pytest_args(args.backend, args.profile, args.device, extra)))



def _run_all(profile: str, device: str | None, extra: Sequence[str]) -> int:
    from capsspec.registry import available_backends

    for name, reason in skipped_backends():
        print(f"capsspec conformance: skipping backend {name!r}: {reason}", flush=True)
    names = available_backends()
    if not names:
        print("capsspec conformance: no backend is available", file=sys.stderr)
        return 2
    results: dict[str, int] = {}
    inference_only: dict[str, str] = {}
    for name in names:
        if device is not None:
            try:
                resolve_backend(name, device)
            except SelectionError as exc:  # e.g. the numpy backend asked for a GPU
                print(f"capsspec conformance: skipping backend {name!r} on device {device!r}: {exc}", flush=True)
                continue
        env = None
        try:
            b = resolve_backend(name, device).backend
            env = environment(b, profile)
            if not b.trains:
                inference_only[name] = ", ".join(b.required_names())
        except SelectionError:
            pass  # the pytest run below says why
        print(f"\ncapsspec conformance: === backend {name!r} ===", flush=True)
        cmd = [sys.executable, "-m", "pytest", *pytest_args(name, profile, device, extra)]
        results[name] = subprocess.call(cmd, env=env)
    print("\ncapsspec conformance: results")
    for name, code in results.items():
        status = "passed" if code == 0 else f"FAILED (pytest exit status {code})"
        if name in inference_only:
            status = (f"{status} ({inference_only[name]} only); training checks: not applicable "
                      f"(inference-only backend)")
        print(f"  {name:<12} {status}")
    return 0 if all(code == 0 for code in results.values()) else 1
