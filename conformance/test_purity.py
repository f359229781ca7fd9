"""Purity: no spec function changes its inputs (arrays, parameters, optimizer state), nor the NumPy
values the caller converted (a backend may share memory with them). The reference's optimizer says
it: "Updates are functional: new arrays, inputs untouched." """

import pytest
from hypothesis import given, strategies as st

from capsspec.conformance import checks
from capsspec.conformance import strategies as cs
from capsspec.conformance.profiles import budget
from capsspec.conformance.records import RECORDS
from capsspec.spec import SPEC_NAMES


def _recipes(name, dtype):
    op = name[:-4] if name.endswith("_vjp") else name
    if op in RECORDS:
        return RECORDS[op].recipes(dtype)
    # The model functions on one small config: purity does not depend on the sizes, and a compiling
    # backend then traces each function once per dtype.
    if name == "adam_update":
        return cs.adam_recipes().map(lambda r: dict(r, config=cs.SMALL_CONFIG))
    return cs.small_model_recipes()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.uses(n)) for n in SPEC_NAMES])
@budget("purity")
@given(data=st.data())
def test_purity(backend, dtype, name, data):
    checks.purity(backend, name, data.draw(_recipes(name, dtype), label="recipe"), dtype)
