"""The suite's checks by name: run the backend and the reference on one drawn case and compare.

Each check takes the selected backend (selection.Selected), then plain JSON (names, a recipe of
cases.py), then a dtype. The test modules (test_*.py) are thin Hypothesis wrappers around these
functions; a reproduction line (repro_line.py, run by reproduce.py) and a regression example
(regressions.py) name a check by its name here. Each check is @reproducible: a failure prints the
one command line that runs the same check on the same inputs again.

Where the checks live:

    op_checks          op_forward, op_vjp: every op against capsspec.ops
    model_checks       model_forward, model_loss, model_value_and_grad, model_predict, and
                       interchange (checkpoints from one backend in another)
    optimizer_checks   adam_step, trajectory (several train_step calls)
    property_checks    the paper's properties on the backend's own results
    contract_checks    error_contract (bad input raises ValueError naming the argument) and
                       purity (no spec function changes what the caller passed in)
    check_kit          what they share: conversions, the failure context, the float32 reference

What the checks must never do: call a backend's private helpers, or hand a backend anything that
did not pass through its conversion functions.
"""

from __future__ import annotations

from .contract_checks import error_contract, purity
from .model_checks import interchange, model_forward, model_loss, model_predict, model_value_and_grad
from .op_checks import op_forward, op_vjp
from .optimizer_checks import adam_step, trajectory
from .property_checks import (batch_independence, child_permutation, coupling_sums_to_one, margin_loss_satisfied,
                              squash_direction_and_norm, zero_vectors)

__all__ = [
    "op_forward", "op_vjp", "model_forward", "model_loss", "model_value_and_grad", "model_predict",
    "adam_step", "trajectory", "coupling_sums_to_one", "child_permutation", "squash_direction_and_norm",
    "zero_vectors", "margin_loss_satisfied", "batch_independence", "interchange", "error_contract", "purity",
]
