"""The error contract: every bad input of records.py raises ValueError naming the argument, on every backend.

One test per (spec name, bad input): wrong rank or shape, wrong dtype, NaN and inf, labels out of
range or of a float dtype, an empty batch, a parameter dict with a missing, extra or misshapen
entry, a config that does not match the parameters. A value check that a device backend defers
must have raised by the time the result is read on the host (check_kit.read_all)."""

import pytest

from capsspec.conformance import checks
from capsspec.conformance.records import error_ids

# params_from_numpy is a conversion every backend has, inference-only ones included.
_USES = {"params_from_numpy": ()}


@pytest.mark.parametrize("name, error_id", [
    pytest.param(n, e, id=f"{n}-{e}", marks=pytest.mark.uses(*_USES.get(n, (n,)))) for n, e in error_ids()])
def test_error_contract(backend, name, error_id):
    dtype = backend.backend.dtypes[0]  # the bad inputs are bad in any dtype
    checks.error_contract(backend, name, error_id, dtype)
