"""ONNX export and the onnxruntime backend, held to the reference.

Tolerance: the exported graph runs in float32 and is compared with the reference run in float64
on the same inputs (float32 widened exactly), so the error measured is the graph's alone. It
passes within the conformance suite's float32 "model" level (4096 float32 epsilons of the
largest value of each output), for that level's reason: conv1, PrimaryCaps, the predictions and
the routing iterations are composed, and ONNX Runtime picks its own summation order and blocking
for every convolution and product. Selections (the predicted class) are compared exactly wherever
the reference's top two lengths are further apart than that tolerance.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import capsspec  # noqa: E402
from capsspec.training import checkpoint as ckpt  # noqa: E402
from capsspec.training import mnist as data  # noqa: E402
from capsspec.tools.cli import main  # noqa: E402
from capsspec.conformance.tolerances import TOLERANCES  # noqa: E402
from capsspec.tools.onnx_export import build_model, export_onnx  # noqa: E402
from capsspec.spec import INFERENCE_NAMES  # noqa: E402

TOL = TOLERANCES["float32"]["model"]
SMALL = capsspec.CapsNetConfig(conv1_channels=8, primary_types=4, primary_dim=4, class_dim=6, decoder_widths=(24,))


def _params(config, seed=0, digit_scale=30.0):
    """init_params with longer class capsules than at initialisation, so routing really decides."""
    p = capsspec.init_params(config, seed=seed)
    p["digit.weight"] = p["digit.weight"] * np.float32(digit_scale)
    return p


def _reference(params, x, config, labels=None):
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    return capsspec.model.forward(p64, x.astype(np.float64), config, labels)


def _close(name, got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.all(np.isfinite(got)), name
    err = np.max(np.abs(got - want), initial=0.0)
    bound = TOL.atol + TOL.rtol * np.max(np.abs(want), initial=0.0)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def _check_predictions(pred, ref_lengths):
    top2 = np.sort(ref_lengths, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * TOL.rtol * np.max(ref_lengths)
    assert pred.dtype == np.int64
    np.testing.assert_array_equal(pred[decided], np.argmax(ref_lengths, axis=1)[decided])


@pytest.fixture(scope="module")
def backend():
    return capsspec.get_backend("onnxruntime")


def test_backend_is_inference_only_and_complete(backend):
    assert backend.trains is False and backend.dtypes == ("float32",)
    assert backend.required_names() == INFERENCE_NAMES and backend.missing_names() == []
    with pytest.raises(ValueError, match="inference-only"):
        from capsspec.training.settings import choose_backend

        choose_backend("onnxruntime", None, {})


@pytest.mark.parametrize("config", [SMALL, SMALL.replace(routing_iterations=1, use_decoder=False),
                                    SMALL.replace(routing_iterations=5, primary_stride=1)],
                         ids=["routing3-decoder", "routing1-no-decoder", "routing5-stride1"])
def test_forward_and_predict_match_the_reference(backend, config):
    params = _params(config, seed=1)
    model = backend.params_from_numpy(params, config)
    rng = np.random.default_rng(2)
    for batch in (1, 3, 17):  # one session: the batch dimension is dynamic
        x = rng.random((batch, *config.input_shape), dtype=np.float32)
        ref = _reference(params, x, config)
        out = backend.forward(model, x, config)
        for name in ("v", "lengths", "coupling"):
            _close(name, getattr(out, name), getattr(ref, name))
        if config.use_decoder:
            _close("reconstruction", out.reconstruction, ref.reconstruction)
        else:
            assert out.reconstruction is None
        _check_predictions(backend.predict(model, x, config), ref.lengths)
        if config.use_decoder:  # the decoder sees the true class's capsule when labels are given
            labels = rng.integers(0, config.num_classes, size=batch)
            _close("reconstruction(labels)", backend.forward(model, x, config, labels).reconstruction,
                   _reference(params, x, config, labels).reconstruction)


def test_zero_capsules_are_exactly_zero_without_nan(backend):
    # PrimaryCaps weights and biases of half the capsule types are 0, so those capsules are the zero
    # vector; with all of them 0 every class capsule is 0 too, and squash must give 0, not NaN.
    config = SMALL
    params = _params(config, seed=3)
    dim = config.primary_dim
    for t in range(0, config.primary_types, 2):
        params["primary.weight"][t * dim:(t + 1) * dim] = 0
        params["primary.bias"][t * dim:(t + 1) * dim] = 0
    x = np.random.default_rng(4).random((5, *config.input_shape), dtype=np.float32)
    ref = _reference(params, x, config)
    out = backend.forward(backend.params_from_numpy(params, config), x, config)
    for name in ("v", "lengths", "coupling", "reconstruction"):
        _close(name, getattr(out, name), getattr(ref, name))

    params["primary.weight"][:] = 0
    params["primary.bias"][:] = 0
    model = backend.params_from_numpy(params, config)
    out = backend.forward(model, x, config)
    assert np.all(out.v == 0) and np.all(out.lengths == 0)
    np.testing.assert_array_equal(out.coupling, np.float32(1 / config.num_classes))  # softmax of 0 logits
    # Every length ties at 0: the spec's argmax takes the lowest class, and the decoder sees capsule 0 = 0.
    np.testing.assert_array_equal(backend.predict(model, x, config), np.zeros(5, np.int64))
    _close("reconstruction", out.reconstruction, _reference(params, x, config).reconstruction)


def test_ties_go_to_the_lowest_class(backend):
    # Classes 3 and 7 get the same (long) prediction matrices, every other class nearly none: their
    # capsules are computed from identical numbers, so their lengths tie exactly, and 3 must win.
    config = SMALL
    params = _params(config, seed=5, digit_scale=1.0)
    w = params["digit.weight"]
    w *= np.float32(0.01)
    w[:, 7] = w[:, 3] = np.random.default_rng(6).normal(0, 0.5, size=w[:, 3].shape).astype(np.float32)
    x = np.random.default_rng(7).random((6, *config.input_shape), dtype=np.float32)
    model = backend.params_from_numpy(params, config)
    out = backend.forward(model, x, config)
    assert np.all(out.lengths[:, 3] == out.lengths[:, 7]) and np.all(np.argmax(out.lengths, axis=1) == 3)
    np.testing.assert_array_equal(backend.predict(model, x, config), np.full(6, 3))


def test_exported_file_holds_the_canonical_parameters_and_a_dynamic_batch(tmp_path):
    params = _params(SMALL, seed=8)
    path = export_onnx(params, SMALL, tmp_path / "m.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for k, v in params.items():  # stored under the canonical names, bit for bit
        np.testing.assert_array_equal(inits[k], v)
    (inp,) = model.graph.input
    assert inp.name == "images" and inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in model.graph.output] == ["lengths", "predicted", "reconstruction", "v", "coupling"]
    assert not any(n.op_type in ("Loop", "Scan", "If") for n in model.graph.node)  # routing is unrolled
    meta = {p.key: p.value for p in model.metadata_props}
    assert capsspec.CapsNetConfig.from_dict(json.loads(meta["config"])) == SMALL
    assert build_model(params, SMALL).graph.node  # the builder alone needs no file


def test_paper_size_model_runs_in_a_fresh_process_with_only_onnxruntime_and_numpy(tmp_path, capsys):
    config = capsspec.CapsNetConfig()
    assert config.parameter_count() == 8_215_568
    params = _params(config, seed=0, digit_scale=10.0)
    checkpoint = ckpt.save_checkpoint(tmp_path / "paper.safetensors", params, config)
    out = tmp_path / "deploy" / "capsnet.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    x = np.random.default_rng(9).random((3, 1, 28, 28), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    # The deployment side: a process that cannot import capsspec or any framework (imports of them
    # fail as if they were not installed), started outside the repository, with -I (no user site).
    script = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("capsspec", "torch", "tensorflow", "jax", "cupy", "onnx", "safetensors"):
                    raise ImportError(f"{name} is not installed here")
        sys.meta_path.insert(0, Block())
        import numpy as np
        import onnxruntime as ort
        session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        lengths, predicted, recon = session.run(["lengths", "predicted", "reconstruction"], {"images": np.load(sys.argv[2])})
        np.savez(sys.argv[3], lengths=lengths, predicted=predicted, recon=recon)
        print(sorted({m.split(".")[0] for m in sys.modules} & {"capsspec", "torch", "tensorflow", "onnx"}))
    """)
    r = subprocess.run([sys.executable, "-I", "-c", script, str(out), str(tmp_path / "x.npy"),
                        str(tmp_path / "y.npz")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    got = np.load(tmp_path / "y.npz")
    ref = _reference(params, x, config)
    _close("lengths", got["lengths"], ref.lengths)
    _close("reconstruction", got["recon"], ref.reconstruction)
    _check_predictions(got["predicted"], ref.lengths)


def _idx(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.tobytes()


def test_eval_on_onnxruntime_agrees_with_numpy(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(10)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (40,), dtype=np.uint8)
    d = tmp_path / "mnist"
    d.mkdir()
    for name, a in {"train-images-idx3-ubyte": images[:1], "train-labels-idx1-ubyte": labels[:1],
                    "t10k-images-idx3-ubyte": images, "t10k-labels-idx1-ubyte": labels}.items():
        raw = _idx(a)
        (d / name).write_bytes(raw)
        monkeypatch.setitem(data.MNIST_FILES, name, hashlib.sha256(raw).hexdigest())
        monkeypatch.setitem(data._EXPECTED_DIMS, name, a.shape)
    params = _params(SMALL, seed=11)
    checkpoint = ckpt.save_checkpoint(tmp_path / "small.safetensors", params, SMALL)
    x = (images[:, None] / np.float32(255)).astype(np.float32)
    ref_lengths = _reference(params, x, SMALL).lengths
    top2 = np.sort(ref_lengths, axis=1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 2 * TOL.rtol * ref_lengths.max())  # no near-tie: both must agree
    reports = {}
    for name in ("numpy", "onnxruntime"):
        report = tmp_path / f"{name}.json"
        assert main(["eval", "--backend", name, str(checkpoint), "--data-dir", str(d), "--json", str(report)]) == 0
        reports[name] = json.loads(report.read_text())
    capsys.readouterr()
    assert reports["onnxruntime"]["backend"] == "onnxruntime" and reports["onnxruntime"]["count"] == 40
    assert reports["onnxruntime"]["confusion_matrix"] == reports["numpy"]["confusion_matrix"]


def test_export_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "m.onnx"

    def error(argv):
        rc = main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert not out.exists()
        return lines[0]

    missing = tmp_path / "nope.safetensors"
    assert str(missing) in error(["export", str(missing), "--out", str(out)])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    line = error(["export", str(junk), "--out", str(out)])
    assert "junk.safetensors" in line and ("corrupt" in line or "not a checkpoint" in line)
    good = ckpt.save_checkpoint(tmp_path / "ok.safetensors", _params(SMALL), SMALL)
    (tmp_path / "folder.onnx").mkdir()
    assert "is a folder" in error(["export", str(good), "--out", str(tmp_path / "folder.onnx")])
    (tmp_path / "a_file").write_text("x")
    assert "cannot write" in error(["export", str(good), "--out", str(tmp_path / "a_file" / "m.onnx")])
    # argparse: an unknown format is a usage error, reported in one line with status 2
    assert main(["export", str(good), "--format", "tflite", "--out", str(out)]) == 2
    assert "tflite" in capsys.readouterr().err
    assert not list(tmp_path.glob(".m.*"))  # no temporary file left behind


def test_float64_checkpoint_is_exported_as_float32_with_a_note(tmp_path, capsys):
    params = {k: v.astype(np.float64) for k, v in _params(SMALL, seed=12).items()}
    checkpoint = ckpt.save_checkpoint(tmp_path / "f64.safetensors", params, SMALL)
    out = tmp_path / "m.onnx"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert "rounded to float32" in capsys.readouterr().err
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    np.testing.assert_array_equal(inits["digit.weight"], params["digit.weight"].astype(np.float32))


def test_bench_times_inference_and_skips_training_with_a_note(capsys):
    from capsspec.tools.bench import _format, run_benchmark

    r = run_benchmark("onnxruntime", config=SMALL, batch_size=4, steps=1, warmup=0)
    assert r["train_images_per_second"] is None and r["inference_images_per_second"] > 0
    assert "inference-only" in r["note"]
    text = _format(r)
    assert "training:   not measured" in text and "inference:" in text
