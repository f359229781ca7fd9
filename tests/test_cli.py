"""The `capsspec` command line: smoke tests of every subcommand on a tiny model and stand-in MNIST files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from capsspec.training import checkpoint as ckpt
from capsspec.tools.cli import main
from capsspec.tools.figures import PERTURBATION_OFFSETS, perturbed_capsules

TINY_FLAGS = ["--backend", "numpy", "--conv1-channels", "2", "--primary-types", "2", "--primary-dim", "4",
              "--batch-size", "10", "--val-size", "5", "--quiet"]


def _one_line_error(capsys, rc, prefix):
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


def test_importing_the_cli_imports_no_framework():
    code = ("import sys, capsspec.tools.cli, capsspec.__main__, capsspec.tools.figures\n"
            "bad = [m for m in ('torch', 'tensorflow', 'cupy', 'jax', 'PIL', 'safetensors', 'matplotlib')\n"
            "       if m in sys.modules]\n"
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
    names = sorted(p.name for p in figs.iterdir())
    assert names == ["perturbations-0.png", "perturbations-1.png", "reconstructions.png", "training-curves.png"]
    for name in names:
        pixels = _png(figs / name)
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 3, name  # something was drawn


def _png(path):
    """The pixels of a PNG (H, W, channels), checking the file is a whole PNG."""
    import matplotlib.image

    raw = path.read_bytes()
    assert raw.startswith(b"\x89PNG\r\n\x1a\n") and raw.endswith(b"IEND\xaeB`\x82"), path
    return matplotlib.image.imread(path)


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

    # Without metrics.jsonl there is nothing to draw: that is an error, not a quiet success.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.safetensors").write_bytes((out / "final.safetensors").read_bytes())
    rc = main(["figures", str(alone / "model.safetensors"), "--data-dir", str(mnist_dir)])
    line = _one_line_error(capsys, rc, "capsspec figures: error: nothing to draw")
    assert "no decoder" in line and "metrics.jsonl" in line
    assert list(alone.iterdir()) == [alone / "model.safetensors"]


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
    import capsspec.tools.bench

    seen = {}

    def fake(name):
        def m(argv):
            seen[name] = list(argv)
            return 7
        return m

    monkeypatch.setattr(capsspec.tools.bench, "main", fake("bench"))
    conformance_cli = types.ModuleType("capsspec.conformance.cli")
    conformance_cli.main = fake("conformance")
    monkeypatch.setitem(sys.modules, "capsspec.conformance.cli", conformance_cli)
    args = ["--backend", "torch", "-k", "routing", "--help"]
    assert main(["bench", *args]) == 7 and seen["bench"] == args
    assert main(["conformance", *args]) == 7 and seen["conformance"] == args


def test_python_dash_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "capsspec", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "conformance" in r.stdout


# ============================================================ plain errors: one line, status 2, no traceback
def _usage_error(capsys, argv, prefix):
    """argparse errors: one line naming the problem and pointing at --help, instead of the usage text."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix) and "usage:" not in err, err
    return lines[0]


def test_argparse_errors_are_one_line_with_a_hint(capsys):
    line = _usage_error(capsys, ["train", "--max-shfit", "3"], "capsspec train: error: unrecognized arguments")
    assert "--max-shfit" in line and "did you mean --max-shift?" in line and "`capsspec train --help`" in line
    # An unknown flag to a subcommand is that subcommand's error, not the top level's.
    line = _usage_error(capsys, ["eval", "ckpt", "--bogus"], "capsspec eval: error: unrecognized arguments: --bogus")
    assert "`capsspec eval --help`" in line
    line = _usage_error(capsys, ["train", "--epochs", "x"], "capsspec train: error: argument --epochs")
    assert "positive integer" in line
    _usage_error(capsys, ["eval"], "capsspec eval: error: the following arguments are required: checkpoint")
    _usage_error(capsys, [], "capsspec: error: the following arguments are required")
    _usage_error(capsys, ["trian"], "capsspec: error: argument COMMAND: invalid choice: 'trian'")


def test_out_that_cannot_be_a_folder_is_refused(capsys, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for out in (a_file, a_file / "sub"):
        rc = main(["train", "--backend", "numpy", "--out", str(out)])
        line = _one_line_error(capsys, rc, f"capsspec train: error: --out {out}")
        assert "is a file" in line and "name a" in line
        rc = main(["figures", "missing.safetensors", "--out", str(out)])
        _one_line_error(capsys, rc, f"capsspec figures: error: --out {out}")
    rc = main(["eval", "missing.safetensors", "--json", str(tmp_path)])
    assert "is a folder" in _one_line_error(capsys, rc, f"capsspec eval: error: --json {tmp_path}")
    assert a_file.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [a_file]


@pytest.mark.parametrize("flags, names", [
    (["--max-shift", "30"], ["--max-shift 30", "28x28", "below 28"]),
    (["--max-shift", "28"], ["--max-shift 28", "below 28"]),
    (["--lr-floor", "1"], ["--lr-floor 1 is above --lr 0.001", "at most 0.001"]),
    (["--lr", "1e-7"], ["default --lr-floor 1e-06 is above --lr 1e-07"]),
    (["--lr-decay-rate", "1.5"], ["--lr-decay-rate 1.5 is above 1"]),
])
def test_train_flags_that_make_no_sense_are_refused_before_any_work(capsys, tmp_path, flags, names):
    out = tmp_path / "run"
    not_mnist = tmp_path / "not-mnist"  # were the flags let through, loading the data would fail at once
    not_mnist.write_text("")
    rc = main(["train", "--backend", "numpy", "--data-dir", str(not_mnist), "--out", str(out), *flags])
    line = _one_line_error(capsys, rc, "capsspec train: error:")
    for name in names:
        assert name in line, line
    assert not out.exists()  # refused before a folder, a download or a model was made


def test_eval_test_subset_larger_than_the_test_set_is_refused(capsys, tmp_path, mnist_dir):
    path = tmp_path / "model.safetensors"
    config = _tiny_config()
    ckpt.save_checkpoint(path, capsspec_init(config), config)
    rc = main(["eval", "--backend", "numpy", str(path), "--data-dir", str(mnist_dir), "--test-subset", "13"])
    assert "--test-subset 13 is more than the 12 test images" in _one_line_error(capsys, rc, "capsspec eval: error:")
    report = tmp_path / "r.json"
    assert main(["eval", "--backend", "numpy", str(path), "--data-dir", str(mnist_dir), "--test-subset", "12",
                 "--json", str(report)]) == 0
    assert json.loads(report.read_text())["count"] == 12


def _tiny_config():
    from capsspec.config import CapsNetConfig

    return CapsNetConfig(conv1_channels=2, primary_types=2, primary_dim=4)


def capsspec_init(config):
    from capsspec.model import init_params

    return init_params(config, seed=0)


def test_figures_say_why_training_curves_are_missing(capsys, tmp_path, mnist_dir):
    path = tmp_path / "model.safetensors"
    config = _tiny_config()
    ckpt.save_checkpoint(path, capsspec_init(config), config)
    assert main(["figures", str(path), "--data-dir", str(mnist_dir), "--samples", "1", "--pairs", "2"]) == 0
    captured = capsys.readouterr()
    assert "no metrics.jsonl beside" in captured.err and "training curves" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist", "model.safetensors", "perturbations-0.png",
                                                           "reconstructions.png"]


_CLOSED_PIPE_SCRIPT = """
import hashlib, sys
from capsspec.training import mnist as data
from capsspec.tools.cli import main
for name in data.MNIST_FILES:  # the stand-in MNIST files written by the test
    raw = open(sys.argv[1] + '/' + name, 'rb').read()
    data.MNIST_FILES[name] = hashlib.sha256(raw).hexdigest()
    data._EXPECTED_DIMS[name] = data.parse_idx(raw).shape
sys.exit(main(sys.argv[2:]))
"""


def _into_closed_pipe(args, unbuffered):
    """Run the command line with stdout a pipe whose reader has already gone (`... | head` after head exits)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:  # as CI runs it: the error comes at the print, not at the final flush
        env["PYTHONUNBUFFERED"] = "1"
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-c", _CLOSED_PIPE_SCRIPT, *args], stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=300, env=env)
    finally:
        os.close(w)


@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_closed_pipe_ends_quietly(tmp_path, mnist_dir, unbuffered):
    path = tmp_path / "model.safetensors"
    config = _tiny_config()
    ckpt.save_checkpoint(path, capsspec_init(config), config)
    for argv in (["data", "--no-download", "--data-dir", str(mnist_dir)],
                 ["eval", "--backend", "numpy", str(path), "--data-dir", str(mnist_dir)]):
        proc = _into_closed_pipe([str(mnist_dir), *argv], unbuffered)
        assert proc.returncode == 141 and proc.stderr == "", (argv, proc.returncode, proc.stderr)
    # argparse itself ignores a failed write of --help; what is left must not fail at exit either.
    proc = _into_closed_pipe([str(mnist_dir), "train", "--help"], unbuffered)
    assert proc.returncode in (0, 141) and proc.stderr == "", proc.stderr


def test_a_config_mismatch_names_only_the_fields_that_differ():
    import capsspec

    config = _tiny_config()
    other = config.replace(routing_iterations=2)
    x = np.zeros((1, 1, 28, 28), dtype=np.float32)
    for name in ("torch", "tensorflow"):
        pytest.importorskip(name)
        backend = capsspec.get_backend(name)
        params = backend.params_from_numpy(capsspec_init(config), config)
        with pytest.raises(ValueError) as exc:
            backend.forward(params, backend.asarray(x), other)
        message = str(exc.value)
        assert "routing_iterations=2" in message and "3" in message, message
        assert "CapsNetConfig(" not in message and len(message) < 200, message


# ============================================================ figures: what each one shows
def test_figures_have_titles_labelled_axes_and_a_colour_bar(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from capsspec.tools import figures

    drawn = {}
    save = figures._save

    def keep(fig, path):  # keep each Figure to inspect, and still write its PNG
        drawn[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    config = _tiny_config()
    rng = np.random.default_rng(1)
    imgs = rng.random((3, 1, 28, 28))
    figures.draw_reconstructions(tmp_path / "r.png", imgs, imgs[::-1], np.array([1, 2, 3]), np.array([1, 2, 4]),
                                 config)
    figures.draw_perturbations(tmp_path / "p.png", rng.random((16 * 11, 784)), config, title="fig 4")
    # Two epochs of 10 steps: curve points (running means of the epoch so far) at steps 5, 10 and 20.
    point = lambda step, epoch, n, loss, acc: {"kind": "point", "epoch": epoch, "step": step,  # noqa: E731
                                               "epoch_images": n, "loss": loss, "margin": loss - 0.1,
                                               "reconstruction": 0.1, "train_accuracy": acc, "seconds": step * 6.0}
    rows = [point(5, 1, 50, 0.6, 0.8), point(10, 1, 100, 0.5, 0.9),
            {"epoch": 1, "step": 10, "loss": 0.5, "margin": 0.4, "reconstruction": 0.1, "train_accuracy": 0.9,
             "val_accuracy": 0.95, "test_accuracy": None},
            point(20, 2, 100, 0.3, 0.95),
            {"epoch": 2, "step": 20, "loss": 0.3, "margin": 0.25, "reconstruction": 0.05, "train_accuracy": 0.95,
             "val_accuracy": 0.97, "test_accuracy": 0.96}]
    figures.draw_training_curves(tmp_path / "t.png", rows)
    for name in ("r.png", "p.png", "t.png"):
        _png(tmp_path / name)

    def colour_bars(fig):
        return [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]

    r = drawn["r.png"]
    assert colour_bars(r) == ["pixel intensity"] and r.get_suptitle()
    titles = [ax.get_title() for ax in r.axes if ax.get_title()]
    assert titles == ["true 1, pred 1", "true 2, pred 2", "true 4, pred 3"]
    wrong = next(ax for ax in r.axes if ax.get_title() == "true 4, pred 3")
    assert wrong.title.get_color() != "black"

    p = drawn["p.png"]
    (grid,) = [ax for ax in p.axes if ax.get_label() != "<colorbar>"]
    assert grid.get_title() == "fig 4" and grid.get_xlabel() and grid.get_ylabel()
    assert colour_bars(p) == ["pixel intensity"]
    assert [t.get_text() for t in grid.get_xticklabels()] == [f"{o:+.2f}" for o in PERTURBATION_OFFSETS]
    assert [t.get_text() for t in grid.get_yticklabels()] == [str(d) for d in range(16)]

    t = drawn["t.png"]
    loss_ax, err_ax = t.axes
    assert loss_ax.get_xlabel() == err_ax.get_xlabel() == "training step" and loss_ax.get_title() and err_ax.get_title()
    assert [line.get_label() for line in err_ax.get_lines()] == ["train (during training)", "validation", "test"]
    np.testing.assert_allclose(err_ax.get_lines()[2].get_xydata(), [[20, 4]])  # test error 4%, only where recorded
    # Each interval's own mean: steps 6-10 were all right ((0.9 * 100 - 0.8 * 50) / 50 = 1.0).
    np.testing.assert_allclose(err_ax.get_lines()[0].get_xydata(), [[5, 20], [10, 0], [20, 5]], atol=1e-9)
    np.testing.assert_allclose(loss_ax.get_lines()[0].get_ydata(), [0.6, 0.4, 0.3])
    assert [a.get_xlabel() for a in loss_ax.child_axes] == ["training minutes"]  # 120 s of training


def test_the_minutes_axis_sits_over_the_steps_it_names(monkeypatch, tmp_path):
    from capsspec.tools import figures

    drawn = {}
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path: (drawn.setdefault(path.name, fig), save(fig, path))[1])
    # 0.12 s per step: minute 1 is step 500. Points from step 5 to 1000 put matplotlib's left margin
    # below step 0, as in any real run.
    rows = [{"kind": "point", "epoch": 1, "step": s, "epoch_images": 10 * s, "loss": 0.5, "margin": 0.4,
             "reconstruction": 0.1, "train_accuracy": 0.9, "seconds": 0.12 * s} for s in (5, 250, 500, 750, 1000)]
    figures.draw_training_curves(tmp_path / "t.png", rows)
    loss_ax = drawn["t.png"].axes[0]
    assert loss_ax.get_xlim()[0] < 0
    assert drawn["t.png"].axes[1].get_yscale() == "log"  # errors from ~90% to ~1% stay readable
    (top,) = loss_ax.child_axes
    for minute, step in ((0.0, 0), (1.0, 500), (2.0, 1000)):
        assert top.transData.transform((minute, 0))[0] == pytest.approx(loss_ax.transData.transform((step, 0))[0])
