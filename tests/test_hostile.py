"""Hostile but honest input: absurd values, bad flags and broken files each get one clear line
(exit status 2 on the command line, a ValueError in the API) and bounded work, never a traceback,
a frozen machine or a wrong number. The catalogue is docs/hostile-inputs.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest

from capsspec.config import AdamConfig, CapsNetConfig
from capsspec.model import init_params
from capsspec.registry import get_backend
from capsspec.tools.cli import main
from capsspec.training import checkpoint as ckpt
from capsspec.training.settings import plan_resume


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


# ===================================================================================== hostile checkpoints
TINY = CapsNetConfig(conv1_channels=2, primary_types=2, primary_dim=4, class_dim=4, decoder_widths=(8,))


def _good_checkpoint(path, dtype="float32"):
    params = init_params(TINY, 0, dtype)
    state = {"step": 3, "m": {k: np.zeros_like(a) for k, a in params.items()},
             "v": {k: np.full_like(a, 1e-4) for k, a in params.items()}}
    return ckpt.save_checkpoint(path, params, TINY, state=state, adam=AdamConfig(), epoch=1,
                                training={"epochs": 2}, extra={"device": None})


def _rewrite(path, mutate):
    """Rewrite a checkpoint's safetensors header through mutate(header) (the body kept as it is)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    mutate(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    return path


def _set_meta(key, value):
    def mutate(header):
        header["__metadata__"][key] = value
    return mutate


HOSTILE_METADATA = [
    ("metadata a JSON list", lambda h: h.__setitem__("__metadata__", ["a", "b"]), "__metadata__"),
    ("training a list", _set_meta("training", "[1, 2]"), "training"),
    ("extra a list", _set_meta("extra", "[]"), "extra"),
    ("extra.progress a number", _set_meta("extra", '{"progress": 3}'), "extra.progress"),
    ("extra.history of numbers", _set_meta("extra", '{"history": [1]}'), "extra.history"),
    ("step negative", _set_meta("step", "-1"), "step"),
    ("step a float", _set_meta("step", "1.5"), "step"),
    ("config a string", _set_meta("config", '"x"'), "config"),
    ("config routing 1e9", _set_meta("config", json.dumps({**TINY.to_dict(), "routing_iterations": 10**9})),
     "routing_iterations"),
    ("dtype float16", _set_meta("dtype", "float16"), "dtype"),
    ("adam a list", _set_meta("adam", "[0.1]"), "adam"),
    ("a tensor's offsets past the end", lambda h: h["conv1.bias"].__setitem__("data_offsets", [0, 10**12]),
     "conv1.bias"),
]


@pytest.mark.parametrize("what, mutate, needle", HOSTILE_METADATA, ids=[c[0] for c in HOSTILE_METADATA])
def test_a_hostile_checkpoint_is_one_line_naming_the_field(tmp_path, capsys, what, mutate, needle):
    path = _rewrite(_good_checkpoint(tmp_path / "c.safetensors"), mutate)
    with pytest.raises(ValueError, match=re.escape(needle)):
        ckpt.load_checkpoint(path)
    for argv in (["eval", str(path)], ["export", str(path), "--out", str(tmp_path / "m.onnx")],
                 ["figures", str(path), "--out", str(tmp_path / "f")]):
        _one_line(capsys, main(argv), "error", str(path))


@pytest.mark.parametrize("moment, value", [("m", np.nan), ("v", np.nan), ("v", -1.0), ("m", np.inf)])
def test_a_corrupt_optimizer_state_is_refused_on_load_and_on_save(tmp_path, capsys, moment, value):
    path = _good_checkpoint(tmp_path / ckpt.CHECKPOINT_NAME)
    ck = ckpt.load_checkpoint(path)
    state = {"step": ck.state["step"], "m": dict(ck.state["m"]), "v": dict(ck.state["v"])}
    state[moment]["conv1.bias"] = np.full_like(state[moment]["conv1.bias"], value)
    with pytest.raises(ValueError, match=f"adam.{moment}.conv1.bias"):
        ckpt.save_checkpoint(tmp_path / "x.safetensors", ck.params, TINY, state=state, adam=ck.adam)
    # The same values written into the file's body, its hash updated: only the values are wrong.
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    start, stop = json.loads(data[8:8 + n])[f"adam.{moment}.conv1.bias"]["data_offsets"]
    body = bytearray(data[8 + n:])
    body[start:stop] = state[moment]["conv1.bias"].tobytes()
    path.write_bytes(data[:8 + n] + bytes(body))
    tensors = {**ck.params, **{f"adam.{p}.{k}": a for p in "mv" for k, a in state[p].items()}}
    _rewrite(path, _set_meta("tensors_sha256", ckpt.tensors_sha256(tensors)))
    with pytest.raises(ValueError, match=f"optimizer .* moment adam.{moment}.conv1.bias"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("dtype", ["float16", "int32"])
def test_resume_refuses_the_dtypes_saving_never_writes(tmp_path, dtype):
    path = _good_checkpoint(tmp_path / ckpt.CHECKPOINT_NAME)
    _rewrite(path, _set_meta("dtype", dtype))
    with pytest.raises(ValueError, match="dtype.*float32 or float64"):
        plan_resume(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ValueError, match="float32 or all float64"):
        ckpt.save_checkpoint(tmp_path / "x.safetensors", init_params(TINY, 0, "float32") | {
            "conv1.bias": np.zeros(2, dtype)}, TINY)


# VmHWM, the peak resident memory of this process image (ru_maxrss would carry the parent's across exec).
_PEAK_RSS_OF_LOAD = """
import sys
from capsspec.training.checkpoint import load_checkpoint
try:
    load_checkpoint(sys.argv[1])
except ValueError as exc:
    print("refused:", exc, file=sys.stderr)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(int(hwm.split()[1]) * 1024)
"""


@pytest.mark.parametrize("header", [b"", b"{}", b'{"__metadata__": {"format": "capsspec-checkpoint"}}'])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_huge_file_is_refused_from_its_header_without_reading_its_body(tmp_path, header):
    """A 3 GiB (sparse) file given as a checkpoint: its header is checked against its size first."""
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write((len(header) if header else 1 << 40).to_bytes(8, "little") + header)
        f.truncate(3 << 30)
    r = subprocess.run([sys.executable, "-c", _PEAK_RSS_OF_LOAD, str(path)], capture_output=True, text=True,
                       check=True)
    assert "refused:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert int(r.stdout) < 400 * 2**20, f"peak RSS {int(r.stdout) / 2**20:.0f} MiB"  # numpy's import alone: ~40 MiB


# ===================================================================================== the MNIST cache
def test_a_gzip_bomb_in_the_mnist_cache_is_stopped_at_the_expected_size(mnist_dir, monkeypatch):
    """A megabyte of zeros in a kilobyte of gzip, where a 48-byte labels file belongs: decompression
    stops at 49 bytes (the expected size plus one) and the file is set aside. (The 9 MB bomb that
    expanded to 4.25 GB: docs/hostile-inputs.md.)"""
    from capsspec.training import mnist

    name = "train-labels-idx1-ubyte"
    (mnist_dir / name).unlink()
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = squeeze.compress(bytes(1_000_000)) + squeeze.flush()
    (mnist_dir / (name + ".gz")).write_bytes(bomb)
    pulled = []
    real = zlib.decompressobj

    class Counting:  # how many bytes decompression produced in all
        def __init__(self, *a):
            self.d = real(*a)

        def decompress(self, data, max_length=0):
            out = self.d.decompress(data, max_length)
            pulled.append(len(out))
            return out

        def __getattr__(self, attr):
            return getattr(self.d, attr)
    monkeypatch.setattr(mnist.zlib, "decompressobj", Counting)
    said = []
    with pytest.raises(mnist.MnistUnavailable):
        mnist.fetch_mnist(mnist_dir, download=False, log=said.append)
    assert sum(pulled) <= mnist._expected_bytes(name) + 1, pulled
    assert (mnist_dir / (name + ".gz.rejected")).exists() and any("more than" in s for s in said), said
    with pytest.raises(ValueError, match="decompresses to more than"):
        mnist._gunzip_bounded(bomb, 1000, "bomb")
    big = squeeze_all(bytes(1 << 26))  # 64 MiB in 64 KiB: too large a .gz to be the file, not even read
    (mnist_dir / (name + ".gz")).write_bytes(big)
    pulled.clear()
    with pytest.raises(mnist.MnistUnavailable):
        mnist.fetch_mnist(mnist_dir, download=False, log=said.append)
    assert pulled == [] and "larger than the 48 bytes" in said[-1], said


def squeeze_all(data):
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return squeeze.compress(data) + squeeze.flush()


def test_eval_estimates_its_batch_before_any_work(tmp_path, capsys):
    path = _good_checkpoint(tmp_path / "c.safetensors")
    _one_line(capsys, main(["eval", str(path), "--batch-size", "1000000000"]), "--batch-size 1000000000", "GiB",
              "inference")


@pytest.mark.parametrize("field, value", [("routing_iterations", 10**9), ("primary_types", 10**6),
                                          ("decoder_widths", (10**9,)), ("num_classes", 10**5)])
def test_config_bounds_hold_wherever_a_config_comes_from(field, value):
    with pytest.raises(ValueError, match=f"CapsNetConfig.{field}.*(bound|at most)"):
        CapsNetConfig(**{field: value})


# ===================================================================================== the reference API
API_REFUSALS = [
    ("margin_loss", dict(m_plus=0.1, m_minus=0.9), "m_minus"),
    ("margin_loss", dict(m_plus=1.5), "m_plus"),
    ("margin_loss", dict(lambda_=-1.0), "lambda_"),
    ("margin_loss", dict(m_minus=float("nan")), "m_minus"),
    ("reconstruction_loss", dict(scale=-1.0), "scale"),
    ("reconstruction_loss", dict(scale=float("inf")), "scale"),
    ("routing", dict(iterations=10**9), "iterations"),
]


@pytest.mark.parametrize("op, kwargs, needle", API_REFUSALS, ids=[f"{o}-{k}" for o, k, _ in API_REFUSALS])
def test_the_reference_api_refuses_what_capsnetconfig_refuses(op, kwargs, needle):
    import capsspec.ops as ops

    args = {"margin_loss": (np.full((2, 3), 0.5), np.array([0, 2])),
            "reconstruction_loss": (np.zeros((2, 4)), np.zeros((2, 1, 2, 2))),
            "routing": (np.zeros((1, 2, 3, 2)),)}[op]
    with pytest.raises(ValueError, match=needle):
        getattr(ops, op)(*args, **kwargs)
    config_field = {"scale": "reconstruction_scale", "iterations": "routing_iterations"}
    fields = {config_field.get(k, k): v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match="CapsNetConfig"):  # the same values, refused there too
        CapsNetConfig(**fields)


# ===================================================================================== no wrong number
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_model_whose_outputs_overflow_reports_no_accuracy(tmp_path, capsys, mnist_dir, backend):
    """Every weight 3e38: finite, so the checkpoint loads, but every capsule length is NaN or inf. An argmax
    would still pick classes (and report, say, 18.75%); eval and figures say how many images failed instead."""
    path = ckpt.save_checkpoint(tmp_path / "c.safetensors",
                                {k: np.full_like(a, 3e38) for k, a in init_params(TINY, 0, "float32").items()}, TINY)
    line = _one_line(capsys, main(["eval", str(path), "--backend", backend, "--data-dir", str(mnist_dir)]),
                     "12 of 12 images gave non-finite capsule lengths", "no accuracy")
    assert "%" not in line
    _one_line(capsys, main(["figures", str(path), "--backend", backend, "--data-dir", str(mnist_dir),
                            "--out", str(tmp_path / "f")]), "non-finite capsule lengths")
    assert capsys.readouterr().out == ""


def test_the_trainers_evaluation_and_predict_all_refuse_non_finite_outputs():
    from capsspec.registry import get_backend
    from capsspec.training.evaluate import NonFiniteOutputs, check_finite_lengths, predict_all

    numpy_backend = get_backend("numpy")
    params = {k: np.full_like(a, 3e38) for k, a in init_params(TINY, 0, "float32").items()}
    with pytest.raises(NonFiniteOutputs, match="3 of 3 images"):
        predict_all(numpy_backend, params, np.ones((3, 1, 28, 28), np.float32), TINY)
    lengths = np.array([[0.1, 0.9], [np.nan, 0.2], [np.inf, 0.0], [0.3, 0.3]])
    with pytest.raises(NonFiniteOutputs, match=r"2 of 4 images .*\(1 NaN, 1 inf\)"):
        check_finite_lengths(lengths)
    check_finite_lengths(lengths[[0, 3]])  # finite: no complaint


# ===================================================================================== fuzzing
# Hypothesis draws hostile checkpoints and command lines; each must end in one line (a ValueError from
# the API, exit status 2 from the command line) or a correct result, quickly. The example counts are
# bounded (the ci profile: 25 each) so the whole section runs in seconds.
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st  # noqa: E402

_CAPSYS_OK = [HealthCheck.function_scoped_fixture]  # capsys is read and cleared in every example

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
META_KEYS = sorted(ckpt._META_SCHEMA)
EXTRA_FIELDS = sorted(ckpt._EXTRA_SCHEMA)


def _encode(value):
    return json.dumps(value, allow_nan=True) if not isinstance(value, str) else value


@st.composite
def hostile_headers(draw):
    """A good checkpoint's header with one thing made hostile: a metadata field of any JSON type, a
    config or extra field of any JSON type, a tensor entry, or the whole metadata."""
    kind = draw(st.sampled_from(["meta", "config", "extra", "tensor", "whole"]))
    value = draw(JSON_VALUES)
    if kind == "meta":
        key = draw(st.sampled_from(META_KEYS))
        return kind, key, lambda h: h["__metadata__"].__setitem__(key, _encode(value))
    if kind == "config":
        key = draw(st.sampled_from(sorted(TINY.to_dict())))
        return kind, key, _set_meta("config", json.dumps({**TINY.to_dict(), key: value}, allow_nan=True))
    if kind == "extra":
        key = draw(st.sampled_from(EXTRA_FIELDS))
        return kind, key, _set_meta("extra", json.dumps({"device": None, key: value}, allow_nan=True))
    if kind == "tensor":
        name = draw(st.sampled_from(["conv1.bias", "adam.v.conv1.bias", "digit.weight"]))
        part = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        return kind, name, lambda h: h[name].__setitem__(part, value)
    return kind, "__metadata__", lambda h: h.__setitem__("__metadata__", value)


@hsettings(max_examples=60, deadline=None)
@given(case=hostile_headers())
def test_fuzz_hostile_checkpoints_load_or_refuse_in_one_line(tmp_path_factory, case):
    kind, where, mutate = case
    path = _rewrite(_good_checkpoint(tmp_path_factory.mktemp("c") / "c.safetensors"), mutate)
    try:
        ck = ckpt.load_checkpoint(path)
    except ValueError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc) and len(str(exc)) < 600, str(exc)
        return
    # Accepted: then it is what saving writes (a value that happens to be valid, e.g. an unused key).
    assert ck.config.routing_iterations <= 100 and ck.dtype in ("float32", "float64")
    assert isinstance(ck.training, dict) and isinstance(ck.extra, dict)


@hsettings(max_examples=25, deadline=None)
@given(cut=st.integers(0, 4000), junk=st.binary(max_size=64))
def test_fuzz_truncated_and_garbled_checkpoints(tmp_path_factory, cut, junk):
    path = _good_checkpoint(tmp_path_factory.mktemp("c") / "c.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:min(cut, len(data) - 1)] + junk)
    with pytest.raises(ValueError):
        ckpt.load_checkpoint(path)


FLAG_VALUES = st.sampled_from(["0", "-1", "1e309", "nan", "inf", "-inf", "", "x", "1000000000", "99999999999999999999",
                               "0.5", "--", "/", "/dev/null"])
TRAIN_VALUE_FLAGS = ["--epochs", "--batch-size", "--seed", "--val-size", "--routing-iterations", "--conv1-channels",
                     "--primary-types", "--primary-dim", "--reconstruction-scale", "--lr", "--lr-decay-rate",
                     "--lr-decay-steps", "--lr-floor", "--max-shift", "--eval-batch-size", "--dtype", "--dataset",
                     "--epoch", "--batch", "--lr-f"]


@hsettings(max_examples=40, deadline=None, suppress_health_check=_CAPSYS_OK)
@given(flag=st.sampled_from(TRAIN_VALUE_FLAGS), value=FLAG_VALUES)
def test_fuzz_hostile_train_command_lines(tmp_path_factory, capsys, flag, value):
    """A hostile value for one flag of a run that would otherwise be refused before any work (its --out is a
    file): every outcome is one line and exit status 2, never a traceback, never a started run."""
    blocker = tmp_path_factory.mktemp("o") / "file"
    blocker.write_text("x")
    capsys.readouterr()
    _one_line(capsys, main(["train", flag, value, "--out", str(blocker)]))


@hsettings(max_examples=25, deadline=None, suppress_health_check=_CAPSYS_OK)
@given(command=st.sampled_from(["bench", "gpu-check", "conformance"]),
       flag=st.sampled_from(["--batch-size", "--steps", "--routing-iterations", "--budget-seconds", "--bogus",
                             "--json", "--out", "--profile", "--b", "--st"]), value=FLAG_VALUES)
def test_fuzz_hostile_tool_command_lines(capsys, command, flag, value):
    """bench, gpu-check and conformance with a hostile flag and value: one line and status 2 unless the
    command line is actually valid for that tool, which this draw then does not run (--help)."""
    capsys.readouterr()
    argv = [command, flag, value] + (["--backend", "numpy"] if command == "conformance" else [])
    parser = {"bench": "capsspec.tools.bench", "gpu-check": "capsspec.tools.gpucheck",
              "conformance": "capsspec.conformance.cli"}[command]
    import importlib

    try:
        importlib.import_module(parser).build_parser().parse_args(argv[1:])
    except SystemExit:
        capsys.readouterr()  # the parser's own line, printed by this check
        _one_line(capsys, main(argv))


@pytest.mark.parametrize("dtype, top", [("float32", 3e38), ("float64", 1.7e308)])
@pytest.mark.parametrize("backend", ["numpy", "cupy-fallback", "torch", "jax", "tensorflow"])
def test_squash_and_lengths_hold_over_the_whole_finite_range(backend, dtype, top):
    """|s| near 4e19 in float32 squares to inf, and near 1e-20 to a subnormal: squash is then the unit vector
    (length 1 to the last bit), or |s|^2 s; lengths are |s| itself (inf only where |s| is beyond the range)."""
    import capsspec.ops as ref

    rows = np.array([[m, m, 0.0, -m] for m in (1e-20, 4e19, 1e30, top)] + [[0.3, 0.2, 0.1, 0.5]], dtype=dtype)
    if backend == "cupy-fallback":  # the cupy backend's array code, on NumPy (no GPU here)
        from capsspec.backends.cupy import kernels
        from capsspec.backends.cupy import ops as cops

        v = kernels.squash_forward(np, rows)
        lengths = getattr(cops.capsule_lengths, "__wrapped__", cops.capsule_lengths)(np, rows)
    else:
        b = get_backend(backend) if backend == "numpy" else get_backend(backend, check=False)
        if not b.is_available():
            pytest.skip(f"{backend} is not available")
        v = np.asarray(b.to_numpy(b.squash(b.asarray(rows))))
        lengths = np.asarray(b.to_numpy(b.capsule_lengths(b.asarray(rows))))
    exact = np.sqrt(3.0) * np.array([1e-20, 4e19, 1e30, top], dtype=np.float64)
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(lengths[:4], exact.astype(dtype), rtol=1e-6)  # inf for the top row only
    np.testing.assert_allclose(np.linalg.norm(v[1:4].astype(np.float64), axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(v[0].astype(np.float64), 3e-40 / np.sqrt(3) * np.array([1, 1, 0, -1]), rtol=1e-5,
                               atol=np.finfo(dtype).tiny)  # a subnormal result may be flushed (XLA)
    np.testing.assert_allclose(v[4], ref.squash(rows[4:])[0], rtol=1e-6)
