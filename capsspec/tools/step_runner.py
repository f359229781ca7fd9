"""The GPU check's step runner: each step a subprocess with its own log and timeout, within one time budget.

A step runs in a session of its own (so that a step out of time is killed with all its children),
writes its output to logs/<name>.log (cut to its head and tail when long), and becomes a
StepResult: passed, failed, timed out or skipped, with the reason and the figures its parser found
(capsspec.tools.step_parsers). Runner.allowance shares the budget out: a step never takes the
minimum seconds that the later planned steps need. capsspec.tools.gpucheck plans and drives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..training.atomic_files import atomic_path

__all__ = ["StepResult", "Interrupted", "raise_interrupted", "Runner", "truncate_log", "LOG_LIMIT_BYTES",
           "KILL_GRACE_S"]

LOG_LIMIT_BYTES = 2 * 2**20  # per step log: the head and tail are kept, so the bundle stays far under 16 MiB
KILL_GRACE_S = 3.0  # between SIGTERM and SIGKILL of a step that ran out of time


@dataclass
class StepResult:
    """One step's outcome, as the report lists it (figures: what its parser read from its output)."""

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


def raise_interrupted(signum: int, frame: Any) -> None:
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
        truncate_log(log_path, LOG_LIMIT_BYTES)
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


def truncate_log(path: Path, limit: int) -> None:
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
