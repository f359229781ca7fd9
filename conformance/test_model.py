"""The full model: forward (v, lengths, coupling, reconstruction), loss parts, gradients, predict."""

import pytest
from hypothesis import given

from capsspec.conformance import checks
from capsspec.conformance import strategies as cs
from capsspec.conformance.profiles import budget


@pytest.mark.uses("forward")
@budget("model")
@given(recipe=cs.model_recipes(with_labels=None))
def test_forward(backend, dtype, recipe):
    checks.model_forward(backend, recipe, dtype)


@pytest.mark.uses("loss")
@budget("model")
@given(recipe=cs.model_recipes())
def test_loss(backend, dtype, recipe):
    checks.model_loss(backend, recipe, dtype)


@pytest.mark.uses("value_and_grad")
@budget("model")
@given(recipe=cs.model_recipes())
def test_value_and_grad(backend, dtype, recipe):
    checks.model_value_and_grad(backend, recipe, dtype)


@pytest.mark.uses("predict")
@budget("model")
@given(recipe=cs.model_recipes(with_labels=False))
def test_predict(backend, dtype, recipe):
    checks.model_predict(backend, recipe, dtype)
