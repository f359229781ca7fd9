"""`capsspec gpu-check`: one prepared command that turns a few minutes of a CUDA GPU into verified facts.

    python -m capsspec.tools.gpucheck --out DIR [--budget-seconds 540] [--data-dir MNIST] [--rehearsal]
    capsspec gpu-check --out DIR ...                                   (the same command)

In order, each step a subprocess of the capsspec command line with its own timeout:
  1. `capsspec backends --json`, the device (nvidia-smi), and a probe of every target's availability;
  2. `capsspec data --no-download`: the MNIST files are there and verified;
  3. the conformance suite, ci profile, float32 and then float64, on every GPU target: cupy, torch on
     cuda, torch on cuda with the fast path, and jax when `capsspec backends` lists it on a GPU;
  4. `capsspec bench` on each target (paper model, batch 128);
  5. a short real-MNIST training on each (2 epochs of the paper model, or as many images as the time
     left allows, sized from the bench figures): test accuracy and seconds per epoch;
  6. where time remains, the paper's headline run (3 routing iterations, decoder, batch 128) for as
     many epochs as fit, resumed from --paper-dir by the next call (train's --resume).

The budget (--budget-seconds) is never exceeded: every step's timeout is what is left less the
minimums the later steps need, split fairly between the targets of a phase and capped per step; a
step that runs past it is killed (its whole process group), a step that does not fit is skipped
with the reason. DIR ends up holding report.json (every figure, the
versions, the device, what passed, failed, timed out or was skipped, and why) and logs.tar.gz (one
log per step, each cut to a few MiB): two files, each under 16 MiB. The report is rewritten after
every step, so even a check killed from outside leaves one. Exit status 1 when any check failed
(a test failed, a command crashed, a GPU target is not available), 2 for a usage error, else 0;
a step that timed out without a failure, or was skipped, is listed but fails nothing. Stopped from
outside (SIGTERM, SIGHUP, Ctrl-C), it kills the running step, writes the report and exits with 130.

--rehearsal runs the same sequence on the CPU backends (numpy, torch on the CPU) with small
configs (the meta conformance profile on a few checks, a tiny bench, a few training steps on a
subset), so that the plumbing, the report and the budget handling are proven without a GPU.

This module plans the steps and runs the phases; capsspec.tools.step_runner runs each step (a
subprocess within the budget), capsspec.tools.step_parsers reads the steps' outputs, and
capsspec.tools.check_report writes what the check leaves in DIR.

This module imports no framework: the frameworks are imported by the steps' own processes
(`--probe`, the hidden mode that reports availability, runs in one of them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..training.atomic_files import atomic_write_text
from .args import OneLineParser, check_out_folder, finite_float
from .check_report import (LOGS_NAME, PARAMS_NAME, REPORT_NAME, bring_back_params, bundle_logs, clear_out,
                           report_head, write_report)
from .step_parsers import json_objects, parse_bench, parse_conformance, read_epoch_rows, training_figures
from .step_runner import Interrupted, Runner, StepResult, raise_interrupted

__all__ = ["Target", "GPU_TARGETS", "REHEARSAL_TARGETS", "run_check", "torch_fast", "main", "DEFAULT_BUDGET_S"]

DEFAULT_BUDGET_S = 540.0
PAPER_EPOCHS = 50  # the headline run's length (train's default)


# ===================================================================================== targets
@dataclass(frozen=True)
class Target:
    """One backend configuration the check holds to the spec, and how each command selects it."""

    name: str  # in step names and the report: "torch-cuda-fast"
    backend: str  # registry name
    device: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # backend constructor options
    conformance_backend: str | None = None  # what `conformance --backend` gets (default: backend)
    conformance_focus: str | None = None  # a -k expression: the checks where this target differs from another

    def probe_spec(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "device": self.device, "options": self.options}

    def conformance_flags(self) -> list[str]:
        flags = ["--backend", self.conformance_backend or self.backend]
        return flags + (["--device", self.device] if self.device else [])

    def bench_flags(self) -> list[str]:
        flags = ["--backend", self.backend] + (["--device", self.device] if self.device else [])
        return flags + (["--fast"] if self.options.get("fast") else [])

    def train_flags(self) -> list[str]:
        flags = ["--backend", self.backend] + (["--device", self.device] if self.device else [])
        for key, value in self.options.items():
            flags += ["--backend-option", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
        return flags


def torch_fast(device: str | None = None) -> Any:
    """The torch backend with its CUDA fast path: a factory for `capsspec conformance --backend
    capsspec.tools.gpucheck:torch_fast` (the suite selects backends by name or factory, not by option)."""
    from ..registry import get_backend

    return get_backend("torch", device=device or "cuda", check=False, fast=True)


GPU_TARGETS: tuple[Target, ...] = (
    Target("cupy", "cupy"),
    Target("torch-cuda", "torch", "cuda"),
    # The fast path changes the model's layout (channels-last) and train_step (compiled); the ops are the
    # same functions on the same device as torch-cuda's, so its time goes to the model and optimizer checks
    # (pytest runs the files in order, and test_optim.py would come after the ops in a cut-short run).
    Target("torch-cuda-fast", "torch", "cuda", {"fast": True}, conformance_backend="capsspec.tools.gpucheck:torch_fast",
           conformance_focus="test_optim or test_model or test_interchange"),
)
JAX_GPU_TARGET = Target("jax-gpu", "jax")  # joins when `capsspec backends` lists jax on a GPU
REHEARSAL_TARGETS: tuple[Target, ...] = (Target("numpy", "numpy"), Target("torch-cpu", "torch", "cpu"))
PHASES = ("backends", "data", "conformance", "bench", "train", "headline")  # in the order they run
DTYPES = ("float32", "float64")  # of the conformance runs, in order
# Headline backend preference when bench figures cannot decide.
_HEADLINE_ORDER = ("torch-cuda-fast", "torch-cuda", "cupy", "jax-gpu", "torch-cpu", "numpy")


@dataclass(frozen=True)
class Profile:
    """The sizes of one mode: per-step caps and minimums (seconds), and the commands' small configs."""

    conformance_profile: str
    conformance_filter: str | None  # ANDed to the dtype selection (-k)
    bench_flags: tuple[str, ...]
    train_epochs: int
    train_flags: tuple[str, ...]  # model/data flags of the short training (and of the headline in a rehearsal)
    full_train_images: int  # training images left after the validation hold-out, for sizing
    headline_flags: tuple[str, ...]
    caps: dict[str, float]  # the most one step of each kind may take
    mins: dict[str, float]  # the least it needs (below that it is skipped); the headline needs an epoch
    overhead_s: float  # a training process's start (imports, MNIST) when no bench wall time says better
    reserve_s: float  # kept for writing the report and the logs bundle
    download: bool  # whether `capsspec data` may fetch MNIST (never on the GPU machine: it has no internet)


GPU_PROFILE = Profile(
    conformance_profile="ci", conformance_filter=None, bench_flags=("--batch-size", "128"), train_epochs=2,
    train_flags=(), full_train_images=55_000, headline_flags=(),
    caps={"backends": 60, "device": 20, "probe": 120, "data": 60, "conformance": 75, "bench": 120, "train": 150,
          "headline": 1e9},
    # What each step takes at the least (imports, CUDA start, a compile): they add up to 470 s, so the
    # default budget holds every step's minimum, and a smaller one runs the first steps and skips the rest.
    mins={"backends": 20, "device": 5, "probe": 30, "data": 10, "conformance": 30, "bench": 30, "train": 45},
    overhead_s=20.0, reserve_s=5.0, download=False)

_TINY_MODEL = ("--conv1-channels", "8", "--primary-types", "2", "--primary-dim", "4", "--batch-size", "32",
               "--val-size", "64", "--train-subset", "128", "--test-subset", "128", "--eval-batch-size", "128")
REHEARSAL_PROFILE = Profile(
    conformance_profile="meta", conformance_filter="test_op_forward and squash",
    bench_flags=("--batch-size", "4", "--steps", "1", "--warmup", "0", "--matmul-size", "64",
                 "--routing-iterations", "1", "--no-decoder"),
    train_epochs=1, train_flags=_TINY_MODEL, full_train_images=128, headline_flags=_TINY_MODEL,
    # Generous caps: a rehearsal takes about a minute of CPU, but a loaded CI machine may stretch a step.
    caps={"backends": 90, "device": 10, "probe": 90, "data": 90, "conformance": 90, "bench": 90, "train": 90,
          "headline": 90},
    mins={"backends": 1, "device": 1, "probe": 1, "data": 1, "conformance": 1, "bench": 1, "train": 1},
    overhead_s=5.0, reserve_s=2.0, download=True)


# ===================================================================================== probe
def probe(specs: list[dict[str, Any]]) -> dict[str, Any]:
    """(Runs in a step's own process.) Each target's availability, and what torch and cupy see of CUDA."""
    from ..registry import get_backend

    out: dict[str, Any] = {"targets": {}, "cuda": {}}
    for s in specs:
        try:
            b = get_backend(s["backend"], device=s.get("device"), check=False, **(s.get("options") or {}))
            a = b.availability()
            out["targets"][s["name"]] = {"available": a.available, "reason": a.reason, "version": a.version,
                                         "device": a.device}
        except Exception as exc:
            out["targets"][s["name"]] = {"available": False, "reason": f"{type(exc).__name__}: {exc}",
                                         "version": None, "device": None}
    try:
        import torch

        info: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                                "available": bool(torch.cuda.is_available())}
        if info["available"]:
            p = torch.cuda.get_device_properties(0)
            info.update({"name": p.name, "total_memory_bytes": int(p.total_memory),
                         "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                         "device_count": torch.cuda.device_count(),
                         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None})
        out["cuda"]["torch"] = info
    except Exception as exc:
        out["cuda"]["torch"] = {"error": f"{type(exc).__name__}: {exc}"}
    if any(s["backend"] == "cupy" for s in specs):
        try:
            import cupy

            out["cuda"]["cupy"] = {"runtime": cupy.cuda.runtime.runtimeGetVersion(),
                                   "driver": cupy.cuda.runtime.driverGetVersion()}
        except Exception as exc:
            out["cuda"]["cupy"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


# ===================================================================================== the check
def _checkout_root() -> Path | None:
    """The repository holding this capsspec when it runs from a checkout (None when installed)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "backends").is_dir() else None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"})
    root = _checkout_root()
    if root is not None:  # the steps run the same capsspec as this process, installed or not
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in parts if Path(p).resolve() != root])
    return env


def default_launcher() -> list[str]:
    """How a step starts the capsspec command line: this interpreter, with -S if this process has it."""
    return [sys.executable, *(["-S"] if sys.flags.no_site else []), "-m", "capsspec"]


def _nvidia_smi(runner: Runner, report: dict[str, Any], profile: Profile, gpu: bool) -> None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        why = "nvidia-smi is not on PATH" + ("; the device is read from torch.cuda in the probe" if gpu else
                                             " (a rehearsal on the CPU)")
        runner.skip("device", "backends", why)
        return

    def parse(result: StepResult, text: str) -> None:
        keys = ("name", "driver_version", "memory_total_mib", "memory_used_mib")
        gpus = []
        for line in text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == len(keys) and not line.startswith("$"):
                gpus.append(dict(zip(keys, parts)))
        result.figures["gpus"] = gpus
        report["device"] = gpus
        if not gpus and result.status == "passed":
            result.status, result.reason = "failed", "nvidia-smi listed no GPU"

    runner.run("device", "backends", [exe, "--query-gpu=name,driver_version,memory.total,memory.used",
                                       "--format=csv,noheader,nounits"],
               cap=profile.caps["device"], min_s=profile.mins["device"], parse=parse)


def _target_ok(runner: Runner, target: str) -> str | None:
    """Why target's later steps should not run (it is unavailable), or None."""
    for r in runner.results:
        if r.target == target and r.phase == "probe" and r.status != "passed":
            return f"target {target} is not available ({r.reason})" if r.status == "failed" else r.reason
    return None


def _step_seconds(runner: Runner, name: str) -> float | None:
    r = next((r for r in runner.results if r.name == name), None)
    return r.seconds if r is not None and r.status == "passed" else None


def _figures(runner: Runner, name: str) -> dict[str, Any]:
    r = next((r for r in runner.results if r.name == name), None)
    return r.figures if r is not None else {}


def run_check(out: Path, *, budget_s: float = DEFAULT_BUDGET_S, data_dir: str | None = None, rehearsal: bool = False,
              paper_dir: Path | None = None, targets: Sequence[str] | None = None,
              phases: Sequence[str] | None = None, launcher: Sequence[str] | None = None,
              profile: Profile | None = None, keep_params: bool = False) -> int:
    """Run the check into `out`; returns the exit status (see the module docstring)."""
    profile = profile or (REHEARSAL_PROFILE if rehearsal else GPU_PROFILE)
    chosen = _choose_targets(list(REHEARSAL_TARGETS if rehearsal else GPU_TARGETS), targets, rehearsal)
    # The steps run in a folder of their own: every path they get is absolute.
    out = Path(out).absolute()
    data_dir = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None
    clear_out(out)
    launcher = list(launcher or default_launcher())
    # The short trainings' runs (checkpoints of ~99 MB for the paper model) live outside `out`, which
    # must hold only what comes back, and go at the end.
    work = Path(tempfile.mkdtemp(prefix="capsspec-gpucheck-"))
    paper = Path(paper_dir).expanduser().absolute() if paper_dir is not None else out / "paper"
    phases = list(phases or PHASES)
    # The reserve covers the report, the logs bundle and, when asked, cutting the parameters into parts.
    runner = Runner(out, budget_s, profile.reserve_s + (10.0 if keep_params else 0.0), env=_child_env(), cwd=work)
    report = report_head(rehearsal, budget_s, data_dir, paper, _checkout_root())
    runner.on_step = lambda: write_report(out, report, runner)
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        handlers = {sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    interrupted = None
    try:
        _plan_and_run(runner, report, profile, launcher, chosen, phases, data_dir, paper, work, rehearsal)
        if keep_params:
            from ..training.checkpoint import CHECKPOINT_NAME

            if (paper / CHECKPOINT_NAME).is_file():
                report["paper_params"] = bring_back_params(paper, out, work=work)
            else:
                report["paper_params"] = f"--keep-params: {paper / CHECKPOINT_NAME} does not exist"
    except (KeyboardInterrupt, Interrupted) as exc:  # stopped from outside: the step was killed; say what ran
        interrupted = str(exc) or type(exc).__name__
        report["interrupted"] = interrupted
        for name in list(runner.pending):
            runner.skip(name, runner.pending[name][0] or name, f"not reached: gpu-check was stopped ({interrupted})")
    except Exception as exc:  # a bug of the check itself: say so in the report, and fail
        import traceback

        traceback.print_exc()
        for name in list(runner.pending):
            runner.skip(name, runner.pending[name][0] or name, f"not reached: gpu-check stopped ({exc!r})")
        runner.fail("gpu-check", "internal", f"gpu-check itself failed: {type(exc).__name__}: {exc}")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        runner.pending.clear()
        shutil.rmtree(work, ignore_errors=True)
        write_report(out, report, runner, final=True)
        bundle_logs(out)
        report["logs"] = LOGS_NAME
        write_report(out, report, runner, final=True)
    s = report["summary"]
    print(f"[gpu-check] {s['passed']} passed, {s['failed']} failed, {s['timed_out']} timed out, {s['skipped']} skipped "
          f"in {report['elapsed_seconds']:.0f}s of {budget_s:.0f}s; report: {out / REPORT_NAME}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if s["failed"] else 0


def _choose_targets(all_targets: list[Target], names: Sequence[str] | None, rehearsal: bool) -> list[Target]:
    if not names:
        return all_targets
    known = {t.name: t for t in [*all_targets, *([] if rehearsal else [JAX_GPU_TARGET])]}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--targets: unknown target(s) {unknown}; known: {', '.join(known)}")
    return [known[n] for n in names]


def _plan_and_run(runner: Runner, report: dict[str, Any], profile: Profile, launcher: list[str],
                  targets: list[Target], phases: list[str], data_dir: str | None, paper: Path, work: Path,
                  rehearsal: bool) -> None:
    """Every step planned, then the chosen phases in order (see the module docstring)."""
    data_flags = ["--data-dir", data_dir] if data_dir else []
    _plan(runner, profile, targets, phases)
    if "backends" in phases:
        _backends_phase(runner, report, profile, launcher, targets, phases, rehearsal)
    report["targets"] = [t.probe_spec() for t in targets]
    data_ok = True
    if "data" in phases:
        data_ok = _data_phase(runner, profile, launcher, data_flags)
    if "conformance" in phases:
        _conformance_phase(runner, profile, launcher, targets)
    if "bench" in phases:
        _bench_phase(runner, profile, launcher, targets)
    if "train" in phases:
        _train_phase(runner, profile, launcher, targets, data_flags, data_ok, work)
    if "headline" in phases:
        _headline(runner, report, profile, launcher, targets, data_flags, data_ok, paper, rehearsal)


def _plan(runner: Runner, profile: Profile, targets: list[Target], phases: list[str]) -> None:
    """Every step still to come, in order, with its minimum (steps already run are not planned again)."""
    mins = profile.mins
    names: list[tuple[str, float, str]] = []
    if "backends" in phases:
        names += [(n, mins[n], n) for n in ("backends", "device", "probe")]
        names += [(f"probe-{t.name}", 0.0, "availability") for t in targets]  # records of the probe's answer
    if "data" in phases:
        names.append(("data", mins["data"], "data"))
    for phase in ("conformance", "bench", "train"):
        if phase in phases:
            for t in targets:
                for name in ([f"conformance-{t.name}-{d}" for d in DTYPES] if phase == "conformance"
                             else [f"{phase}-{t.name}"]):
                    names.append((name, mins[phase], phase))
    if "headline" in phases:
        names.append(("headline", 0.0, "headline"))  # "where budget remains": it holds back nothing
    done = {r.name for r in runner.results}
    runner.pending.clear()
    for name, m, phase in names:
        if name not in done:
            runner.plan(name, m, phase)


def _backends_phase(runner: Runner, report: dict[str, Any], profile: Profile, launcher: list[str],
                    targets: list[Target], phases: list[str], rehearsal: bool) -> None:
    """1. `capsspec backends --json`, the device, jax when it is on a GPU, and the targets' availability."""
    def parse_backends(result: StepResult, text: str) -> None:
        body = text.split("\n", 1)[1] if text.startswith("$ ") else text
        start = body.find("[")
        rows = json.loads(body[start:body.rfind("]") + 1]) if start >= 0 else []
        result.figures["backends"] = rows
        report["backends"] = rows

    runner.run("backends", "backends", [*launcher, "backends", "--json"], cap=profile.caps["backends"],
               min_s=profile.mins["backends"], parse=parse_backends)
    _nvidia_smi(runner, report, profile, gpu=not rehearsal)
    if not rehearsal:
        _jax_on_gpu(runner, report, profile, targets, phases)
    _probe_targets(runner, report, profile, launcher, targets)


def _jax_on_gpu(runner: Runner, report: dict[str, Any], profile: Profile, targets: list[Target],
                phases: list[str]) -> None:
    """jax joins the targets (and the plan) when `capsspec backends` lists it on a GPU; the report says why or why not."""
    jax = {r["name"]: r for r in report.get("backends") or []}.get("jax")
    if jax is None:
        report["jax"] = "not included: `capsspec backends` lists no jax backend"
    elif JAX_GPU_TARGET not in targets:
        on_gpu = jax.get("available") and re.search(r"gpu|cuda", str(jax.get("device")), re.I)
        if on_gpu:
            targets.append(JAX_GPU_TARGET)
            _plan(runner, profile, targets, phases)
        where = f"on {jax.get('device')}" if jax.get("available") else f"unavailable: {jax.get('reason')}"
        report["jax"] = f"{'included' if on_gpu else 'not included'}: `capsspec backends` lists jax {where}"


def _probe_targets(runner: Runner, report: dict[str, Any], profile: Profile, launcher: list[str],
                   targets: list[Target]) -> None:
    """The probe (a step of its own process) and one probe-<target> record per target of what it saw."""
    def parse_probe(result: StepResult, text: str) -> None:
        objs = [o for o in json_objects(text) if "targets" in o]
        if not objs:
            raise ValueError("the probe printed no JSON")
        result.figures.update(objs[-1])
        report["cuda"] = objs[-1].get("cuda")

    specs = json.dumps([t.probe_spec() for t in targets])
    pr = runner.run("probe", "backends", [*launcher, "gpu-check", "--probe", specs], cap=profile.caps["probe"],
                    min_s=profile.mins["probe"], parse=parse_probe)
    seen = pr.figures.get("targets", {})
    for t in targets:
        a = seen.get(t.name)
        if a is None and pr.status in ("skipped", "timed_out"):
            runner.skip(f"probe-{t.name}", "probe", f"not probed (the probe {pr.status.replace('_', ' ')}: "
                                                     f"{pr.reason})", target=t.name)
        elif a is None:
            runner.fail(f"probe-{t.name}", "probe", f"the probe did not report it ({pr.status}: {pr.reason})",
                        target=t.name)
        elif a.get("available"):
            runner.record(StepResult(f"probe-{t.name}", "probe", "passed", target=t.name, figures=a))
        else:
            runner.fail(f"probe-{t.name}", "probe", f"unavailable: {a.get('reason')}", target=t.name, figures=a)


def _data_phase(runner: Runner, profile: Profile, launcher: list[str], data_flags: list[str]) -> bool:
    """2. `capsspec data`: whether MNIST is there and verified (the trainings need it)."""
    r = runner.run("data", "data", [*launcher, "data", *data_flags, *([] if profile.download else ["--no-download"])],
                   cap=profile.caps["data"], min_s=profile.mins["data"])
    return r.status == "passed"


def _conformance_phase(runner: Runner, profile: Profile, launcher: list[str], targets: list[Target]) -> None:
    """3. The conformance suite on each target, float32 then float64."""
    for t in targets:
        for d in DTYPES:
            name = f"conformance-{t.name}-{d}"
            why = _target_ok(runner, t.name)
            if why:
                runner.skip(name, "conformance", why, target=t.name, dtype=d)
                continue
            select = "not float64" if d == "float32" else "float64"  # float32 also takes the dtype-free checks
            for focus in (t.conformance_focus, profile.conformance_filter):
                if focus:
                    select = f"({select}) and ({focus})"
            argv = [*launcher, "conformance", *t.conformance_flags(), "--profile", profile.conformance_profile,
                    "--", "-v", "-rfE", "-k", select]
            runner.run(name, "conformance", argv, cap=profile.caps["conformance"], min_s=profile.mins["conformance"],
                       parse=parse_conformance, target=t.name, dtype=d)


def _bench_phase(runner: Runner, profile: Profile, launcher: list[str], targets: list[Target]) -> None:
    """4. `capsspec bench` on each target."""
    for t in targets:
        name = f"bench-{t.name}"
        why = _target_ok(runner, t.name)
        if why:
            runner.skip(name, "bench", why, target=t.name)
            continue
        runner.run(name, "bench", [*launcher, "bench", *t.bench_flags(), *profile.bench_flags, "--json", "-"],
                   cap=profile.caps["bench"], min_s=profile.mins["bench"], parse=parse_bench, target=t.name)


def _train_phase(runner: Runner, profile: Profile, launcher: list[str], targets: list[Target], data_flags: list[str],
                 data_ok: bool, work: Path) -> None:
    """5. A short training on each target, sized to its share of the time from the bench figures."""
    for t in targets:
        name = f"train-{t.name}"
        why = _target_ok(runner, t.name) or (None if data_ok else "MNIST was not verified (see the data step)")
        if why:
            runner.skip(name, "train", why, target=t.name)
            continue
        allowed = runner.allowance(name, profile.caps["train"])
        flags, note = _short_training_flags(runner, profile, t, allowed)
        if flags is None:
            runner.skip(name, "train", note, target=t.name)
            continue
        run_dir = work / name
        argv = [*launcher, "train", *t.train_flags(), *flags, *data_flags, "--out", str(run_dir), "--quiet"]

        def parse_train(result: StepResult, text: str, run_dir: Path = run_dir, note: str = note) -> None:
            result.figures.update(training_figures(run_dir))
            result.figures["sizing"] = note
            if result.status == "passed" and result.figures.get("test_accuracy") is None:
                result.status, result.reason = "failed", "the run reported no test accuracy"

        runner.run(name, "train", argv, cap=profile.caps["train"], min_s=profile.mins["train"], parse=parse_train,
                   target=t.name)


def _short_training_flags(runner: Runner, profile: Profile, t: Target, allowed: float) -> tuple[list[str] | None, str]:
    """The short training's flags, sized to `allowed` seconds from the bench figures; (None, why) if it cannot fit."""
    epochs = profile.train_epochs
    flags = [*profile.train_flags, "--epochs", str(epochs)]
    if profile.train_flags:  # a rehearsal's small config: nothing to size
        return flags, f"{epochs} epoch(s) of the rehearsal's small config"
    bench = _figures(runner, f"bench-{t.name}")
    ips, infer = bench.get("train_images_per_second"), bench.get("inference_images_per_second")
    if not ips or not infer:
        return flags, f"{epochs} epochs of the paper model on all {profile.full_train_images} images (no bench " \
                      f"figures to size it by; the step's timeout bounds it)"
    overhead = max(profile.overhead_s, _step_seconds(runner, f"bench-{t.name}") or 0.0)
    eval_s = 15_000 / infer  # validation and test, each epoch
    per_epoch_budget = (allowed - overhead) / epochs - eval_s
    n = int(min(profile.full_train_images, 0.8 * per_epoch_budget * ips))
    if n < 1280:
        return None, (f"out of budget: {allowed:.0f}s allowed; at {ips:.0f} images/s with ~{overhead:.0f}s to start "
                      f"and {eval_s:.0f}s to evaluate, {epochs} epochs would cover only {max(n, 0)} images")
    if n < profile.full_train_images:
        flags += ["--train-subset", str(n)]
        return flags, (f"{epochs} epochs on {n} of {profile.full_train_images} images: what fits {allowed:.0f}s at the "
                       f"bench's {ips:.0f} images/s")
    return flags, f"{epochs} epochs of the paper model on all {n} images"


def _headline(runner: Runner, report: dict[str, Any], profile: Profile, launcher: list[str], targets: list[Target],
              data_flags: list[str], data_ok: bool, paper: Path, rehearsal: bool) -> None:
    """6. Continue (or start) the paper's run in `paper` for as many epochs as the time left allows."""
    from ..training.checkpoint import CHECKPOINT_NAME, read_metadata

    name = "headline"
    if not data_ok:
        runner.skip(name, "headline", "MNIST was not verified (see the data step)")
        return
    ckpt = paper / CHECKPOINT_NAME
    done = 0
    if ckpt.is_file():
        try:
            done = int(read_metadata(ckpt)["epoch"])
        except Exception as exc:
            runner.fail(name, "headline", f"cannot read {ckpt}: {exc}")
            return
    choice_file = paper / "gpucheck-target.txt"
    target = _headline_target(runner, targets, choice_file, rehearsal)
    if target is None:
        runner.skip(name, "headline", "no target passed its checks")
        return
    total = PAPER_EPOCHS if not rehearsal else 10 ** 6
    if done >= total:
        runner.skip(name, "headline", f"the run in {paper} is complete ({done} epochs)", target=target.name,
                    figures=training_figures(paper))
        return
    allowed = runner.allowance(name, profile.caps["headline"])
    overhead = max(profile.overhead_s, _step_seconds(runner, f"bench-{target.name}") or 0.0)
    epoch_s, basis = _epoch_seconds(runner, profile, target, paper, rehearsal)
    if epoch_s is None:
        runner.skip(name, "headline", f"no figure to size an epoch by (no bench, short training or earlier epoch of "
                                      f"{target.name}): add the bench phase", target=target.name)
        return
    k = int((allowed - overhead) // (1.1 * epoch_s)) if not rehearsal else (1 if allowed >= overhead else 0)
    k = min(k, total - done)
    if k < 1:
        runner.skip(name, "headline", f"out of budget: an epoch of the paper model on {target.name} takes ~{epoch_s:.0f}s"
                                      f" (+~{overhead:.0f}s to start), {allowed:.0f}s are left; the run in {paper} "
                                      f"stays at epoch {done}", target=target.name)
        return
    paper.mkdir(parents=True, exist_ok=True)
    atomic_write_text(choice_file, target.name + "\n")
    argv = [*launcher, "train", *target.train_flags(), "--out", str(paper), "--epochs", str(done + k), *data_flags,
            "--quiet"]
    argv += ["--resume"] if done else list(profile.headline_flags)

    def parse(result: StepResult, text: str) -> None:
        figs = training_figures(paper)
        result.figures.update(figs)
        result.figures.update({"epochs_before": done, "epochs_asked": done + k, "epochs_of_the_paper_run": total
                               if not rehearsal else None, "estimated_seconds_per_epoch": round(epoch_s, 1),
                               "estimated_from": basis, "resumed": bool(done)})
        report["headline"] = {"target": target.name, "run_dir": str(paper), **result.figures}

    runner.run(name, "headline", argv, cap=profile.caps["headline"], min_s=0, parse=parse, target=target.name)


def _headline_target(runner: Runner, targets: list[Target], choice_file: Path, rehearsal: bool) -> Target | None:
    """The target of the headline run: the one an earlier call chose, while it still passes its checks; else
    the fastest by the bench (on a GPU), in a rehearsal the first (numpy: no framework to start). None when
    no target passed."""
    usable = [t for t in targets if _target_ok(runner, t.name) is None
              and all(r.status != "failed" for r in runner.results if r.target == t.name)]
    if not usable:
        return None
    previous = choice_file.read_text().strip() if choice_file.is_file() else None
    by_speed = usable if rehearsal else sorted(usable, key=lambda t: (
        -(_figures(runner, f"bench-{t.name}").get("train_images_per_second") or 0),
        _HEADLINE_ORDER.index(t.name) if t.name in _HEADLINE_ORDER else 99))
    return next((t for t in usable if t.name == previous), by_speed[0])


def _epoch_seconds(runner: Runner, profile: Profile, target: Target, paper: Path,
                   rehearsal: bool) -> tuple[float | None, str]:
    """Seconds per epoch of the paper model on the whole training set, and what says so, from the best source
    there is: the run's own epochs, the short training, the bench. (None, "") when there is none."""
    bench = _figures(runner, f"bench-{target.name}")
    short = _figures(runner, f"train-{target.name}")
    own = read_epoch_rows(paper / "metrics.jsonl")
    if own:
        return (max(float(r["seconds"]) + float(r.get("eval_seconds", 0.0)) for r in own),
                f"the slowest of the run's {len(own)} epochs so far")
    if short.get("mean_seconds_per_epoch"):
        n_short = short.get("train_images") or profile.full_train_images
        eval_s = (short.get("eval_seconds_per_epoch") or [0.0])[-1]
        return (short["mean_seconds_per_epoch"] * profile.full_train_images / n_short + eval_s,
                f"the short training on {target.name} ({n_short} images)")
    if bench.get("epoch_seconds_60k"):
        return (bench["epoch_seconds_60k"] * profile.full_train_images / 60_000
                + 15_000 / bench.get("inference_images_per_second", 1e9), f"the bench of {target.name}")
    if rehearsal:
        return 0.0, "a rehearsal: one epoch per call"
    return None, ""


# ===================================================================================== command line
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="capsspec gpu-check", description=__doc__.split("\n\n")[0],
                      epilog="See docs/gpu-check.md.")
    p.add_argument("--out", required=False, help="folder for report.json and logs.tar.gz (emptied of the old ones)")
    p.add_argument("--budget-seconds", type=finite_float(0.0, exclusive=True), default=None,
                   help=f"the whole check's time limit, never exceeded (default {DEFAULT_BUDGET_S:.0f}; 120 with "
                        "--rehearsal)")
    p.add_argument("--data-dir", default=None, help="MNIST folder: the four IDX files, raw or .gz (see `capsspec data`)")
    p.add_argument("--paper-dir", default=None,
                   help="the headline run's folder, continued by the next call (default OUT/paper; give a folder "
                        "outside OUT when OUT is emptied between calls)")
    p.add_argument("--rehearsal", action="store_true", help="the same sequence on the CPU backends, small configs")
    p.add_argument("--keep-params", action="store_true",
                   help=f"also write the headline run's parameters (no optimizer state) into OUT as parts of 15 MiB: "
                        f"`cat {PARAMS_NAME}.part* > {PARAMS_NAME}`")
    p.add_argument("--targets", default=None,
                   help="comma-separated subset of the targets (gpu: cupy, torch-cuda, torch-cuda-fast, jax-gpu; "
                        "rehearsal: numpy, torch-cpu)")
    p.add_argument("--phases", default=None,
                   help="comma-separated subset of: backends, data, conformance, bench, train, headline (default all)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: JSON target specs
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # a one-line usage error (2), or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    if args.probe is not None:
        print(json.dumps(probe(json.loads(args.probe)), default=str), flush=True)
        return 0
    phases = [p.strip() for p in args.phases.split(",") if p.strip()] if args.phases else None
    known = ("backends", "data", "conformance", "bench", "train", "headline")
    try:
        if args.out is None:
            raise ValueError("--out is required")
        check_out_folder(args.out)
        if args.paper_dir:
            check_out_folder(args.paper_dir, "--paper-dir")
        if phases and any(p not in known for p in phases):
            raise ValueError(f"--phases: unknown phase(s) {[p for p in phases if p not in known]}; known: "
                             f"{', '.join(known)}")
        budget = args.budget_seconds if args.budget_seconds is not None else (120.0 if args.rehearsal
                                                                               else DEFAULT_BUDGET_S)
        if not budget > 0 or not math.isfinite(budget):
            raise ValueError(f"--budget-seconds must be a positive number, got {budget}")
        targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
        return run_check(Path(args.out), budget_s=budget, data_dir=args.data_dir, rehearsal=args.rehearsal,
                         paper_dir=Path(args.paper_dir) if args.paper_dir else None, targets=targets, phases=phases,
                         keep_params=args.keep_params)
    except ValueError as exc:
        print(f"capsspec gpu-check: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
