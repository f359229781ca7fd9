"""Tests of the CuPy backend (backends/cupy), with and without a GPU.

(a) Without a GPU: the backend module imports without importing cupy (in a subprocess), and
    the registry reports it unavailable with a reason that says why.
(b) The backend's own code on the CPU: every op, VJP, model function and Adam run with NumPy
    arrays and are compared with the reference (capsspec.ops / model / optim) in float64 and
    float32, zeros and one-example batches included, plus signatures and input validation.
    Each comparison runs twice: with the kernels' array fallbacks, and along the GPU code
    path, where each kernel launch (its argument list and scalar types included) is executed
    by the kernel's CUDA C compiled as host C++ (needs a C++ compiler).
(c) The CUDA kernels one by one against their fallbacks on the host, and compiled for the GPU
    by NVRTC when its library can be loaded.
(d) On a GPU (skipped with reason "no CUDA device" otherwise): the parametrised tests of (b)
    run again on cupy arrays in float64 and float32, each kernel against its fallback on the
    same data, and the backend end to end through get_backend.
"""

from __future__ import annotations

import ctypes
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import capsspec
from capsspec import AdamConfig, BackendUnavailable, CapsNetConfig, get_backend
from capsspec import model as ref_model
from capsspec import ops as ref_ops
from capsspec import optim as ref_optim
from capsspec.spec import MODEL_FUNCTIONS, OPS, OPTIMIZER_FUNCTIONS
from capsspec.validation import guard
from capsspec.backends.cupy import CupyBackend, kernels
from capsspec.backends.cupy import model as cp_model
from capsspec.backends.cupy import ops as cp_ops
from capsspec.backends.cupy import optim as cp_optim


def _cuda_available() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


HAS_GPU = _cuda_available()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")

# ============================================================================== kernels on the host
# The kernels' CUDA C compiled as C++ for the CPU: every block and thread index is 0 and every
# dimension 1, so the grid-stride loops run every item in order on one thread. This checks each
# thread's arithmetic and indexing; with one writer per output element (see kernels.py) no
# inter-thread behaviour remains to check.
_HOST_PRELUDE = r"""
#include <cmath>
using std::sqrt;
using std::exp;
struct EmulatedDim3 { unsigned int x, y, z; };
static const EmulatedDim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
#define __global__
"""


def _ctype(decl: str, dtype: str):
    t = decl.rsplit(" ", 1)[0].replace("__restrict__", "").replace("const", "").strip()
    if t.endswith("*"):
        return ctypes.c_void_p
    return {"long long": ctypes.c_longlong, "int": ctypes.c_int, "double": ctypes.c_double,
            "T": ctypes.c_float if dtype == "float32" else ctypes.c_double}[t]


def _scalar_type(decl: str, dtype: str):
    t = decl.rsplit(" ", 1)[0].strip()
    return {"long long": np.int64, "int": np.int32, "double": np.float64, "T": np.dtype(dtype).type}[t]


class HostKernels:
    """The kernels of one dtype as a shared library; call(name, **args) by parameter name."""

    def __init__(self, path: Path, dtype: str) -> None:
        self.lib, self.dtype = ctypes.CDLL(str(path)), dtype

    def call(self, name: str, **args) -> None:
        decls = kernels.KERNELS[name].params
        self.launch(name, [args[d.rsplit(" ", 1)[1].lstrip("*")] for d in decls], strict=False)

    def launch(self, name: str, args, strict: bool = True) -> None:
        """Runs kernel `name` on positional args; strict: scalars must have the exact NumPy type
        the C parameter needs (what a cupy.RawKernel launch relies on)."""
        decls = kernels.KERNELS[name].params
        assert len(args) == len(decls), (name, len(args), len(decls))
        fn = getattr(self.lib, name)
        fn.restype = None
        fn.argtypes = [_ctype(d, self.dtype) for d in decls]
        values = []
        for d, a in zip(decls, args):
            if _ctype(d, self.dtype) is ctypes.c_void_p:
                assert isinstance(a, np.ndarray) and a.dtype == np.dtype(self.dtype) and a.flags.c_contiguous, (name, d)
                values.append(a.ctypes.data)
            else:
                assert not strict or type(a) is _scalar_type(d, self.dtype), (name, d, type(a))
                values.append(a)
        fn(*values)


class HostLaunch:
    """Stands in for the compiled cupy.RawKernel: kernel((grid,), (block,), args)."""

    def __init__(self, host: HostKernels, name: str) -> None:
        self.host, self.name = host, name

    def __call__(self, grid, block, args) -> None:
        assert len(grid) == 1 and len(block) == 1 and grid[0] >= 1 and block[0] >= 1
        self.host.launch(self.name, args)


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to run the kernels' CUDA C on the host")
    out = {}
    for dtype in ("float32", "float64"):
        d = tmp_path_factory.mktemp(f"kernels_{dtype}")
        src = d / "kernels.cpp"
        # Every kernel source repeats the same typedef and macro, which C++ allows.
        src.write_text(_HOST_PRELUDE + "\n".join(kernels.kernel_source(n, dtype) for n in kernels.KERNELS))
        lib = d / "kernels.so"
        subprocess.run([cxx, "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-Wall", "-Werror", "-o", str(lib),
                        str(src)], check=True)
        out[dtype] = HostKernels(lib, dtype)
    return out


# (array module, dtype) pairs every comparison runs under; the reference runs in the same dtype
# on the same inputs. "host-kernels" runs the backend's GPU code path (the kernel launches, not
# the fallbacks) on NumPy arrays, with each launch executed by the host build of its CUDA C.
CASES = [
    pytest.param(("numpy", "float64"), id="numpy-float64"),
    pytest.param(("numpy", "float32"), id="numpy-float32"),
    pytest.param(("host-kernels", "float64"), id="hostkernels-float64"),
    pytest.param(("host-kernels", "float32"), id="hostkernels-float32"),
    pytest.param(("cupy", "float64"), marks=requires_gpu, id="cupy-float64"),
    pytest.param(("cupy", "float32"), marks=requires_gpu, id="cupy-float32"),
]

# Relative to the largest magnitude of the reference's result. The backend does the reference's
# arithmetic in the reference's order except for summation order inside BLAS and the kernels'
# fused multiply-adds, so only rounding differs: in float32 it accumulates over a few hundred
# terms and through up to three routing iterations.
TOL = {"float64": 1e-10, "float32": 2e-4}


class Arrays:
    """Moves test data to the module under test and back."""

    def __init__(self, module: str, dtype: str) -> None:
        self.module, self.dtype = module, dtype
        if module == "cupy":
            import cupy

            self.xp = cupy
        else:
            self.xp = np

    def __call__(self, a):
        """A float array on the module under test, in its dtype."""
        return self.xp.asarray(np.asarray(a, dtype=self.dtype))

    def ints(self, a):
        return self.xp.asarray(np.asarray(a, dtype=np.int64))

    def host(self, a):
        return self.xp.asnumpy(a) if self.module == "cupy" else np.asarray(a)

    def ref(self, a):
        """The same values as the input under test, as a NumPy array of the same dtype, for the reference."""
        return np.asarray(a, dtype=self.dtype)


@pytest.fixture(params=CASES)
def arr(request, monkeypatch) -> Arrays:
    module, dtype = request.param
    if module == "host-kernels":
        host = request.getfixturevalue("host_kernels")
        monkeypatch.setattr(kernels, "uses_kernels", lambda xp: True)
        monkeypatch.setattr(kernels, "_compiled", lambda name, dt: HostLaunch(host[dt], name))
        module = "numpy"
    return Arrays(module, dtype)


def assert_close(got, want, arr: Arrays, what: str = "", atol: float = 0.0) -> None:
    """Type, shape and dtype first, then values within the dtype's tolerance (plus `atol`)."""
    if isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), (what, type(got))
        for k, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, arr, f"{what}[{k}]", atol)
        return
    # On NumPy, reductions give NumPy scalars (as in the reference); on CuPy, 0-d device arrays.
    assert isinstance(got, (np.ndarray, np.generic) if arr.xp is np else arr.xp.ndarray), (what, type(got))
    got = arr.host(got)
    want = np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if want.dtype.kind == "f":
        assert got.dtype == np.dtype(arr.dtype), (what, got.dtype)
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        np.testing.assert_allclose(got, want, rtol=TOL[arr.dtype], atol=TOL[arr.dtype] * max(scale, 1e-30) + atol,
                                   err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


# ============================================================================== (a) no GPU
def test_import_does_not_import_cupy():
    code = ("import sys; import capsspec.backends.cupy as b; b.CupyBackend(); "
            "assert 'cupy' not in sys.modules, 'importing the cupy backend imported cupy'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backend_attributes():
    b = get_backend("cupy", check=False)
    assert type(b).__name__ == "CupyBackend"
    assert (b.name, b.framework, b.speed_rank) == ("cupy", "cupy", 15)
    assert "capsspec[cupy]" in b.install_hint
    assert b.impl_modules == ("capsspec.backends.cupy.ops", "capsspec.backends.cupy.model",
                              "capsspec.backends.cupy.optim")
    assert b.device == "cuda:0" and get_backend("cupy", check=False, device="cuda:1").device == "cuda:1"
    with pytest.raises(ValueError, match="device"):
        get_backend("cupy", check=False, device="cpu")


@pytest.mark.skipif(HAS_GPU, reason="checks the report of a machine without a CUDA device")
def test_unavailable_without_gpu_says_why():
    a = get_backend("cupy", check=False).availability()
    assert not a.available
    assert "CUDA device" in a.reason or "cupy" in a.reason, a.reason
    with pytest.raises(BackendUnavailable) as info:
        get_backend("cupy")
    assert a.reason in str(info.value)
    assert "cupy" not in capsspec.available_backends()
    assert get_backend("cupy", check=False).peak_memory_bytes() is None


def test_availability_never_raises(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_cupy)
    a = get_backend("cupy", check=False).availability()
    assert not a.available and "cupy is not importable" in a.reason and "capsspec[cupy]" in a.reason


# ============================================================================== signatures
def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", [n for op in OPS for n in (op.name, op.vjp_name)])
def test_op_signatures_match_reference(name):
    assert _params(getattr(cp_ops, name)) == _params(getattr(ref_ops, name))


@pytest.mark.parametrize("name", MODEL_FUNCTIONS + OPTIMIZER_FUNCTIONS)
def test_model_and_optimizer_signatures_match_reference(name):
    mine = getattr(cp_model, name, None) or getattr(cp_optim, name)
    ref = getattr(ref_model, name, None) or getattr(ref_optim, name)
    assert _params(mine) == _params(ref)


def test_backend_provides_every_spec_name():
    # Resolved through the impl modules directly: the Backend would first require a GPU.
    found = set()
    for module in (cp_ops, cp_model, cp_optim):
        found |= {n for n in capsspec.SPEC_NAMES if n in vars(module)}
    assert found == set(capsspec.SPEC_NAMES)


# ============================================================================== (b) ops vs reference
def _normal(rng, shape, zero_rows=0):
    a = rng.normal(size=shape)
    if zero_rows:
        a.reshape(-1, shape[-1])[:zero_rows] = 0
    return a


CONV_CASES = [  # (batch, channels, height, width, out, kernel, stride)
    (1, 1, 5, 5, 2, 3, 1),
    (3, 2, 7, 6, 4, 3, 2),
    (2, 3, 6, 6, 3, 6, 1),
    (2, 2, 9, 8, 3, 2, 3),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("zero_input", [False, True])
def test_conv2d(arr, case, zero_input):
    b, c, h, w, o, k, stride = case
    rng = np.random.default_rng(sum(case))
    x = np.zeros((b, c, h, w)) if zero_input else rng.normal(size=(b, c, h, w))
    wt, bias = rng.normal(size=(o, c, k, k)), rng.normal(size=(o,))
    want = ref_ops.conv2d(arr.ref(x), arr.ref(wt), arr.ref(bias), stride)
    assert_close(cp_ops.conv2d(arr(x), arr(wt), arr(bias), stride), want, arr, "conv2d")
    g = rng.normal(size=want.shape)
    assert_close(cp_ops.conv2d_vjp(arr(g), arr(x), arr(wt), arr(bias), stride),
                 ref_ops.conv2d_vjp(arr.ref(g), arr.ref(x), arr.ref(wt), arr.ref(bias), stride), arr, "conv2d_vjp")


SQUASH_SCALES = {"float64": [0.0, 1e-150, 1e-3, 1.0, 1e4, 1e100], "float32": [0.0, 1e-15, 1e-3, 1.0, 1e4, 1e15]}


@pytest.mark.parametrize("shape_axis", [((4, 8), -1), ((1, 1), -1), ((2, 5, 3), 1), ((3, 2, 4), 0)])
@pytest.mark.parametrize("scale_index", range(6))
def test_squash(arr, shape_axis, scale_index):
    shape, axis = shape_axis
    scale = SQUASH_SCALES[arr.dtype][scale_index]
    rng = np.random.default_rng(scale_index)
    s = rng.normal(size=shape) * scale
    if scale and s.ndim == 2 and shape[0] > 1:
        s[0] = 0  # a zero capsule among non-zero ones
    g = rng.normal(size=shape)
    want = ref_ops.squash(arr.ref(s), axis)
    got = cp_ops.squash(arr(s), axis)
    assert_close(got, want, arr, "squash")
    (gs,) = cp_ops.squash_vjp(arr(g), arr(s), axis)
    assert np.all(np.isfinite(arr.host(gs)))
    # At large norms the radial part of the VJP, f (g + q unit (unit . g)) with q -> -1, is the
    # difference of two terms ~n^2 times larger than itself: it is resolved only to
    # eps * f * |g|, whichever way the terms are rounded or fused.
    n = np.sqrt(np.sum(arr.ref(s).astype(np.float64) ** 2, axis=axis))
    cancellation = 4 * np.finfo(arr.dtype).eps * float(np.max(n / (1 + n * n))) * float(np.max(np.abs(g)))
    assert_close((gs,), ref_ops.squash_vjp(arr.ref(g), arr.ref(s), axis), arr, "squash_vjp", atol=cancellation)


def test_squash_is_exactly_zero_at_zero(arr):
    s = np.zeros((3, 8))
    assert np.all(arr.host(cp_ops.squash(arr(s))) == 0)
    assert np.all(arr.host(cp_ops.squash_vjp(arr(np.ones((3, 8))), arr(s))[0]) == 0)


@pytest.mark.parametrize("batch", [1, 2])
def test_primary_capsules(arr, batch):
    rng = np.random.default_rng(batch)
    h = np.abs(rng.normal(size=(batch, 3, 7, 7)))
    w, bias = rng.normal(size=(2 * 4, 3, 3, 3)), rng.normal(size=(8,))
    want = ref_ops.primary_capsules(arr.ref(h), arr.ref(w), arr.ref(bias), 4, 2)
    assert_close(cp_ops.primary_capsules(arr(h), arr(w), arr(bias), 4, 2), want, arr, "primary_capsules")
    g = rng.normal(size=want.shape)
    assert_close(cp_ops.primary_capsules_vjp(arr(g), arr(h), arr(w), arr(bias), 4, 2),
                 ref_ops.primary_capsules_vjp(arr.ref(g), arr.ref(h), arr.ref(w), arr.ref(bias), 4, 2), arr,
                 "primary_capsules_vjp")


def test_primary_capsules_zero_weights_give_zero_capsules(arr):
    h = np.ones((1, 2, 5, 5))
    u = cp_ops.primary_capsules(arr(h), arr(np.zeros((4, 2, 3, 3))), arr(np.zeros(4)), 2, 1)
    assert arr.host(u).shape == (1, 2 * 9, 2) and np.all(arr.host(u) == 0)


@pytest.mark.parametrize("batch", [1, 3])
def test_predictions(arr, batch):
    rng = np.random.default_rng(batch)
    u, w = rng.normal(size=(batch, 5, 4)), rng.normal(size=(5, 3, 6, 4))
    want = ref_ops.predictions(arr.ref(u), arr.ref(w))
    assert_close(cp_ops.predictions(arr(u), arr(w)), want, arr, "predictions")
    g = rng.normal(size=want.shape)
    assert_close(cp_ops.predictions_vjp(arr(g), arr(u), arr(w)),
                 ref_ops.predictions_vjp(arr.ref(g), arr.ref(u), arr.ref(w)), arr, "predictions_vjp")


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 4, 3, 2), (3, 7, 4, 5)])
@pytest.mark.parametrize("with_g_c", [False, True])
@pytest.mark.parametrize("nota", [False, True])
def test_routing(arr, iterations, shape, with_g_c, nota):
    rng = np.random.default_rng(iterations * 10 + len(shape))
    u_hat = rng.normal(size=shape)
    u_hat[0, 0] = 0  # a child that predicts nothing
    v_want, c_want = ref_ops.routing(arr.ref(u_hat), iterations, nota)
    v, c = cp_ops.routing(arr(u_hat), iterations, nota)
    assert_close(v, v_want, arr, "routing v")
    assert_close(c, c_want, arr, "routing c")
    g_v = rng.normal(size=v_want.shape)
    g_c = rng.normal(size=c_want.shape) if with_g_c else None
    ref_g = (arr.ref(g_v), None if g_c is None else arr.ref(g_c))
    got = cp_ops.routing_vjp((arr(g_v), None if g_c is None else arr(g_c)), arr(u_hat), iterations, nota)
    assert_close(got, ref_ops.routing_vjp(ref_g, arr.ref(u_hat), iterations, nota), arr, "routing_vjp")


def test_routing_of_zero_predictions(arr):
    u_hat = np.zeros((1, 6, 3, 4))
    v, c = cp_ops.routing(arr(u_hat), 3)
    assert np.all(arr.host(v) == 0)
    np.testing.assert_allclose(arr.host(c), 1 / 3)
    (g,) = cp_ops.routing_vjp((arr(np.ones((1, 3, 4))), None), arr(u_hat), 3)
    assert_close((g,), ref_ops.routing_vjp((np.ones((1, 3, 4)), None), u_hat, 3), arr, "routing_vjp at 0")


def test_routing_is_per_example(arr):
    # b is never shared across the batch: an example's output must not depend on the others.
    rng = np.random.default_rng(7)
    u_hat = rng.normal(size=(3, 5, 4, 2))
    v_all, c_all = cp_ops.routing(arr(u_hat), 3)
    v_one, c_one = cp_ops.routing(arr(u_hat[1:2]), 3)
    tol = TOL[arr.dtype]
    np.testing.assert_allclose(arr.host(v_all)[1:2], arr.host(v_one), rtol=tol, atol=tol)
    np.testing.assert_allclose(arr.host(c_all)[1:2], arr.host(c_one), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 2), (6,)])
def test_capsule_lengths(arr, shape):
    rng = np.random.default_rng(len(shape))
    v = _normal(rng, shape, zero_rows=1)
    want = ref_ops.capsule_lengths(arr.ref(v))
    assert_close(cp_ops.capsule_lengths(arr(v)), want, arr, "capsule_lengths")
    g = rng.normal(size=want.shape)
    assert_close(cp_ops.capsule_lengths_vjp(arr(g), arr(v)), ref_ops.capsule_lengths_vjp(arr.ref(g), arr.ref(v)),
                 arr, "capsule_lengths_vjp")


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("constants", [(0.9, 0.1, 0.5), (0.8, 0.3, 2.0)])
def test_margin_loss(arr, batch, constants):
    rng = np.random.default_rng(batch)
    lengths = rng.uniform(0, 1, size=(batch, 5))
    lengths[0, 0] = 0.0
    labels = rng.integers(0, 5, size=batch)
    want = ref_ops.margin_loss(arr.ref(lengths), labels, *constants)
    assert_close(cp_ops.margin_loss(arr(lengths), arr.ints(labels), *constants), want, arr, "margin_loss")
    assert_close(cp_ops.margin_loss_vjp(arr(1.7), arr(lengths), arr.ints(labels), *constants),
                 ref_ops.margin_loss_vjp(np.float64(1.7), arr.ref(lengths), labels, *constants), arr,
                 "margin_loss_vjp")


@pytest.mark.parametrize("use_labels", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_mask(arr, use_labels, batch):
    rng = np.random.default_rng(batch)
    v = rng.normal(size=(batch, 4, 3))
    v[0, 2] = v[0, 1]  # a tie for... whatever wins; and below an exact tie for the longest
    v[0, 1] = v[0, 2] = 10.0
    labels = rng.integers(0, 4, size=batch) if use_labels else None
    lab = None if labels is None else arr.ints(labels)
    want = ref_ops.mask(arr.ref(v), labels)
    got = cp_ops.mask(arr(v), lab)
    assert_close(got, want, arr, "mask")
    if not use_labels:  # the tie goes to the lowest class index
        assert np.any(arr.host(got)[0, 3:6] != 0) and np.all(arr.host(got)[0, 6:9] == 0)
    g = rng.normal(size=want.shape)
    assert_close(cp_ops.mask_vjp(arr(g), arr(v), lab), ref_ops.mask_vjp(arr.ref(g), arr.ref(v), labels), arr,
                 "mask_vjp")


@pytest.mark.parametrize("widths", [(6, 5, 7, 4), (3, 2)])
@pytest.mark.parametrize("batch", [1, 3])
def test_decoder(arr, widths, batch):
    rng = np.random.default_rng(len(widths) + batch)
    x = rng.normal(size=(batch, widths[0]))
    x[0] = 0
    ws = [rng.normal(size=(widths[k + 1], widths[k])) for k in range(len(widths) - 1)]
    bs = [rng.normal(size=(widths[k + 1],)) for k in range(len(widths) - 1)]
    want = ref_ops.decoder(arr.ref(x), [arr.ref(w) for w in ws], [arr.ref(b) for b in bs])
    assert_close(cp_ops.decoder(arr(x), [arr(w) for w in ws], [arr(b) for b in bs]), want, arr, "decoder")
    g = rng.normal(size=want.shape)
    got = cp_ops.decoder_vjp(arr(g), arr(x), [arr(w) for w in ws], [arr(b) for b in bs])
    ref = ref_ops.decoder_vjp(arr.ref(g), arr.ref(x), [arr.ref(w) for w in ws], [arr.ref(b) for b in bs])
    assert isinstance(got, tuple) and isinstance(got[1], list) and isinstance(got[2], list)
    assert_close(got, ref, arr, "decoder_vjp")


@pytest.mark.parametrize("scale", [0.0005, 0.3])
@pytest.mark.parametrize("batch", [1, 2])
def test_reconstruction_loss(arr, scale, batch):
    rng = np.random.default_rng(batch)
    recon, images = rng.uniform(size=(batch, 12)), rng.uniform(size=(batch, 1, 3, 4))
    want = ref_ops.reconstruction_loss(arr.ref(recon), arr.ref(images), scale)
    assert_close(cp_ops.reconstruction_loss(arr(recon), arr(images), scale), want, arr, "reconstruction_loss")
    assert_close(cp_ops.reconstruction_loss_vjp(arr(0.5), arr(recon), arr(images), scale),
                 ref_ops.reconstruction_loss_vjp(np.float64(0.5), arr.ref(recon), arr.ref(images), scale), arr,
                 "reconstruction_loss_vjp")


# ============================================================================== (b) model and Adam
SMALL = CapsNetConfig(input_height=10, input_width=10, conv1_channels=4, conv1_kernel=3, primary_types=2,
                      primary_dim=4, primary_kernel=3, primary_stride=2, num_classes=3, class_dim=4,
                      decoder_widths=(8, 16))
MODEL_CONFIGS = [
    pytest.param(SMALL, id="decoder-r3"),
    pytest.param(SMALL.replace(use_decoder=False, routing_iterations=1), id="nodecoder-r1"),
    pytest.param(SMALL.replace(routing_iterations=2, conv1_stride=2, primary_stride=1), id="strides-r2"),
    pytest.param(SMALL.replace(input_channels=3, none_of_the_above=True), id="rgb-none-of-the-above-r3"),
]


def _model_inputs(config, batch, seed, zero_images=False):
    rng = np.random.default_rng(seed)
    params = ref_model.init_params(config, seed=seed, dtype="float64")
    # Larger class-capsule weights than the initialisation's, so routing has something to do.
    params["digit.weight"] = params["digit.weight"] * 30
    x = np.zeros((batch, *config.input_shape)) if zero_images else rng.uniform(size=(batch, *config.input_shape))
    labels = rng.integers(0, config.num_classes, size=batch)
    return params, x, labels


@pytest.mark.parametrize("config", MODEL_CONFIGS)
@pytest.mark.parametrize("batch,zero_images", [(1, False), (3, False), (2, True)])
def test_model(arr, config, batch, zero_images):
    params, x, labels = _model_inputs(config, batch, seed=batch, zero_images=zero_images)
    p_ref = {k: arr.ref(p) for k, p in params.items()}
    p_mine = {k: arr(p) for k, p in params.items()}
    x_ref, x_mine, lab = arr.ref(x), arr(x), arr.ints(labels)

    for with_labels in (True, False):
        want = ref_model.forward(p_ref, x_ref, config, labels if with_labels else None)
        got = cp_model.forward(p_mine, x_mine, config, lab if with_labels else None)
        assert type(got) is capsspec.CapsNetOutput
        for name in ("v", "lengths", "coupling", "reconstruction"):
            if getattr(want, name) is None:
                assert getattr(got, name) is None
            else:
                assert_close(getattr(got, name), getattr(want, name), arr, f"forward.{name}")

    parts = cp_model.loss(p_mine, x_mine, lab, config)
    assert type(parts) is capsspec.LossParts
    assert_close(tuple(parts), tuple(ref_model.loss(p_ref, x_ref, labels, config)), arr, "loss")

    total, grads = cp_model.value_and_grad(p_mine, x_mine, lab, config)
    total_ref, grads_ref = ref_model.value_and_grad(p_ref, x_ref, labels, config)
    assert_close(total, total_ref, arr, "value_and_grad total")
    assert list(grads) == list(grads_ref)
    for k in grads_ref:
        assert_close(grads[k], grads_ref[k], arr, f"grad {k}")

    pred = cp_model.predict(p_mine, x_mine, config)
    assert arr.host(pred).dtype == np.int64
    lengths = ref_model.forward(p_ref, x_ref, config).lengths
    top2 = np.sort(lengths, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 1e-3  # float32 may legitimately flip a near-tie
    np.testing.assert_array_equal(arr.host(pred)[decided], ref_model.predict(p_ref, x_ref, config)[decided])


@pytest.mark.parametrize("steps", [1, 3])
def test_adam_update(arr, steps):
    rng = np.random.default_rng(steps)
    params = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
    adam = AdamConfig(lr=0.01, decay_steps=2)
    ref_p, ref_s = {k: arr.ref(p) for k, p in params.items()}, None
    my_p, my_s = {k: arr(p) for k, p in params.items()}, None
    ref_s, my_s = ref_optim.adam_init(ref_p), cp_optim.adam_init(my_p)
    assert my_s["step"] == 0 and all(np.all(arr.host(a) == 0) for a in my_s["m"].values())
    for _ in range(steps):
        grads = {k: rng.normal(size=p.shape) for k, p in params.items()}
        grads["b"][0] = 0.0  # a zero gradient on a zero moment: the step is 0, not NaN
        ref_p, ref_s = ref_optim.adam_update(ref_p, {k: arr.ref(g) for k, g in grads.items()}, ref_s, adam)
        my_p, my_s = cp_optim.adam_update(my_p, {k: arr(g) for k, g in grads.items()}, my_s, adam)
    assert my_s["step"] == ref_s["step"] == steps
    for k in params:
        assert_close(my_p[k], ref_p[k], arr, f"param {k}")
        assert_close(my_s["m"][k], ref_s["m"][k], arr, f"m {k}")
        assert_close(my_s["v"][k], ref_s["v"][k], arr, f"v {k}")


def test_adam_update_float32_matches_reference_float32_closely():
    # Both on NumPy in float32: the step is formed in float64 in both, so they agree to rounding.
    rng = np.random.default_rng(0)
    p = {"w": rng.normal(size=(50,)).astype(np.float32)}
    g = {"w": rng.normal(size=(50,)).astype(np.float32)}
    ref_p, _ = ref_optim.adam_update(p, g, ref_optim.adam_init(p))
    my_p, _ = cp_optim.adam_update(p, g, cp_optim.adam_init(p))
    assert my_p["w"].dtype == np.float32
    np.testing.assert_array_equal(my_p["w"], ref_p["w"])


def test_train_step(arr):
    config = SMALL
    params, x, labels = _model_inputs(config, batch=3, seed=11)
    adam = AdamConfig(lr=0.003)
    ref_p = {k: arr.ref(p) for k, p in params.items()}
    my_p = {k: arr(p) for k, p in params.items()}
    ref_s, my_s = ref_optim.adam_init(ref_p), cp_optim.adam_init(my_p)
    for _ in range(3):
        ref_p, ref_s, ref_m = ref_optim.train_step(ref_p, ref_s, arr.ref(x), labels, config, adam)
        my_p, my_s, my_m = cp_optim.train_step(my_p, my_s, arr(x), arr.ints(labels), config, adam)
        assert type(my_m) is capsspec.StepMetrics and isinstance(my_m.lr, float) and my_m.lr == ref_m.lr
        for name in ("total", "margin", "reconstruction"):
            assert_close(getattr(my_m, name), np.float64(getattr(ref_m, name)), arr, f"metrics.{name}")
        assert int(my_m.correct) == ref_m.correct
    assert my_s["step"] == 3
    for k in ref_p:
        assert_close(my_p[k], ref_p[k], arr, f"param {k} after 3 steps")


# ============================================================================== (b) validation
def _checked(module, name):
    """The spec name `name` of the CuPy implementation behind the door, with the CuPy backend as the
    door's adapter: on NumPy arrays, the host path, so no GPU is needed."""
    return guard(name, getattr(module, name), CupyBackend())


def test_bad_inputs_raise_value_error():
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(1, 2, 5, 5)), rng.normal(size=(3, 2, 3, 3)), rng.normal(size=(3,))
    with pytest.raises(ValueError, match="weight"):
        _checked(cp_ops, 'conv2d')(x, w[:, :1], b)
    with pytest.raises(ValueError, match="dtype"):
        _checked(cp_ops, 'conv2d')(x.astype(np.float32), w, b)
    with pytest.raises(ValueError, match="stride"):
        _checked(cp_ops, 'conv2d')(x, w, b, 0)
    with pytest.raises(ValueError, match="x must be"):
        _checked(cp_ops, 'conv2d')(x.tolist(), w, b)
    with pytest.raises(ValueError, match="finite"):
        _checked(cp_ops, 'squash')(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="axis"):
        _checked(cp_ops, 'squash')(np.ones((2, 3)), axis=2)
    with pytest.raises(ValueError, match="iterations"):
        _checked(cp_ops, 'routing')(np.ones((1, 2, 2, 2)), 0)
    with pytest.raises(ValueError, match="pair"):
        _checked(cp_ops, 'routing_vjp')(np.ones((1, 2, 2)), np.ones((1, 2, 2, 2)), 1)
    with pytest.raises(ValueError, match="labels"):
        _checked(cp_ops, 'margin_loss')(np.ones((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        _checked(cp_ops, 'mask')(np.ones((2, 3, 4)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="g must be a scalar"):
        _checked(cp_ops, 'margin_loss_vjp')(np.ones(2), np.ones((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="weights"):
        _checked(cp_ops, 'decoder')(np.ones((2, 3)), [], [])
    with pytest.raises(ValueError, match="images"):
        _checked(cp_ops, 'reconstruction_loss')(np.ones((2, 12)), np.ones((2, 1, 3, 3)))
    params, x, labels = _model_inputs(SMALL, 2, 0)
    with pytest.raises(ValueError, match="dtype"):
        _checked(cp_model, 'forward')(params, x.astype(np.float32), SMALL)
    with pytest.raises(ValueError, match="params"):
        _checked(cp_model, 'forward')({k: v for k, v in params.items() if k != "conv1.bias"}, x, SMALL)
    with pytest.raises(ValueError, match="labels"):
        _checked(cp_model, 'loss')(params, x, None, SMALL)
    state = cp_optim.adam_init(params)
    with pytest.raises(ValueError, match="grads"):
        _checked(cp_optim, 'adam_update')(params, {}, state)
    with pytest.raises(ValueError, match="step"):
        _checked(cp_optim, 'adam_update')(params, params, {**state, "step": -1})
    # An empty batch is refused here as on every backend.
    with pytest.raises(ValueError, match="empty batch"):
        _checked(cp_ops, 'routing')(np.ones((0, 2, 2, 2)), 1)


def test_inputs_are_not_changed():
    rng = np.random.default_rng(3)
    u_hat = rng.normal(size=(2, 5, 3, 4))
    g_v = rng.normal(size=(2, 3, 4))
    keep = u_hat.copy(), g_v.copy()
    cp_ops.routing_vjp((g_v, None), u_hat, 3)
    np.testing.assert_array_equal(u_hat, keep[0])
    np.testing.assert_array_equal(g_v, keep[1])


# ============================================================================== (c) kernels on the host
HOST_TOL = {"float64": 1e-13, "float32": 1e-5}
KERNEL_DTYPES = ["float32", "float64"]


def _rand(rng, shape, dtype, zero_rows=0):
    return np.ascontiguousarray(_normal(rng, shape, zero_rows).astype(dtype))


def _close(got, want, dtype):
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-30)
    np.testing.assert_allclose(got, want, rtol=HOST_TOL[dtype], atol=HOST_TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_host_squash_kernels(host_kernels, dtype):
    k = host_kernels[dtype]
    rng = np.random.default_rng(0)
    big = 1e100 if dtype == "float64" else 1e15
    s = _rand(rng, (7, 5), dtype, zero_rows=2)
    s[3] *= big
    s[4] *= 1e-3
    g = _rand(rng, (7, 5), dtype)
    out = np.full_like(s, np.nan)
    k.call("squash_forward", s=s, out=out, rows=7, dim=5)
    _close(out, kernels.squash_forward(np, s), dtype)
    assert np.all(out[:2] == 0)
    out = np.full_like(s, np.nan)
    k.call("squash_backward", s=s, g=g, out=out, rows=7, dim=5)
    _close(out, kernels.squash_backward(np, s, g), dtype)
    assert np.all(out[:2] == 0)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_host_routing_kernels(host_kernels, dtype):
    k = host_kernels[dtype]
    rng = np.random.default_rng(1)
    bsz, j, n, e = 2, 3, 5, 4
    ut = _rand(rng, (bsz, j, n, e), dtype)
    logits = _rand(rng, (bsz, j, n), dtype) * 3
    logits[0, 1] += 1000  # exp overflows unless the softmax subtracts the max over every parent
    v, gs = _rand(rng, (bsz, j, e), dtype), _rand(rng, (bsz, j, e), dtype)
    dims = dict(batch=bsz, parents=j, children=n)

    for nota in (0, 1):
        c = np.full_like(logits, np.nan)
        k.call("routing_softmax", logits=logits, c=c, none_of_the_above=nota, **dims)
        _close(c, kernels.routing_softmax(np, logits, bool(nota)), dtype)

    out = np.full_like(logits, np.nan)
    k.call("routing_agreement", logits=logits, ut=ut, v=v, out=out, dim=e, **dims)
    _close(out, kernels.routing_agreement(np, logits, ut, v), dtype)

    g_c = _rand(rng, (bsz, j, n), dtype)
    for has_g_c in (0, 1):
        for accumulate in (0, 1):
            g_logits0 = _rand(rng, (bsz, j, n), dtype)
            g_logits = g_logits0.copy()
            scratch = np.full_like(logits, np.nan)
            k.call("routing_softmax_backward", ut=ut, gs=gs, c=c, g_c=g_c, gc=scratch, g_logits=g_logits, dim=e,
                   has_g_c=has_g_c, accumulate=accumulate, **dims)
            want = kernels.routing_softmax_backward(np, ut, gs, c, g_c if has_g_c else None,
                                                    g_logits0 if accumulate else None)
            _close(g_logits, want, dtype)

    for has_g_logits in (0, 1):
        g_ut0 = _rand(rng, (bsz, j, n, e), dtype)
        g_l = _rand(rng, (bsz, j, n), dtype)
        g_ut = g_ut0.copy()
        k.call("routing_grad_ut", g_ut=g_ut, g_logits=g_l, v=v, c=c, gs=gs, dim=e, has_g_logits=has_g_logits, **dims)
        want = kernels.routing_grad_ut(np, g_ut0.copy(), g_l if has_g_logits else None, v, c, gs)
        _close(g_ut, want, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("geometry", [(2, 3, 7, 6, 3, 2, 2), (1, 2, 5, 5, 5, 5, 1), (2, 1, 9, 8, 2, 3, 3),
                                      (1, 2, 6, 6, 3, 3, 1)])
def test_host_col2im_kernel(host_kernels, dtype, geometry):
    b, c, h, w, kh, kw, stride = geometry
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    rng = np.random.default_rng(2)
    cols = _rand(rng, (b, ho, wo, c, kh, kw), dtype)
    gx = np.full((b, c, h, w), np.nan, dtype=dtype)
    host_kernels[dtype].call("col2im", cols=cols, gx=gx, batch=b, channels=c, height=h, width=w, kh=kh, kw=kw,
                             stride=stride, out_h=ho, out_w=wo)
    _close(gx, kernels.col2im(np, cols, (b, c, h, w), stride), dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_host_adam_step_kernel(host_kernels, dtype):
    rng = np.random.default_rng(3)
    p, g = _rand(rng, (40,), dtype), _rand(rng, (40,), dtype)
    g[:3] = 0
    m, v = _rand(rng, (40,), dtype) * 0.1, np.abs(_rand(rng, (40,), dtype)) * 0.01
    m[:2] = v[:2] = 0
    alpha, beta1, beta2, eps = 0.0013, 0.9, 0.999, 1e-8
    outs = [np.full_like(p, np.nan) for _ in range(3)]
    t = np.dtype(dtype).type
    host_kernels[dtype].call("adam_step", p=p, g=g, m=m, v=v, p_out=outs[0], m_out=outs[1], v_out=outs[2],
                             size=40, alpha=alpha, beta1=t(beta1), one_minus_beta1=t(1 - beta1), beta2=t(beta2),
                             one_minus_beta2=t(1 - beta2), epsilon=t(eps))
    for got, want in zip(outs, kernels.adam_step(np, p, g, m, v, alpha, beta1, beta2, eps)):
        _close(got, want, dtype)


def test_kernel_sources_compile_with_nvrtc():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:
        pytest.skip(f"NVRTC library not found ({type(exc).__name__})")
    for name in kernels.KERNELS:
        for dtype in KERNEL_DTYPES:
            prog = nvrtc.createProgram(kernels.kernel_source(name, dtype), f"{name}.cu", [], [])
            try:
                nvrtc.compileProgram(prog, ["-arch=compute_80"])
            except Exception:
                pytest.fail(f"{name} ({dtype}) does not compile:\n{nvrtc.getProgramLog(prog)}")
            assert f".entry {name}(" in nvrtc.getPTX(prog).decode()


# ============================================================================== (d) on a GPU
@requires_gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_gpu_kernels_match_fallbacks(dtype):
    import cupy

    rng = np.random.default_rng(4)
    host = dict(s=_rand(rng, (9, 16), dtype, zero_rows=2), g=_rand(rng, (9, 16), dtype),
                ut=_rand(rng, (3, 10, 37, 16), dtype), logits=_rand(rng, (3, 10, 37), dtype),
                v=_rand(rng, (3, 10, 16), dtype), gs=_rand(rng, (3, 10, 16), dtype),
                g_c=_rand(rng, (3, 10, 37), dtype), g_l=_rand(rng, (3, 10, 37), dtype),
                g_ut=_rand(rng, (3, 10, 37, 16), dtype), cols=_rand(rng, (2, 4, 4, 5, 9, 9), dtype))
    dev = {k: cupy.asarray(a) for k, a in host.items()}
    c_host = kernels.routing_softmax(np, host["logits"])
    c_dev = cupy.asarray(c_host)
    checks = [
        (kernels.squash_forward(cupy, dev["s"]), kernels.squash_forward(np, host["s"])),
        (kernels.squash_backward(cupy, dev["s"], dev["g"]), kernels.squash_backward(np, host["s"], host["g"])),
        (kernels.routing_softmax(cupy, dev["logits"]), c_host),
        (kernels.routing_softmax(cupy, dev["logits"], True), kernels.routing_softmax(np, host["logits"], True)),
        (kernels.routing_agreement(cupy, dev["logits"], dev["ut"], dev["v"]),
         kernels.routing_agreement(np, host["logits"], host["ut"], host["v"])),
        (kernels.routing_softmax_backward(cupy, dev["ut"], dev["gs"], c_dev, dev["g_c"], dev["g_l"].copy()),
         kernels.routing_softmax_backward(np, host["ut"], host["gs"], c_host, host["g_c"], host["g_l"])),
        (kernels.routing_softmax_backward(cupy, dev["ut"], dev["gs"], c_dev, None, None),
         kernels.routing_softmax_backward(np, host["ut"], host["gs"], c_host, None, None)),
        (kernels.routing_grad_ut(cupy, dev["g_ut"].copy(), dev["g_l"], dev["v"], c_dev, dev["gs"]),
         kernels.routing_grad_ut(np, host["g_ut"].copy(), host["g_l"], host["v"], c_host, host["gs"])),
        (kernels.routing_grad_ut(cupy, dev["g_ut"].copy(), None, dev["v"], c_dev, dev["gs"]),
         kernels.routing_grad_ut(np, host["g_ut"].copy(), None, host["v"], c_host, host["gs"])),
        (kernels.col2im(cupy, dev["cols"], (2, 5, 16, 16), 2), kernels.col2im(np, host["cols"], (2, 5, 16, 16), 2)),
        *zip(kernels.adam_step(cupy, dev["s"], dev["g"], dev["g"] * 0.1, dev["g"] ** 2, 1e-3, 0.9, 0.999, 1e-8),
             kernels.adam_step(np, host["s"], host["g"], host["g"] * 0.1, host["g"] ** 2, 1e-3, 0.9, 0.999, 1e-8)),
    ]
    for k, (got, want) in enumerate(checks):
        assert got.dtype == np.dtype(dtype), k
        # CUDA contracts a*b+c into FMAs and uses its own exp, so agreement is to rounding, not bitwise.
        scale = max(float(np.max(np.abs(want))), 1e-30)
        tol = 1e-12 if dtype == "float64" else 1e-5
        np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=tol, atol=tol * scale, err_msg=f"check {k}")


@requires_gpu
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_gpu_backend_end_to_end(dtype):
    import cupy

    backend = get_backend("cupy")
    a = backend.availability()
    assert a.available and a.device.startswith("cuda:0 (")
    assert backend.missing_names() == []
    config = SMALL
    params, x, labels = _model_inputs(config, batch=4, seed=5)
    arr = Arrays("cupy", dtype)
    p = backend.params_from_numpy({k: v.astype(dtype) for k, v in params.items()}, config)
    assert all(isinstance(v, cupy.ndarray) for v in p.values())
    state = backend.state_from_numpy(ref_optim.adam_init({k: v.astype(dtype) for k, v in params.items()}), p)
    ref_p = {k: arr.ref(v) for k, v in params.items()}
    ref_s = ref_optim.adam_init(ref_p)
    xb, lb = backend.asarray(x.astype(dtype)), backend.asarray(labels)
    for _ in range(2):
        p, state, metrics = backend.train_step(p, state, xb, lb, config)
        ref_p, ref_s, ref_metrics = ref_optim.train_step(ref_p, ref_s, arr.ref(x), labels, config)
        assert_close(metrics.total, np.float64(ref_metrics.total), arr, "total")
    backend.synchronize()
    back = backend.params_to_numpy(p)
    for k in ref_p:
        assert_close(cupy.asarray(back[k]), ref_p[k], arr, k)
    s = backend.state_to_numpy(state)
    assert s["step"] == 2 and isinstance(s["m"]["conv1.weight"], np.ndarray)
    pred = backend.to_numpy(backend.predict(p, xb, config))
    assert pred.dtype == np.int64 and pred.shape == (4,)
    assert backend.peak_memory_bytes() > 0


@requires_gpu
def test_gpu_paper_sized_step_runs():
    # The paper's model on a small batch: shapes, finiteness and float32 throughout.
    import cupy

    backend = get_backend("cupy")
    config = CapsNetConfig()
    params = backend.params_from_numpy(ref_model.init_params(config, seed=0), config)
    state = backend.adam_init(params)
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.uniform(size=(8, 1, 28, 28)).astype(np.float32))
    labels = backend.asarray(rng.integers(0, 10, size=8))
    params, state, metrics = backend.train_step(params, state, x, labels, config)
    assert np.isfinite(float(metrics.total)) and 0 <= int(metrics.correct) <= 8
    assert all(v.dtype == cupy.float32 and bool(cupy.isfinite(v).all()) for v in params.values())


@requires_gpu
def test_gpu_value_checks_are_deferred_to_the_next_read_never_dropped():
    # On the GPU the door queues NaN/inf and label-range checks as device flags (no stall per
    # call) and raises at the next host read through the backend.
    backend = get_backend("cupy")
    params, x, labels = _model_inputs(SMALL, batch=2, seed=6)
    p = backend.params_from_numpy(params, SMALL)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    pred = backend.predict(p, backend.asarray(bad), SMALL)
    with pytest.raises(ValueError, match="x passed to predict must contain only finite values"):
        backend.to_numpy(pred)
    backend.loss(p, backend.asarray(x), backend.asarray(np.array([0, SMALL.num_classes])), SMALL)
    with pytest.raises(ValueError, match=r"labels passed to loss must contain labels in \[0, "):
        backend.synchronize()
    backend.synchronize()  # settled: nothing is reported twice
