"""The conformance suite's command line: `capsspec conformance` and `python -m capsspec.conformance`.

    capsspec conformance --backend NAME [--profile ci|full|meta] [--device DEV] [-- PYTEST ARGS...]
    capsspec conformance --backend package.module:Factory     (a backend not registered yet)
    capsspec conformance --backend all                         (every available backend in turn)
    capsspec conformance --backend all --jobs 2                (two backends' suites at a time)
    capsspec conformance --op squash=mypkg.layers:squash --framework torch --layout "batch caps dim"
                                                               (a piece of your own CapsNet: own.py)

The backend is checked before any test runs: an unknown or unavailable one prints the reason and
exits with status 2. With `all`, the known backends that cannot run here are listed with the
reason, each available backend runs in its own pytest process (one session per backend, so no
state leaks between them), and the exit status is non-zero if any of them failed.
Arguments after `--` go to pytest unchanged (e.g. `-- -x -k routing`). A backend that names
environment variables for the ci profile (Backend.ci_environment: JAX's cheaper XLA compiler
settings) runs in a pytest process of its own with them added.

With --op (repeatable) the command holds a function of the user's own code to the reference
(own.check_op) instead of a backend: NAME=module:attr, the module imported from the current
directory or sys.path, attr a function or a class (instantiated with no arguments: an nn.Module,
a Keras layer). It prints each report and exits 0 if every piece passes, 1 if one fails, 2 for a
bad spec, a missing module or a non-callable (one line each).

What this module must never do: fall back to another backend than the one named.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any, NoReturn, Sequence

from capsspec.tools.args import int_in

from .profiles import PROFILES
from .selection import SelectionError, resolve_backend, skipped_backends

__all__ = ["main", "build_parser", "pytest_args", "environment", "run_suites"]


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line naming the flag (exit 2), never the whole usage; no abbreviated flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="capsspec conformance",
        description="Hold a backend, or a piece of your own CapsNet (--op), to the capsspec reference, forward "
                    "and backward, within stated tolerances.",
        epilog="Arguments after `--` are passed to pytest unchanged (with --backend).")
    p.add_argument("--backend", default=None, metavar="NAME",
                   help="a registered backend name, 'module:attr' (a factory returning a capsspec.Backend), or 'all'")
    p.add_argument("--profile", default="ci", choices=sorted(PROFILES),
                   help="example budget: ci (derandomised, minutes; the default), full (release checks), meta")
    p.add_argument("--device", default=None, help="device for the backend under test (e.g. cuda:0)")
    p.add_argument("--jobs", type=int_in(1, 64, "positive"), default=1, metavar="N",
                   help="with --backend all: run up to N backends' suites at once, each one's output printed whole "
                        "when it ends (default 1: one after another, output as it comes)")
    own = p.add_argument_group("your own CapsNet (docs/check-your-own.md)")
    own.add_argument("--op", action="append", default=[], metavar="PIECE=module:attr",
                     help="a piece of your code to check, e.g. squash=mypkg.layers:squash (repeatable); pieces: "
                          "squash, capsule_lengths, predictions, routing, margin_loss, mask, reconstruction_loss, "
                          "capsule_head")
    own.add_argument("--framework", default=None, help="torch, tensorflow (keras), jax or numpy (default: inferred)")
    own.add_argument("--layout", default=None, help='your axes, e.g. "batch caps dim" (default: the reference\'s)')
    own.add_argument("--dtype", action="append", default=None, choices=("float32", "float64"),
                     help="dtype to check (repeatable; default float32)")
    own.add_argument("--labels", default="index", choices=("index", "onehot"), help="labels your loss or mask takes")
    own.add_argument("--iterations", default="3",
                     help="routing: a fixed count, or the name of your function's keyword that takes it")
    own.add_argument("--outputs", type=int, default=0, help="routing: 1 if your function returns v alone")
    own.add_argument("--order", default="", help="your function's inputs in its order, e.g. labels,lengths")
    own.add_argument("--no-extremes", dest="extremes", action="store_false",
                     help="draw values within 1e-6..1e6 only (not the edges of the float range)")
    own.add_argument("--examples", type=int, default=None, help="draws per dtype (default: the profile's)")
    own.add_argument("--recipe", default=None, help="one draw only: the JSON a failure's reproduction line gives")
    whole = p.add_argument_group("your own whole model (docs/import-your-model.md; --framework as above)")
    whole.add_argument("--model", default=None, metavar="module:attr",
                       help="your model: an object, or a class or function that builds it without arguments (JAX: "
                            "one returning (apply, params))")
    whole.add_argument("--mapping", default=None, metavar="FILE",
                       help="the JSON or TOML file mapping your parameter names and layouts to the canonical ones")
    whole.add_argument("--input-layout", default=None, help='your model\'s input axes, e.g. "batch h w channels"')
    whole.add_argument("--model-outputs", default=None, metavar="NAMES",
                       help="what your model returns, in order, comma-separated (default: v,reconstruction)")
    whole.add_argument("--output-layout", action="append", default=[], metavar='NAME="AXES"',
                       help='an output\'s axes where they are not the reference\'s, e.g. v="batch classes dim 1" '
                            "(repeatable)")
    whole.add_argument("--loss", default=None, metavar="module:attr",
                       help="your loss(model, x, labels): with it the loss and every gradient are checked too")
    whole.add_argument("--draws", type=int, default=3, help="weight draws (default 3)")
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
    if sum(map(bool, (args.op, args.model, args.backend))) > 1:
        print("capsspec conformance: --backend, --op and --model are exclusive: check a backend, your own pieces "
              "or your own model", file=sys.stderr)
        return 2
    if args.op:
        return _run_own(args)
    if args.model:
        return _run_model(args)
    if args.backend is None:
        print("capsspec conformance: error: one of --backend NAME, --op PIECE=module:attr or --model module:attr is "
              "required; see `capsspec conformance --help`", file=sys.stderr)
        return 2
    if args.backend == "all":
        return _run_all(args.profile, args.device, extra, args.jobs)
    if args.jobs != 1:
        print("capsspec conformance: --jobs runs several backends at once: it needs --backend all", file=sys.stderr)
        return 2
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



def _run_all(profile: str, device: str | None, extra: Sequence[str], jobs: int = 1) -> int:
    from capsspec.registry import available_backends

    for name, reason in skipped_backends():
        print(f"capsspec conformance: skipping backend {name!r}: {reason}", flush=True)
    names = available_backends()
    if not names:
        print("capsspec conformance: no backend is available", file=sys.stderr)
        return 2
    runs: list[tuple[str, list[str], dict[str, str] | None]] = []
    inference_only: dict[str, str] = {}
    costs: dict[str, float] = {}
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
            costs[name] = float(getattr(b, "conformance_cost", 1.0))
            if not b.trains:
                inference_only[name] = ", ".join(b.required_names())
        except SelectionError:
            pass  # the pytest run below says why
        runs.append((name, [sys.executable, "-m", "pytest", *pytest_args(name, profile, device, extra)], env))
    # Several at once: the longest suites first (Backend.conformance_cost); the report keeps the names' order.
    order = sorted(runs, key=lambda run: -costs.get(run[0], 1.0)) if jobs > 1 else runs
    codes = run_suites(order, jobs)
    results = {name: codes[name] for name, _, _ in runs}
    print("\ncapsspec conformance: results")
    for name, code in results.items():
        status = "passed" if code == 0 else f"FAILED (pytest exit status {code})"
        if name in inference_only:
            status = (f"{status} ({inference_only[name]} only); training checks: not applicable "
                      f"(inference-only backend)")
        print(f"  {name:<12} {status}")
    return 0 if all(code == 0 for code in results.values()) else 1


def _print_finished(name: str, proc: subprocess.Popen, out: Any) -> int:
    """Print a finished suite's kept output under its heading; return its exit status."""
    print(f"\ncapsspec conformance: === backend {name!r} ===", flush=True)
    out.seek(0)
    sys.stdout.buffer.write(out.read())
    sys.stdout.flush()
    out.close()
    return proc.returncode


def run_suites(runs: Sequence[tuple[str, list[str], dict[str, str] | None]], jobs: int = 1) -> dict[str, int]:
    """Run each (name, command, environment) and return its exit status by name, in the order given.

    jobs 1: one after another, each one's output straight to this process's. More: up to `jobs` at once,
    each one's output (stdout and stderr together) kept in a temporary file and printed whole, under
    its heading, when it ends, so that the suites' lines never interleave. On a CPU whose cores a single
    suite leaves partly idle (Python between small kernels, compiling, starting up), two at once finish
    sooner than two in turn.
    """
    if jobs == 1:
        codes = {}
        for name, cmd, env in runs:
            print(f"\ncapsspec conformance: === backend {name!r} ===", flush=True)
            codes[name] = subprocess.call(cmd, env=env)
        return codes
    import signal
    import tempfile
    import time

    def stop(signum: int, frame: Any) -> None:  # a kill (scripts/test.sh's exit trap): the finally below runs
        raise SystemExit(128 + signum)

    waiting, running, codes = list(runs), [], {}
    previous = signal.signal(signal.SIGTERM, stop)
    with tempfile.TemporaryDirectory(prefix="capsspec-conformance-") as tmp:
        try:
            while waiting or running:
                while waiting and len(running) < jobs:
                    name, cmd, env = waiting.pop(0)
                    out = open(os.path.join(tmp, f"{len(codes) + len(running)}.log"), "w+b")
                    print(f"capsspec conformance: started backend {name!r}", flush=True)
                    running.append((name, subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), out))
                for item in [r for r in running if r[1].poll() is not None]:
                    running.remove(item)
                    codes[item[0]] = _print_finished(*item)
                time.sleep(0.2)
        finally:  # interrupted (Ctrl-C, a kill) or failed here: no suite is left running behind the command
            signal.signal(signal.SIGTERM, previous)
            for _, proc, out in running:
                proc.terminate()
                proc.wait()
                out.close()
    return {name: codes[name] for name, _, _ in runs}


# ---------------------------------------------------------------------------------------- your own pieces
def _load(spec: str) -> tuple[str, Any]:
    """(piece, callable) of an --op spec PIECE=module:attr; ValueError with one line otherwise."""
    piece, eq, target = spec.partition("=")
    module, colon, attr = target.partition(":")
    if not eq or not colon or not piece.strip() or not module.strip() or not attr.strip():
        raise ValueError(f"--op {spec!r}: expected PIECE=module:attr, e.g. squash=mypkg.layers:squash")
    obj = _import_object(target, f"--op {spec!r}", "squash=mypkg.layers:squash")
    if not callable(obj):
        raise ValueError(f"--op {spec!r}: {target.partition(':')[2].strip()} is not callable (a "
                         f"{type(obj).__name__}): name a function or a layer")
    return piece.strip(), obj


def _import_object(target: str, flag: str, example: str) -> Any:
    """The object module:attr names (a class: its instance made without arguments); ValueError in one line."""
    import importlib

    module, colon, attr = target.partition(":")
    if not colon or not module.strip() or not attr.strip():
        raise ValueError(f"{flag}: expected module:attr, e.g. {example}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the user's package, from where they run the command
    try:
        obj: Any = importlib.import_module(module.strip())
    except ImportError as exc:
        raise ValueError(f"{flag}: cannot import module {module.strip()!r}: {exc}") from None
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{flag}: module {module.strip()!r} has no attribute {attr.strip()!r}")
        obj = getattr(obj, part)
    if isinstance(obj, type):
        try:
            obj = obj()  # a layer or module class: its default instance
        except Exception as exc:
            raise ValueError(f"{flag}: cannot make {attr.strip()}() without arguments: {exc}") from None
    return obj


def _run_own(args: Any) -> int:
    """Check each --op; print the reports; 0 all passed, 1 one failed, 2 bad input."""
    import json

    from .own import check_op

    iterations: Any = int(args.iterations) if args.iterations.strip().isdigit() else args.iterations.strip()
    try:
        recipe = json.loads(args.recipe) if args.recipe else None
        pieces = [_load(spec) for spec in args.op]
        kwargs = dict(framework=args.framework, layout=args.layout, profile=args.profile,
                      dtypes=tuple(args.dtype or ("float32",)), labels=args.labels, iterations=iterations,
                      outputs=args.outputs, order=args.order, extremes=args.extremes,
                      max_examples=args.examples, recipe=recipe)
        failed = 0
        for piece, fn in pieces:
            report = check_op(piece, fn, **kwargs)
            print(report, flush=True)
            failed += not report.passed
    except json.JSONDecodeError as exc:
        print(f"capsspec conformance: --recipe is not JSON: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"capsspec conformance: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def _run_model(args: Any) -> int:
    """Check --model against the reference through --mapping; print the report; 0 passed, 1 failed, 2 bad input."""
    from .user_model import CANONICAL_INPUT_LAYOUT, check_model

    try:
        if not args.mapping:
            raise ValueError("--model needs --mapping FILE (your parameter names and layouts; docs/import-your-model.md)")
        model = _import_object(args.model, f"--model {args.model!r}", "mypkg.model:build_capsnet")
        if callable(model) and not _is_model(model):
            model = model()  # a factory function
        loss = _import_object(args.loss, f"--loss {args.loss!r}", "mypkg.train:loss") if args.loss else None
        outputs = tuple(n.strip() for n in args.model_outputs.split(",")) if args.model_outputs else (
            "v", "reconstruction")
        layouts = {}
        for spec in args.output_layout:
            name, eq, axes = spec.partition("=")
            if not eq or not name.strip() or not axes.strip():
                raise ValueError(f'--output-layout {spec!r}: expected NAME="AXES", e.g. v="batch classes dim 1"')
            layouts[name.strip()] = axes.strip().strip('"')
        report = check_model(model, args.mapping, framework=args.framework or "torch", loss=loss,
                             output_layouts=layouts,
                             input_layout=args.input_layout or CANONICAL_INPUT_LAYOUT, outputs=outputs,
                             draws=args.draws)
    except ValueError as exc:
        print(f"capsspec conformance: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(report, flush=True)
    return 0 if report.passed else 1


def _is_model(obj: Any) -> bool:
    """Whether obj is already a model (a torch module or Keras layer), not a function that builds one."""
    return any(c.__name__ in ("Module", "Layer") for c in type(obj).__mro__)
