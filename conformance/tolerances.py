"""The suite's one tolerance table: how far a backend may be from the reference, per dtype and level.

The reference side of every comparison is computed in float64 from the very inputs the backend
got (float32 inputs are widened exactly), so an error measures the backend alone, not the
reference's own float32 rounding.

A value passes when |backend - reference| <= atol + rtol * scale, elementwise, where scale is
the largest |reference| in the value's row (last axis) for "row" levels, or in the whole array
for "tensor" levels. Norm-wise scaling is deliberate: backends may reorder sums, so an element
that is tiny next to its row has no meaningful relative precision, while any of the paper's
mistakes moves whole rows by O(1).

The strictest level is "elementwise"; every looser entry says why in a comment. The table is
written for float32, in units of its machine epsilon (1.19e-7); float64's is derived from it by
one rule (_for_float64), with the entries that do not follow the rule listed, each with its reason.

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

_FLOAT32: dict[str, Tolerance] = {
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
    # float32 reference trajectory's own distance from the float64 one (see optimizer_checks.py).
    "trajectory": Tolerance(rtol=1e-3, atol=0.0, scale="tensor"),
}

# float64's floors (atol), by float32's. A floor only keeps comparisons of values near underflow
# meaningful: each is far below anything the suite draws and above its dtype's smallest normal
# number (1.2e-38, 2.2e-308), looser for the composed levels (routing, model, gradients). Floors
# are not counts of roundings, so no epsilon rule maps them; a new float32 floor needs its float64
# counterpart here.
_FLOAT64_FLOORS: dict[float, float] = {0.0: 0.0, 1e-37: 1e-300, 1e-36: 1e-290, 1e-30: 1e-280}

# float64 entries that do not follow the rule, and why.
_FLOAT64_OVERRIDES: dict[str, Tolerance] = {
    # trajectory's rtol is a round bound on the error compounded over the steps, not a count of
    # roundings (float32's 1e-3 is about 8400 of its epsilons). The rule would make float64's
    # 1.9e-12; its bound has been 1e-10 (about 450000 epsilons), and no tighter one has been
    # measured against the backends, so it stays.
    "trajectory": Tolerance(rtol=1e-10, atol=0.0, scale="tensor"),
}


def _for_float64(t: Tolerance) -> Tolerance:
    """A float32 entry's float64 counterpart: the same number of roundings in units of float64's
    epsilon (the rtols above are power-of-two multiples of EPS32, so rtol / EPS32 is that number
    exactly), the same scale, and float64's floor for float32's."""
    return Tolerance(rtol=t.rtol / EPS32 * EPS64, atol=_FLOAT64_FLOORS[t.atol], scale=t.scale)


TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "float32": _FLOAT32,
    "float64": {level: _FLOAT64_OVERRIDES.get(level) or _for_float64(t) for level, t in _FLOAT32.items()},
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
