"""The optimizer: one adam_update from a given state, and a short train_step trajectory."""

import pytest
from hypothesis import example, given

from capsspec.conformance import checks
from capsspec.conformance import strategies as cs
from capsspec.conformance.profiles import budget


@pytest.mark.uses("adam_init", "adam_update")
@budget("optimizer")
@given(recipe=cs.adam_recipes())
def test_adam_update(backend, dtype, recipe):
    checks.adam_step(backend, recipe, dtype)


@pytest.mark.uses("adam_init", "train_step")
@budget("trajectory")
@given(recipe=cs.trajectory_recipes(steps=3))
@example(recipe=cs.TWO_DIGIT_TRAJECTORY_RECIPE)  # MultiMNIST's loss: two digits per image, with targets
def test_train_step_trajectory(backend, dtype, recipe):
    checks.trajectory(backend, recipe, dtype)
