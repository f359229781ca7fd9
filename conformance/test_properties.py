"""Properties of the paper's model, checked on the backend's own results (no reference involved)."""

import pytest
from hypothesis import given, strategies as st

from capsspec.conformance import checks
from capsspec.conformance import strategies as cs
from capsspec.conformance.records import RECORDS
from capsspec.conformance.profiles import budget


@pytest.mark.uses("routing")
@budget("properties")
@given(data=st.data())
def test_coupling_sums_to_one_over_parents(backend, dtype, data):
    checks.coupling_sums_to_one(backend, data.draw(RECORDS["routing"].recipes(dtype), label="recipe"), dtype)


@pytest.mark.uses("predictions", "routing")
@budget("properties")
@given(data=st.data(), iterations=st.integers(1, 5))
def test_child_permutation_leaves_v_unchanged(backend, dtype, data, iterations):
    recipe = data.draw(RECORDS["predictions"].recipes(dtype), label="recipe")
    recipe["scale"] = min(recipe["scale"], 0)  # routing's well-conditioned range (strategies.py)
    recipe["iterations"] = iterations
    checks.child_permutation(backend, recipe, dtype)


@pytest.mark.uses("squash")
@budget("properties")
@given(data=st.data())
def test_squash_keeps_direction_and_norm_below_one(backend, dtype, data):
    recipe = data.draw(RECORDS["squash"].recipes(dtype), label="recipe")
    checks.squash_direction_and_norm(backend, recipe, dtype)


@pytest.mark.uses("squash", "squash_vjp", "capsule_lengths", "capsule_lengths_vjp", "routing", "routing_vjp")
@budget("properties")
@given(data=st.data())
def test_zero_capsule_vectors_give_finite_values_and_zero_gradients(backend, dtype, data):
    recipe = data.draw(RECORDS["squash"].recipes(dtype), label="recipe")
    checks.zero_vectors(backend, recipe, dtype)


@pytest.mark.uses("margin_loss", "margin_loss_vjp")
@budget("properties")
@given(data=st.data())
def test_margin_loss_is_zero_when_margins_are_met(backend, dtype, data):
    recipe = data.draw(RECORDS["margin_loss"].recipes(dtype), label="recipe")
    checks.margin_loss_satisfied(backend, recipe, dtype)


@pytest.mark.uses("forward", "predict")
@budget("properties")
@given(recipe=cs.model_recipes(with_labels=False, min_batch=2))
def test_examples_do_not_depend_on_the_rest_of_the_batch(backend, dtype, recipe):
    checks.batch_independence(backend, recipe, dtype)
