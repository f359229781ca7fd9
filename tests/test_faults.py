"""Fault injection: a run killed with SIGKILL at seeded random moments and resumed each time ends exactly
as an uninterrupted run does, and no kill ever leaves a half-written file.

A small numpy run (12x12 synthetic images, 3 epochs of 8 steps, a checkpoint every 3 steps, the
validation-selected checkpoint on) is run in a child process. Each round, the child is killed
with SIGKILL at a moment drawn from a seeded generator: in the k-th training step (before or
after its update), in the k-th file write (part-way through the bytes, or just after the rename),
in the k-th evaluation batch, or at a random wall-clock time from the parent. After every kill
each file the run keeps must be whole (checkpoints load and pass their hash, metrics and summary
parse); leftover temporary files are allowed only until the next start removes them. The last
round runs to the end; its parameters, optimizer state, metrics and summary must equal the
uninterrupted run's bit for bit (timings aside).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from capsspec.training import checkpoint as ckpt
from capsspec.training.atomic_files import stale_temporaries
from capsspec.training.checkpoint import BEST_VAL_NAME, METRICS_NAME, SUMMARY_NAME

# The child: trains (or resumes) the small run in sys.argv[1], killing itself at the moment that
# sys.argv[2:] name: PHASE K FRACTION.
CHILD = r'''
import os, signal, sys
import numpy as np
import capsspec
import capsspec.training.checkpoint as C
import capsspec.training.train as T
import capsspec.training.settings as S
import capsspec.training.splits as P
from capsspec.config import CapsNetConfig
from capsspec.training.atomic_files import atomic_path

out, phase, k, fraction = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
calls = [0]

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def count():
    calls[0] += 1
    return calls[0] == k

backend = capsspec.get_backend("numpy")
if phase == "step":
    real_step = backend.train_step
    def train_step(*args):
        hit = count()
        if hit and fraction < 0.5:
            kill()  # before the update
        result = real_step(*args)
        if hit:
            kill()  # after it, before the trainer has seen it
        return result
    backend.train_step = train_step
elif phase == "write":
    def partial(write):
        def wrapped(path, data):
            if not count():
                return write(path, data)
            raw = data if isinstance(data, bytes) else data.encode()
            if fraction >= 1.0:  # the whole write, rename included, then the kill
                write(path, data)
                kill()
            with atomic_path(path) as tmp:  # part of the bytes, on disk, then the kill
                with open(tmp, "wb") as f:
                    f.write(raw[:int(len(raw) * fraction)])
                    f.flush()
                    os.fsync(f.fileno())
                kill()
        return wrapped
    C.atomic_write_bytes = partial(C.atomic_write_bytes)
    T.atomic_write_text = partial(T.atomic_write_text)
elif phase == "eval":
    real_predict = T.predict_top_k  # the trainer's evaluation: every prediction goes through it
    def predict_top_k(*args, **kwargs):
        if count():
            kill()
        return real_predict(*args, **kwargs)
    T.predict_top_k = predict_top_k

TINY = CapsNetConfig(input_height=12, input_width=12, conv1_channels=4, conv1_kernel=5, primary_types=2,
                     primary_dim=4, primary_kernel=3, primary_stride=2, num_classes=3, class_dim=4,
                     decoder_widths=(8,))
rng = np.random.default_rng(0)
def make(n):
    y = rng.integers(0, 3, n)
    x = rng.random((n, 1, 12, 12)).astype(np.float32) * 0.2
    for c in range(3):
        x[y == c, :, 2 + 3 * c:5 + 3 * c, 3:9] += 0.8
    return np.clip(x, 0, 1), y.astype(np.int64)
(x, y), (xt, yt) = make(80), make(24)
s = S.TrainSettings(epochs=3, batch_size=8, val_size=16, seed=7, select="val", checkpoint_every=3, eval_batch_size=8)
data = P.split_data(x, y, xt, yt, s)
resume = os.path.exists(os.path.join(out, C.CHECKPOINT_NAME))
try:
    T.train(backend, TINY, data, out, settings=s, resume=resume, progress=None, log=lambda m: None)
except ValueError as exc:
    if "already at epoch" not in str(exc):  # a kill after the last write: the run was already complete
        raise
'''

TIMING = ("seconds", "images_per_second", "eval_seconds", "train_seconds", "train_seconds_by_backend",
          "mean_images_per_second")
KEPT = ("checkpoint.safetensors", "final.safetensors", BEST_VAL_NAME, METRICS_NAME, SUMMARY_NAME)


def _child(out: Path, phase: str = "none", k: int = 0, fraction: float = 0.0, kill_after: float | None = None) -> int:
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(out), phase, str(k), str(fraction)],
                         stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode in (0, -signal.SIGKILL), f"the child failed ({phase} {k} {fraction}):\n{err}"
    return p.returncode


def _assert_every_file_is_whole(out: Path) -> None:
    if not out.exists():  # killed before the run made its folder
        return
    for name in KEPT:
        path = out / name
        if not path.exists():
            continue
        if path.suffix == ".safetensors":
            ckpt.load_checkpoint(path)  # raises on a truncated or corrupt file
        elif name == METRICS_NAME:
            [json.loads(line) for line in path.read_text().splitlines()]
        else:
            json.loads(path.read_text())
    unknown = {p.name for p in out.iterdir()} - set(KEPT) - {p.name for n in KEPT for p in stale_temporaries(out / n)}
    assert not unknown, f"files that are neither the run's nor its writers' temporaries: {unknown}"


def _result(out: Path) -> dict:
    final = ckpt.load_checkpoint(out / "final.safetensors")
    best = ckpt.load_checkpoint(out / BEST_VAL_NAME)
    summary = json.loads((out / SUMMARY_NAME).read_text())
    for key in ("checkpoint", "final_checkpoint", "metrics", "reported_checkpoint"):
        summary[key] = Path(summary[key]).name
    return {
        "step": final.step, "epoch": final.epoch, "best_epoch": best.epoch,
        "arrays": {**{f"final.{k}": v for k, v in final.params.items()},
                   **{f"m.{k}": v for k, v in final.state["m"].items()},
                   **{f"v.{k}": v for k, v in final.state["v"].items()},
                   **{f"best.{k}": v for k, v in best.params.items()}},
        "metrics": [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                    for line in (out / METRICS_NAME).read_text().splitlines()],
        "summary": {k: v for k, v in summary.items() if k not in TIMING},
    }


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    assert _child(tmp_path / "reference") == 0
    reference = _result(tmp_path / "reference")
    # 3 epochs of 8 steps: a row per epoch, and curve points (log_every 5) at the 5th and 8th step of each
    assert reference["step"] == 24 and len(reference["metrics"]) == 3 + 3 * 2

    rng = np.random.default_rng(20261125)
    runs, kills = [tmp_path / "killed-0"], {}
    for phase in ["step", "write", "eval", "timer"] * 3:
        if phase == "timer":
            rc = _child(runs[-1], kill_after=float(rng.uniform(0.3, 3.0)))
        else:
            k = int(rng.integers(1, {"step": 9, "write": 9, "eval": 8}[phase]))
            fraction = float(rng.uniform(0.0, 1.2)) if phase == "write" else float(rng.uniform())
            rc = _child(runs[-1], phase, k, fraction)
        kills[phase] = kills.get(phase, 0) + (rc == -signal.SIGKILL)
        _assert_every_file_is_whole(runs[-1])
        if rc == 0:  # this round ran to the end: the next kills go to a fresh run
            runs.append(tmp_path / f"killed-{len(runs)}")
    assert all(kills[p] >= 2 for p in ("step", "write", "eval")), kills
    _child(runs[-1])  # the last round, undisturbed
    for out in runs:
        _assert_every_file_is_whole(out)
        assert not [p for n in KEPT for p in stale_temporaries(out / n)], f"a temporary file was left in {out}"
        result = _result(out)
        arrays, ref_arrays = result.pop("arrays"), {**reference["arrays"]}
        assert arrays.keys() == ref_arrays.keys()
        for name in ref_arrays:
            assert np.array_equal(arrays[name], ref_arrays[name]), (out.name, name)
        assert result == {k: v for k, v in reference.items() if k != "arrays"}, out.name
