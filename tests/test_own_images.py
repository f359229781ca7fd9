"""Training on your own images: folders, CSVs and .npz files made here (tests/shapes.py), through the command line.

Checked: a short run learns them well above chance; every bad input is one line (exit 2); the
user's files are left as they were; a cached second run trains bit for bit as the first; predict
agrees with eval; the layout rule; several labels per image.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from capsspec.tools.cli import main
from capsspec.training.arrays import to_nchw
from capsspec.training.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from shapes import multi_label_csv, shapes_arrays, shapes_folder, two_class_folder  # noqa: E402

TINY = ["--backend", "numpy", "--conv1-channels", "16", "--primary-types", "4", "--primary-dim", "8",
        "--conv1-kernel", "5", "--primary-kernel", "5", "--batch-size", "16", "--lr", "0.003", "--max-shift", "0",
        "--quiet"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSSPEC_IMAGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bars(tmp_path_factory):
    return two_class_folder(tmp_path_factory.mktemp("bars") / "bars", per_class=150)


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_short_run_learns_the_16x16_bars_and_leaves_the_folder_alone(bars, tmp_path, capsys):
    before = _tree_digest(bars)
    out = tmp_path / "run"
    assert main(["train", "--data", str(bars), *TINY, "--epochs", "6", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.85  # chance is 0.5
    ck = load_checkpoint(out / "final.safetensors")
    assert ck.config.input_shape == (1, 16, 16) and ck.config.num_classes == 2
    assert ck.extra["dataset"]["class_names"] == ["horizontal", "vertical"]
    assert _tree_digest(bars) == before
    capsys.readouterr()
    assert main(["eval", str(out / "final.safetensors"), "--backend", "numpy"]) == 0
    report = capsys.readouterr().out
    assert "horizontal:" in report and "vertical 1" in report  # per-class lines and confusion rows are named


def test_the_second_run_reads_the_cache_and_trains_bit_for_bit_as_the_first(bars, tmp_path, capsys):
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}"
        assert main(["train", "--data", str(bars), *TINY, "--epochs", "1", "--out", str(out)]) == 0
        runs.append((load_checkpoint(out / "final.safetensors").params, capsys.readouterr().err))
    assert "decoded in" in runs[0][1] and "read from the cache" in runs[1][1]
    assert runs[0][0].keys() == runs[1][0].keys()
    for name in runs[0][0]:
        assert np.array_equal(runs[0][0][name], runs[1][0][name]), name


def test_predict_agrees_with_eval_on_a_test_folder(tmp_path, capsys):
    root = tmp_path / "split"
    shapes_folder(root / "train", per_class=40, size=20, seed=5, classes=("circle", "square"))
    shapes_folder(root / "test", per_class=10, size=20, seed=6, classes=("circle", "square"))
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), *TINY, "--epochs", "2", "--val-size", "8", "--out", str(out)]) == 0
    ckpt = str(out / "final.safetensors")
    capsys.readouterr()
    assert main(["eval", ckpt, "--backend", "numpy", "--json", str(tmp_path / "eval.json")]) == 0
    confusion = json.loads((tmp_path / "eval.json").read_text())["confusion_matrix"]
    capsys.readouterr()
    assert main(["predict", ckpt, str(root / "test"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert len(rows) == 20
    names = ["circle", "square"]
    counts = np.zeros((2, 2), dtype=int)
    for r in rows:
        counts[names.index(Path(r["file"]).parent.name), names.index(r["predicted"])] += 1
        assert r["predicted"] == max(r["scores"], key=r["scores"].get)
    assert counts.tolist() == confusion


def test_predict_names_each_bad_file_on_one_line_and_predicts_the_others(bars, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(bars), *TINY, "--epochs", "1", "--out", str(out)]) == 0
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = sorted((bars / "vertical").iterdir())[0]
    capsys.readouterr()
    status = main(["predict", str(out / "final.safetensors"), str(good), str(tmp_path / "broken.png"),
                   str(tmp_path / "missing.png")])
    captured = capsys.readouterr()
    assert status == 2
    assert len(captured.err.strip().splitlines()) == 2
    assert "broken.png" in captured.err and "missing.png" in captured.err
    table = captured.out.strip().splitlines()
    assert table[0].split()[:2] == ["file", "predicted"] and "horizontal" in table[0] and len(table) == 2


def test_rgb_npz_in_nhwc_trains_and_exports_with_its_shape(tmp_path, capsys):
    x, y = shapes_arrays(160, size=20)
    path = tmp_path / "shapes.npz"
    np.savez(path, x_train=x[:120], y_train=y[:120], x_test=x[120:], y_test=y[120:],
             class_names=np.array(["circle", "square", "triangle"]))
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), *TINY, "--epochs", "1", "--out", str(out)]) == 0
    ck = load_checkpoint(out / "final.safetensors")
    assert ck.config.input_shape == (3, 20, 20) and ck.config.num_classes == 3
    onnx = pytest.importorskip("onnx")
    assert main(["export", str(out / "final.safetensors"), "--out", str(tmp_path / "m.onnx")]) == 0
    dims = [d.dim_value for d in onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 20, 20]


@pytest.mark.parametrize("shape,layout", [((5, 3, 32, 32), "nchw"), ((5, 32, 32, 3), "nhwc"), ((5, 32, 32), "nhw"),
                                          ((5, 1, 16, 8), "nchw"), ((5, 9, 7, 2), "nhwc")])
def test_the_layout_rule_tells_the_clear_cases(shape, layout):
    x = np.zeros(shape, np.uint8)
    y, got = to_nchw(x, None, "x_train")
    assert got == layout and y.shape[0] == 5 and y.ndim == 4


@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (5, 16, 8, 8), (5, 4, 8, 4)])
def test_an_ambiguous_layout_is_refused_naming_the_flag(shape):
    with pytest.raises(ValueError, match="--layout nchw or --layout nhwc"):
        to_nchw(np.zeros(shape, np.uint8), None, "x_train")
    assert to_nchw(np.zeros(shape, np.uint8), "nhwc", "x_train")[0].shape[1] == shape[3]


def _npz(tmp_path, **changes):
    x, y = shapes_arrays(30, size=20)
    arrays = {"x_train": x[:20], "y_train": y[:20], "x_test": x[20:], "y_test": y[20:],
              "class_names": np.array(["circle", "square", "triangle"]), **changes}
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_every_bad_npz_gets_one_clear_line(tmp_path, capsys):
    x, y = shapes_arrays(30, size=20)
    nan = x[:20].astype(np.float32) / 255
    nan[3, 0, 0, 0] = np.nan
    cases = [({"y_test": None}, "no y_test"), ({"y_train": y[:20] + 5}, "labels run from"),
             ({"y_train": y[:20] + 0.5}, "not whole numbers"), ({"x_train": nan}, "NaN or inf"),
             ({"x_train": x[:20, :3, :3]}, "--layout"), ({"x_train": x[:20].astype(np.float32)}, "[0, 1]")]
    for change, words in cases:
        line = _error_line(capsys, ["train", "--data", str(_npz(tmp_path, **change)), *TINY, "--out",
                                    str(tmp_path / "run")])
        assert words in line, (change.keys(), line)


def test_every_bad_folder_gets_one_clear_line(tmp_path, capsys):
    one = shapes_folder(tmp_path / "one", per_class=3, size=20, classes=("circle",))
    empty = shapes_folder(tmp_path / "empty", per_class=3, size=20, classes=("circle", "square"))
    (empty / "triangle").mkdir()
    mixed = shapes_folder(tmp_path / "mixed", per_class=3, size=20, classes=("circle", "square"))
    shapes_folder(mixed, per_class=1, size=24, classes=("square",), seed=9)  # overwrites one square at 24x24
    small = shapes_folder(tmp_path / "small", per_class=3, size=8, classes=("circle", "square"))
    cases = [(one, [], "at least two"), (empty, [], "holds no image files"), (mixed, [], "--image-size H W"),
             (small, [], "smallest input these admit is 17x17")]
    for folder, extra, words in cases:
        line = _error_line(capsys, ["train", "--data", str(folder), "--out", str(tmp_path / "run"), *extra])
        assert words in line, line
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_a_truncated_image_is_named_or_skipped_and_counted(tmp_path, capsys):
    folder = shapes_folder(tmp_path / "shapes", per_class=12, size=20, classes=("circle", "square"))
    bad = folder / "square" / "0003.png"
    bad.write_bytes(bad.read_bytes()[:60])
    line = _error_line(capsys, ["train", "--data", str(folder), *TINY, "--out", str(tmp_path / "a")])
    assert str(bad) in line and "--skip-bad-images" in line
    assert main(["train", "--data", str(folder), *TINY, "--epochs", "1", "--skip-bad-images",
                 "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image file" in err
    ck = load_checkpoint(tmp_path / "b" / "final.safetensors")
    assert ck.extra["n_train"] + ck.extra["n_val"] + ck.extra["n_test"] == 23


def test_several_labels_per_image_train_without_the_decoder_and_are_scored_as_sets(tmp_path, capsys):
    csv_path = multi_label_csv(tmp_path / "multi", n=120, size=20)
    out = tmp_path / "run"
    assert main(["train", "--data", str(csv_path), *TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert "without the decoder" in capsys.readouterr().err
    ck = load_checkpoint(out / "final.safetensors")
    assert not ck.config.use_decoder and ck.extra["dataset"]["labels_per_image"] == 2
    assert main(["eval", str(out / "final.safetensors"), "--backend", "numpy"]) == 0
    assert "correct when all 2 classes" in capsys.readouterr().out
    assert main(["predict", str(out / "final.safetensors"), str(tmp_path / "multi" / "images" / "0000.png"),
                 "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)["predictions"][0]["predicted"]
    assert isinstance(predicted, list) and len(set(predicted)) == 2


def test_an_interrupted_run_on_own_images_resumes_bit_for_bit(bars, tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", "--data", str(bars), *TINY, "--epochs", "2", "--out", str(whole)]) == 0
    assert main(["train", "--data", str(bars), *TINY, "--epochs", "1", "--out", str(split)]) == 0
    assert main(["train", "--resume", "--epochs", "2", "--out", str(split), "--quiet"]) == 0  # the path is recorded
    a, b = (load_checkpoint(d / "final.safetensors").params for d in (whole, split))
    assert all(np.array_equal(a[k], b[k]) for k in a)


ROOT = Path(__file__).resolve().parent.parent


def _commands(text: str, heading: str) -> list[str]:
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")[1::2]
    return [line.strip() for b in blocks for line in b.splitlines()[1:]
            if line.strip().startswith(("capsspec ", "python "))]


@pytest.mark.slow
def test_the_docs_commands_run_as_written(tmp_path, monkeypatch):
    """docs/own-images.md's "Try it" commands, run in a fresh folder; the README's "Your own images" section,
    when it has one, may only show commands among them."""
    import os
    import shlex
    import subprocess

    commands = _commands((ROOT / "docs" / "own-images.md").read_text(), "Try it")
    assert any(c.startswith("capsspec train --data") for c in commands) and len(commands) >= 5
    readme = (ROOT / "README.md").read_text()
    if "\n## Your own images\n" in readme:
        assert set(_commands(readme, "Your own images")) <= set(commands)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CAPSSPEC_IMAGE_CACHE": str(tmp_path / "cache"), "MPLBACKEND": "Agg"}
    for command in commands:
        argv = shlex.split(command)
        argv = ([sys.executable, "-m", "capsspec", *argv[1:]] if argv[0] == "capsspec" else
                [sys.executable, *(str(ROOT / a) if a.startswith("tests/") else a for a in argv[1:])])
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (command, done.stderr[-2000:])
    assert (tmp_path / "runs" / "shapes" / "model.onnx").is_file()
    assert (tmp_path / "runs" / "shapes" / "reconstructions.png").is_file()
