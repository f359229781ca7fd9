"""Data-parallel training under torchrun (capsspec.training.distributed), on the CPU with gloo and two processes.

The two-process runs go through the command line (`python -m torch.distributed.run --nproc-per-node 2
CHILD ... train ...`, CHILD being capsspec's command line with the stand-in MNIST files of conftest's
mnist_dir accepted) on a small model; the one-process runs they are held to go through the same
command line in this process. The tolerance is the conformance suite's for float32 gradients: a
data-parallel step differs from a one-process step only in how the gradient's sum over the batch
is split and reduced.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from capsspec.training import checkpoint as ckpt
from capsspec.tools import cli
from capsspec.conformance.tolerances import tolerance
from capsspec.training.distributed import Launch, launch, plan_device, shard

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("this torch has no torch.distributed with gloo", allow_module_level=True)

# capsspec's command line, with the MNIST files in argv[1] accepted (their hashes and shapes are the
# stand-ins', as conftest's mnist_dir arranges in this process), and rank DIE_RANK killing itself with
# SIGKILL when it draws the shifts of training batch DIE_AT (1-based), if those are set.
CHILD = r'''
import os, signal, sys
import numpy as np
from capsspec.tools import cli
from capsspec.training import mnist as data
import capsspec.training.train as T

folder = sys.argv[1]
for name in data.MNIST_FILES:
    raw = open(os.path.join(folder, name), "rb").read()
    import hashlib
    data.MNIST_FILES[name] = hashlib.sha256(raw).hexdigest()
    data._EXPECTED_DIMS[name] = tuple(int(d) for d in np.frombuffer(raw[4:4 + 4 * raw[3]], ">u4"))
die_at, die_rank = int(os.environ.get("DIE_AT", "0")), os.environ.get("DIE_RANK")
if die_at and os.environ.get("RANK") == die_rank:
    real, calls = T.augment_batch, [0]
    def augment_batch(*args, **kwargs):
        calls[0] += 1
        if calls[0] == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    T.augment_batch = augment_batch
sys.exit(cli.main(sys.argv[2:]))
'''

# A small model on the 28x28 stand-ins: 3 steps of a global batch of 7 (slices of 4 and 3) per epoch,
# with the 2-pixel shifts, the decoder, and 8 validation and 12 test images (several evaluation rounds).
SMALL = ["--conv1-channels", "4", "--primary-types", "2", "--primary-dim", "4", "--seed", "3", "--val-size", "8",
         "--train-subset", "21", "--batch-size", "7", "--eval-batch-size", "3", "--quiet", "--backend", "torch",
         "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, mnist_dir: Path, args: list[str], env: dict[str, str] | None = None,
              nproc: int = 2) -> subprocess.CompletedProcess:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), str(child), str(mnist_dir), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=full_env)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    c = ckpt.load_checkpoint(path)
    return {**{f"params.{k}": v for k, v in c.params.items()}, **{f"m.{k}": v for k, v in c.state["m"].items()},
            **{f"v.{k}": v for k, v in c.state["v"].items()}}


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """Every array within the float32 gradient tolerance, relative to its largest value (as the suite
    compares gradients); returns the largest error as a fraction of its bound."""
    tol = tolerance("float32", "gradients")
    assert got.keys() == want.keys()
    worst = 0.0
    for k in want:
        a, e = got[k].astype(np.float64), want[k].astype(np.float64)
        bound = tol.atol + tol.rtol * float(np.abs(e).max())
        err = float(np.abs(a - e).max())
        assert err <= bound, f"{k}: largest difference {err:.3g} exceeds {bound:.3g}"
        worst = max(worst, err / bound)
    return worst


@pytest.fixture
def one_thread():
    """torch on one thread in this process while a test runs (as torchrun's processes are): on a
    small shared machine, its thread pool only waits for the other processes' cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(out: Path) -> list[dict]:
    """The epochs' rows of metrics.jsonl (the training curve's points left out)."""
    return [r for line in (out / "metrics.jsonl").read_text().splitlines() if "kind" not in (r := json.loads(line))]


# ===================================================================================== in-process units
def test_launch_reads_torchrun_environment_and_refuses_bad_values():
    assert launch({}) is None and launch({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert launch({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Launch(rank=3, world_size=4, local_rank=1)
    with pytest.raises(ValueError, match="RANK"):
        launch({"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="RANK=2 must be below WORLD_SIZE=2"):
        launch({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


def test_shards_cover_a_batch_in_order_and_differ_by_at_most_one():
    for n in (0, 1, 5, 7, 128):
        for world in (1, 2, 3, 8):
            parts = [shard(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [hi - lo for lo, hi in parts]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard(4, 2, 2)


def test_only_torch_trains_distributed_and_each_process_gets_its_own_gpu():
    where = Launch(rank=3, world_size=4, local_rank=1)
    with pytest.raises(ValueError, match="--backend numpy cannot train distributed.*--backend torch"):
        plan_device("numpy", None, where)
    assert plan_device(None, "cpu", where) == ("torch", "cpu")
    assert plan_device("torch", "cuda", where) == ("torch", "cuda:1")
    assert plan_device("torch", "cuda:0", where) == ("torch", "cuda:1")


def test_dist_timeout_outside_torchrun_is_refused(tmp_path, capsys):
    assert cli.main(["train", "--dist-timeout", "5", "--out", str(tmp_path / "run")]) == 2
    assert "--dist-timeout applies to runs on several processes started by torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_importing_capsspec_distributed_imports_no_framework():
    code = "import sys, capsspec.training.distributed, capsspec.training.train; print(sorted(m for m in sys.modules if m in " \
           "('torch', 'tensorflow', 'jax', 'cupy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def one_process_group(monkeypatch):
    """torch.distributed's gloo group of this process alone (what torchrun --nproc-per-node 1 would set up)."""
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    yield Launch(rank=0, world_size=1, local_rank=0)
    if dist.is_initialized():
        dist.destroy_process_group()


TINY = dict(conv1_channels=4, conv1_kernel=5, input_height=12, input_width=12, primary_types=2, primary_dim=4,
            primary_kernel=3, primary_stride=2, num_classes=3, class_dim=4, decoder_widths=(8,))


def test_a_share_of_the_batch_weights_the_gradient_by_it(one_process_group):
    """W n / B scales the loss: with W = 1 and 3 of 7 images, Adam's first moment after one step
    (1 - beta1) g is 3/7 of the plain step's."""
    from capsspec import AdamConfig, CapsNetConfig, get_backend, init_params
    from capsspec.training.distributed import setup

    config, adam = CapsNetConfig(**TINY), AdamConfig()
    rng = np.random.default_rng(0)
    x, y = rng.random((3, 1, 12, 12), dtype=np.float32), np.array([0, 2, 1])
    b = get_backend("torch")
    moments = []
    for share in (None, (3, 7)):
        p = b.params_from_numpy(init_params(config, 1), config)
        s = b.adam_init(p)
        if share is not None:
            d = setup(b, one_process_group)
            d.attach(b, p, s)
            d.begin_step(b, s, *share)
        p, s, _ = b.train_step(p, s, b.asarray(x), b.asarray(y), config, adam)
        moments.append(b.state_to_numpy(s)["m"])
    for k, m in moments[0].items():
        np.testing.assert_allclose(moments[1][k], m * 3 / 7, rtol=1e-5, atol=1e-12, err_msg=k)
    with pytest.raises(ValueError, match="local=8, total=7"):
        d.begin_step(b, s, 8, 7)


def test_bench_times_the_distributed_step(one_process_group):
    from capsspec.tools.bench import _format, run_distributed_benchmark
    from capsspec.config import CapsNetConfig

    r = run_distributed_benchmark(one_process_group, device="cpu", config=CapsNetConfig(**TINY), batch_size=4,
                                  steps=1, warmup=0)
    assert r["world_size"] == 1 and r["batch_per_process"] == [4] and r["process_group"] == "gloo"
    assert r["train_images_per_second"] == pytest.approx(4 / r["train_step_seconds"])
    assert r["train_images_per_second_per_process"] == r["train_images_per_second"]
    assert r["inference_images_per_second"] is None and "distributed" in r["note"]
    assert not dist.is_initialized()  # it leaves the group it joined
    r = {**r, "world_size": 2, "batch_per_process": [2, 2], "train_images_per_second_per_process": 1.0}
    assert "images/s in all, 1.0 per process" in _format(r) and "global batch 4 = 2 + 2" in _format(r)


# ===================================================================================== two processes
@pytest.mark.slow
def test_two_processes_train_as_one_and_their_checkpoint_resumes_on_one(tmp_path, mnist_dir, capsys, one_thread):
    two, one = tmp_path / "two", tmp_path / "one"
    r = _torchrun(tmp_path, mnist_dir, ["train", *SMALL, "--epochs", "1", "--data-dir", str(mnist_dir), "--out",
                                        str(two)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("capsspec: done.") == 1, "rank 0 alone reports"
    assert cli.main(["train", *SMALL, "--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(one)]) == 0
    capsys.readouterr()

    # Three steps of the global batch of 7 over two processes = three steps of batch 7 in one process:
    # parameters, and Adam's moments (running sums of the reduced gradients).
    _assert_close(_arrays(two / "final.safetensors"), _arrays(one / "final.safetensors"))
    two_rows, one_rows = _rows(two), _rows(one)
    assert len(two_rows) == len(one_rows) == 1 and two_rows[0]["step"] == one_rows[0]["step"] == 3
    rtol = tolerance("float32", "gradients").rtol
    for key in ("loss", "margin", "reconstruction"):
        assert abs(two_rows[0][key] - one_rows[0][key]) <= rtol * abs(one_rows[0][key]), key
    # Accuracies are counts summed over the processes' shards: exact.
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert two_rows[0][key] == one_rows[0][key], key
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and json.loads((one / "summary.json").read_text())["world_size"] == 1
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())

    # The two-process checkpoint, resumed in one process, continues the one-process trajectory.
    resumed, reference = tmp_path / "resumed", tmp_path / "reference"
    shutil.copytree(two, resumed)
    shutil.copytree(one, reference)
    for out in (resumed, reference):
        assert cli.main(["train", "--resume", "--epochs", "2", "--data-dir", str(mnist_dir), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "it ran on 2 processes and now on 1" in err
    _assert_close(_arrays(resumed / "final.safetensors"), _arrays(reference / "final.safetensors"))
    assert [r["step"] for r in _rows(resumed)] == [3, 6]


@pytest.mark.slow
def test_a_process_that_dies_fails_the_job_clearly_and_keeps_the_last_checkpoint(tmp_path, mnist_dir, capsys,
                                                                                    one_thread):
    out = tmp_path / "run"
    args = ["train", *SMALL, "--train-subset", "28", "--epochs", "1", "--checkpoint-every", "2", "--data-dir",
            str(mnist_dir), "--out", str(out)]
    r = _torchrun(tmp_path, mnist_dir, args, env={"DIE_AT": "4", "DIE_RANK": "1"})
    assert r.returncode != 0
    # Ours, from the survivor: what failed and which checkpoint is whole; and torchrun's, naming the dead one.
    assert "process 0 of 2" in r.stderr and "The last checkpoint is" in r.stderr, r.stderr[-3000:]
    assert "step 2" in r.stderr
    assert "ChildFailedError" in r.stderr or "Signal 9" in r.stderr, r.stderr[-3000:]
    c = ckpt.load_checkpoint(out / "checkpoint.safetensors")  # whole (its hash checks out), at step 2
    assert c.step == 2 and not (out / "final.safetensors").exists()

    # That mid-epoch checkpoint of two processes, resumed in one, ends where one process alone ends.
    one = tmp_path / "one"
    assert cli.main(["train", "--resume", "--data-dir", str(mnist_dir), "--out", str(out)]) == 0
    assert cli.main([*args[:-1], str(one)]) == 0
    assert "at step 2: epoch 1, 2/4 batches" in capsys.readouterr().err
    _assert_close(_arrays(out / "final.safetensors"), _arrays(one / "final.safetensors"))
    (resumed,), (alone,) = _rows(out), _rows(one)
    for key in ("loss", "margin", "reconstruction"):
        assert abs(resumed[key] - alone[key]) <= tolerance("float32", "gradients").rtol * abs(alone[key]), key
    assert resumed["train_accuracy"] == alone["train_accuracy"]


@pytest.mark.slow
def test_two_processes_train_multimnist_as_one(tmp_path, mnist_dir, capsys, one_thread):
    # MultiMNIST's generated pairs and their two target digits are sliced like MNIST batches: two
    # steps of a global batch of 7 pairs on two processes are two steps of batch 7 in one.
    args = [*[a for a in SMALL if a not in ("--train-subset", "21")], "--dataset", "multimnist",
            "--images-per-epoch", "14", "--test-subset", "6", "--epochs", "1", "--data-dir", str(mnist_dir)]
    two, one = tmp_path / "two", tmp_path / "one"
    r = _torchrun(tmp_path, mnist_dir, ["train", *args, "--out", str(two)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert cli.main(["train", *args, "--out", str(one)]) == 0
    capsys.readouterr()
    _assert_close(_arrays(two / "final.safetensors"), _arrays(one / "final.safetensors"))
    two_rows, one_rows = _rows(two), _rows(one)
    assert two_rows[0]["step"] == one_rows[0]["step"] == 2
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert two_rows[0][key] == one_rows[0][key], key
    assert json.loads((two / "summary.json").read_text())["dataset"] == "multimnist"
