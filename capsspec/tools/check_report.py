"""What a GPU check leaves in its folder: report.json, logs.tar.gz, and the headline run's parameters in parts.

The report is rewritten after every step (write_report), so even a check killed from outside
leaves one; the steps' logs go into one bundle under 16 MiB at the end (bundle_logs); the
headline's parameters come back as parts of at most 15 MiB (bring_back_params), the largest file
the device tool brings back being 16 MiB. capsspec.tools.gpucheck runs the check and calls these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from ..training.atomic_files import atomic_path, atomic_write_text
from ..version import __version__
from .step_runner import LOG_LIMIT_BYTES, Runner, StepResult, truncate_log

__all__ = ["REPORT_NAME", "LOGS_NAME", "PARAMS_NAME", "clear_out", "report_head", "write_report", "bundle_logs",
           "bring_back_params"]

REPORT_NAME = "report.json"
LOGS_NAME = "logs.tar.gz"
REPORT_FORMAT = 1
BUNDLE_LIMIT_BYTES = 15 * 2**20
PARAMS_NAME = "paper-params.safetensors"
PART_BYTES = 15 * 2**20

# Package versions recorded in the report (read from installed metadata; nothing is imported).
VERSION_PACKAGES = ("numpy", "torch", "cupy-cuda13x", "cupy-cuda12x", "cupy", "jax", "jaxlib", "jax-cuda13-plugin",
                    "jax-cuda12-plugin", "tensorflow", "tensorflow-cpu", "hypothesis", "pytest", "safetensors",
                    "triton", "onnxruntime")


def clear_out(out: Path) -> None:
    """`out` made, and emptied of what an earlier check left there (its report, logs and parameter parts)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / REPORT_NAME, out / LOGS_NAME, *out.glob(f"{PARAMS_NAME}.part*")):
        stale.unlink(missing_ok=True)
    shutil.rmtree(out / "logs", ignore_errors=True)


def report_head(rehearsal: bool, budget_s: float, data_dir: str | None, paper: Path,
                checkout: Path | None) -> dict[str, Any]:
    """The report's first fields: what runs where, with which versions (checkout: the repository this
    capsspec runs from, None when it is installed)."""
    return {
        "format": REPORT_FORMAT, "command": "capsspec gpu-check", "mode": "rehearsal" if rehearsal else "gpu",
        "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_seconds": budget_s,
        "host": {"node": platform.node(), "machine": platform.machine(), "platform": platform.platform(),
                 "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "capsspec": {"version": __version__, "from_checkout": str(checkout) if checkout else None,
                     "git_commit": _git_commit(checkout) if checkout else None},
        "versions": _versions(), "data_dir": data_dir, "paper_dir": str(paper),
    }


def write_report(out: Path, report: dict[str, Any], runner: Runner, final: bool = False) -> None:
    """report.json as it stands: the steps so far, those still pending, and the summary."""
    report["elapsed_seconds"] = round(runner.elapsed(), 2)
    report["steps"] = [dataclasses.asdict(r) for r in runner.results]
    report["pending_steps"] = list(runner.pending)
    report["summary"] = _summary(runner.results)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z") if final else None
    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2, default=str) + "\n")


def _summary(results: list[StepResult]) -> dict[str, Any]:
    by = {s: [r.name for r in results if r.status == s] for s in ("passed", "failed", "timed_out", "skipped")}
    return {"passed": len(by["passed"]), "failed": len(by["failed"]), "timed_out": len(by["timed_out"]),
            "skipped": len(by["skipped"]), "failed_steps": by["failed"], "timed_out_steps": by["timed_out"],
            "skipped_steps": {r.name: r.reason for r in results if r.status == "skipped"}}


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


def bundle_logs(out: Path) -> None:
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
            truncate_log(f, limit)
    shutil.rmtree(logs, ignore_errors=True)


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
    return {"parts": parts, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "epoch": ck.epoch,
            "rebuild": f"cat {PARAMS_NAME}.part* > {PARAMS_NAME}"}
