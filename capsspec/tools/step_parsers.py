"""Parsers of the GPU check's step outputs: pytest's -v lines, bench's JSON, a training run's files.

Each parse_* takes the StepResult of its step and the text of its log, adds figures, and may turn
a passed step into a failed one (a suite where a check failed, a bench that printed no figures).
They read what a step printed before it was killed as well as a complete log.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .step_runner import StepResult

__all__ = ["parse_conformance", "parse_bench", "training_figures", "json_objects", "read_jsonl", "read_epoch_rows"]

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


def json_objects(text: str) -> list[dict[str, Any]]:
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
    found = [o for o in json_objects(text) if "train_images_per_second" in o]
    if found:
        result.figures.update(found[-1])
    elif result.status == "passed":
        result.status, result.reason = "failed", "bench printed no JSON figures"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def read_epoch_rows(path: Path) -> list[dict[str, Any]]:
    """The epochs' rows of a metrics.jsonl (its training-curve points, "kind": "point", left out)."""
    return [r for r in read_jsonl(path) if "kind" not in r]


def training_figures(run_dir: Path) -> dict[str, Any]:
    """Figures of a training run from its metrics.jsonl and summary.json (what completed, even if killed)."""
    rows = read_epoch_rows(run_dir / "metrics.jsonl")
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
