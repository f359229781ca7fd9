"""`capsspec train` interrupted and resumed as a user does it: Ctrl-C (SIGINT) and SIGTERM at any moment,
then `--resume --out DIR` as the message says, on stand-in MNIST files and a tiny model."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

import capsspec.training.train as train_mod
import capsspec.training.splits as splits_mod
from capsspec.training import checkpoint as ckpt
from capsspec.backend import BackendUnavailable
from capsspec.tools.cli import main

TINY_FLAGS = ["--conv1-channels", "2", "--primary-types", "2", "--primary-dim", "4", "--batch-size", "10",
              "--val-size", "5", "--quiet"]


@pytest.fixture
def signal_at_step(monkeypatch):
    """signal_at_step(k, signum): the next `capsspec train` sends itself signum during its k-th step."""

    def arm(k: int, signum: int) -> None:
        real_train = train_mod.train

        def train(backend, *args, **kwargs):
            real_step, calls = backend.train_step, [0]

            def train_step(*a):
                calls[0] += 1
                if calls[0] == k:
                    os.kill(os.getpid(), signum)
                return real_step(*a)

            backend.train_step = train_step
            train_mod.train = real_train  # armed for one run only
            return real_train(backend, *args, **kwargs)

        monkeypatch.setattr(train_mod, "train", train)

    return arm


def _final_params(out):
    return ckpt.load_checkpoint(out / "final.safetensors").params


@pytest.mark.parametrize("signame, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_in_epoch_1_names_a_checkpoint_that_exists_and_the_resume_is_exact(
        capsys, tmp_path, mnist_dir, signal_at_step, signame, status):
    base = ["train", "--backend", "numpy", *TINY_FLAGS, "--data-dir", str(mnist_dir), "--epochs", "1"]
    assert main([*base, "--out", str(tmp_path / "full")]) == 0
    capsys.readouterr()

    out = tmp_path / "cut"
    signal_at_step(2, getattr(signal, signame))
    assert main([*base, "--out", str(out)]) == status
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last == (f"capsspec train: stopped by {signame} at step 2: epoch 1, 2/4 batches; {out}/checkpoint.safetensors "
                    f"holds that step; continue with: capsspec train --resume --out {out}"), err
    assert "Traceback" not in err and ckpt.load_checkpoint(out / "checkpoint.safetensors").step == 2

    # Exactly what the message says, with no --backend: the run goes on on numpy, where it started.
    assert main(["train", "--resume", "--out", str(out), "--data-dir", str(mnist_dir), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "backend numpy: the backend the run was started on" in err and "as the run was started" in err
    assert "bit-exact" not in err
    a, b = _final_params(tmp_path / "full"), _final_params(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resuming_on_another_backend_says_so_and_credits_each_backend(capsys, tmp_path, mnist_dir):
    try:
        import capsspec

        capsspec.get_backend("torch")
    except BackendUnavailable as exc:
        pytest.skip(f"torch is not available here: {exc}")
    out = tmp_path / "run"
    assert main(["train", "--backend", "numpy", *TINY_FLAGS, "--data-dir", str(mnist_dir), "--epochs", "1",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--backend", "torch", "--out", str(out), "--data-dir", str(mnist_dir),
                 "--epochs", "2", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "the run was started on numpy" in captured.err and "will not be bit-exact" in captured.err
    by = json.loads(captured.out)["train_seconds_by_backend"]
    assert sorted(k.split()[0] for k in by) == ["numpy", "torch"]


def test_ctrl_c_before_training_starts_claims_no_checkpoint(capsys, tmp_path, mnist_dir, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(splits_mod, "split_data", interrupted)  # Ctrl-C while the data loads
    out = tmp_path / "run"
    assert main(["train", "--backend", "numpy", *TINY_FLAGS, "--data-dir", str(mnist_dir), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "capsspec train: stopped by SIGINT before training started; no checkpoint was written"
    assert not (out / "checkpoint.safetensors").exists()


def test_checkpoint_every_flag_reaches_the_run(capsys, tmp_path, mnist_dir):
    out = tmp_path / "run"
    assert main(["train", "--backend", "numpy", *TINY_FLAGS, "--data-dir", str(mnist_dir), "--epochs", "1",
                 "--checkpoint-every", "3", "--out", str(out)]) == 0
    assert "checkpoints every 3 steps" in capsys.readouterr().err
    assert ckpt.load_checkpoint(out / "checkpoint.safetensors").training["checkpoint_every"] == 3
