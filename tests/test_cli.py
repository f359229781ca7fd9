"""The `capsspec` command line: smoke tests of every subcommand on a tiny model and stand-in MNIST files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types

import numpy as np
import pytest

from capsspec import checkpoint as ckpt
from capsspec import data
from capsspec.cli import main
from capsspec.figures import PERTURBATION_OFFSETS, perturbed_capsules

TINY_FLAGS = ["--backend", "numpy", "--conv1-channels", "2", "--primary-types", "2", "--primary-dim", "4",
              "--batch-size", "10", "--val-size", "5", "--quiet"]


def _idx(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.tobytes()


@pytest.fixture
def mnist_dir(tmp_path, monkeypatch):
    """A folder of small stand-in MNIST files, with the module's hashes and dims pointed at them."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, (40,), dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, (12,), dtype=np.uint8)}
    d = tmp_path / "mnist"
    d.mkdir()
    for name, a in arrays.items():
        raw = _idx(a)
        (d / name).write_bytes(raw)
        monkeypatch.setitem(data.MNIST_FILES, name, hashlib.sha256(raw).hexdigest())
        monkeypatch.setitem(data._EXPECTED_DIMS, name, a.shape)
    return d


def _one_line_error(capsys, rc, prefix):
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


def test_importing_the_cli_imports_no_framework():
    code = ("import sys, capsspec.cli, capsspec.__main__\n"
            "bad = [m for m in ('torch', 'tensorflow', 'cupy', 'jax', 'PIL', 'safetensors') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backends(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "torch" in out and "yes" in out
    assert main(["backends", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name": "numpy", "available": True}.items() <= next(r for r in rows if r["name"] == "numpy").items()


def test_data(capsys, mnist_dir):
    assert main(["data", "--data-dir", str(mnist_dir)]) == 0
    out = capsys.readouterr().out
    assert str(mnist_dir) in out and "40 images" in out


def test_data_missing_is_a_one_line_error(capsys, tmp_path):
    rc = main(["data", "--data-dir", str(tmp_path / "empty"), "--no-download"])
    line = _one_line_error(capsys, rc, "capsspec data: error: MNIST is not available")
    assert "train-images-idx3-ubyte" in line


def test_train_resume_eval_figures(capsys, tmp_path, mnist_dir):
    out = tmp_path / "run"
    base = ["train", *TINY_FLAGS, "--data-dir", str(mnist_dir), "--out", str(out)]
    assert main([*base, "--epochs", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["backend"] == "numpy" and printed["epochs_completed"] == 1
    assert (out / "summary.json").is_file() and (out / "final.safetensors").is_file()

    # A second fresh run into the same folder is refused; --resume continues; a changed setting is refused.
    assert main([*base, "--epochs", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--quiet", "--resume", "--out", str(out), "--data-dir", str(mnist_dir), "--epochs", "2"]) == 0
    capsys.readouterr()
    c = ckpt.load_checkpoint(out / "checkpoint.safetensors")
    assert c.epoch == 2 and c.step == 8 and c.config.conv1_channels == 2  # the run's own config, not the paper's
    rc = main(["train", "--resume", "--out", str(out), "--data-dir", str(mnist_dir), "--epochs", "3", "--seed", "4"])
    assert "cannot change" in _one_line_error(capsys, rc, "capsspec train: error:")

    report = tmp_path / "eval.json"
    assert main(["eval", "--backend", "numpy", str(out / "final.safetensors"), "--data-dir", str(mnist_dir),
                 "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text and "confusion matrix" in text and "per-class accuracy" in text
    r = json.loads(report.read_text())
    assert np.array(r["confusion_matrix"]).shape == (10, 10) and np.sum(r["confusion_matrix"]) == 12

    figs = tmp_path / "figs"
    assert main(["figures", str(out / "final.safetensors"), "--out", str(figs), "--data-dir", str(mnist_dir),
                 "--samples", "2", "--pairs", "6"]) == 0
    capsys.readouterr()
    from PIL import Image

    names = sorted(p.name for p in figs.iterdir())
    assert names == ["perturbations-0.png", "perturbations-1.png", "reconstructions.png", "training-curves.png"]
    from capsspec import figures

    with Image.open(figs / "perturbations-0.png") as im:
        tile = 28 * figures._SCALE + figures._GAP
        assert im.size == (44 + 11 * tile + figures._GAP, 28 + 16 * tile + figures._GAP)  # 16 rows x 11 columns
    with Image.open(figs / "training-curves.png") as im:
        assert im.size == (1000, 420) and len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 3  # something was drawn


def test_model_flags_reach_the_model(capsys, tmp_path, mnist_dir):
    """--routing-iterations and --no-decoder must change the trained model, never be silently ignored."""
    out = tmp_path / "run"
    assert main(["train", *TINY_FLAGS, "--data-dir", str(mnist_dir), "--out", str(out), "--epochs", "1",
                 "--routing-iterations", "1", "--no-decoder", "--lr", "0.002", "--max-shift", "0"]) == 0
    capsys.readouterr()
    c = ckpt.load_checkpoint(out / "final.safetensors")
    assert c.config.routing_iterations == 1 and c.config.use_decoder is False
    assert not [k for k in c.params if k.startswith("decoder.")]
    assert c.adam.lr == 0.002 and c.training["max_shift"] == 0
    assert main(["figures", str(out / "final.safetensors"), "--data-dir", str(mnist_dir)]) == 0
    assert "no decoder" in capsys.readouterr().err
    assert (out / "training-curves.png").is_file() and not (out / "reconstructions.png").exists()


def test_perturbed_capsules_is_figure_4():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(10, 16)).astype(np.float32)
    x = perturbed_capsules(v, 3)
    assert x.shape == (16 * 11, 160)
    np.testing.assert_allclose(PERTURBATION_OFFSETS, np.linspace(-0.25, 0.25, 11))
    for d in range(16):
        for k, off in enumerate(PERTURBATION_OFFSETS):
            row = x[d * 11 + k].reshape(10, 16)
            expected = v[3].copy()
            expected[d] += np.float32(off)
            np.testing.assert_array_equal(row[3], expected)
            assert not np.any(np.delete(row, 3, axis=0))  # every other capsule masked out


def test_bad_input_exits_2_with_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    rc = main(["eval", "--backend", "numpy", str(bad)])
    _one_line_error(capsys, rc, "capsspec eval: error:")
    rc = main(["eval", "--backend", "no-such-backend", str(bad)])
    _one_line_error(capsys, rc, "capsspec eval: error:")
    rc = main(["figures", str(tmp_path / "missing.safetensors")])
    assert "does not exist" in _one_line_error(capsys, rc, "capsspec figures: error:")


def test_conformance_and_bench_get_their_arguments_untouched(monkeypatch):
    import capsspec.bench

    seen = {}

    def fake(name):
        def m(argv):
            seen[name] = list(argv)
            return 7
        return m

    monkeypatch.setattr(capsspec.bench, "main", fake("bench"))
    conformance_cli = types.ModuleType("capsspec.conformance.cli")
    conformance_cli.main = fake("conformance")
    monkeypatch.setitem(sys.modules, "capsspec.conformance.cli", conformance_cli)
    args = ["--backend", "torch", "-k", "routing", "--help"]
    assert main(["bench", *args]) == 7 and seen["bench"] == args
    assert main(["conformance", *args]) == 7 and seen["conformance"] == args


def test_python_dash_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "capsspec", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "conformance" in r.stdout
