"""The suite's one tolerance table: how far a backend may be from the reference, per dtype and level.

The reference side of every comparison is computed in float64 from the very inputs the backend
got (float32 inputs are widened exactly), so an error measures the backend alone, not the
reference's own float32 rounding.

A value passes when |backend - reference| <= atol + rtol * scale, elementwise, where scale is
the largest |reference| in the value's row (last axis) for "row" levels, or in the whole array
for "tensor" levels. Norm-wise scaling is deliberate: backends may reorder sums, so an element
that is tiny next to its row has no meaningful relative precision, while any of the paper's
mistakes moves whole rows by O(1).

The strictest level is "elementwise"; every looser entry says why in a comment. float32 entries
are in units of its machine epsilon (1.19e-7), float64 entries of its (2.22e-16).

What this module must never do: hold per-backend exceptions (those are known gaps, in
known_gaps/<backend>.txt) or be loosened to make a failing backend pass.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tolerance", "TOLERANCES", "LEVELS", "tolerance"]

EPS32 = 1.1920929e-07
EPS64 = 2.220446049250313e-16


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    # What |reference| the rtol is relative to: "row" the largest in the value's last axis,
    # "block" in its last two axes (one example's capsules), "tensor" in the whole array.
    scale: str = "row"


LEVELS = ("exact", "elementwise", "reduction", "contraction", "routing", "model", "gradients", "optimizer",
          "trajectory")

TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "float32": {
        # Selections (mask, predict's argmax inputs) copy values: nothing to round.
        "exact": Tolerance(rtol=0.0, atol=0.0),
        # A few roundings per element (squash's norm, sqrt, division; formulas may be arranged
        # differently, e.g. |s| / (1 + |s|^2) against 1 / (|s| + 1/|s|)).
        "elementwise": Tolerance(rtol=64 * EPS32, atol=1e-37),
        # Sums over a few hundred terms (capsule lengths, loss means) in any order.
        "reduction": Tolerance(rtol=128 * EPS32, atol=1e-37),
        # Convolutions and matmuls: the backend picks the summation order and blocking
        # (BLAS, cuDNN, XLA), so the error grows with the contraction length.
        "contraction": Tolerance(rtol=512 * EPS32, atol=1e-37),
        # Routing feeds each iteration's agreement back into the next softmax, so a rounding
        # error in u_hat . v is amplified once per iteration (up to 5 in the suite). Relative to
        # a whole block of capsules: once the softmax has decided, the coupling to the losing
        # parents (and everything scaled by it) is exp(-large) and has no relative precision.
        "routing": Tolerance(rtol=2048 * EPS32, atol=1e-36, scale="block"),
        # The whole network: conv1, PrimaryCaps, predictions and routing composed, relative to
        # each output's largest value.
        "model": Tolerance(rtol=4096 * EPS32, atol=1e-30, scale="tensor"),
        # Reverse mode through the network and every routing iteration: the backward of each
        # contraction adds its own summation error on top of the forward's.
        "gradients": Tolerance(rtol=8192 * EPS32, atol=1e-30, scale="tensor"),
        # One Adam update is a handful of elementwise operations on given inputs.
        "optimizer": Tolerance(rtol=64 * EPS32, atol=1e-37, scale="tensor"),
        # Several training steps: Adam's m / sqrt(v) turns the relative error of a small
        # gradient component into an O(lr) change of that parameter, and the steps compound.
        # Compared norm-wise on the change of the parameters since the start, on top of the
        # float32 reference trajectory's own distance from the float64 one (see checks.py).
        "trajectory": Tolerance(rtol=1e-3, atol=0.0, scale="tensor"),
    },
    "float64": {
        "exact": Tolerance(rtol=0.0, atol=0.0),
        "elementwise": Tolerance(rtol=64 * EPS64, atol=1e-300),
        "reduction": Tolerance(rtol=128 * EPS64, atol=1e-300),
        # Same reasons as float32's entries above.
        "contraction": Tolerance(rtol=512 * EPS64, atol=1e-300),
        "routing": Tolerance(rtol=2048 * EPS64, atol=1e-290, scale="block"),
        "model": Tolerance(rtol=4096 * EPS64, atol=1e-280, scale="tensor"),
        "gradients": Tolerance(rtol=8192 * EPS64, atol=1e-280, scale="tensor"),
        "optimizer": Tolerance(rtol=64 * EPS64, atol=1e-300, scale="tensor"),
        "trajectory": Tolerance(rtol=1e-10, atol=0.0, scale="tensor"),
    },
}

# float32 with TF32 matrix products and convolutions (a backend's float32_precision "tf32", a speed mode
# asked for by name, e.g. the tensorflow backend's tf32=True): their inputs keep 10 mantissa bits
# (unit roundoff 2^-11), so every level from "contraction" on is in units of TF32's epsilon 2^-10.
EPS_TF32 = 2.0 ** -10
TOLERANCES["tf32"] = {**TOLERANCES["float32"],
                      "contraction": Tolerance(rtol=8 * EPS_TF32, atol=1e-37),
                      "routing": Tolerance(rtol=16 * EPS_TF32, atol=1e-36, scale="block"),
                      "model": Tolerance(rtol=32 * EPS_TF32, atol=1e-30, scale="tensor"),
                      "gradients": Tolerance(rtol=64 * EPS_TF32, atol=1e-30, scale="tensor"),
                      "trajectory": Tolerance(rtol=5e-2, atol=0.0, scale="tensor")}


def tolerance(dtype: str, level: str) -> Tolerance:
    """The table's entry for a dtype ("tf32": float32 on a backend whose float32_precision is "tf32") and
    level; ValueError naming what exists otherwise."""
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype must be one of {sorted(TOLERANCES)}, got {dtype!r}")
    if level not in TOLERANCES[dtype]:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return TOLERANCES[dtype][level]
