"""capsspec bench: what a --json line records, so that results from two machines can be compared."""

from __future__ import annotations

import json
import os

import pytest

from capsspec.tools.bench import main


def test_a_json_line_records_the_machine_the_settings_and_consistent_figures(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAPSSPEC_REUSE_FREED_MEMORY", "0")  # this test's process keeps glibc's defaults
    out = tmp_path / "bench.jsonl"
    args = ["--backend", "numpy", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--matmul-size", "128"]
    assert main([*args, "--json", str(out)]) == 0
    assert "dense matmul" in capsys.readouterr().out  # the table is printed too
    (r,) = [json.loads(line) for line in out.read_text().splitlines()]
    m = r["machine"]
    assert m["cpu_count"] == os.cpu_count() and 1 <= m["usable_cpus"] <= os.cpu_count()
    assert m["cpu_model"] and m["python"].count(".") == 2 and m["numpy"] and m["capsspec"]
    assert r["settings"] == {"steps": 1, "warmup": 1, "matmul_size": 128, "backend_options": {},
                             "freed_host_memory": "system default (CAPSSPEC_REUSE_FREED_MEMORY=0)"}
    assert r["batch_size"] == 2 and r["config"]["conv1_channels"] == 256 and r["paper_config"] is True
    # The derived figures follow from the measured ones.
    assert r["train_images_per_second"] == pytest.approx(2 / r["train_step_seconds"])
    assert r["epoch_seconds_60k"] == pytest.approx(60_000 / r["train_images_per_second"])
    assert r["fraction_of_matmul_rate"] == pytest.approx(r["achieved_tflops"] / r["matmul_tflops"])
    assert r["achieved_tflops"] == pytest.approx(r["train_gflops_per_image"] * r["train_images_per_second"] / 1e3)
