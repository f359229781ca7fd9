"""Every op of capsspec.spec.OPS, forward and VJP (random cotangents), against the reference.

What is drawn for each op, and how it is compared, is that op's record (records.py)."""

import pytest
from hypothesis import given, strategies as st

from capsspec.conformance import checks
from capsspec.conformance.profiles import budget
from capsspec.conformance.records import RECORDS


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.uses(n)) for n in RECORDS])
@budget("ops")
@given(data=st.data())
def test_op_forward(backend, dtype, name, data):
    checks.op_forward(backend, name, data.draw(RECORDS[name].recipes(dtype), label="recipe"), dtype)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.uses(n + "_vjp")) for n in RECORDS])
@budget("ops")
@given(data=st.data())
def test_op_vjp(backend, dtype, name, data):
    checks.op_vjp(backend, name, data.draw(RECORDS[name].recipes(dtype), label="recipe"), dtype)
