"""Every op of capsspec.spec.OPS, forward and VJP (random cotangents), against the reference."""

import pytest
from hypothesis import given, strategies as st

from capsspec.conformance import checks
from capsspec.conformance import strategies as cs
from capsspec.conformance.profiles import budget
from capsspec.spec import OP_NAMES


@pytest.mark.parametrize("name", OP_NAMES)
@budget("ops")
@given(data=st.data())
def test_op_forward(backend, dtype, name, data):
    checks.op_forward(backend, name, data.draw(cs.op_recipes(name, dtype), label="recipe"), dtype)


@pytest.mark.parametrize("name", OP_NAMES)
@budget("ops")
@given(data=st.data())
def test_op_vjp(backend, dtype, name, data):
    checks.op_vjp(backend, name, data.draw(cs.op_recipes(name, dtype), label="recipe"), dtype)
