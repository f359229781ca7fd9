"""The full model: forward (v, lengths, coupling, reconstruction), loss parts, gradients, predict.

Besides the drawn recipes (one or two digits per image), forward, loss and value_and_grad always
check one two-digit batch (MultiMNIST's loss: (B, 2) labels and a target image per digit)."""

import pytest
from hypothesis import example, given

from capsspec.conformance import checks
from capsspec.conformance import strategies as cs
from capsspec.conformance.profiles import budget


@pytest.mark.uses("forward")
@budget("model")
@given(recipe=cs.model_recipes(with_labels=None))
@example(recipe=cs.TWO_DIGIT_MODEL_RECIPE)
def test_forward(backend, dtype, recipe):
    checks.model_forward(backend, recipe, dtype)


@pytest.mark.uses("loss")
@budget("model")
@given(recipe=cs.model_recipes())
@example(recipe=cs.TWO_DIGIT_MODEL_RECIPE)
def test_loss(backend, dtype, recipe):
    checks.model_loss(backend, recipe, dtype)


@pytest.mark.uses("value_and_grad")
@budget("model")
@given(recipe=cs.model_recipes())
@example(recipe=cs.TWO_DIGIT_MODEL_RECIPE)
def test_value_and_grad(backend, dtype, recipe):
    checks.model_value_and_grad(backend, recipe, dtype)


@pytest.mark.uses("predict")
@budget("model")
@given(recipe=cs.model_recipes(with_labels=False))
def test_predict(backend, dtype, recipe):
    checks.model_predict(backend, recipe, dtype)
