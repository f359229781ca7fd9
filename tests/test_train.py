"""The trainer, checkpoints and evaluation: resume bit for bit, refusal of bad checkpoints, divergence,
checkpoints moving between backends, and one real-MNIST run (marked `mnist`)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import capsspec
from capsspec.training import checkpoint as ckpt
from capsspec.backend import BackendUnavailable
from capsspec.config import AdamConfig, CapsNetConfig
from capsspec.spec import StepMetrics
from capsspec.training.checkpoint import BEST_VAL_NAME
from capsspec.training.settings import TrainingDiverged, TrainSettings, choose_backend
from capsspec.training.splits import epoch_generators, split_data
from capsspec.training.train import train

TINY = CapsNetConfig(input_height=12, input_width=12, conv1_channels=4, conv1_kernel=5, primary_types=2,
                     primary_dim=4, primary_kernel=3, primary_stride=2, num_classes=3, class_dim=4,
                     decoder_widths=(8,))


def synthetic(n_train: int = 120, n_test: int = 30, seed: int = 0):
    """Three learnable classes: a bright square in one of three places, plus noise."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 3, n)
        x = rng.random((n, 1, 12, 12)).astype(np.float32) * 0.2
        for k in range(3):
            x[y == k, :, 2 + 3 * k:5 + 3 * k, 3:9] += 0.8
        return np.clip(x, 0, 1), y.astype(np.int64)

    (x, y), (xt, yt) = make(n_train), make(n_test)
    return x, y, xt, yt


def splits(settings: TrainSettings, **kw):
    return split_data(*synthetic(**kw), settings)


def quiet_train(backend, config, data, out, **kw):
    return train(backend, config, data, out, progress=None, log=lambda s: None, **kw)


NUMPY = capsspec.get_backend("numpy")


# ===================================================================================== splits and rngs
def test_split_is_deterministic_disjoint_and_sized():
    x, y, xt, yt = synthetic(100, 20)
    x = x + np.arange(100, dtype=np.float32)[:, None, None, None]  # make every image identifiable
    s = TrainSettings(val_size=15, train_subset=50, test_subset=10, seed=3)
    a, b = split_data(x, y, xt, yt, s), split_data(x, y, xt, yt, s)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.val_x, b.val_x)
    ids = lambda arr: set(np.round(arr[:, 0, 0, 0] - arr[:, 0, 0, 0] % 1).astype(int))  # noqa: E731
    assert len(a.train_x) == 50 and len(a.val_x) == 15 and len(a.test_x) == 10
    assert not ids(a.train_x) & ids(a.val_x)
    np.testing.assert_array_equal(a.test_x, xt[:10])
    other = split_data(x, y, xt, yt, TrainSettings(val_size=15, seed=4))
    assert ids(other.val_x) != ids(a.val_x)
    # the validation set depends on the seed only, not on the training subset
    np.testing.assert_array_equal(split_data(x, y, xt, yt, TrainSettings(val_size=15, seed=3)).val_x, a.val_x)
    assert len(split_data(x, y, xt, yt, TrainSettings(val_size=0)).val_x) == 0
    with pytest.raises(ValueError, match="train_subset"):
        split_data(x, y, xt, yt, TrainSettings(val_size=15, train_subset=90))


def test_epoch_generators_depend_on_seed_and_epoch_only():
    a = epoch_generators(0, 3)[0].permutation(50)
    np.testing.assert_array_equal(a, epoch_generators(0, 3)[0].permutation(50))
    assert not np.array_equal(a, epoch_generators(0, 4)[0].permutation(50))
    assert not np.array_equal(a, epoch_generators(1, 3)[0].permutation(50))


def test_settings_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainSettings(batch_size=0)
    with pytest.raises(ValueError, match="select"):
        TrainSettings(select="test")
    with pytest.raises(ValueError, match="val_size is 0"):
        TrainSettings(select="val", val_size=0)


# ===================================================================================== training + resume
def test_training_learns_and_writes_outputs(tmp_path):
    s = TrainSettings(epochs=3, batch_size=16, val_size=20, seed=1, select="val")
    summary = quiet_train(NUMPY, TINY, splits(s, n_train=200), tmp_path, settings=s)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "kind" not in r]  # the epochs' rows, between the training curve's points
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for key in ("epoch", "step", "loss", "margin", "reconstruction", "train_accuracy", "val_accuracy",
                "test_accuracy", "lr", "seconds", "images_per_second"):
        assert key in rows[0]
    assert rows[-1]["step"] == 3 * 12 and rows[-1]["loss"] < rows[0]["loss"]
    assert summary["final_test_accuracy"] > 0.6  # chance is 1/3
    for name in ("checkpoint.safetensors", "final.safetensors", BEST_VAL_NAME, "summary.json"):
        assert (tmp_path / name).is_file()
    best = max(rows, key=lambda r: r["val_accuracy"])  # first best: ties keep the earliest epoch
    assert summary["test_accuracy"] == best["test_accuracy"] and f"epoch {best['epoch']}" in summary["reported_model"]
    assert "never the best" in summary["note"]
    assert json.loads((tmp_path / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]


def _final_state(out):
    c = ckpt.load_checkpoint(out / "checkpoint.safetensors")
    return c


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path):
    s2 = TrainSettings(epochs=2, batch_size=16, val_size=10, seed=5)
    data = splits(s2, n_train=90)
    quiet_train(NUMPY, TINY, data, tmp_path / "full", settings=s2)
    s1 = TrainSettings(**{**s2.to_dict(), "epochs": 1})
    quiet_train(NUMPY, TINY, data, tmp_path / "split", settings=s1)
    quiet_train(NUMPY, TINY, data, tmp_path / "split", settings=s2, resume=True)
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "split")
    assert a.epoch == b.epoch == 2 and a.step == b.step == 10  # 80 images, batches of 16
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
        assert np.array_equal(a.state["m"][k], b.state["m"][k]) and np.array_equal(a.state["v"][k], b.state["v"][k])
    rows = lambda p: [{k: v for k, v in json.loads(line).items() if "second" not in k}  # noqa: E731
                      for line in (p / "metrics.jsonl").read_text().splitlines()]
    assert rows(tmp_path / "full") == rows(tmp_path / "split")


def test_run_interrupted_mid_epoch_resumes_exactly(tmp_path):
    class Interrupted(type(NUMPY)):
        calls = 0

        def train_step(self, *args):
            Interrupted.calls += 1
            if Interrupted.calls == 8:  # the middle of epoch 2 (5 steps per epoch)
                raise KeyboardInterrupt
            return capsspec.train_step(*args)

    s = TrainSettings(epochs=3, batch_size=16, val_size=10, seed=2)
    data = splits(s, n_train=90)
    quiet_train(NUMPY, TINY, data, tmp_path / "full", settings=s)
    with pytest.raises(KeyboardInterrupt):
        quiet_train(Interrupted(), TINY, data, tmp_path / "cut", settings=s)
    assert ckpt.load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors").epoch == 1
    quiet_train(NUMPY, TINY, data, tmp_path / "cut", settings=s, resume=True)
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "cut")
    assert a.step == b.step == 15
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


def test_resume_refuses_changed_settings_and_fresh_run_refuses_existing_checkpoint(tmp_path):
    s = TrainSettings(epochs=1, batch_size=16, val_size=10)
    data = splits(s, n_train=60)
    quiet_train(NUMPY, TINY, data, tmp_path, settings=s)
    with pytest.raises(ValueError, match="already holds"):
        quiet_train(NUMPY, TINY, data, tmp_path, settings=s)
    with pytest.raises(ValueError, match="seed"):
        quiet_train(NUMPY, TINY, data, tmp_path, settings=TrainSettings(epochs=2, batch_size=16, val_size=10, seed=9),
                    resume=True)
    with pytest.raises(ValueError, match="another model"):
        quiet_train(NUMPY, TINY.replace(routing_iterations=2), data, tmp_path,
                    settings=TrainSettings(epochs=2, batch_size=16, val_size=10), resume=True)
    with pytest.raises(ValueError, match="already at epoch 1"):
        quiet_train(NUMPY, TINY, data, tmp_path, settings=s, resume=True)
    with pytest.raises(ValueError, match="data differ"):
        quiet_train(NUMPY, TINY, splits(s, n_train=60, seed=1), tmp_path,
                    settings=TrainSettings(epochs=2, batch_size=16, val_size=10), resume=True)


def test_metrics_are_read_back_only_every_log_every_steps(tmp_path):
    """Device-side metrics must not be converted to host numbers at every step."""

    class DeviceScalar:
        reads = 0

        def __init__(self, v):
            self.v = v

        def __mul__(self, k):
            return DeviceScalar(self.v * k)

        def __add__(self, o):
            return DeviceScalar(self.v + o.v)

        def __float__(self):
            raise AssertionError("a device scalar was converted with float() directly")

    class LazyBackend(type(NUMPY)):
        def train_step(self, params, state, x, labels, config, adam):
            p, st, m = capsspec.train_step(params, state, x, labels, config, adam)
            return p, st, StepMetrics(DeviceScalar(m.total), DeviceScalar(m.margin), DeviceScalar(m.reconstruction),
                                      DeviceScalar(m.correct), m.lr)

        def to_numpy(self, a):
            if isinstance(a, DeviceScalar):
                DeviceScalar.reads += 1
                return np.asarray(a.v)
            return super().to_numpy(a)

    s = TrainSettings(epochs=1, batch_size=8, val_size=0, log_every=4)  # 10 steps: reads after 4, 8 and 10
    quiet_train(LazyBackend(), TINY, splits(s, n_train=80), tmp_path, settings=s)
    assert DeviceScalar.reads == 3 * 4


def test_the_training_curve_has_a_point_every_log_every_steps_with_each_interval_mean(tmp_path):
    """metrics.jsonl's curve points give, for each interval between two points, the mean loss and
    accuracy of exactly the steps in it (recomputed here from every step's own metrics)."""
    from capsspec.tools.figures import curve_intervals, read_metrics_rows

    steps = []

    class Spy(type(NUMPY)):
        def train_step(self, params, state, x, labels, config, adam):
            p, st, m = capsspec.train_step(params, state, x, labels, config, adam)
            steps.append((x.shape[0], float(m.total), float(m.correct)))
            return p, st, m

    s = TrainSettings(epochs=2, batch_size=8, val_size=0, log_every=3)  # 60 images: 8 steps, points at 3, 6, 8
    quiet_train(Spy(), TINY, splits(s, n_train=60), tmp_path, settings=s)
    rows = read_metrics_rows(tmp_path / "metrics.jsonl")
    assert [(r["epoch"], r["step"]) for r in rows if r.get("kind") == "point"] == [
        (1, 3), (1, 6), (1, 8), (2, 11), (2, 14), (2, 16)]
    assert [r["epoch"] for r in rows if "kind" not in r] == [1, 2]  # one row per epoch, after its points
    bounds = [(0, 3), (3, 6), (6, 8), (8, 11), (11, 14), (14, 16)]
    expected_loss = [sum(n * v for n, v, _ in steps[a:b]) / sum(n for n, _, _ in steps[a:b]) for a, b in bounds]
    expected_acc = [sum(c for _, _, c in steps[a:b]) / sum(n for n, _, _ in steps[a:b]) for a, b in bounds]
    xs, loss = curve_intervals(rows, "loss")
    assert xs == [3.0, 6.0, 8.0, 11.0, 14.0, 16.0]
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-9)
    np.testing.assert_allclose(curve_intervals(rows, "train_accuracy")[1], expected_acc, rtol=1e-9)


def test_test_and_validation_images_are_never_shifted(tmp_path, monkeypatch):
    import capsspec.training.train as train_mod

    s = TrainSettings(epochs=1, batch_size=16, val_size=10)
    data = splits(s, n_train=60)
    shifted_batches = []
    real_augment = train_mod.augment_batch

    def spy(images, rng, max_shift):
        shifted_batches.append(images.shape[0])
        return real_augment(images, rng, max_shift)

    seen = []

    class Spy(type(NUMPY)):
        def forward(self, params, x, config, labels=None):  # evaluation reads forward's capsule lengths
            seen.append(np.array(x))
            return capsspec.forward(params, x, config, labels)

    monkeypatch.setattr(train_mod, "augment_batch", spy)
    quiet_train(Spy(), TINY, data, tmp_path, settings=s)
    assert sum(shifted_batches) == data.train_x.shape[0]  # every training image, once per epoch
    evaluated = np.concatenate(seen)
    np.testing.assert_array_equal(evaluated, np.concatenate([data.val_x, data.test_x]))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    class Diverging(type(NUMPY)):
        calls = 0

        def train_step(self, params, state, x, labels, config, adam):
            Diverging.calls += 1
            p, st, m = capsspec.train_step(params, state, x, labels, config, adam)
            if Diverging.calls == 6:  # in the second epoch (4 steps per epoch)
                m = m._replace(total=float("nan"))
            return p, st, m

    s = TrainSettings(epochs=3, batch_size=16, val_size=10)
    data = splits(s, n_train=60)
    with pytest.raises(TrainingDiverged, match=r"NaN|nan") as err:
        quiet_train(Diverging(), TINY, data, tmp_path, settings=s)
    assert "checkpoint.safetensors (step 4: the end of epoch 1)" in str(err.value)
    c = ckpt.load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert c.epoch == 1 and c.step == 4
    assert all(np.all(np.isfinite(a)) for a in c.params.values())
    assert not (tmp_path / "final.safetensors").exists()
    # Resumed, it diverges again before any new checkpoint: that checkpoint is not called good.
    Diverging.calls = 5
    with pytest.raises(TrainingDiverged, match=r"none known: .*checkpoint.safetensors \(step 4: the end of epoch 1\) "
                                               r"is the one this run resumed from"):
        quiet_train(Diverging(), TINY, data, tmp_path, settings=s, resume=True)


# ===================================================================================== checkpoints
def _tiny_checkpoint(path, dtype="float32", with_state=True):
    params = capsspec.init_params(TINY, seed=2, dtype=dtype)
    state = capsspec.adam_init(params) if with_state else None
    if state is not None:
        state = {**state, "step": 7, "m": {k: v + 0.5 for k, v in state["m"].items()}}
    return ckpt.save_checkpoint(path, params, TINY, state=state, adam=AdamConfig(), epoch=3,
                                rng={"seed": 1}, training={"seed": 1}, backend="numpy"), params, state


def test_checkpoint_round_trip(tmp_path):
    path, params, state = _tiny_checkpoint(tmp_path / "c.safetensors")
    c = ckpt.load_checkpoint(path, config=TINY, require_optimizer=True)
    assert c.config == TINY and c.epoch == 3 and c.step == 7 and c.adam == AdamConfig() and c.dtype == "float32"
    assert list(c.params) == list(TINY.param_shapes())
    for k in params:
        np.testing.assert_array_equal(c.params[k], params[k])
        np.testing.assert_array_equal(c.state["m"][k], state["m"][k])
    meta = ckpt.read_metadata(path)
    assert meta["format"] == ckpt.FORMAT_NAME and meta["format_version"] == "1" and meta["capsspec_version"]
    assert {"adam.m.conv1.weight", "adam.v.digit.weight"} <= set(__import__("safetensors.numpy").numpy.load_file(path))
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary file left behind


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path, _, _ = _tiny_checkpoint(tmp_path / "c.safetensors")
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(path, capsspec.init_params(TINY, seed=9), TINY, epoch=4)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_checkpoint_refuses_nonfinite_params(tmp_path):
    params = capsspec.init_params(TINY)
    params["conv1.bias"][0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        ckpt.save_checkpoint(tmp_path / "c.safetensors", params, TINY)
    assert not (tmp_path / "c.safetensors").exists()


def _rewrite(path, tensors, metadata):
    import safetensors.numpy as stn

    path.write_bytes(stn.save(tensors, metadata=metadata))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "corrupt or truncated"),
    ("garbage", "corrupt|not a checkpoint"),
    ("flip", "do not match the hash"),
    ("empty", "too short"),
    ("foreign", "not a capsspec checkpoint"),
    ("version", "format version"),
    ("shape", "shape"),
    ("missing", "missing tensors"),
    ("config", "another model"),
])
def test_bad_checkpoints_are_refused(tmp_path, damage, message):
    import safetensors.numpy as stn

    path, _, _ = _tiny_checkpoint(tmp_path / "c.safetensors")
    raw = path.read_bytes()
    meta = ckpt.read_metadata(path)
    tensors = stn.load(raw)
    expected_config = None
    if damage == "truncate":
        path.write_bytes(raw[:-100])
    elif damage == "garbage":
        path.write_bytes(struct.pack("<Q", 20) + b"{not json at all....." + raw[30:])
    elif damage == "flip":
        b = bytearray(raw)
        b[-5] ^= 0x40
        path.write_bytes(bytes(b))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        _rewrite(path, {"weight": np.zeros(3, np.float32)}, {"framework": "somebody else"})
    elif damage == "version":
        _rewrite(path, tensors, {**meta, "format_version": "2"})
    elif damage == "shape":
        tensors["conv1.bias"] = np.zeros(5, np.float32)
        _rewrite(path, tensors, {**meta, "tensors_sha256": ckpt.tensors_sha256(tensors)})
    elif damage == "missing":
        del tensors["adam.v.conv1.bias"]
        _rewrite(path, tensors, {**meta, "tensors_sha256": ckpt.tensors_sha256(tensors)})
    elif damage == "config":
        expected_config = TINY.replace(class_dim=5)
    with pytest.raises(ValueError, match=message):
        ckpt.load_checkpoint(path, config=expected_config)


def test_checkpoint_without_optimizer_cannot_resume(tmp_path):
    path, _, _ = _tiny_checkpoint(tmp_path / "c.safetensors", with_state=False)
    assert ckpt.load_checkpoint(path).state is None
    with pytest.raises(ValueError, match="no optimizer state"):
        ckpt.load_checkpoint(path, require_optimizer=True)


@pytest.mark.parametrize("name", ["torch", "tensorflow", "cupy"])
def test_checkpoint_moves_between_backends(tmp_path, name):
    try:
        other = capsspec.get_backend(name)
    except BackendUnavailable as exc:
        pytest.skip(f"backend {name!r} is not available here: {exc}")
    s = TrainSettings(epochs=1, batch_size=16, val_size=0, dtype="float64")
    data = splits(s, n_train=64)
    quiet_train(NUMPY, TINY, data, tmp_path, settings=s)
    c = ckpt.load_checkpoint(tmp_path / "checkpoint.safetensors")
    p_np, p_other = NUMPY.params_from_numpy(c.params, TINY), other.params_from_numpy(c.params, TINY)
    x = data.test_x.astype(np.float64)
    np.testing.assert_array_equal(capsspec.predict(p_np, x, TINY),
                                  np.asarray(other.to_numpy(other.predict(p_other, other.asarray(x), TINY))))
    # ... and a run goes on from it on the other backend, then back on numpy.
    quiet_train(other, TINY, data, tmp_path, settings=TrainSettings(**{**s.to_dict(), "epochs": 2}), resume=True)
    c2 = ckpt.load_checkpoint(tmp_path / "checkpoint.safetensors", require_optimizer=True)
    assert c2.epoch == 2 and c2.step == 8 and c2.backend == other.name
    quiet_train(NUMPY, TINY, data, tmp_path, settings=TrainSettings(**{**s.to_dict(), "epochs": 3}), resume=True)
    assert ckpt.load_checkpoint(tmp_path / "checkpoint.safetensors").step == 12


def test_choose_backend():
    b, why = choose_backend("numpy")
    assert b.name == "numpy" and "asked for" in why
    b, why = choose_backend(None)
    assert b.is_available() and "fastest available" in why
    for name in capsspec.backend_names():  # nothing faster was available
        try:
            other = capsspec.get_backend(name, check=False)
        except BackendUnavailable:  # a backend that cannot even be loaded is not available
            continue
        if other.speed_rank > b.speed_rank:
            assert not other.is_available(), name
    with pytest.raises(ValueError, match="unknown backend"):
        choose_backend("no-such-backend")


# ===================================================================================== real MNIST
@pytest.mark.mnist
@pytest.mark.slow
def test_real_mnist_small_model_numpy(tmp_path):
    """A small CapsNet on 4,000 real MNIST training images, 2 epochs on the numpy backend.

    Measured on 2 shared CPU cores: test accuracy 95.2% on the first 1,000 test images with seed 0
    (94.4% with seed 1), about 30 s. The floor (91%) sits a few points below. Chance is 10%.
    """
    from capsspec.training.mnist import load_mnist

    m = load_mnist()
    config = CapsNetConfig(conv1_channels=32, primary_types=8)
    s = TrainSettings(epochs=2, batch_size=32, val_size=0, train_subset=4000, test_subset=1000, seed=0)
    data = split_data(m.train_images, m.train_labels, m.test_images, m.test_labels, s)
    summary = quiet_train(NUMPY, config, data, tmp_path, settings=s)
    assert summary["test_accuracy"] >= 0.91, summary


# ===================================================================================== interrupts (issue 14)
from capsspec.training.settings import TrainingInterrupted, plan_resume  # noqa: E402

TIMING = ("seconds", "images_per_second", "eval_seconds")


def _rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _signal_at(backend, step, signum=None, twice=False, raise_instead=False):
    """backend with train_step wrapped: at call `step` (1-based), a real signal to this process mid-step."""
    import os
    import signal

    real, calls = backend.train_step, [0]

    def train_step(*args):
        calls[0] += 1
        if calls[0] == step:
            if raise_instead:  # a KeyboardInterrupt that no handler of the trainer saw
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum or signal.SIGINT)  # delivered before os.kill returns
            if twice:
                os.kill(os.getpid(), signum or signal.SIGINT)
        return real(*args)

    backend.train_step = train_step  # an instance attribute wins over the backend's spec lookup
    return backend


def _assert_same_run(a_dir, b_dir):
    a, b = ckpt.load_checkpoint(a_dir / "final.safetensors"), ckpt.load_checkpoint(b_dir / "final.safetensors")
    assert a.step == b.step
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
        assert np.array_equal(a.state["m"][k], b.state["m"][k]) and np.array_equal(a.state["v"][k], b.state["v"][k]), k
    assert _rows(a_dir) == _rows(b_dir)


@pytest.mark.parametrize("name", ["numpy", "torch"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_mid_epoch_checkpoints_that_step_and_the_run_resumes_bit_for_bit(tmp_path, name, signame):
    """SIGINT/SIGTERM in the middle of epoch 1 (no checkpoint yet) write a checkpoint of the current step;
    resuming it gives the uninterrupted run's parameters, optimizer state and metrics, bit for bit."""
    import signal

    try:
        capsspec.get_backend(name)
    except BackendUnavailable as exc:
        pytest.skip(f"backend {name!r} is not available here: {exc}")
    s = TrainSettings(epochs=2, batch_size=16, val_size=10, seed=4, log_every=3, checkpoint_every=0)
    data = splits(s, n_train=90)  # 5 steps per epoch
    quiet_train(capsspec.get_backend(name), TINY, data, tmp_path / "full", settings=s)
    cut = tmp_path / "cut"
    interrupting = _signal_at(capsspec.get_backend(name), 2, getattr(signal, signame))
    with pytest.raises(TrainingInterrupted) as err:
        quiet_train(interrupting, TINY, data, cut, settings=s)
    assert err.value.signal_name == signame and err.value.step == 2 and err.value.checkpoint == cut / "checkpoint.safetensors"
    assert f"stopped by {signame} at step 2: epoch 1, 2/5 batches" in str(err.value)
    c = ckpt.load_checkpoint(cut / "checkpoint.safetensors")
    assert c.step == 2 and c.epoch == 0 and c.extra["progress"]["batch"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back
    # A second interruption in epoch 2, between two reads of the device-side metrics (log_every=3).
    with pytest.raises(TrainingInterrupted):
        quiet_train(_signal_at(capsspec.get_backend(name), 7), TINY, data, cut, settings=s, resume=True)
    assert ckpt.load_checkpoint(cut / "checkpoint.safetensors").step == 9
    quiet_train(capsspec.get_backend(name), TINY, data, cut, settings=s, resume=True)
    _assert_same_run(tmp_path / "full", cut)


def test_a_second_signal_stops_at_once_and_never_claims_a_checkpoint_that_does_not_exist(tmp_path):
    s = TrainSettings(epochs=2, batch_size=16, val_size=10, checkpoint_every=0)
    data = splits(s, n_train=90)
    with pytest.raises(TrainingInterrupted) as err:
        quiet_train(_signal_at(capsspec.get_backend("numpy"), 3, twice=True), TINY, data, tmp_path, settings=s)
    assert err.value.checkpoint is None and "before any checkpoint was written" in str(err.value)
    assert "nothing to resume" in str(err.value) and not (tmp_path / "checkpoint.safetensors").exists()
    # In epoch 2 the last checkpoint written is epoch 1's, and the message names it.
    with pytest.raises(TrainingInterrupted) as err:
        quiet_train(_signal_at(capsspec.get_backend("numpy"), 8, twice=True), TINY, data, tmp_path / "b", settings=s)
    assert err.value.step == 5 and "the last checkpoint written is" in str(err.value)
    assert "(step 5: the end of epoch 1)" in str(err.value)
    assert ckpt.load_checkpoint(tmp_path / "b" / "checkpoint.safetensors").step == 5


def test_time_rule_checkpoints_within_an_epoch(tmp_path):
    """With checkpoint_seconds tiny, every step is checkpointed: an abrupt stop at step 4 loses one step only."""
    s = TrainSettings(epochs=1, batch_size=16, val_size=10, checkpoint_seconds=1e-9)
    with pytest.raises(TrainingInterrupted) as err:
        quiet_train(_signal_at(capsspec.get_backend("numpy"), 4, raise_instead=True), TINY, splits(s, n_train=90),
                    tmp_path, settings=s)
    assert err.value.step == 3 and "(step 3: epoch 1, 3/5 batches)" in str(err.value)
    assert ckpt.load_checkpoint(tmp_path / "checkpoint.safetensors").step == 3


def test_default_checkpoint_interval_is_two_minutes_on_a_cpu_and_one_elsewhere(tmp_path):
    from capsspec.backend import Availability

    class FakeAccelerator(type(NUMPY)):
        def availability(self):
            return Availability(True, version="0", device="cuda:0 (a stand-in)")

    said = []
    s = TrainSettings(epochs=1, batch_size=16, val_size=0)
    data = splits(s, n_train=32)
    train(NUMPY, TINY, data, tmp_path / "cpu", settings=s, progress=None, log=said.append)
    train(FakeAccelerator(), TINY, data, tmp_path / "gpu", settings=s, progress=None, log=said.append)
    assert "checkpoints every 2 minutes of training" in said[0]
    assert "checkpoints every 1 minute of training" in [x for x in said if "checkpoints" in x][1]


def test_resume_keeps_backend_device_dtype_and_says_when_asked_for_others(tmp_path):
    s = TrainSettings(epochs=1, batch_size=16, val_size=0, dtype="float64")
    data = splits(s, n_train=32)
    quiet_train(NUMPY, TINY, data, tmp_path, settings=s, backend_options={})
    plan = plan_resume(tmp_path, settings={"epochs": 2})
    assert (plan.backend, plan.device, plan.settings.dtype, plan.settings.epochs) == ("numpy", NUMPY.device, "float64", 2)
    assert plan.config == TINY and plan.adam == AdamConfig()
    plan = plan_resume(tmp_path, backend="torch", settings={"dtype": "float32"})
    assert (plan.backend, plan.device, plan.settings.dtype) == ("torch", None, "float32")
    with pytest.raises(ValueError, match="seed=0; a resumed run cannot change it to 3"):
        plan_resume(tmp_path, settings={"seed": 3})
    with pytest.raises(ValueError, match="routing_iterations"):
        plan_resume(tmp_path, config={"routing_iterations": 1})
    said = []
    train(NUMPY, TINY, data, tmp_path, settings=TrainSettings(**{**s.to_dict(), "epochs": 2, "dtype": "float32"}),
          resume=True, progress=None, log=said.append)
    assert "will not be bit-exact" in said[0] and "float64" in said[0], said[0]
    assert ckpt.load_checkpoint(tmp_path / "checkpoint.safetensors").dtype == "float32"


def test_summary_credits_training_time_to_each_backend(tmp_path):
    try:
        torch_backend = capsspec.get_backend("torch")
    except BackendUnavailable as exc:
        pytest.skip(f"torch is not available here: {exc}")
    s = TrainSettings(epochs=1, batch_size=16, val_size=0)
    data = splits(s, n_train=32)
    first = quiet_train(NUMPY, TINY, data, tmp_path, settings=s)
    said = []
    second = train(torch_backend, TINY, data, tmp_path, settings=TrainSettings(**{**s.to_dict(), "epochs": 2}),
                   resume=True, progress=None, log=said.append)
    assert "will not be bit-exact" in said[0] and "the run was started on numpy" in said[0]
    (np_key,) = first["train_seconds_by_backend"]
    by = second["train_seconds_by_backend"]
    assert np_key.startswith("numpy") and set(by) == {np_key, next(k for k in by if k.startswith("torch"))}
    assert by[np_key] == first["train_seconds"]  # numpy's time stays numpy's; torch's epoch is torch's
    assert second["train_seconds"] == pytest.approx(sum(by.values()))
    assert "on numpy" in said[-1] and "on torch" in said[-1]


def test_output_folder_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    s = TrainSettings(epochs=1, batch_size=16, val_size=0)
    with pytest.raises(ValueError, match="is an existing file"):
        quiet_train(NUMPY, TINY, splits(s, n_train=32), tmp_path / "file", settings=s)
    with pytest.raises(ValueError, match="cannot create the output folder"):
        quiet_train(NUMPY, TINY, splits(s, n_train=32), tmp_path / "file" / "sub", settings=s)


def test_a_signal_during_evaluation_checkpoints_the_trained_epoch_and_resumes_exactly(tmp_path):
    """Stopped while evaluating epoch 1: the checkpoint holds the trained, unevaluated epoch; the resumed run
    evaluates it and writes exactly the uninterrupted run's metrics (every field but timings, in order)."""
    import os
    import signal

    s = TrainSettings(epochs=2, batch_size=16, val_size=10, seed=6, eval_batch_size=4, checkpoint_every=0)
    data = splits(s, n_train=90)
    quiet_train(NUMPY, TINY, data, tmp_path / "full", settings=s)
    backend, calls = capsspec.get_backend("numpy"), [0]
    real_forward = backend.forward  # evaluation reads forward's capsule lengths

    def forward(*args):
        calls[0] += 1
        if calls[0] == 3:  # the last validation batch of epoch 1
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(*args)

    backend.forward = forward
    with pytest.raises(TrainingInterrupted) as err:
        quiet_train(backend, TINY, data, tmp_path / "cut", settings=s)
    assert "at step 5: epoch 1 trained, its evaluation not yet done" in str(err.value)
    quiet_train(NUMPY, TINY, data, tmp_path / "cut", settings=s, resume=True)
    _assert_same_run(tmp_path / "full", tmp_path / "cut")
    lines = lambda p: [[(k, v) for k, v in json.loads(line).items() if k not in TIMING]  # noqa: E731
                       for line in (p / "metrics.jsonl").read_text().splitlines()]
    assert lines(tmp_path / "full") == lines(tmp_path / "cut")
