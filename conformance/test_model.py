"""The full model: forward (v, lengths, coupling, reconstruction), loss parts, gradients, predict.

Besides the drawn recipes (one or two digits per image), forward, loss and value_and_grad always
check one two-digit batch (MultiMNIST's loss: (B, 2) labels and a target image per digit).

The four tests are one decorator stack (_model_test) with what differs between them as its
arguments. Not pytest's parametrize: each function draws its own recipes (labels given, not
given, or either) and three have an explicit example, which Hypothesis ties to one strategy per
test function; and known gaps and the tests of the tester name these tests (test_forward, ...).
"""

from typing import Any, Callable, Mapping

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from capsspec.conformance import checks
from capsspec.conformance import strategies as cs
from capsspec.conformance.profiles import budget


def _model_test(name: str, check: Callable[..., None], recipes: st.SearchStrategy[dict[str, Any]],
                *examples: Mapping[str, Any]) -> Callable[..., None]:
    """test_<name>: `check` on the model budget's recipes drawn from `recipes`, after each of
    `examples`; marked as using spec name `name` (an inference-only backend may lack it)."""
    def test(backend, dtype, recipe):
        check(backend, recipe, dtype)

    # Hypothesis derives a test's derandomised draws and its database key from its name (and
    # source, which the four share): each test keeps its own.
    test.__name__ = test.__qualname__ = f"test_{name}"
    for e in examples:
        test = example(recipe=e)(test)
    return pytest.mark.uses(name)(budget("model")(given(recipe=recipes)(test)))


test_forward = _model_test("forward", checks.model_forward, cs.model_recipes(with_labels=None),
                           cs.TWO_DIGIT_MODEL_RECIPE)
test_loss = _model_test("loss", checks.model_loss, cs.model_recipes(), cs.TWO_DIGIT_MODEL_RECIPE)
test_value_and_grad = _model_test("value_and_grad", checks.model_value_and_grad, cs.model_recipes(),
                                  cs.TWO_DIGIT_MODEL_RECIPE)
test_predict = _model_test("predict", checks.model_predict, cs.model_recipes(with_labels=False))
