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

This module imports no framework: the frameworks are imported by the steps' own processes
(`--probe`, the hidden mode that reports availability, runs in one of them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

from ..version import __version__
from ..training.atomic_files import atomic_path, atomic_write_text
from .args import OneLineParser, check_out_folder, finite_float

__all__ = ["Target", "GPU_TARGETS", "REHEARSAL_TARGETS", "Runner", "run_check", "torch_fast", "main",
           "REPORT_NAME", "LOGS_NAME", "DEFAULT_BUDGET_S"]

REPORT_NAME = "report.json"
LOGS_NAME = "logs.tar.gz"
REPORT_FORMAT = 1
DEFAULT_BUDGET_S = 540.0
LOG_LIMIT_BYTES = 2 * 2**20  # per step log: the head and tail are kept, so the bundle stays far under 16 MiB
BUNDLE_LIMIT_BYTES = 15 * 2**20
PARAMS_NAME = "paper-params.safetensors"
PART_BYTES = 15 * 2**20
KILL_GRACE_S = 3.0  # between SIGTERM and SIGKILL of a step that ran out of time
PAPER_EPOCHS = 50  # the headline run's length (train's default)

# Package versions recorded in the report (read from installed metadata; nothing is imported).
VERSION_PACKAGES = ("numpy", "torch", "cupy-cuda13x", "cupy-cuda12x", "cupy", "jax", "jaxlib", "jax-cuda13-plugin",
                    "jax-cuda12-plugin", "tensorflow", "tensorflow-cpu", "hypothesis", "pytest", "safetensors",
                    "triton", "onnxruntime")


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


# ===================================================================================== running steps
@dataclass
class StepResult:
    name: str
    phase: str
    status: str  # passed | failed | timed_out | skipped
    reason: str = ""
    target: str | None = None
    dtype: str | None = None
    command: list[str] | None = None
    returncode: int | None = None
    seconds: float = 0.0
    timeout_s: float | None = None
    log: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)


class Interrupted(Exception):
    """The check received SIGTERM or SIGHUP (a tool's timeout, a closed terminal)."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


class Runner:
    """Runs steps as subprocesses within one time budget, logging each; on_step is called after each.

    `pending` is every step still to come, in order, with its phase and the minimum seconds it needs
    (see allowance): early steps cannot starve later ones of their minimum while the budget holds
    them all, and when it does not, the earlier steps come first.
    """

    def __init__(self, out: Path, budget_s: float, reserve_s: float, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.budget_s, self.reserve_s = out, float(budget_s), float(reserve_s)
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = env if env is not None else dict(os.environ)
        self.cwd = cwd
        self.clock = clock
        self.start = clock()
        self.results: list[StepResult] = []
        self.pending: dict[str, tuple[str, float]] = {}  # planned step -> (its phase, its minimum seconds)
        self.on_step: Callable[[], None] = lambda: None

    def plan(self, name: str, min_s: float, phase: str = "") -> None:
        self.pending[name] = (phase, float(min_s))

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.budget_s - self.reserve_s - self.elapsed()

    def allowance(self, name: str, cap: float) -> float:
        """Seconds step `name` may run: at most its cap, never more than the time left less the minimums of
        the later pending steps, and no more than its fair share of what its phase may use (the time left
        less the later phases' minimums, split evenly over the phase's pending steps), so that the first
        backend of a phase cannot take the time of the others."""
        names = list(self.pending)
        phase = self.pending[name][0] if name in self.pending else ""
        later = names[names.index(name) + 1:] if name in self.pending else []
        later_min = sum(self.pending[n][1] for n in later)
        other_min = sum(self.pending[n][1] for n in later if self.pending[n][0] != phase)
        same = 1 + sum(1 for n in later if self.pending[n][0] == phase)
        share = (self.left() - other_min) / same
        protected = min(float(cap), self.left() - later_min, share)
        # Earlier steps come first: a step gets its own minimum while the time is there, even when the
        # later minimums add up to more than is left.
        floor = min(float(cap), self.left(), self.pending[name][1] if name in self.pending else 0.0)
        return max(0.0, protected, floor)

    def _finish(self, result: StepResult) -> StepResult:
        self.pending.pop(result.name, None)
        self.results.append(result)
        mark = {"passed": "ok", "failed": "FAILED", "timed_out": "TIMED OUT", "skipped": "skipped"}[result.status]
        note = f" ({result.reason})" if result.reason else ""
        print(f"[gpu-check {self.elapsed():6.1f}s] {result.name}: {mark}{note}", file=sys.stderr, flush=True)
        self.on_step()
        return result

    def skip(self, name: str, phase: str, reason: str, **kw: Any) -> StepResult:
        return self._finish(StepResult(name, phase, "skipped", reason, **kw))

    def fail(self, name: str, phase: str, reason: str, **kw: Any) -> StepResult:
        return self._finish(StepResult(name, phase, "failed", reason, **kw))

    def record(self, result: StepResult) -> StepResult:
        return self._finish(result)

    def run(self, name: str, phase: str, argv: Sequence[str], *, cap: float, min_s: float,
            parse: Callable[[StepResult, str], None] | None = None, target: str | None = None,
            dtype: str | None = None, cwd: Path | None = None) -> StepResult:
        """Run argv with its output in logs/<name>.log; parse(result, log_text) adds figures and may
        change the status. Skipped (with the reason) when its allowance is under min_s."""
        allowed = self.allowance(name, cap)
        if allowed < min_s:
            return self.skip(name, phase, f"out of budget: {allowed:.0f}s could be given to it, it needs at least "
                                          f"{min_s:.0f}s ({self.left():.0f}s left of {self.budget_s:.0f}s)",
                             target=target, dtype=dtype, command=list(argv))
        log_path = self.logs / f"{name}.log"
        result = StepResult(name, phase, "passed", target=target, dtype=dtype, command=list(argv),
                            timeout_s=round(allowed, 1), log=f"logs/{name}.log")
        print(f"[gpu-check {self.elapsed():6.1f}s] {name}: running (up to {allowed:.0f}s): {' '.join(argv)}",
              file=sys.stderr, flush=True)
        t0 = self.clock()
        with open(log_path, "wb") as logf:
            logf.write(f"$ {' '.join(argv)}\n".encode())
            logf.flush()
            try:
                proc = subprocess.Popen(list(argv), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=self.env, cwd=str(cwd or self.cwd or Path.cwd()), start_new_session=True)
            except OSError as exc:
                result.status, result.reason = "failed", f"could not start: {exc}"
                result.seconds = round(self.clock() - t0, 2)
                return self._finish(result)
            grace = min(KILL_GRACE_S, 0.25 * allowed)
            try:
                result.returncode = proc.wait(timeout=max(0.1, allowed - grace))
            except subprocess.TimeoutExpired:
                _kill_group(proc, grace)
                result.status = "timed_out"
                result.reason = f"killed after {self.clock() - t0:.1f}s (its share of the budget)"
                result.returncode = proc.returncode
            except BaseException as exc:  # the check itself is being stopped: its step (a session of its own) too
                _kill_group(proc, 1.0)
                result.status, result.returncode = "skipped", proc.returncode
                result.reason = f"stopped after {self.clock() - t0:.0f}s: gpu-check was stopped ({exc or type(exc).__name__})"
                result.seconds = round(self.clock() - t0, 2)
                self._finish(result)
                raise
        result.seconds = round(self.clock() - t0, 2)
        _truncate_log(log_path, LOG_LIMIT_BYTES)
        text = log_path.read_text(encoding="utf-8", errors="replace")
        if result.status == "passed" and result.returncode != 0:
            result.status = "failed"
            result.reason = f"exit status {result.returncode}: {_last_error_line(text)}"
        if parse is not None:
            try:
                parse(result, text)
            except Exception as exc:  # a parser bug must not hide the step's own outcome
                result.figures["parse_error"] = f"{type(exc).__name__}: {exc}"
        return self._finish(result)


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the step's process group (it started a session of its own), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:
                try:  # children that ignored SIGTERM while the leader exited
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            return
        except subprocess.TimeoutExpired:
            continue


def _truncate_log(path: Path, limit: int) -> None:
    """Keep a log under `limit` bytes: its first quarter and its last three quarters, with a note between."""
    size = path.stat().st_size
    if size <= limit:
        return
    head_n, tail_n = limit // 4, limit - limit // 4 - 200
    with open(path, "rb") as f:
        head = f.read(head_n)
        f.seek(size - tail_n)
        tail = f.read()
    note = f"\n[... gpu-check cut {size - head_n - tail_n} bytes of this log ...]\n".encode()
    with atomic_path(path) as tmp:
        tmp.write_bytes(head + note + tail)


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("$ ")]
    for ln in reversed(lines):
        if "error" in ln.lower() or "failed" in ln.lower() or "exception" in ln.lower():
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


# ===================================================================================== parsers
_PYTEST_OUTCOME = re.compile(r"::(\S+) (PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR)\b")
_PYTEST_SUMMARY = re.compile(r"^=+ (.*\b(?:passed|failed|error|errors|skipped|deselected|xfailed)\b.*) in "
                             r"([\d.]+)s", re.M)
_CONFORMANCE_ROW = re.compile(r"^(\S+::\S+.*?)\s+(\d+)\s+(\d+)\s+([-+\d.eE]+|nan|inf)\s+([-+\d.eE]+|nan|inf)\b", re.M)


def parse_conformance(result: StepResult, text: str) -> None:
    """Counts per outcome (from the -v lines, so a killed run still reports what it got through), the
    failing checks, pytest's summary line, and the largest error as a fraction of its tolerance."""
    counts: dict[str, int] = {}
    failed: list[str] = []
    for test, outcome in _PYTEST_OUTCOME.findall(text):
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
        if outcome in ("FAILED", "ERROR", "XPASS"):
            failed.append(test)
    summary = _PYTEST_SUMMARY.findall(text)
    worst = None
    for row in _CONFORMANCE_ROW.findall(text):
        try:
            ratio = float(row[3])
        except ValueError:
            continue
        if worst is None or ratio > worst[0] or math.isnan(ratio):
            worst = (ratio, row[0].strip())
    result.figures.update({"tests": counts, "failed_tests": sorted(set(failed))[:50]})
    if summary:
        result.figures["pytest_summary"] = summary[-1][0]
        result.figures["pytest_seconds"] = float(summary[-1][1])
    if worst is not None:
        result.figures["max_error_over_tolerance"] = worst[0]
        result.figures["worst_check"] = worst[1]
    if failed and result.status != "failed":
        result.status = "failed"
        result.reason = (result.reason + "; " if result.reason else "") + f"{len(set(failed))} check(s) failed"
    if result.status == "passed" and not counts.get("passed"):
        result.status = "failed"
        result.reason = "no test passed (nothing selected, or the suite did not run)"


def _json_objects(text: str) -> list[dict[str, Any]]:
    objs = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                objs.append(obj)
    return objs


def parse_bench(result: StepResult, text: str) -> None:
    """bench --json - prints one JSON object per backend: the figures, as they are."""
    found = [o for o in _json_objects(text) if "train_images_per_second" in o]
    if found:
        result.figures.update(found[-1])
    elif result.status == "passed":
        result.status, result.reason = "failed", "bench printed no JSON figures"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def training_figures(run_dir: Path) -> dict[str, Any]:
    """Figures of a training run from its metrics.jsonl and summary.json (what completed, even if killed)."""
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    figs: dict[str, Any] = {"epochs_completed": rows[-1]["epoch"] if rows else 0}
    if rows:
        last = rows[-1]
        secs = [float(r["seconds"]) for r in rows]
        figs.update({
            "test_accuracy": last.get("test_accuracy"), "val_accuracy": last.get("val_accuracy"),
            "train_accuracy": last.get("train_accuracy"), "loss": last.get("loss"),
            "seconds_per_epoch": secs, "mean_seconds_per_epoch": sum(secs) / len(secs),
            "eval_seconds_per_epoch": [float(r.get("eval_seconds", 0.0)) for r in rows],
            "images_per_second": [r.get("images_per_second") for r in rows],
            "steps": last.get("step"),
        })
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            s = json.loads(summary.read_text(encoding="utf-8"))
            figs.update({k: s.get(k) for k in ("test_accuracy", "test_error_percent", "reported_model", "device",
                                               "framework_version", "train_seconds", "parameters")})
            figs["train_images"] = (s.get("settings") or {}).get("train_subset")
        except (OSError, json.JSONDecodeError):
            pass
    return figs


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
def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in VERSION_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _git_commit(root: Path) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


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
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / REPORT_NAME, out / LOGS_NAME, *out.glob(f"{PARAMS_NAME}.part*")):
        stale.unlink(missing_ok=True)
    shutil.rmtree(out / "logs", ignore_errors=True)
    launcher = list(launcher or default_launcher())
    # The short trainings' runs (checkpoints of ~99 MB for the paper model) live outside `out`, which
    # must hold only what comes back, and go at the end.
    work = Path(tempfile.mkdtemp(prefix="capsspec-gpucheck-"))
    paper = Path(paper_dir).expanduser().absolute() if paper_dir is not None else out / "paper"
    phases = list(phases or ("backends", "data", "conformance", "bench", "train", "headline"))
    # The reserve covers the report, the logs bundle and, when asked, cutting the parameters into parts.
    runner = Runner(out, budget_s, profile.reserve_s + (10.0 if keep_params else 0.0), env=_child_env(), cwd=work)
    root = _checkout_root()
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "command": "capsspec gpu-check", "mode": "rehearsal" if rehearsal else "gpu",
        "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_seconds": budget_s,
        "host": {"node": platform.node(), "machine": platform.machine(), "platform": platform.platform(),
                 "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "capsspec": {"version": _capsspec_version(), "from_checkout": str(root) if root else None,
                     "git_commit": _git_commit(root) if root else None},
        "versions": _versions(), "data_dir": data_dir, "paper_dir": str(paper),
    }

    def write_report(final: bool = False) -> None:
        report["elapsed_seconds"] = round(runner.elapsed(), 2)
        report["steps"] = [dataclasses.asdict(r) for r in runner.results]
        report["pending_steps"] = list(runner.pending)
        report["summary"] = _summary(runner.results)
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z") if final else None
        atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2, default=str) + "\n")

    runner.on_step = write_report
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        handlers = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
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
        write_report(final=True)
        _bundle_logs(out)
        report["logs"] = LOGS_NAME
        write_report(final=True)
    s = report["summary"]
    print(f"[gpu-check] {s['passed']} passed, {s['failed']} failed, {s['timed_out']} timed out, {s['skipped']} skipped "
          f"in {report['elapsed_seconds']:.0f}s of {budget_s:.0f}s; report: {out / REPORT_NAME}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if s["failed"] else 0


def _capsspec_version() -> str:

    return __version__


def _choose_targets(all_targets: list[Target], names: Sequence[str] | None, rehearsal: bool) -> list[Target]:
    if not names:
        return all_targets
    known = {t.name: t for t in [*all_targets, *([] if rehearsal else [JAX_GPU_TARGET])]}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--targets: unknown target(s) {unknown}; known: {', '.join(known)}")
    return [known[n] for n in names]


def _summary(results: list[StepResult]) -> dict[str, Any]:
    by = {s: [r.name for r in results if r.status == s] for s in ("passed", "failed", "timed_out", "skipped")}
    return {"passed": len(by["passed"]), "failed": len(by["failed"]), "timed_out": len(by["timed_out"]),
            "skipped": len(by["skipped"]), "failed_steps": by["failed"], "timed_out_steps": by["timed_out"],
            "skipped_steps": {r.name: r.reason for r in results if r.status == "skipped"}}


def _plan_and_run(runner: Runner, report: dict[str, Any], profile: Profile, launcher: list[str],
                  targets: list[Target], phases: list[str], data_dir: str | None, paper: Path, work: Path,
                  rehearsal: bool) -> None:
    caps, mins = profile.caps, profile.mins
    data_flags = ["--data-dir", data_dir] if data_dir else []
    dtypes = ("float32", "float64")

    def plan(ts: list[Target]) -> None:
        """Every step still to come, in order, with its minimum (steps already run are not planned again)."""
        names: list[tuple[str, float, str]] = []
        if "backends" in phases:
            names += [(n, mins[n], n) for n in ("backends", "device", "probe")]
            names += [(f"probe-{t.name}", 0.0, "availability") for t in ts]  # records of the probe's answer
        if "data" in phases:
            names.append(("data", mins["data"], "data"))
        for phase in ("conformance", "bench", "train"):
            if phase in phases:
                for t in ts:
                    for name in ([f"conformance-{t.name}-{d}" for d in dtypes] if phase == "conformance"
                                 else [f"{phase}-{t.name}"]):
                        names.append((name, mins[phase], phase))
        if "headline" in phases:
            names.append(("headline", 0.0, "headline"))  # "where budget remains": it holds back nothing
        done = {r.name for r in runner.results}
        runner.pending.clear()
        for name, m, phase in names:
            if name not in done:
                runner.plan(name, m, phase)

    plan(targets)

    # 1. backends, the device, and the targets' availability ---------------------------------------
    if "backends" in phases:
        def parse_backends(result: StepResult, text: str) -> None:
            body = text.split("\n", 1)[1] if text.startswith("$ ") else text
            start = body.find("[")
            rows = json.loads(body[start:body.rfind("]") + 1]) if start >= 0 else []
            result.figures["backends"] = rows
            report["backends"] = rows

        runner.run("backends", "backends", [*launcher, "backends", "--json"], cap=caps["backends"],
                   min_s=mins["backends"], parse=parse_backends)
        _nvidia_smi(runner, report, profile, gpu=not rehearsal)
        rows = {r["name"]: r for r in report.get("backends") or []}
        jax = rows.get("jax")
        if not rehearsal and JAX_GPU_TARGET not in targets and jax is not None:
            on_gpu = jax.get("available") and re.search(r"gpu|cuda", str(jax.get("device")), re.I)
            if on_gpu:
                targets.append(JAX_GPU_TARGET)
                plan(targets)
            where = f"on {jax.get('device')}" if jax.get("available") else f"unavailable: {jax.get('reason')}"
            report["jax"] = f"{'included' if on_gpu else 'not included'}: `capsspec backends` lists jax {where}"
        elif not rehearsal and jax is None:
            report["jax"] = "not included: `capsspec backends` lists no jax backend"

        def parse_probe(result: StepResult, text: str) -> None:
            objs = [o for o in _json_objects(text) if "targets" in o]
            if not objs:
                raise ValueError("the probe printed no JSON")
            result.figures.update(objs[-1])
            report["cuda"] = objs[-1].get("cuda")

        specs = json.dumps([t.probe_spec() for t in targets])
        pr = runner.run("probe", "backends", [*launcher, "gpu-check", "--probe", specs], cap=caps["probe"],
                        min_s=mins["probe"], parse=parse_probe)
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
    report["targets"] = [t.probe_spec() for t in targets]

    # 2. MNIST ------------------------------------------------------------------------------------
    data_ok = True
    if "data" in phases:
        r = runner.run("data", "data", [*launcher, "data", *data_flags, *([] if profile.download else ["--no-download"])],
                       cap=caps["data"], min_s=mins["data"])
        data_ok = r.status == "passed"

    # 3. conformance, float32 then float64 ---------------------------------------------------------
    if "conformance" in phases:
        for t in targets:
            for d in dtypes:
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
                runner.run(name, "conformance", argv, cap=caps["conformance"], min_s=mins["conformance"],
                           parse=parse_conformance, target=t.name, dtype=d)

    # 4. bench --------------------------------------------------------------------------------------
    if "bench" in phases:
        for t in targets:
            name = f"bench-{t.name}"
            why = _target_ok(runner, t.name)
            if why:
                runner.skip(name, "bench", why, target=t.name)
                continue
            runner.run(name, "bench", [*launcher, "bench", *t.bench_flags(), *profile.bench_flags, "--json", "-"],
                       cap=caps["bench"], min_s=mins["bench"], parse=parse_bench, target=t.name)

    # 5. short trainings ------------------------------------------------------------------------------
    if "train" in phases:
        for t in targets:
            name = f"train-{t.name}"
            why = _target_ok(runner, t.name) or (None if data_ok else "MNIST was not verified (see the data step)")
            if why:
                runner.skip(name, "train", why, target=t.name)
                continue
            allowed = runner.allowance(name, caps["train"])
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

            runner.run(name, "train", argv, cap=caps["train"], min_s=mins["train"], parse=parse_train, target=t.name)

    # 6. the headline run ---------------------------------------------------------------------------
    if "headline" in phases:
        _headline(runner, report, profile, launcher, targets, data_flags, data_ok, paper, rehearsal)


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
    """Continue (or start) the paper's run in `paper` for as many epochs as the time left allows."""
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
    usable = [t for t in targets if _target_ok(runner, t.name) is None
              and all(r.status != "failed" for r in runner.results if r.target == t.name)]
    if not usable:
        runner.skip(name, "headline", "no target passed its checks")
        return
    previous = choice_file.read_text().strip() if choice_file.is_file() else None
    # The fastest by the bench (on a GPU); in a rehearsal the first (numpy: no framework to start).
    by_speed = usable if rehearsal else sorted(usable, key=lambda t: (
        -(_figures(runner, f"bench-{t.name}").get("train_images_per_second") or 0),
        _HEADLINE_ORDER.index(t.name) if t.name in _HEADLINE_ORDER else 99))
    target = next((t for t in usable if t.name == previous), by_speed[0])
    total = PAPER_EPOCHS if not rehearsal else 10 ** 6
    if done >= total:
        runner.skip(name, "headline", f"the run in {paper} is complete ({done} epochs)", target=target.name,
                    figures=training_figures(paper))
        return
    allowed = runner.allowance(name, profile.caps["headline"])
    bench = _figures(runner, f"bench-{target.name}")
    short = _figures(runner, f"train-{target.name}")
    overhead = max(profile.overhead_s, _step_seconds(runner, f"bench-{target.name}") or 0.0)
    # Seconds per epoch of the paper model on the whole training set, from the best source there is:
    # the run's own epochs, the short training, the bench.
    epoch_s, basis = None, ""
    own = _read_jsonl(paper / "metrics.jsonl")
    if own:
        epoch_s = max(float(r["seconds"]) + float(r.get("eval_seconds", 0.0)) for r in own)
        basis = f"the slowest of the run's {len(own)} epochs so far"
    elif short.get("mean_seconds_per_epoch"):
        n_short = short.get("train_images") or profile.full_train_images
        eval_s = (short.get("eval_seconds_per_epoch") or [0.0])[-1]
        epoch_s = short["mean_seconds_per_epoch"] * profile.full_train_images / n_short + eval_s
        basis = f"the short training on {target.name} ({n_short} images)"
    elif bench.get("epoch_seconds_60k"):
        epoch_s = bench["epoch_seconds_60k"] * profile.full_train_images / 60_000 + \
            15_000 / bench.get("inference_images_per_second", 1e9)
        basis = f"the bench of {target.name}"
    elif rehearsal:
        epoch_s, basis = 0.0, "a rehearsal: one epoch per call"
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


def bring_back_params(paper: Path, out: Path, part_bytes: int = PART_BYTES, work: Path | None = None) -> dict[str, Any]:
    """The headline run's latest parameters, without the optimizer state, as parts of at most part_bytes
    in `out` (the device tool brings back files of up to 16 MiB): `cat NAME.part* > NAME` rebuilds a
    checkpoint that `capsspec eval` and `capsspec figures` read."""
    from ..training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint

    ck = load_checkpoint(paper / CHECKPOINT_NAME)
    with tempfile.TemporaryDirectory(prefix="capsspec-params-", dir=work) as tmpdir:
        whole = Path(tmpdir) / PARAMS_NAME
        save_checkpoint(whole, ck.params, ck.config, adam=ck.adam, step=ck.step, epoch=ck.epoch, rng=ck.rng,
                        training=ck.training, extra=ck.extra, backend=ck.backend)
        data = whole.read_bytes()
    parts = []
    for i in range(0, len(data), part_bytes):
        part = out / f"{PARAMS_NAME}.part{i // part_bytes:02d}"
        with atomic_path(part) as tmp:
            tmp.write_bytes(data[i:i + part_bytes])
        parts.append(part.name)
    import hashlib

    return {"parts": parts, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "epoch": ck.epoch,
            "rebuild": f"cat {PARAMS_NAME}.part* > {PARAMS_NAME}"}


def _bundle_logs(out: Path) -> None:
    """logs/*.log -> logs.tar.gz (under 16 MiB, cutting the logs harder if need be), then remove logs/."""
    logs = out / "logs"
    files = sorted(logs.glob("*.log")) if logs.is_dir() else []
    limit = LOG_LIMIT_BYTES
    while True:
        with atomic_path(out / LOGS_NAME) as tmp:
            with tarfile.open(tmp, "w:gz") as tar:
                for f in files:
                    tar.add(f, arcname=f"logs/{f.name}")
        if (out / LOGS_NAME).stat().st_size <= BUNDLE_LIMIT_BYTES or limit < 4096:
            break
        limit //= 4
        for f in files:
            _truncate_log(f, limit)
    shutil.rmtree(logs, ignore_errors=True)


# ===================================================================================== command line
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="capsspec gpu-check", description=__doc__.split("\n\n")[0],
                                epilog="See the README section 'Checking a GPU'.")
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
