"""Tests of the tester: the conformance suite passes the reference and fails every broken backend.

Each broken backend of capsspec.conformance.broken carries one of the paper's known mistakes;
the suite, run from the installed package exactly as users run it (one pytest process per
backend, the small "meta" profile, checkpoint exchange with numpy only), must fail each of them
through the check that targets that mistake, and must pass the numpy backend. The other tests
here show that a missing or bad backend stops the run before any test, and that known gaps are
strict. Together about a minute on two cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from capsspec.conformance import broken
from capsspec.conformance.cli import main as conformance_main
from capsspec.conformance.profiles import PROFILES

pytest.importorskip("hypothesis")

SUITE = ["--pyargs", "capsspec.conformance", "-p", "capsspec.conformance.plugin", "-p", "no:cacheprovider",
         "--conformance-profile", "meta", "--interchange-with", "numpy", "-q", "-rf"]

# The check that exists for each mistake (other checks may catch it as well): every part must
# appear in one FAILED line.
EXPECTED = {
    "softmax_over_children": ("test_coupling_sums_to_one_over_parents",),
    "squash_nan_at_zero": ("test_zero_capsule_vectors_give_finite_values_and_zero_gradients",),
    "primary_no_channels_last": ("test_op_forward[float64-primary_capsules]",),
    "margin_on_softmax": ("test_margin_loss_is_zero_when_margins_are_met",),
    "shared_routing_logits": ("test_examples_do_not_depend_on_the_rest_of_the_batch",),
    "detached_routing_gradient": ("test_value_and_grad",),
    "iterations_always_1": ("test_op_forward[float64-routing]",),
    "iterations_always_3": ("test_op_forward[float64-routing]",),
    "none_of_the_above_ignored": ("test_op_forward[float64-routing]",),
    "decodes_first_digit_only": ("test_loss",),
    "nan_images_accepted": ("test_error_contract[forward-x-nan]",),
    "in_place_adam": ("test_purity[", "adam_update"),
}


def _suite(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # From an empty folder, so nothing but the installed package is collected.
    return subprocess.run([sys.executable, "-m", "pytest", *SUITE, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)


def test_every_broken_backend_has_an_expected_check():
    assert set(EXPECTED) == set(broken.BROKEN)


def test_numpy_backend_passes(tmp_path):
    r = _suite(tmp_path, "--backend", "numpy")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "capsspec conformance: backend 'numpy', profile meta" in r.stdout  # the summary


@pytest.mark.parametrize("key", sorted(broken.BROKEN))
def test_broken_backend_fails(tmp_path, key):
    cls = broken.BROKEN[key]
    r = _suite(tmp_path, "--backend", f"capsspec.conformance.broken:{cls.__name__}")
    out = r.stdout + r.stderr
    assert r.returncode == 1, f"{cls.mistake}: the suite did not fail (exit {r.returncode})\n{out[-4000:]}"
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
    assert any(all(part in line for part in EXPECTED[key]) for line in failed), (
        f"{cls.mistake}: {EXPECTED[key]} did not fail; failures were:\n" + "\n".join(failed))
    assert "ConformanceFailure" in out  # a comparison failed, not a crash of the suite


def test_missing_backend_stops_before_any_test(tmp_path, monkeypatch):
    monkeypatch.delenv("CAPSSPEC_BACKEND", raising=False)
    r = _suite(tmp_path)
    assert r.returncode == 4 and "no backend chosen" in r.stdout + r.stderr
    assert "passed" not in r.stdout


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown backend 'nope'"),
    ("numpy:ones", "the factory raised"),
    ("capsspec.config:CapsNetConfig", "not a capsspec.Backend"),
    ("capsspec.conformance.broken:BROKEN", "is not callable"),
    ("no_such_module_xyz:Backend", "cannot import module"),
])
def test_bad_backend_stops_before_any_test(tmp_path, spec, message):
    r = _suite(tmp_path, "--backend", spec)
    assert r.returncode == 4, r.stdout[-2000:]
    assert message in r.stdout + r.stderr
    assert "passed" not in r.stdout


def test_unavailable_backend_stops_with_its_reason(tmp_path):
    (tmp_path / "absent_backend.py").write_text(
        "from capsspec import Backend\n"
        "class Absent(Backend):\n"
        "    name = 'absent'\n"
        "    framework = 'surely_not_an_installed_module_xyz'\n"
        "    install_hint = 'pip install absent'\n")
    r = subprocess.run([sys.executable, "-m", "pytest", *SUITE, "--backend", "absent_backend:Absent"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 4 and "pip install absent" in r.stdout + r.stderr


def test_command_line_refuses_bad_backends_with_status_2(capsys):
    assert conformance_main(["--backend", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
    assert conformance_main([]) == 2  # --backend is required


def test_known_gaps_are_strict_and_stale_ones_are_reported(tmp_path):
    gaps = tmp_path / "gaps.txt"
    gaps.write_text("# a gap that does not exist any more\n"
                    "test_api.py::test_backend_declares_itself  # pretend this failed\n"
                    "test_api.py::test_no_such_test  # matches nothing\n")
    r = _suite(tmp_path, "--backend", "numpy", "--known-gaps", str(gaps), "-k", "test_backend_declares_itself")
    assert r.returncode == 1, r.stdout[-3000:]
    assert "XPASS(strict)" in r.stdout
    assert "known gaps that now pass (stale" in r.stdout
    assert "known gaps matching no test (stale" in r.stdout and "test_no_such_test" in r.stdout


def test_known_gap_turns_a_failure_into_an_expected_failure(tmp_path):
    gaps = tmp_path / "gaps.txt"
    gaps.write_text("test_ops.py::test_op_forward[float6?-routing]  # always one iteration for now\n")
    r = _suite(tmp_path, "--backend", "capsspec.conformance.broken:IterationsAlwaysOne", "--known-gaps", str(gaps),
               "-k", "test_op_forward and float64 and routing")
    assert r.returncode == 0, r.stdout[-3000:]
    assert "1 xfailed" in r.stdout


def test_numpy_has_no_known_gaps():
    path = Path(broken.__file__).parent / "known_gaps" / "numpy.txt"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines == []


def test_profiles_are_bounded():
    assert PROFILES["meta"]["ops"] <= PROFILES["ci"]["ops"] < PROFILES["full"]["ops"]


def test_inference_only_backend_is_held_to_inference_names_only(tmp_path):
    # An inference-only backend (trains False): forward and predict are checked (and their error
    # contract), every check of a training name is a skip saying "not applicable", none passes.
    (tmp_path / "inference_backend.py").write_text(
        "from capsspec.backends.numpy import NumpyBackend\n"
        "from capsspec.spec import INFERENCE_NAMES, SPEC_NAMES\n"
        "class InferenceOnly(NumpyBackend):\n"
        "    trains = False\n"
        "    def __getattr__(self, attr):\n"
        "        if attr in SPEC_NAMES and attr not in INFERENCE_NAMES:\n"
        "            raise AttributeError(f'inference-only: no {attr}')\n"
        "        return super().__getattr__(attr)\n")
    r = subprocess.run([sys.executable, "-m", "pytest", *SUITE, "-rs", "--backend", "inference_backend:InferenceOnly"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-4000:]
    skipped = [ln for ln in r.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert any("not applicable:" in ln and "value_and_grad" in ln for ln in skipped), "\n".join(skipped[:20])
    assert any("not applicable:" in ln and "adam_update" in ln for ln in skipped)
    assert "not applicable:" in r.stdout and "check(s) of training names" in r.stdout  # the summary
    assert "test_forward" in r.stdout and "test_predict" in r.stdout  # the inference checks ran


def test_a_failure_prints_one_line_that_reproduces_it(capsys):
    # The line a failure prints is a command; run in-process here, it fails again (status 1) on the
    # broken backend and passes (status 0) on numpy.
    import json
    import shlex

    from capsspec.conformance import checks, reproduce
    from capsspec.conformance.compare import ConformanceFailure
    from capsspec.conformance.selection import resolve_backend

    recipe = {"seed": 3, "kind": "zero_rows", "scale": 0, "row_scales": [0, 0], "shape": [2, 3, 4], "axis": -1}
    sel = resolve_backend("capsspec.conformance.broken:SquashNanAtZero")
    with pytest.raises(ConformanceFailure) as info:
        checks.zero_vectors(sel, recipe, "float64")
    lines = [ln for ln in str(info.value).splitlines() if ln.startswith("reproduce with: ")]
    assert len(lines) == 1
    argv = shlex.split(lines[0].removeprefix("reproduce with: "))
    assert argv[:3] == ["python", "-m", "capsspec.conformance.reproduce"] and len(argv) == 4
    assert reproduce.main(argv[3:]) == 1
    assert "squash is not finite" in capsys.readouterr().out
    payload = dict(json.loads(argv[3]), backend="numpy")
    assert reproduce.main([json.dumps(payload)]) == 0


def test_every_op_has_one_record_and_distinct_error_inputs():
    from capsspec.conformance.records import RECORDS, error_ids
    from capsspec.spec import OP_NAMES, SPEC_NAMES

    assert sorted(RECORDS) == sorted(OP_NAMES)
    ids = error_ids()
    assert len(ids) == len(set(ids))
    covered = {name for name, _ in ids}
    assert covered >= set(SPEC_NAMES) - {"adam_init"}  # adam_init takes only parameters it made itself


def _suite_stand_in(name: str, code: int, wait_for: str | None, tmp_path: Path) -> tuple[str, list[str], None]:
    """A command standing in for one backend's suite: it announces itself with a file, waits (up to 60 s)
    for another stand-in's file where told to, prints three lines and exits with `code`."""
    script = (
        "import os, sys, time\n"
        f"open(os.path.join({str(tmp_path)!r}, {name!r}), 'w').close()\n"
        f"other = {wait_for!r}\n"
        "deadline = time.time() + 60\n"
        f"while other and not os.path.exists(os.path.join({str(tmp_path)!r}, other)) and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        f"for i in range(3): print({name!r}, 'line', i, flush=True); time.sleep(0.05)\n"
        f"print({name!r}, 'saw', other, os.path.exists(os.path.join({str(tmp_path)!r}, other)) if other else None)\n"
        f"sys.exit({code})\n")
    return name, [sys.executable, "-c", script], None


def test_jobs_2_runs_two_suites_at_once_and_prints_each_whole(tmp_path, capfd):
    from capsspec.conformance.cli import run_suites

    # a and b each wait for the other: they can only both see the other if they ran at the same time.
    runs = [_suite_stand_in("a", 0, "b", tmp_path), _suite_stand_in("b", 3, "a", tmp_path),
            _suite_stand_in("c", 0, None, tmp_path)]
    assert run_suites(runs, jobs=2) == {"a": 0, "b": 3, "c": 0}
    out = capfd.readouterr().out
    assert "a saw b True" in out and "b saw a True" in out
    for name in "abc":  # each suite's lines together, under its own heading
        block = out.split(f"=== backend {name!r} ===")[1].split("=== backend")[0]
        assert [line for line in block.splitlines() if line.startswith(f"{name} line")] == [
            f"{name} line 0", f"{name} line 1", f"{name} line 2"]


def test_jobs_1_runs_the_suites_in_turn(tmp_path, capfd):
    from capsspec.conformance.cli import run_suites

    # One at a time, in the order given: d starts only after c has printed everything and ended.
    runs = [_suite_stand_in("c", 0, None, tmp_path), _suite_stand_in("d", 1, "c", tmp_path)]
    assert run_suites(runs, jobs=1) == {"c": 0, "d": 1}
    out = capfd.readouterr().out
    assert out.index("c line 2") < out.index("=== backend 'd' ===") and "d saw c True" in out


def test_jobs_needs_backend_all_and_a_sane_count(capsys):
    assert conformance_main(["--backend", "numpy", "--jobs", "2"]) == 2
    assert "--jobs runs several backends at once: it needs --backend all" in capsys.readouterr().err
    for bad in ("0", "two", "65"):
        assert conformance_main(["--backend", "all", "--jobs", bad]) == 2
        assert "--jobs" in capsys.readouterr().err


def test_jobs_start_the_costliest_suites_first_and_report_in_name_order(monkeypatch, capsys):
    import types

    import capsspec.registry
    from capsspec.conformance import cli

    costs = {"alpha": 1.0, "beta": 4.0, "gamma": 0.5, "delta": 3.5}
    monkeypatch.setattr(capsspec.registry, "available_backends", lambda: list(costs))
    monkeypatch.setattr(cli, "skipped_backends", lambda: [])
    monkeypatch.setattr(cli, "resolve_backend", lambda name, device: types.SimpleNamespace(
        backend=types.SimpleNamespace(conformance_cost=costs[name], trains=True, ci_environment={})))
    started = []

    def fake_run_suites(runs, jobs):
        started.extend(name for name, _, _ in runs)
        return {name: 0 for name, _, _ in runs}

    monkeypatch.setattr(cli, "run_suites", fake_run_suites)
    assert cli._run_all("ci", None, [], jobs=2) == 0
    assert started == ["beta", "delta", "alpha", "gamma"]
    report = capsys.readouterr().out.split("results")[1]
    assert [line.split()[0] for line in report.strip().splitlines()] == list(costs)


def test_a_killed_parallel_run_leaves_no_suite_running(tmp_path):
    # The command runs two stand-in suites that would sleep for minutes; killed with SIGTERM (as
    # scripts/test.sh's exit trap does), it must stop them before it exits.
    import os
    import signal
    import time

    pids = tmp_path / "pids"
    script = (f"import os, time; open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n'); time.sleep(300)")
    driver = ("import sys\nfrom capsspec.conformance.cli import run_suites\n"
              f"run_suites([('a', [sys.executable, '-c', {script!r}], None), "
              f"('b', [sys.executable, '-c', {script!r}], None)], jobs=2)\n")
    proc = subprocess.Popen([sys.executable, "-c", driver])
    deadline = time.time() + 60
    while (not pids.exists() or len(pids.read_text().split()) < 2) and time.time() < deadline:
        time.sleep(0.1)
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    for pid in children:  # terminated and reaped by the command before it exited: gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
