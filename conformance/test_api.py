"""The backend's API surface: every spec name, with the reference's signature; conversions."""

import inspect

import numpy as np
import pytest

import capsspec
from capsspec import model, ops, optim
from capsspec.spec import SPEC_NAMES


def _reference(name):
    for module in (ops, model, optim):
        if hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"the reference has no {name!r}")


def _describe(sig):
    return [(p.name, p.kind.name, "<none>" if p.default is inspect.Parameter.empty else p.default)
            for p in sig.parameters.values()]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.uses(n)) for n in SPEC_NAMES])
def test_implements_spec_name_with_reference_signature(backend, name):
    b = backend.backend
    try:
        fn = getattr(b, name)
    except AttributeError as exc:
        pytest.fail(f"backend {backend.spec!r} does not implement the spec's {name!r}: {exc}", pytrace=False)
    assert callable(fn), f"{name} is not callable"
    got, want = _describe(inspect.signature(fn)), _describe(inspect.signature(_reference(name)))
    assert got == want, (f"{name}: signature (name, kind, default) {got} differs from the reference's {want}")


def test_backend_declares_itself(backend):
    b = backend.backend
    assert isinstance(b, capsspec.Backend)
    assert isinstance(b.name, str) and b.name, "backend.name must be a non-empty string"
    assert b.dtypes and set(b.dtypes) <= {"float32", "float64"}, f"backend.dtypes {b.dtypes!r}"
    assert b.missing_names() == [], f"missing spec names: {b.missing_names()}"
    assert b.availability().available


@pytest.mark.parametrize("kind", ["float32", "float64", "int64"])
def test_asarray_to_numpy_round_trip_is_exact(backend, kind):
    b = backend.backend
    if kind != "int64" and kind not in b.dtypes:
        pytest.skip(f"backend {backend.spec!r} does not support {kind}")
    rng = np.random.default_rng(0)
    for shape in [(), (1,), (3, 4), (2, 1, 5, 3)]:
        a = (rng.integers(-5, 5, size=shape) if kind == "int64" else rng.standard_normal(shape)).astype(kind)
        back = b.to_numpy(b.asarray(a))
        assert isinstance(back, np.ndarray), f"to_numpy returned {type(back).__name__}"
        assert back.shape == a.shape and back.dtype == a.dtype, (
            f"{a.dtype}{a.shape} came back as {back.dtype}{back.shape}")
        np.testing.assert_array_equal(back, a)
