"""Hostile but honest input: absurd values, bad flags and broken files each get one clear line
(exit status 2 on the command line, a ValueError in the API) and bounded work, never a traceback,
a frozen machine or a wrong number. The catalogue is docs/hostile-inputs.md."""

from __future__ import annotations

import pytest

from capsspec.tools.cli import main


def _one_line(capsys, status: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ===================================================================================== the parser contract
BAD_COMMAND_LINES = [
    # (argv, what the one line must name)
    (["train", "--epoch", "2"], ["--epoch", "did you mean --epochs?"]),  # no prefix matching
    (["train", "--routing-iterations", "1000000000"], ["--routing-iterations", "limit of 100"]),
    (["train", "--reconstruction-scale", "nan"], ["--reconstruction-scale", "finite"]),
    (["train", "--reconstruction-scale", "-1"], ["--reconstruction-scale"]),
    (["train", "--lr", "inf"], ["--lr"]),
    (["train", "--conv1-channels", "100000"], ["--conv1-channels"]),
    (["eval", "x.safetensors", "--batch", "3"], ["--batch", "did you mean --batch-size?"]),
    (["bench", "--routing-iterations", "0"], ["capsspec bench", "--routing-iterations"]),
    (["bench", "--bogus"], ["capsspec bench", "--bogus"]),
    (["bench", "--batch", "4"], ["capsspec bench", "--batch-size"]),
    (["bench", "--steps", "-1"], ["capsspec bench", "--steps"]),
    (["gpu-check", "--budg", "3"], ["capsspec gpu-check", "--budget-seconds"]),
    (["gpu-check", "--out", "o", "--budget-seconds", "nan"], ["capsspec gpu-check", "--budget-seconds"]),
    (["conformance", "--backend", "numpy", "--prof", "ci"], ["capsspec conformance", "--prof"]),
    (["conformance"], ["capsspec conformance", "--backend"]),
]


@pytest.mark.parametrize("argv, needles", BAD_COMMAND_LINES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_bad_flag_or_value_is_one_line_naming_the_flag(capsys, argv, needles):
    _one_line(capsys, main(argv), *needles)


def test_output_paths_are_checked_before_the_work(capsys, tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    # bench would time the backend first and lose its results; gpu-check would run its phases.
    _one_line(capsys, main(["bench", "--backend", "numpy", "--json", str(tmp_path)]), "--json", "is a folder")
    _one_line(capsys, main(["gpu-check", "--rehearsal", "--out", str(a_file)]), "--out", "is a file")
    _one_line(capsys, main(["train", "--out", str(a_file / "run")]), "--out", "which is a file")


def test_absurd_sizes_are_refused_with_the_estimate_and_the_limit(capsys, tmp_path):
    line = _one_line(capsys, main(["train", "--batch-size", "100000000", "--out", str(tmp_path / "r")]),
                     "--batch-size 100000000", "GiB", "memory")
    assert "GFLOP per image" in line
    _one_line(capsys, main(["train", "--conv1-channels", "4096", "--primary-types", "1024", "--primary-dim", "256",
                            "--out", str(tmp_path / "r")]), "parameters", "--conv1-channels 4096")
    _one_line(capsys, main(["bench", "--backend", "numpy", "--batch-size", "100000000"]), "--batch-size", "GiB")
