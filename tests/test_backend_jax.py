"""Focused tests of the JAX backend (backends/jax) against the reference.

The conformance suite holds every backend to the reference op by op; these tests cover what is
particular to this backend: train_step compiles once per batch shape (traces are counted), it
donates the params and moments while the other functions leave their inputs alone, float64
works without touching JAX's global configuration while float32 stays float32, and a
checkpoint moves between numpy and jax with the same predictions. A small config keeps the
whole file to a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from capsspec import AdamConfig, get_backend, init_params  # noqa: E402
from capsspec import model as ref_model  # noqa: E402
from capsspec import optim as ref_optim  # noqa: E402
from capsspec.backends.jax import optim as jax_optim  # noqa: E402
from capsspec.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from capsspec.training.evaluate import evaluate  # noqa: E402
from batches import SMALL, random_batch  # noqa: E402



@pytest.fixture(scope="module")
def backend():
    return get_backend("jax")


_data = random_batch


def _step(b, p, s, config, batch, dtype="float32", seed=0, adam=AdamConfig()):
    x, y = _data(config, batch, dtype, seed)
    return b.train_step(p, s, b.asarray(x), b.asarray(y), config, adam)


def test_registered_and_available(backend):
    assert (backend.name, backend.framework, backend.dtypes) == ("jax", "jax", ("float32", "float64"))
    assert backend.missing_names() == []
    assert backend.availability().device == "cpu" or backend.availability().device.startswith("gpu")
    with pytest.raises(ValueError, match="device"):
        get_backend("jax", device="tpu-ish")


def test_train_step_traces_once_per_batch_shape(backend):
    config = SMALL.replace(class_dim=7)  # a config no other test compiles
    p = backend.params_from_numpy(init_params(config, 0), config)
    s = backend.adam_init(p)
    before = jax_optim.TRACES["train_step"]
    p, s, _ = _step(backend, p, s, config, 4, seed=0)
    assert jax_optim.TRACES["train_step"] == before + 1
    # New batches of the same shape, later steps (a new learning rate), another lr: no new trace.
    for seed, adam in ((1, AdamConfig()), (2, AdamConfig()), (3, AdamConfig(lr=5e-4))):
        p, s, m = _step(backend, p, s, config, 4, seed=seed, adam=adam)
    assert jax_optim.TRACES["train_step"] == before + 1
    assert s["step"] == 4 and m.lr == AdamConfig(lr=5e-4).learning_rate(3)
    p, s, _ = _step(backend, p, s, config, 3, seed=4)  # a new batch shape compiles once more
    assert jax_optim.TRACES["train_step"] == before + 2


def test_clear_compiled_drops_the_compiled_train_step(backend):
    # The conformance suite releases a compiling backend's programs when memory maps run short.
    config = SMALL.replace(class_dim=5)  # a config no other test compiles
    p = backend.params_from_numpy(init_params(config, 0), config)
    s = backend.adam_init(p)
    before = jax_optim.TRACES["train_step"]
    p, s, _ = _step(backend, p, s, config, 2, seed=0)
    p, s, _ = _step(backend, p, s, config, 2, seed=1)
    assert jax_optim.TRACES["train_step"] == before + 1
    backend.clear_compiled()
    p, s, _ = _step(backend, p, s, config, 2, seed=2)  # the same shape compiles again
    assert jax_optim.TRACES["train_step"] == before + 2


def test_train_step_donates_params_and_moments_and_matches_reference(backend):
    params = init_params(SMALL, 1)
    p = backend.params_from_numpy(params, SMALL)
    s = backend.adam_init(p)
    p2, s2, m = _step(backend, p, s, SMALL, 4)
    assert all(a.is_deleted() for a in p.values()), "train_step must donate the params passed in"
    assert all(a.is_deleted() for part in ("m", "v") for a in s[part].values())
    assert list(p2) == list(params) and s2["step"] == 1 and s["step"] == 0
    x, y = _data(SMALL, 4, "float32")
    rp, rs, rm = ref_optim.train_step(params, ref_optim.adam_init(params), x, y, SMALL)
    got = backend.params_to_numpy(p2)
    for k in params:
        np.testing.assert_allclose(got[k], rp[k], rtol=0, atol=1e-6 * max(1.0, np.abs(rp[k]).max()))
    assert abs(float(m.total) - rm.total) <= 1e-5 * rm.total and int(m.correct) == rm.correct


def test_other_functions_leave_their_inputs_alone(backend):
    params = init_params(SMALL, 2)
    p = backend.params_from_numpy(params, SMALL)
    x, y = _data(SMALL, 4, "float32")
    _, grads = backend.value_and_grad(p, backend.asarray(x), backend.asarray(y), SMALL)
    s = backend.adam_init(p)
    backend.adam_update(p, grads, s, AdamConfig())
    assert not any(a.is_deleted() for a in [*p.values(), *grads.values(), *s["m"].values(), *s["v"].values()])
    assert s["step"] == 0
    for k, a in backend.params_to_numpy(p).items():
        np.testing.assert_array_equal(a, params[k])


def test_float64_without_global_config_and_float32_by_default(backend):
    assert not jax.config.jax_enable_x64, "this test needs JAX's default (x64 off) configuration"
    p64 = init_params(SMALL, 3, "float64")
    p = backend.params_from_numpy(p64, SMALL)
    x, y = _data(SMALL, 4, "float64")
    p, s, m = backend.train_step(p, backend.adam_init(p), backend.asarray(x), backend.asarray(y), SMALL, AdamConfig())
    rp, _, rm = ref_optim.train_step(p64, ref_optim.adam_init(p64), x, y, SMALL)
    got = backend.params_to_numpy(p)
    for k in p64:
        assert got[k].dtype == np.float64
        np.testing.assert_allclose(got[k], rp[k], rtol=0, atol=1e-13)
    assert abs(float(backend.to_numpy(m.total)) - rm.total) <= 1e-13
    assert backend.to_numpy(backend.asarray(np.arange(3))).dtype == np.int64
    assert not jax.config.jax_enable_x64, "the backend changed JAX's global configuration"
    # float32 stays float32 everywhere, through a step and the forward pass.
    x32, y32 = _data(SMALL, 4, "float32")  # shapes the other tests compile: no new compile
    p = backend.params_from_numpy(init_params(SMALL, 3), SMALL)
    p, s, m = backend.train_step(p, backend.adam_init(p), backend.asarray(x32), backend.asarray(y32), SMALL)
    out = backend.forward(p, backend.asarray(x32), SMALL)
    assert {a.dtype.name for a in [*p.values(), *s["m"].values(), out.v, out.reconstruction, m.total]} == {"float32"}


def test_numpy_checkpoint_evaluates_the_same_on_jax_and_back(backend, tmp_path):
    numpy_b = get_backend("numpy")
    rng = np.random.default_rng(5)
    # A learnable toy task: the class is the brightest quadrant of the image.
    x = rng.uniform(0, 0.3, size=(96, *SMALL.input_shape)).astype(np.float32)
    y = rng.integers(0, 4, size=96)
    for i, c in enumerate(y):
        x[i, 0, (c // 2) * 6:(c // 2) * 6 + 6, (c % 2) * 6:(c % 2) * 6 + 6] += 0.7
    params, state = init_params(SMALL, 0), None
    state = ref_optim.adam_init(params)
    adam = AdamConfig(lr=3e-3)
    for k in range(0, 64, 16):
        params, state, _ = ref_optim.train_step(params, state, x[k:k + 16], y[k:k + 16], SMALL, adam)
    path = save_checkpoint(tmp_path / "numpy.safetensors", params, SMALL, state=state, adam=adam, backend="numpy")
    ck = load_checkpoint(path, config=SMALL)
    test_x, test_y = x[64:], y[64:]
    on_numpy = evaluate(numpy_b, numpy_b.params_from_numpy(ck.params, SMALL), test_x, test_y, SMALL, batch_size=16)
    pj = backend.params_from_numpy(ck.params, SMALL)
    on_jax = evaluate(backend, pj, test_x, test_y, SMALL, batch_size=16)
    assert on_jax.accuracy == on_numpy.accuracy and (on_jax.confusion == on_numpy.confusion).all()
    assert on_numpy.accuracy > 0.25  # the numpy steps learned something, so the comparison means something
    # And back: a step on jax from the checkpoint's state, saved, evaluates the same on numpy.
    sj = backend.state_from_numpy(ck.state, pj)
    pj, sj, _ = backend.train_step(pj, sj, backend.asarray(x[:4]), backend.asarray(y[:4]), SMALL, adam)
    path2 = save_checkpoint(tmp_path / "jax.safetensors", backend.params_to_numpy(pj), SMALL,
                            state=backend.state_to_numpy(sj), adam=adam, backend="jax")
    ck2 = load_checkpoint(path2, config=SMALL)
    assert ck2.step == ck.step + 1
    back = evaluate(numpy_b, numpy_b.params_from_numpy(ck2.params, SMALL), test_x, test_y, SMALL, batch_size=16)
    again = evaluate(backend, backend.params_from_numpy(ck2.params, SMALL), test_x, test_y, SMALL, batch_size=16)
    assert back.accuracy == again.accuracy and (back.confusion == again.confusion).all()
    ref = ref_model.predict(ck2.params, test_x, SMALL)
    assert back.accuracy == float(np.mean(ref == test_y))
