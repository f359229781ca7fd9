"""`capsspec gpu-check`: the CPU rehearsal end to end, and the budget logic with stub commands.

The rehearsal runs the real command line from the checkout with nothing installed (python -S,
PYTHONPATH = the repository and the interpreter's site-packages), as the GPU machine runs it.
The stub tests replace the capsspec command line by a small script whose steps sleep, fail or
print figures as each test asks, so the budget, timeout and exit-status rules are checked in
seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from capsspec.tools import check_report, gpucheck, step_parsers, step_runner

ROOT = Path(__file__).resolve().parent.parent


# ===================================================================================== the rehearsal
@pytest.fixture(scope="module")
def mnist_dir():
    from capsspec.training.mnist import MnistUnavailable, fetch_mnist

    try:
        return fetch_mnist()
    except MnistUnavailable as exc:  # no cache and no network: the rehearsal trains on real MNIST
        pytest.skip(f"real MNIST is needed: {exc}")


@pytest.mark.slow
@pytest.mark.mnist
def test_rehearsal_runs_every_step_from_a_checkout_within_its_budget(tmp_path, mnist_dir):
    out, budget = tmp_path / "out", 300.0  # about 60 s on two idle cores; room for a loaded machine
    env = _checkout_env()
    t0 = time.monotonic()
    # -S: no site processing, so no installed capsspec (editable or not): the device machine's situation.
    proc = subprocess.run([sys.executable, "-S", "-m", "capsspec.tools.gpucheck", "--rehearsal", "--out", str(out),
                           "--budget-seconds", str(budget), "--data-dir", str(mnist_dir)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=budget + 60)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "rehearsal" and report["capsspec"]["from_checkout"] == str(ROOT)
    assert report["elapsed_seconds"] <= budget and wall <= budget + 5  # + the interpreter's own start
    steps = {s["name"]: s for s in report["steps"]}
    expected = ["backends", "device", "probe", "probe-numpy", "probe-torch-cpu", "data",
                *[f"conformance-{t}-{d}" for t in ("numpy", "torch-cpu") for d in ("float32", "float64")],
                "bench-numpy", "bench-torch-cpu", "train-numpy", "train-torch-cpu", "headline"]
    assert list(steps) == expected
    for s in steps.values():  # every step passed, or says why not
        assert s["status"] in ("passed", "skipped"), s
        assert s["status"] == "passed" or s["reason"], s
    assert "nvidia-smi" in steps["device"]["reason"] or steps["device"]["status"] == "passed"
    assert {r["name"] for r in steps["backends"]["figures"]["backends"]} >= {"numpy", "torch"}
    for t in ("numpy", "torch-cpu"):
        for d in ("float32", "float64"):
            c = steps[f"conformance-{t}-{d}"]
            assert c["status"] == "passed" and c["figures"]["tests"].get("passed", 0) >= 1
            assert c["figures"]["failed_tests"] == [] and c["figures"]["max_error_over_tolerance"] <= 1
            assert d in c["figures"]["worst_check"]
        b = steps[f"bench-{t}"]["figures"]
        assert b["train_images_per_second"] > 0 and b["batch_size"] == 4 and b["backend"] == t.split("-")[0]
        tr = steps[f"train-{t}"]["figures"]
        assert tr["epochs_completed"] == 1 and 0 <= tr["test_accuracy"] <= 1 and tr["seconds_per_epoch"][0] > 0
    h = steps["headline"]
    assert h["target"] == "numpy" and h["figures"]["epochs_completed"] == 1 and not h["figures"]["resumed"]
    assert report["headline"]["epochs_completed"] == 1
    assert report["summary"]["failed"] == 0
    # What the device tool brings back: two files at the top, each under 16 MiB; the runs' folders gone.
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "paper", "report.json"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    ran = [n for n, s in steps.items() if s["log"]]
    assert {f"logs/{n}.log" for n in ran} == names
    for f in (out / "report.json", out / "logs.tar.gz"):
        assert f.stat().st_size < 16 * 2**20


def _checkout_env() -> dict[str, str]:
    """PYTHONPATH = the repository, then this interpreter's package folders (no installed capsspec
    under python -S: no .pth file runs, so an editable install's finder is not there either)."""
    paths = [str(ROOT), *(p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != ROOT)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def test_a_checkout_on_pythonpath_finds_the_backends_and_the_suite_without_an_install(tmp_path):
    code = ("import sys, capsspec, capsspec.backends, capsspec.conformance.cli\n"
            "from capsspec.registry import get_backend\n"
            "assert capsspec.backends.__file__.startswith(sys.argv[1]), capsspec.backends.__file__\n"
            "b = get_backend('numpy')\n"
            "print(type(b).__module__)\n")
    r = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT / "backends")], env=_checkout_env(), cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "capsspec.backends.numpy"


# ===================================================================================== stubs
STUB = textwrap.dedent('''
    """A stand-in for `python -m capsspec`: each subcommand sleeps, fails or prints figures as $GPUCHECK_STUB says."""
    import json, os, sys, time
    from pathlib import Path

    cfg = json.loads(os.environ.get("GPUCHECK_STUB", "{}"))
    cmd, args = sys.argv[1], sys.argv[2:]
    target = " ".join(args)
    key = cmd + (":" + args[args.index("--backend") + 1] if "--backend" in args else "")
    if "--device" in args:
        key += ":" + args[args.index("--device") + 1]
    if "--fast" in args or "fast=true" in args or "torch_fast" in target:
        key += ":fast"
    pidfile = cfg.get("pidfile")
    if pidfile:
        with open(pidfile, "a") as f:
            f.write(f"{key} {os.getpid()}\\n")
    time.sleep(cfg.get("sleep", {}).get(key, cfg.get("sleep", {}).get(cmd, 0)))
    if key in cfg.get("fail", []) or cmd in cfg.get("fail", []):
        print(f"stub: {key}: error: told to fail", file=sys.stderr)
        sys.exit(1)
    if cmd == "backends":
        print(json.dumps(cfg.get("backends", [{"name": "numpy", "available": True, "device": "cpu"}])))
    elif cmd == "gpu-check":
        specs = json.loads(args[args.index("--probe") + 1])
        down = cfg.get("unavailable", {})
        print(json.dumps({"targets": {s["name"]: {"available": s["name"] not in down, "reason": down.get(s["name"], ""),
                                                   "version": "1", "device": "stub"} for s in specs}, "cuda": {}}))
    elif cmd == "conformance":
        dtype = "float64" if args[-1].startswith("(float64") or args[-1] == "float64" else "float32"
        print(f"conformance/test_ops.py::test_op_forward[{dtype}-squash] PASSED")
        print("test_ops.py::test_op_forward[" + dtype + "-squash]   6   6   0.5   1e-7  squash out")
        print("==== 1 passed, 3 deselected in 0.10s ====")
    elif cmd == "bench":
        print(json.dumps({"backend": "stub", "train_images_per_second": 5000.0, "inference_images_per_second": 20000.0,
                          "epoch_seconds_60k": 12.0, "batch_size": 128}))
    elif cmd == "train":
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"epoch": 1, "step": 10, "loss": 0.5, "train_accuracy": 0.5, "val_accuracy": 0.5,
                                "test_accuracy": 0.5, "seconds": 0.2, "eval_seconds": 0.1,
                                "images_per_second": 100.0}) + "\\n")
        (out / "summary.json").write_text(json.dumps({"test_accuracy": 0.5, "settings": {}}))
''')


@pytest.fixture
def stub(tmp_path, monkeypatch):
    path = tmp_path / "stub_capsspec.py"
    path.write_text(STUB)

    def configure(**cfg):
        monkeypatch.setenv("GPUCHECK_STUB", json.dumps(cfg))
        return [sys.executable, str(path)]

    return configure


def _fast(profile, caps=5.0, mins=0.2, **kw):
    """A profile with short caps and minimums, so a whole check takes seconds."""
    return dataclasses.replace(profile, caps={k: caps for k in profile.caps}, mins={k: mins for k in profile.mins},
                               overhead_s=0.1, reserve_s=0.5, **kw)


def _report(out):
    report = json.loads((out / "report.json").read_text())
    return report, {s["name"]: s for s in report["steps"]}


def test_a_tiny_budget_skips_the_later_steps_with_a_note(tmp_path, stub):
    launcher = stub(sleep={"conformance": 1.0})
    out, budget = tmp_path / "out", 4.0
    t0 = time.monotonic()
    rc = gpucheck.run_check(out, budget_s=budget, rehearsal=True, launcher=launcher,
                            profile=_fast(gpucheck.REHEARSAL_PROFILE, mins=0.6))
    elapsed = time.monotonic() - t0
    report, steps = _report(out)
    assert rc == 0 and elapsed <= budget + 0.5  # + the parent's own bookkeeping after the last step
    assert report["elapsed_seconds"] <= budget
    # The budget is kept by cutting: a step either does not start (skipped, with the reason) or is
    # killed at its share of the budget (timed out, with the reason); never silently.
    cut = [s for s in steps.values() if s["status"] in ("skipped", "timed_out") and s["name"] != "device"]
    assert cut, "a 4 s budget cannot hold 4 conformance runs of 1 s and everything after them"
    for s in cut:
        if s["status"] == "timed_out":
            assert "share of the budget" in s["reason"], s
        else:
            assert s["reason"].startswith("out of budget") or "MNIST" in s["reason"] or "no target" in s["reason"], s
    # Every step of the plan is in the report, run or skipped: nothing is silently left out.
    assert {"headline", "train-torch-cpu", "bench-numpy", "conformance-torch-cpu-float64"} <= set(steps)
    assert report["pending_steps"] == []


def test_a_failing_step_makes_the_exit_status_non_zero_and_the_rest_still_runs(tmp_path, stub):
    launcher = stub(fail=["bench:torch:cpu"])
    out = tmp_path / "out"
    rc = gpucheck.run_check(out, budget_s=60, rehearsal=True, launcher=launcher, profile=_fast(gpucheck.REHEARSAL_PROFILE))
    report, steps = _report(out)
    assert rc == 1
    assert report["summary"]["failed_steps"] == ["bench-torch-cpu"]
    assert "told to fail" in steps["bench-torch-cpu"]["reason"]
    assert steps["train-torch-cpu"]["status"] == "passed" and steps["train-torch-cpu"]["figures"]["test_accuracy"] == 0.5
    # the headline avoids the target that failed a check
    assert steps["headline"]["target"] == "numpy"


def test_main_returns_one_when_a_check_fails_and_two_for_bad_flags(tmp_path, stub, monkeypatch):
    monkeypatch.setattr(gpucheck, "default_launcher", lambda: stub(fail=["data"]))
    monkeypatch.setattr(gpucheck, "REHEARSAL_PROFILE", _fast(gpucheck.REHEARSAL_PROFILE))
    assert gpucheck.main(["--rehearsal", "--out", str(tmp_path / "o"), "--budget-seconds", "30"]) == 1
    _, steps = _report(tmp_path / "o")
    assert steps["data"]["status"] == "failed" and "MNIST" in steps["train-numpy"]["reason"]
    assert gpucheck.main(["--rehearsal", "--out", str(tmp_path / "o"), "--budget-seconds", "-1"]) == 2
    assert gpucheck.main(["--rehearsal", "--out", str(tmp_path / "o"), "--phases", "bogus"]) == 2
    assert gpucheck.main(["--rehearsal", "--out", str(tmp_path / "o"), "--targets", "cupy"]) == 2


def test_a_hung_step_is_killed_with_its_children_at_its_timeout(tmp_path, stub):
    pids = tmp_path / "pids.txt"
    launcher = stub(sleep={"conformance:numpy": 600}, pidfile=str(pids))
    out = tmp_path / "out"
    t0 = time.monotonic()
    rc = gpucheck.run_check(out, budget_s=60, rehearsal=True, launcher=launcher, targets=["numpy"],
                            phases=["conformance"], profile=_fast(gpucheck.REHEARSAL_PROFILE, caps=2.0))
    elapsed = time.monotonic() - t0
    _, steps = _report(out)
    assert rc == 0  # timed out is not failed: nothing was found wrong
    for d in ("float32", "float64"):
        s = steps[f"conformance-numpy-{d}"]
        assert s["status"] == "timed_out" and s["seconds"] <= 2.5 and "killed" in s["reason"]
    assert elapsed < 15
    for line in pids.read_text().splitlines():
        pid = int(line.split()[1])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_stopped_check_kills_its_step_and_leaves_a_report(tmp_path, stub):
    pids = tmp_path / "pids.txt"
    launcher = stub(sleep={"conformance:numpy": 600}, pidfile=str(pids))
    out = tmp_path / "out"
    code = ("import sys, json\nfrom pathlib import Path\nfrom capsspec.tools import gpucheck\n"
            "sys.exit(gpucheck.run_check(Path(sys.argv[1]), budget_s=60, rehearsal=True, targets=['numpy'], "
            "phases=['conformance', 'bench'], launcher=json.loads(sys.argv[2])))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out), json.dumps(launcher)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (pids.is_file() and pids.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.terminate()
    assert proc.wait(timeout=20) == 130
    report, steps = _report(out)
    assert report["interrupted"] == "SIGTERM"
    assert steps["bench-numpy"]["status"] == "skipped" and "not reached" in steps["bench-numpy"]["reason"]
    killed = steps["conformance-numpy-float32"]
    assert killed["status"] == "skipped" and "stopped after" in killed["reason"] and killed["log"]
    pid = int(pids.read_text().split()[1])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_gpu_mode_plans_the_gpu_targets_adds_jax_on_a_gpu_and_fails_an_unavailable_one(tmp_path, stub, monkeypatch):
    rows = [{"name": "jax", "available": True, "device": "cuda:0 (NVIDIA H100)"},
            {"name": "torch", "available": True, "device": "cpu (cuda available: 1 device(s))"}]
    launcher = stub(backends=rows, unavailable={"cupy": "no CUDA device"})
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # relative folders, as in the README's device command
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.159.04, 81559, 0'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    rc = gpucheck.run_check(Path("out"), budget_s=60, launcher=launcher, data_dir=".mnist",
                            profile=_fast(gpucheck.GPU_PROFILE, caps=10.0), paper_dir=Path(".gpucheck/paper"))
    report, steps = _report(out)
    # the steps run elsewhere, so they get absolute folders
    assert str(tmp_path / ".mnist") in steps["data"]["command"]
    assert str(tmp_path / ".gpucheck" / "paper") in steps["headline"]["command"]
    assert (tmp_path / ".gpucheck" / "paper" / "metrics.jsonl").is_file()
    assert rc == 1 and report["summary"]["failed_steps"] == ["probe-cupy"]
    assert [t["name"] for t in report["targets"]] == ["cupy", "torch-cuda", "torch-cuda-fast", "jax-gpu"]
    assert report["device"] == [{"name": "NVIDIA H100 80GB HBM3", "driver_version": "580.159.04",
                                 "memory_total_mib": "81559", "memory_used_mib": "0"}]
    assert report["jax"].startswith("included")
    assert steps["probe"]["timeout_s"] == 10.0  # its whole cap: the probe's answers share no time with it
    for phase in ("conformance-cupy-float32", "bench-cupy", "train-cupy"):
        assert steps[phase]["status"] == "skipped" and "cupy is not available" in steps[phase]["reason"]
    fast = steps["conformance-torch-cuda-fast-float64"]["command"]
    assert fast[fast.index("--backend") + 1] == "capsspec.tools.gpucheck:torch_fast" and "cuda" in fast
    assert "--fast" in steps["bench-torch-cuda-fast"]["command"]
    assert "fast=true" in steps["train-torch-cuda-fast"]["command"]
    assert fast[fast.index("-k") + 1] == "(float64) and (test_optim or test_model or test_interchange)"
    plain = steps["conformance-torch-cuda-float32"]["command"]
    assert plain[plain.index("-k") + 1] == "not float64" and "--profile" in plain and "ci" in plain
    assert "--no-download" in steps["data"]["command"]
    # training sized from the bench: 5000 images/s; the headline on the fastest target that passed
    assert "images" in steps["train-torch-cuda"]["figures"]["sizing"]
    assert steps["headline"]["status"] == "passed" and steps["headline"]["target"] == "torch-cuda-fast"
    assert "--epochs" in steps["headline"]["command"]


def test_the_headline_resumes_the_run_of_the_previous_call(tmp_path):
    from capsspec.training.checkpoint import save_checkpoint
    from capsspec.config import CapsNetConfig
    from capsspec.model import init_params

    paper = tmp_path / "paper"
    paper.mkdir()
    config = CapsNetConfig(conv1_channels=2, primary_types=2, primary_dim=4)
    save_checkpoint(paper / "checkpoint.safetensors", init_params(config, 0), config, epoch=3)
    (paper / "metrics.jsonl").write_text(json.dumps({"epoch": 3, "seconds": 1.0, "eval_seconds": 0.5}) + "\n")
    runner = step_runner.Runner(tmp_path / "out", 100.0, 1.0)
    runner.run = lambda name, phase, argv, **kw: runner.record(step_runner.StepResult(name, phase, "passed", command=argv))
    report: dict = {}
    gpucheck._headline(runner, report, gpucheck.GPU_PROFILE, ["capsspec"], list(gpucheck.GPU_TARGETS), [], True,
                       paper, rehearsal=False)
    argv = runner.results[-1].command
    assert "--resume" in argv
    epochs = int(argv[argv.index("--epochs") + 1])
    assert 4 <= epochs <= gpucheck.PAPER_EPOCHS  # continues after epoch 3, as many as fit 99 s at ~1.5 s each


# ===================================================================================== parts
def test_conformance_output_is_parsed_even_when_the_run_was_cut_short():
    text = ("$ capsspec conformance ...\n"
            "conformance/test_ops.py::test_op_forward[float32-squash] PASSED [ 1%]\n"
            "conformance/test_ops.py::test_op_vjp[float32-routing] FAILED [ 2%]\n"
            "conformance/test_ops.py::test_op_vjp[float32-mask] SKIPPED (not applicable: x) [ 3%]\n")
    r = step_runner.StepResult("c", "conformance", "timed_out", "killed")
    step_parsers.parse_conformance(r, text)
    assert r.figures["tests"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert r.figures["failed_tests"] == ["test_op_vjp[float32-routing]"] and r.status == "failed"
    done = step_runner.StepResult("c", "conformance", "passed")
    step_parsers.parse_conformance(done, "x::t[float64] PASSED\n===== 1 passed, 2 deselected in 3.50s =====\n"
                                     "test_ops.py::t[float64]   6   6   0.25   1e-9  out\n"
                                     "test_ops.py::u[float64]   6   6   0.75   1e-9  out\n")
    assert done.status == "passed" and done.figures["pytest_seconds"] == 3.5
    assert done.figures["max_error_over_tolerance"] == 0.75 and done.figures["worst_check"] == "test_ops.py::u[float64]"


def test_a_long_log_is_cut_to_its_head_and_tail(tmp_path):
    log = tmp_path / "x.log"
    log.write_bytes(b"HEAD" + b"x" * 100_000 + b"TAIL")
    step_runner.truncate_log(log, 10_000)
    data = log.read_bytes()
    assert len(data) <= 10_000 and data.startswith(b"HEAD") and data.endswith(b"TAIL") and b"cut" in data


def test_importing_gpucheck_imports_no_framework():
    code = ("import sys, capsspec.tools.gpucheck\n"
            "bad = [m for m in ('torch', 'tensorflow', 'cupy', 'jax', 'safetensors') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_headline_parameters_come_back_in_parts_that_rebuild_a_checkpoint(tmp_path):
    from capsspec.training.checkpoint import load_checkpoint, save_checkpoint
    from capsspec.config import CapsNetConfig
    from capsspec.model import init_params
    from capsspec.optim import adam_init

    paper, out = tmp_path / "paper", tmp_path / "out"
    paper.mkdir()
    config = CapsNetConfig(conv1_channels=2, primary_types=2, primary_dim=4)
    params = init_params(config, 0)
    state = adam_init(params)
    save_checkpoint(paper / "checkpoint.safetensors", params, config, state=state, epoch=2)
    info = check_report.bring_back_params(paper, out, part_bytes=2 * 2**20)
    parts = sorted(out.glob("paper-params.safetensors.part*"))
    assert [p.name for p in parts] == info["parts"] and len(parts) >= 2
    assert all(p.stat().st_size <= 2 * 2**20 for p in parts)
    rebuilt = tmp_path / "rebuilt.safetensors"
    rebuilt.write_bytes(b"".join(p.read_bytes() for p in parts))
    ck = load_checkpoint(rebuilt)
    assert ck.epoch == 2 and ck.state is None and ck.config == config
    for k, v in params.items():
        assert (ck.params[k] == v).all()


def test_a_bug_in_the_check_itself_is_reported_and_fails(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(gpucheck, "_plan_and_run", broken)
    rc = gpucheck.run_check(tmp_path / "out", budget_s=10, rehearsal=True)
    report, steps = _report(tmp_path / "out")
    assert rc == 1 and steps["gpu-check"]["status"] == "failed" and "planted" in steps["gpu-check"]["reason"]
    assert (tmp_path / "out" / "logs.tar.gz").is_file()
