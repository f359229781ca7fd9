"""Focused tests of the PyTorch backend (backends/torch) against the reference.

The conformance suite holds every backend to the reference op by op; these tests cover what is
particular to this backend: the nn.Module's names are the canonical ones, conversions are
exact, autograd meets the spec's numerics at zero and at huge norms, SpecAdam is the spec's
Adam and not torch.optim.Adam's, train_step keeps its metrics on the device, and the CPU path
never touches the compiled fast path. A small config keeps the whole file to a few seconds.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from capsspec import AdamConfig, get_backend  # noqa: E402
from capsspec import model as ref_model  # noqa: E402
from capsspec import ops as ref_ops  # noqa: E402
from capsspec import optim as ref_optim  # noqa: E402
from capsspec.spec import OPS, StepMetrics  # noqa: E402
from capsspec.backends.torch import TorchBackend  # noqa: E402
from capsspec.backends.torch import model as tm  # noqa: E402
from capsspec.backends.torch import ops as tops  # noqa: E402
from batches import SMALL, random_batch  # noqa: E402



@pytest.fixture(scope="module")
def backend():
    return get_backend("torch")


_data = random_batch


def _close(got, want, rtol, atol=0.0):
    got = np.asarray(got)
    assert got.shape == np.shape(want) and got.dtype == np.asarray(want).dtype
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------ structure
def test_backend_attributes_and_options():
    b = TorchBackend()
    assert (b.name, b.framework, b.speed_rank, b.device) == ("torch", "torch", 20, "cpu")
    assert b.missing_names() == []
    assert b.availability().available
    with pytest.raises(ValueError, match="CUDA only"):
        TorchBackend(fast=True)
    with pytest.raises(ValueError, match="device"):
        TorchBackend(device="tpu")


def test_op_signatures_match_the_reference():
    for op in OPS:
        for name in (op.name, op.vjp_name):
            want = [(p.name, p.default, p.kind) for p in inspect.signature(getattr(ref_ops, name)).parameters.values()]
            got = [(p.name, p.default, p.kind) for p in inspect.signature(getattr(tops, name)).parameters.values()]
            assert got == want, name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_params_round_trip_is_exact_and_names_are_canonical(backend, dtype):
    params = ref_model.init_params(SMALL, seed=3, dtype=dtype)
    net = backend.params_from_numpy(params, SMALL)
    assert isinstance(net, tm.CapsNet) and isinstance(net.decoder, torch.nn.Sequential)
    assert list(net.state_dict()) == list(SMALL.param_shapes())
    back = backend.params_to_numpy(net)
    assert list(back) == list(params)
    for k in params:
        assert back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]), k
    with pytest.raises(ValueError, match="missing"):
        backend.params_from_numpy({k: v for k, v in params.items() if k != "digit.weight"}, SMALL)
    with pytest.raises(ValueError, match="shape"):
        backend.params_from_numpy({**params, "conv1.bias": params["conv1.bias"][:-1]}, SMALL)


def test_asarray_keeps_dtype(backend):
    assert backend.asarray(np.arange(3)).dtype == torch.int64
    assert backend.asarray(np.zeros(2, np.float32)).dtype == torch.float32
    a = np.ones(3)
    t = backend.asarray(a)
    a[0] = 5  # a copy, not a view
    assert backend.to_numpy(t)[0] == 1


# ------------------------------------------------------------------------------ model vs reference
def test_model_functions_match_the_reference_in_float64(backend):
    params = ref_model.init_params(SMALL, seed=1, dtype="float64")
    net = backend.params_from_numpy(params, SMALL)
    x, y = _data(SMALL, 5, "float64")
    X, Y = backend.asarray(x), backend.asarray(y)

    for labels, labels_t in ((y, Y), (None, None)):
        want = ref_model.forward(params, x, SMALL, labels)
        got = backend.forward(net, X, SMALL, labels_t)
        for w, g in zip(want, got):
            _close(backend.to_numpy(g), w, rtol=1e-10, atol=1e-13)

    want_loss = ref_model.loss(params, x, y, SMALL)
    got_loss = backend.loss(net, X, Y, SMALL)
    for w, g in zip(want_loss, got_loss):
        assert g.dim() == 0
        _close(backend.to_numpy(g), w, rtol=1e-10)

    total_ref, grads_ref = ref_model.value_and_grad(params, x, y, SMALL)
    total, grads = backend.value_and_grad(net, X, Y, SMALL)
    _close(backend.to_numpy(total), total_ref, rtol=1e-10)
    assert list(grads) == list(grads_ref)
    for k in grads_ref:
        _close(backend.to_numpy(grads[k]), grads_ref[k], rtol=1e-9, atol=1e-12 * np.abs(grads_ref[k]).max())
    assert all(p.grad is None for p in net.parameters())  # returned, not accumulated

    pred = backend.predict(net, X, SMALL)
    assert pred.dtype == torch.int64
    np.testing.assert_array_equal(backend.to_numpy(pred), ref_model.predict(params, x, SMALL))


def test_model_rejects_bad_input(backend):
    net = backend.params_from_numpy(ref_model.init_params(SMALL, dtype="float64"), SMALL)
    x, y = _data(SMALL, 2, "float64")
    X = backend.asarray(x)
    with pytest.raises(ValueError, match="config does not match"):
        backend.forward(net, X, SMALL.replace(routing_iterations=2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        backend.loss(net, X, torch.tensor([0, 4]), SMALL)
    with pytest.raises(ValueError, match="x has dtype float32"):
        backend.predict(net, X.float(), SMALL)
    with pytest.raises(ValueError, match="x must have shape"):
        backend.predict(net, X[:, :, :5], SMALL)
    with pytest.raises(ValueError, match="params must be a CapsNet"):
        backend.predict(backend.params_to_numpy(net), X, SMALL)


# ------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squash_and_lengths_are_zero_with_zero_gradient_at_zero(dtype):
    s = torch.zeros(3, 4, 5, dtype=dtype, requires_grad=True)
    v = tops.squash(s)
    lengths = tops.capsule_lengths(s)
    assert torch.equal(v, torch.zeros_like(v)) and torch.equal(lengths, torch.zeros_like(lengths))
    (v.sum() + lengths.sum()).backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    (g,) = tops.squash_vjp(torch.ones_like(s), s.detach())
    assert torch.equal(g, torch.zeros_like(g))
    (g,) = tops.capsule_lengths_vjp(torch.ones(3, 4, dtype=dtype), s.detach())
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-20), (torch.float32, 1e18),
                                         (torch.float64, 1e-150), (torch.float64, 1e150)])
def test_squash_is_finite_and_matches_the_reference_at_extreme_norms(dtype, scale):
    rng = np.random.default_rng(0)
    s_np = (rng.standard_normal((6, 8)) * scale).astype(str(dtype).replace("torch.", ""))
    g_np = rng.standard_normal((6, 8)).astype(s_np.dtype)
    v = tops.squash(torch.from_numpy(s_np))
    (g,) = tops.squash_vjp(torch.from_numpy(g_np), torch.from_numpy(s_np))
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    _close(v.numpy(), ref_ops.squash(s_np), rtol=rtol, atol=0)
    _close(g.numpy(), ref_ops.squash_vjp(g_np, s_np)[0], rtol=rtol, atol=rtol * np.abs(g_np).max() / scale)


def test_routing_softmax_is_over_parents_and_per_example():
    rng = np.random.default_rng(1)
    u_hat = rng.standard_normal((3, 7, 4, 5))
    u_hat[1] *= 10  # examples must not share logits
    v, c = tops.routing(torch.from_numpy(u_hat), 3)
    np.testing.assert_allclose(c.sum(dim=2).numpy(), 1.0, rtol=1e-12)
    want_v, want_c = ref_ops.routing(u_hat, 3)
    _close(v.numpy(), want_v, rtol=1e-10, atol=1e-14)
    _close(np.ascontiguousarray(c.numpy()), want_c, rtol=1e-10, atol=1e-14)
    g_v, g_c = rng.standard_normal(want_v.shape), rng.standard_normal(want_c.shape)
    (got,) = tops.routing_vjp((torch.from_numpy(g_v), torch.from_numpy(g_c)), torch.from_numpy(u_hat), 3)
    _close(got.numpy(), ref_ops.routing_vjp((g_v, g_c), u_hat, 3)[0], rtol=1e-9, atol=1e-13)


# ------------------------------------------------------------------------------ optimizer
def test_adam_matches_the_reference_over_three_steps(backend):
    params = ref_model.init_params(SMALL, seed=2, dtype="float64")
    net = backend.params_from_numpy(params, SMALL)
    state, ref_state = backend.adam_init(net), ref_optim.adam_init(params)
    adam = AdamConfig(lr=3e-3, decay_steps=2)  # the schedule moves within three steps
    x, y = _data(SMALL, 4, "float64")
    for _ in range(3):
        _, grads = ref_model.value_and_grad(params, x, y, SMALL)
        params, ref_state = ref_optim.adam_update(params, grads, ref_state, adam)
        net, state = backend.adam_update(net, {k: backend.asarray(g) for k, g in grads.items()}, state, adam)
    got = backend.params_to_numpy(net)
    for k in params:
        _close(got[k], params[k], rtol=1e-12, atol=1e-15)
    saved = backend.state_to_numpy(state)
    assert saved["step"] == 3 == state["step"]
    for part in ("m", "v"):
        for k in params:
            _close(saved[part][k], ref_state[part][k], rtol=1e-12, atol=1e-18)
    restored = backend.state_from_numpy(saved, net)
    again = backend.state_to_numpy(restored)
    assert again["step"] == 3
    assert all(np.array_equal(again["m"][k], saved["m"][k]) for k in params)


def test_train_step_with_batch_one_keeps_metrics_on_the_device(backend):
    params = ref_model.init_params(SMALL, seed=4, dtype="float64")
    net = backend.params_from_numpy(params, SMALL)
    state, ref_state = backend.adam_init(net), ref_optim.adam_init(params)
    x, y = _data(SMALL, 1, "float64")
    X, Y = backend.asarray(x), backend.asarray(y)
    for _ in range(2):
        net, state, m = backend.train_step(net, state, X, Y, SMALL)
        params, ref_state, rm = ref_optim.train_step(params, ref_state, x, y, SMALL)
        assert isinstance(m, StepMetrics) and isinstance(m.lr, float) and m.lr == rm.lr
        for name in ("total", "margin", "reconstruction", "correct"):
            value = getattr(m, name)
            assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, name
            np.testing.assert_allclose(float(value), getattr(rm, name), rtol=1e-10)
    got = backend.params_to_numpy(net)
    for k in params:
        _close(got[k], params[k], rtol=1e-10, atol=1e-14)


def test_registration_imports_no_torch_and_the_cpu_path_not_the_fast_path():
    # (Constructing any torch.optim.Optimizer imports parts of torch._inductor: torch's doing, not checked.)
    code = (
        "import sys, numpy as np, capsspec;"
        "from capsspec.backends.torch import TorchBackend;"
        "b = capsspec.get_backend('torch', check=False);"
        "assert 'torch' not in sys.modules, 'torch imported by construction';"
        "from capsspec import model as M;"
        "c = capsspec.CapsNetConfig(input_height=12, input_width=12, conv1_channels=4, conv1_kernel=3, "
        "primary_types=2, primary_dim=4, primary_kernel=3, class_dim=4, num_classes=3, decoder_widths=(8,));"
        "net = b.params_from_numpy(M.init_params(c), c); s = b.adam_init(net);"
        "x = b.asarray(np.zeros((2, 1, 12, 12), 'float32')); y = b.asarray(np.array([0, 2]));"
        "b.train_step(net, s, x, y, c);"
        "sys.exit(1 if 'capsspec.backends.torch.fast' in sys.modules else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_value_checks_are_deferred_to_the_next_read_never_dropped():
    backend = TorchBackend(device="cuda")
    net = backend.params_from_numpy(ref_model.init_params(SMALL, seed=5, dtype="float32"), SMALL)
    x, _ = _data(SMALL, 2, "float32")
    x[1, 0, 2, 2] = np.inf
    pred = backend.predict(net, backend.asarray(x), SMALL)  # queued as a device flag: no stall here
    with pytest.raises(ValueError, match="x passed to predict must contain only finite values"):
        backend.to_numpy(pred)
    backend.to_numpy(pred)  # settled: reported once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("fast", [False, True])
def test_cuda_train_step_matches_the_cpu(fast):
    cpu, gpu = TorchBackend(), TorchBackend(device="cuda", fast=fast)
    params = ref_model.init_params(SMALL, seed=5, dtype="float64")
    x, y = _data(SMALL, 8, "float64")
    results = []
    for b in (cpu, gpu):
        net = b.params_from_numpy(params, SMALL)
        state = b.adam_init(net)
        for _ in range(2):
            net, state, m = b.train_step(net, state, b.asarray(x), b.asarray(y), SMALL)
        b.synchronize()
        results.append((b.params_to_numpy(net), float(b.to_numpy(m.total))))
    (p_cpu, t_cpu), (p_gpu, t_gpu) = results
    np.testing.assert_allclose(t_gpu, t_cpu, rtol=1e-9)
    for k in p_cpu:
        _close(p_gpu[k], p_cpu[k], rtol=1e-8, atol=1e-12)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
