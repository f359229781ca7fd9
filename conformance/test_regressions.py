"""Every regression example of regressions.py, on the backend under test, in every profile."""

import pytest

from capsspec.conformance import checks
from capsspec.conformance.regressions import REGRESSIONS


@pytest.mark.parametrize("reg", [pytest.param(r, id=r.id, marks=pytest.mark.uses(*r.uses)) for r in REGRESSIONS])
def test_regression_example(backend, reg):
    if reg.dtype not in backend.backend.dtypes:
        pytest.skip(f"backend {backend.spec!r} does not support {reg.dtype}")
    getattr(checks, reg.check)(backend, *reg.args, reg.dtype)
