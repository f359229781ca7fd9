"""Checkpoint interchange: params exported by one backend load into another with the same results."""

import pytest
from hypothesis import given

from capsspec.conformance import checks
from capsspec.conformance import strategies as cs
from capsspec.conformance.profiles import budget
from capsspec.conformance.selection import SelectionError, resolve_backend


@pytest.fixture(scope="session")
def partners(backend):
    """Resolved partner backends, or the reason each cannot run here."""
    return {}


def _partner(backend, partner, cache):
    if partner not in cache:
        if partner == backend.spec or partner == backend.name:
            cache[partner] = backend
        else:
            try:
                cache[partner] = resolve_backend(partner, None)
            except SelectionError as exc:
                cache[partner] = str(exc)
    found = cache[partner]
    if isinstance(found, str):
        pytest.skip(f"partner backend {partner!r} is unavailable: {found}")
    return found


@pytest.mark.uses("forward", "predict")  # and train_step, loss where a side trains (checks.interchange)
@pytest.mark.parametrize("direction", ["export", "import"])
@budget("interchange")
@given(recipe=cs.model_recipes())
def test_checkpoint_interchange(backend, partner, direction, dtype, recipe, partners):
    other = _partner(backend, partner, partners)
    if dtype not in other.backend.dtypes:
        pytest.skip(f"partner backend {partner!r} does not support {dtype}")
    if other is backend and direction == "import":
        pytest.skip("a backend with itself: the export direction covers it")
    source, target = (backend, other) if direction == "export" else (other, backend)
    checks.interchange(source, target, recipe, dtype)
