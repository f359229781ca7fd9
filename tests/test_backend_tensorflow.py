"""Focused tests of the TensorFlow backend (backends/tensorflow) against the reference.

The conformance suite holds every backend to the reference op by op; these tests cover what is
particular to this backend: canonical parameters survive the trip through channels-last
variables unchanged, the NHWC PrimaryCaps keeps the spec's capsule order (on a non-square grid
with several types, where a wrong order shows), the tape meets the spec's numerics at zero and
at huge norms, the hand-written Adam is the spec's, the compiled steps do not retrace when the
batch size changes, and importing the backend's package does not import TensorFlow. A small
config keeps the whole file to a few seconds of TensorFlow work.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from capsspec import AdamConfig, CapsNetConfig, get_backend  # noqa: E402
from capsspec import model as ref_model  # noqa: E402
from capsspec import ops as ref_ops  # noqa: E402
from capsspec import optim as ref_optim  # noqa: E402
from capsspec.spec import OPS, StepMetrics  # noqa: E402
from capsspec.backends.tensorflow import TensorFlowBackend  # noqa: E402
from capsspec.backends.tensorflow import ops as tops  # noqa: E402
from batches import random_batch  # noqa: E402

# PrimaryCaps grid 5x4 (not square), 3 types of 4 dims: a capsule order that mixes grid
# positions, types or dims gives different numbers here.
SMALL = CapsNetConfig(
    input_height=13, input_width=11, conv1_channels=6, conv1_kernel=3, primary_types=3, primary_dim=4,
    primary_kernel=3, primary_stride=2, num_classes=4, class_dim=5, decoder_widths=(12, 10),
)
F64 = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def backend():
    return get_backend("tensorflow")


_data = random_batch


def _close(got, want, rtol=1e-10, atol=1e-12):
    """Shape and dtype first, then values; recurses into tuples/lists (decoder's VJP)."""
    if isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want)
        for g, w in zip(got, want):
            _close(g, w, rtol, atol)
        return
    got = got.numpy() if tf.is_tensor(got) else np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ structure
def test_backend_attributes_and_devices():
    b = TensorFlowBackend()
    assert (b.name, b.framework, b.speed_rank, b.device, b.tf_device) == ("tensorflow", "tensorflow", 10, "cpu", "/CPU:0")
    assert b.install_hint == "pip install 'capsspec[tensorflow]'"
    assert b.missing_names() == []
    assert b.availability().available
    assert TensorFlowBackend("cpu").tf_device == "/CPU:0"
    assert TensorFlowBackend("cuda:1").tf_device == "/GPU:1"
    with pytest.raises(ValueError, match="device"):
        TensorFlowBackend("tpu")
    if not tf.config.list_physical_devices("GPU"):
        a = TensorFlowBackend("gpu").availability()
        assert not a.available and "GPU" in a.reason


def test_importing_the_backend_does_not_import_tensorflow():
    code = ("import sys, capsspec, capsspec.backends.tensorflow as m; from capsspec import get_backend; "
            "b = get_backend('tensorflow', check=False); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.parametrize("user", [None, "1"])
def test_onednn_is_off_unless_the_user_turned_it_on(user):
    # The backend's default keeps TensorFlow 2.21's oneDNN kernels (heap corruption in rank-4 matmul,
    # tensorflow/tensorflow issue 117700) out of the process; a user's own setting is kept.
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if user is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = user
    code = ("import os; from capsspec import get_backend; get_backend('tensorflow'); "
            "import tensorflow; print('value', os.environ.get('TF_ENABLE_ONEDNN_OPTS'))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert f"value {user or '0'}" in res.stdout
    # TensorFlow says at import when its oneDNN custom operations are on (an INFO line, at log level 0 or 1).
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert ("oneDNN custom operations are on" in res.stderr) == (user == "1"), res.stderr[-2000:]


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_op_signatures_match_the_reference(op):
    for name in (op.name, op.vjp_name):
        assert inspect.signature(getattr(tops, name)).parameters.keys() == \
            inspect.signature(getattr(ref_ops, name)).parameters.keys()
        for p_tf, p_ref in zip(inspect.signature(getattr(tops, name)).parameters.values(),
                               inspect.signature(getattr(ref_ops, name)).parameters.values()):
            assert p_tf.default == p_ref.default, (name, p_tf.name)


# ------------------------------------------------------------------------------ conversions
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_params_round_trip_is_exact_and_layouts_stay_inside(backend, dtype):
    params = ref_model.init_params(SMALL, seed=3, dtype=dtype)
    net = backend.params_from_numpy(params, SMALL)
    # Stored channels-last / (in, out) inside ...
    assert tuple(net.conv1.kernel.shape) == (3, 3, 1, 6)
    assert tuple(net.decoder.layers[0].kernel.shape) == (20, 12)
    # ... and canonical at the edges, bit for bit.
    back = backend.params_to_numpy(net)
    assert list(back) == list(SMALL.param_shapes())
    for k, a in params.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape and np.array_equal(back[k], a), k


def test_asarray_keeps_dtypes(backend):
    labels = backend.asarray(np.array([1, 2], dtype=np.int64))
    assert labels.dtype == tf.int64
    x = backend.asarray(np.zeros((2, 3), dtype=np.float64))
    assert x.dtype == tf.float64 and backend.to_numpy(x).dtype == np.float64


# ------------------------------------------------------------------------------ ops vs reference
def _op_cases(rng):
    """(name, args for the op, cotangent) in float64, canonical layouts."""
    f = lambda *s: rng.normal(size=s)  # noqa: E731
    labels3 = np.array([2, 0, 3])
    return [
        ("conv2d", (f(2, 3, 7, 6), f(4, 3, 3, 2), f(4), 2), f(2, 4, 3, 3)),
        ("squash", (f(3, 4, 5), 1), f(3, 4, 5)),
        # 6 channels = 3 types x 2 dims on a 4x3 grid.
        ("primary_capsules", (f(2, 4, 9, 7), f(6, 4, 3, 3), f(6), 2, 2), f(2, 36, 2)),
        ("predictions", (f(2, 5, 3), f(5, 4, 6, 3)), f(2, 5, 4, 6)),
        ("routing", (f(2, 5, 4, 3), 3), (f(2, 4, 3), f(2, 5, 4))),
        ("capsule_lengths", (f(2, 4, 3),), f(2, 4)),
        ("margin_loss", (rng.uniform(size=(3, 4)), labels3, 0.9, 0.1, 0.5), 1.5),
        ("mask", (f(3, 4, 2), labels3), f(3, 8)),
        ("decoder", (f(3, 8), [f(5, 8), f(6, 5)], [f(5), f(6)]), f(3, 6)),
        ("reconstruction_loss", (rng.uniform(size=(2, 12)), rng.uniform(size=(2, 3, 2, 2)), 0.0005), 2.0),
    ]


def _to_tf(a):
    if isinstance(a, np.ndarray):
        return tf.constant(a)
    if isinstance(a, list):
        return [_to_tf(b) for b in a]
    if isinstance(a, tuple):
        return tuple(_to_tf(b) for b in a)
    return a


@pytest.mark.parametrize("case", range(10), ids=[op.name for op in OPS])
def test_ops_and_vjps_match_the_reference_in_float64(case):
    name, args, g = _op_cases(np.random.default_rng(case))[case]
    _close(getattr(tops, name)(*_to_tf(args)), getattr(ref_ops, name)(*args))
    _close(getattr(tops, name + "_vjp")(_to_tf(g), *_to_tf(args)), getattr(ref_ops, name + "_vjp")(g, *args))
    if name == "routing":  # also without a cotangent for c, and with one iteration (c constant)
        _close(tops.routing_vjp((_to_tf(g[0]), None), *_to_tf(args)), ref_ops.routing_vjp((g[0], None), *args))
        _close(tops.routing_vjp(_to_tf(g), _to_tf(args[0]), 1), ref_ops.routing_vjp(g, args[0], 1))
    if name == "mask":  # the longest capsule, when no labels are given
        _close(tops.mask(_to_tf(args[0])), ref_ops.mask(args[0]))


def test_primary_capsule_order_is_the_spec_s():
    # Each conv output channel o at grid (y, x) gets a distinct value, so the position of every
    # value in u says which capsule and dim it landed in.
    t, d, gh, gw = 3, 2, 4, 3
    h = np.zeros((1, 1, gh, gw))
    weight = np.zeros((t * d, 1, 1, 1))
    bias = np.arange(t * d, dtype=np.float64) * 100
    h[0, 0] = np.arange(gh * gw).reshape(gh, gw)
    weight[:, 0, 0, 0] = 1.0
    s = (h[0, 0][None] + bias[:, None, None])  # (T*D, Gh, Gw): channel o at (y, x)
    expected_s = np.empty((t * gh * gw, d))
    for tt in range(t):
        for y in range(gh):
            for x in range(gw):
                for dd in range(d):
                    expected_s[(tt * gh + y) * gw + x, dd] = s[tt * d + dd, y, x]
    got = tops.primary_capsules(tf.constant(h), tf.constant(weight), tf.constant(bias), d, 1).numpy()[0]
    np.testing.assert_allclose(got, ref_ops.squash(expected_s), rtol=1e-12)


# ------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("dtype, huge", [("float32", 1e18), ("float64", 1e150)])
def test_zero_and_huge_vectors_give_the_reference_s_values_and_no_nan(dtype, huge):
    s = np.zeros((4, 3), dtype=dtype)
    s[1] = [huge, -huge, 0.5 * huge]
    s[2] = [1e-30, 0, 0]
    s[3] = [0.3, -0.2, 0.1]
    g = np.ones_like(s)
    rtol = 1e-5 if dtype == "float32" else 1e-12
    out = tops.squash(tf.constant(s)).numpy()
    (grad,) = tops.squash_vjp(tf.constant(g), tf.constant(s))
    (lgrad,) = tops.capsule_lengths_vjp(tf.constant(g[:, 0]), tf.constant(s))
    for got, want in ((out, ref_ops.squash(s)), (grad.numpy(), ref_ops.squash_vjp(g, s)[0]),
                      (lgrad.numpy(), ref_ops.capsule_lengths_vjp(g[:, 0], s)[0])):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0)
    assert (out[0] == 0).all() and (grad.numpy()[0] == 0).all() and (lgrad.numpy()[0] == 0).all()


def test_model_with_all_zero_capsules_has_finite_gradients(backend):
    # Zero PrimaryCaps weights and bias: every u, u_hat, s and v is exactly 0.
    params = ref_model.init_params(SMALL, seed=1, dtype="float64")
    params["primary.weight"][:] = 0
    params["primary.bias"][:] = 0
    x, y = _data(SMALL, 3, "float64")
    net = backend.params_from_numpy(params, SMALL)
    total, grads = backend.value_and_grad(net, backend.asarray(x), backend.asarray(y), SMALL)
    want_total, want_grads = ref_model.value_and_grad(params, x, y, SMALL)
    _close(total, want_total)
    for k in want_grads:
        assert np.isfinite(grads[k].numpy()).all(), k
        _close(grads[k], want_grads[k])


# ------------------------------------------------------------------------------ model vs reference
def test_forward_loss_value_and_grad_predict_match_the_reference_in_float64(backend):
    params = ref_model.init_params(SMALL, seed=2, dtype="float64")
    net = backend.params_from_numpy(params, SMALL)
    x, y = _data(SMALL, 5, "float64")
    tx, ty = backend.asarray(x), backend.asarray(y)
    for labels in (y, None):  # the decoder sees the true class, then the longest capsule
        got = backend.forward(net, tx, SMALL, None if labels is None else ty)
        want = ref_model.forward(params, x, SMALL, labels)
        for field in want._fields:
            _close(getattr(got, field), getattr(want, field))
    want_parts = ref_model.loss(params, x, y, SMALL)
    for got, want in zip(backend.loss(net, tx, ty, SMALL), want_parts):
        assert got.shape == () and got.dtype == tf.float64
        _close(got, want)
    total, grads = backend.value_and_grad(net, tx, ty, SMALL)
    want_total, want_grads = ref_model.value_and_grad(params, x, y, SMALL)
    _close(total, want_total)
    assert list(grads) == list(want_grads)
    for k in want_grads:
        _close(grads[k], want_grads[k])
    pred = backend.predict(net, tx, SMALL)
    assert pred.dtype == tf.int64 and np.array_equal(pred.numpy(), ref_model.predict(params, x, SMALL))


def test_float32_matches_the_reference_loosely_and_batch_1_works(backend):
    params = ref_model.init_params(SMALL, seed=4, dtype="float32")
    net = backend.params_from_numpy(params, SMALL)
    x, y = _data(SMALL, 1, "float32")
    total, grads = backend.value_and_grad(net, backend.asarray(x), backend.asarray(y), SMALL)
    want_total, want_grads = ref_model.value_and_grad(params, x, y, SMALL)
    # float32 rounding differs between im2col+BLAS and TensorFlow's convolutions.
    _close(total, want_total, rtol=1e-5, atol=1e-7)
    for k in want_grads:
        _close(grads[k], want_grads[k], rtol=1e-3, atol=1e-6 * max(1.0, float(np.abs(want_grads[k]).max())))


def test_no_decoder_and_one_routing_iteration(backend):
    config = SMALL.replace(use_decoder=False, routing_iterations=1)
    params = ref_model.init_params(config, seed=5, dtype="float64")
    net = backend.params_from_numpy(params, config)
    x, y = _data(config, 2, "float64")
    out = backend.forward(net, backend.asarray(x), config)
    assert out.reconstruction is None
    total, grads = backend.value_and_grad(net, backend.asarray(x), backend.asarray(y), config)
    want_total, want_grads = ref_model.value_and_grad(params, x, y, config)
    _close(total, want_total)
    for k in want_grads:
        _close(grads[k], want_grads[k])


def test_strided_1x1_convolutions_and_none_of_the_above_on_colour_images(backend):
    """TensorFlow 2.21's oneDNN gradient of a 1x1 convolution of stride 2 corrupts the heap (the process
    aborts); the backend takes every second pixel instead. Also 3 channels and the none-of-the-above logit."""
    config = CapsNetConfig(input_channels=3, input_height=14, input_width=10, conv1_channels=3, conv1_kernel=1,
                           conv1_stride=2, primary_types=2, primary_dim=3, primary_kernel=1, primary_stride=2,
                           num_classes=5, class_dim=3, none_of_the_above=True, decoder_widths=(6,))
    params = ref_model.init_params(config, seed=6, dtype="float64")
    x, y = _data(config, 3, "float32")
    net = backend.params_from_numpy({k: v.astype(np.float32) for k, v in params.items()}, config)
    state = backend.adam_init(net)
    for _ in range(5):  # float32 training steps: where the corruption aborted the suite
        net, state, _ = backend.train_step(net, state, backend.asarray(x), backend.asarray(y), config)
    net = backend.params_from_numpy(params, config)
    x = x.astype(np.float64)
    total, grads = backend.value_and_grad(net, backend.asarray(x), backend.asarray(y), config)
    want_total, want_grads = ref_model.value_and_grad(params, x, y, config)
    _close(total, want_total)
    for k in want_grads:
        _close(grads[k], want_grads[k])


# ------------------------------------------------------------------------------ tracing
def test_changing_batch_sizes_does_not_retrace(backend):
    params = ref_model.init_params(SMALL, seed=6, dtype="float32")
    net = backend.params_from_numpy(params, SMALL)
    state = backend.adam_init(net)
    for batch in (1, 7, 12, 3):  # full batches of different sizes and a last partial one
        x, y = _data(SMALL, batch, "float32", seed=batch)
        tx, ty = backend.asarray(x), backend.asarray(y.astype(np.int32 if batch == 3 else np.int64))
        backend.forward(net, tx, SMALL, ty)
        backend.forward(net, tx, SMALL)
        backend.loss(net, tx, ty, SMALL)
        _, grads = backend.value_and_grad(net, tx, ty, SMALL)
        backend.predict(net, tx, SMALL)
        backend.adam_update(net, grads, state, AdamConfig(lr=2e-3 * batch))  # pure: net and state unchanged
        net, state, _ = backend.train_step(net, state, tx, ty, SMALL, AdamConfig(lr=1e-3 * batch))
        # Two digits per image (MultiMNIST): (B, 2) labels and their targets go through the same traces.
        t2 = backend.asarray(np.stack([x, x[::-1]], axis=1))
        y2 = backend.asarray(np.stack([y, (y + 1) % 4], axis=1))
        assert backend.forward(net, tx, SMALL, y2).reconstruction.shape == (batch, 2, 13 * 11)
        backend.loss(net, tx, y2, SMALL, t2)
        backend.value_and_grad(net, tx, y2, SMALL, t2)
        net, state, _ = backend.train_step(net, state, tx, y2, SMALL, AdamConfig(lr=1e-3 * batch), t2)
    # Python side effects run only while tracing: each step was traced once for all sizes.
    assert max(net.traces.values()) <= 1, dict(net.traces)
    assert set(net.traces) == {"forward_labels", "forward_longest", "loss", "value_and_grad", "predict",
                               "train_step"}
    for fn in (net.forward_labels_step, net.forward_longest_step, net.loss_step, net.value_and_grad_step,
               net.predict_step, state.train_step_fn):
        assert fn.experimental_get_tracing_count() <= 1


# ------------------------------------------------------------------------------ Adam
def test_adam_over_three_steps_matches_the_reference_in_float64(backend):
    adam = AdamConfig(lr=1e-2, decay_steps=2, lr_floor=9.5e-3)  # the schedule and its floor both bite
    params = ref_model.init_params(SMALL, seed=7, dtype="float64")
    net = backend.params_from_numpy(params, SMALL)
    state = backend.adam_init(net)
    ref_params, ref_state = params, ref_optim.adam_init(params)
    for step in range(3):
        x, y = _data(SMALL, 4, "float64", seed=10 + step)
        net, state, metrics = backend.train_step(net, state, backend.asarray(x), backend.asarray(y), SMALL, adam)
        ref_params, ref_state, want = ref_optim.train_step(ref_params, ref_state, x, y, SMALL, adam)
        assert isinstance(metrics, StepMetrics) and isinstance(metrics.lr, float)
        assert metrics.lr == want.lr
        for field in ("total", "margin", "reconstruction"):
            assert tf.is_tensor(getattr(metrics, field))
            _close(getattr(metrics, field), np.float64(getattr(want, field)))
        assert int(metrics.correct) == want.correct
    got = backend.params_to_numpy(net)
    for k in params:
        _close(got[k], ref_params[k])
    got_state = backend.state_to_numpy(state)
    assert got_state["step"] == ref_state["step"] == 3
    for part in ("m", "v"):
        for k in params:
            _close(got_state[part][k], ref_state[part][k])


def test_adam_update_and_state_round_trip(backend):
    adam = AdamConfig(lr=3e-3)
    params = ref_model.init_params(SMALL, seed=8, dtype="float64")
    x, y = _data(SMALL, 3, "float64")
    ref_params, ref_state = ref_optim.adam_update(params, ref_model.value_and_grad(params, x, y, SMALL)[1],
                                                  ref_optim.adam_init(params), adam)
    net = backend.params_from_numpy(params, SMALL)
    state = backend.adam_init(net)
    _, grads = backend.value_and_grad(net, backend.asarray(x), backend.asarray(y), SMALL)
    net, state = backend.adam_update(net, grads, state, adam)
    got = backend.params_to_numpy(net)
    for k in params:
        _close(got[k], ref_params[k])
    # A state written out and read back continues the same run.
    again = backend.state_to_numpy(backend.state_from_numpy(backend.state_to_numpy(state), net))
    assert again["step"] == 1
    for part in ("m", "v"):
        for k in params:
            assert np.array_equal(again[part][k], ref_state[part][k]) or \
                np.allclose(again[part][k], ref_state[part][k], **F64)


# ------------------------------------------------------------------------------ validation
def test_bad_inputs_raise_value_errors_naming_the_argument(backend):
    params = ref_model.init_params(SMALL, seed=9, dtype="float64")
    net = backend.params_from_numpy(params, SMALL)
    x, y = _data(SMALL, 2, "float64")
    tx, ty = backend.asarray(x), backend.asarray(y)
    with pytest.raises(ValueError, match="config"):
        backend.forward(net, tx, SMALL.replace(routing_iterations=2))
    with pytest.raises(ValueError, match="x"):
        backend.forward(net, backend.asarray(x[:, :, :-1]), SMALL)
    with pytest.raises(ValueError, match="dtype"):
        backend.forward(net, backend.asarray(x.astype("float32")), SMALL)
    with pytest.raises(ValueError, match="x must be a tf.Tensor"):
        backend.forward(net, x, SMALL)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        backend.loss(net, tx, backend.asarray(np.array([0, 4])), SMALL)
    with pytest.raises(ValueError, match="labels"):
        backend.value_and_grad(net, tx, backend.asarray(np.array([0.0, 1.0])), SMALL)
    with pytest.raises(ValueError, match="params"):
        backend.params_from_numpy({k: v for k, v in params.items() if k != "digit.weight"}, SMALL)
    with pytest.raises(ValueError, match="state"):
        backend.train_step(net, backend.adam_init(backend.params_from_numpy(params, SMALL)), tx, ty, SMALL)
    with pytest.raises(ValueError, match="weight"):
        backend.conv2d(tf.zeros((1, 2, 5, 5), tf.float64), tf.zeros((3, 1, 3, 3), tf.float64), tf.zeros(3, tf.float64))
    with pytest.raises(ValueError, match="g"):
        backend.squash_vjp(tf.zeros((2, 3), tf.float64), tf.zeros((2, 4), tf.float64))
    # The door's value checks hold here as on the reference: NaN images, float labels, empty batches.
    with pytest.raises(ValueError, match="x must contain only finite values"):
        backend.predict(net, backend.asarray(np.full_like(x, np.nan)), SMALL)
    with pytest.raises(ValueError, match="labels must have an integer dtype"):
        backend.loss(net, tx, backend.asarray(y.astype("float64")), SMALL)
    with pytest.raises(ValueError, match="x must hold at least one example"):
        backend.forward(net, backend.asarray(x[:0]), SMALL)


def test_ties_go_to_the_lowest_class():
    v = np.zeros((2, 4, 3))
    v[0, 1] = v[0, 3] = [0.3, 0.4, 0.0]  # classes 1 and 3 tie
    _close(tops.mask(tf.constant(v)), ref_ops.mask(v))
    assert tops._first_argmax(tf.constant([[0.5, 0.7, 0.7]])).numpy().tolist() == [1]


_TF32_SCRIPT = """
import sys, numpy as np, tensorflow as tf
from capsspec import get_backend
first = sys.argv[1] == "true"
assert tf.config.experimental.tensor_float_32_execution_enabled()  # TensorFlow's own default: on
b = get_backend("tensorflow", tf32=first)
b.squash(b.asarray(np.ones((2, 3), np.float32)))
assert tf.config.experimental.tensor_float_32_execution_enabled() == first, "TF32 not as asked"
assert b.float32_precision == ("tf32" if first else "ieee")
other = get_backend("tensorflow", tf32=not first)
try:
    other.squash(other.asarray(np.ones((2, 3), np.float32)))
except ValueError as exc:
    assert "process-wide" in str(exc), exc
else:
    raise AssertionError("a second backend switched TF32 under the first")
print("ok")
"""


@pytest.mark.parametrize("tf32", ["false", "true"])
def test_tf32_is_off_unless_asked_for_whenever_the_backend_is_used(tf32):
    """TensorFlow runs float32 products in TF32 on Ampere and newer GPUs by default; the backend's first use
    sets the process-wide switch to its tf32 option (off by default), and refuses to flip it later."""
    r = subprocess.run([sys.executable, "-c", _TF32_SCRIPT, tf32], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_tf32_has_its_own_conformance_tolerance():
    from capsspec.conformance.tolerances import tolerance

    assert tolerance("tf32", "contraction").rtol > 100 * tolerance("float32", "contraction").rtol
    assert tolerance("tf32", "elementwise") == tolerance("float32", "elementwise")  # no product: no TF32
