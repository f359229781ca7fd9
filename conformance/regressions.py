"""Regression examples: draws that once failed correct code (or would have), run by every profile.

The full profile keeps each failing draw in Hypothesis' example database (profiles.py) and replays
it first on the next run; a draw worth keeping for good is written here, as the check's arguments
from its reproduction line (the JSON after `python -m capsspec.conformance.reproduce`), with why
it is kept. test_regressions.py runs every entry against the backend under test.

What this module must never do: hold a draw that fails correct code today (fix the check first),
or a per-backend exception (that is a known gap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Regression", "REGRESSIONS"]


@dataclass(frozen=True)
class Regression:
    id: str
    check: str  # a function of checks.py
    args: tuple[Any, ...]  # its arguments between the backend and the dtype
    dtype: str
    uses: tuple[str, ...]  # the spec names it calls
    why: str


def _saturated(config_seed: int, digit_scale: float, x_seed: int, conv1: int, types: int, classes: int) -> dict:
    """A 1x3 image of values up to 1e5, class capsules of one dimension and no decoder: lengths within
    ~1e-10 of 1, where every gradient is a small difference of large terms (magnitudes.py)."""
    config = {"input_channels": 1, "input_height": 1, "input_width": 3, "conv1_channels": conv1, "conv1_kernel": 1,
              "conv1_stride": 1, "primary_types": types, "primary_dim": 1, "primary_kernel": 1, "primary_stride": 1,
              "num_classes": classes, "class_dim": 1, "routing_iterations": 1, "use_decoder": False,
              "decoder_widths": [], "m_plus": 0.9, "m_minus": 0.1, "lambda_": 0.5, "reconstruction_scale": 0.0005}
    return {"config": config, "seed": config_seed, "digit_scale": digit_scale,
            "x": {"seed": x_seed, "B": 1, "kind": "unit", "scale": 5}, "with_labels": True}


REGRESSIONS: tuple[Regression, ...] = (
    Regression(
        "squash-norms-down-to-1e-132", "squash_direction_and_norm",
        ({"seed": 4096, "kind": "mixed", "scale": 0, "row_scales": [-140, 150], "shape": [2, 5, 4], "axis": -1,
          "cot": {"seed": 0, "kind": "normal", "with_gc": False}},), "float64", ("squash",),
        "the full profile failed the reference itself: squares of components near 1e-132 underflowed in the "
        "check's cosine (0.99996); the check now rescales each vector by its largest component"),
    Regression(
        "value-and-grad-saturated-a", "model_value_and_grad", (_saturated(33604, 300.0, 60889, 2, 1, 10),),
        "float64", ("value_and_grad",),
        "torch agreed with the reference to 1e-10 relative on a conv1 gradient that is a difference of terms "
        "~1e10 times larger; the gradient's tolerance now follows those terms (magnitudes.model_gradients)"),
    Regression(
        "value-and-grad-saturated-b", "model_value_and_grad", (_saturated(27794, 1.0, 64204, 1, 3, 11),),
        "float64", ("value_and_grad",), "as value-and-grad-saturated-a, with one conv1 channel and three types"),
)
