"""Hypothesis strategies for the suite: named building blocks of recipes (see cases.py), never raw arrays.

A recipe is a small flat dict of seeds, sizes, value kinds and log10 scales. It is put together
from the named strategies below, each of which draws a few of its keys (`seeds`, `values`,
`batch`, `conv_geometry`, `capsule_shape`, `margins`, `cotangents`, `sizes`), merged by
`recipe(...)`. Each op's record (records.py) says which blocks make its recipe, so there is no
per-op branching here.

Sizes are kept small so that the ci profile checks a backend in minutes on a laptop; the value
kinds cover the corners the paper's implementations got wrong (zeros, all-equal inputs, zero
capsule vectors, huge and tiny norms side by side). Scales are bounded per range and dtype:
squash and lengths go to the edge of their domain (|s|^2 finite), routing stays where it is
well conditioned (its logits are dot products of u_hat with v: at |u_hat| ~ 1e2 in float32 a
rounding of the logits already moves the softmax by more than any sensible tolerance).

What this module must never do: draw NaN or inf (that is the error contract's business, in
records.py), or sizes that make a single example take more than a fraction of a second on the
reference.
"""

from __future__ import annotations

from typing import Any, Mapping

from hypothesis import strategies as st

from capsspec.config import CapsNetConfig

from .cases import SCALE_LIMITS

__all__ = ["DTYPES", "RANGES", "seeds", "batch", "values", "cotangents", "conv_geometry", "capsule_shape",
           "sizes", "margins", "label_rows", "recipe", "configs", "SMALL_CONFIG", "small_model_recipes",
           "model_recipes", "adam_recipes", "trajectory_recipes", "TWO_DIGIT_MODEL_RECIPE", "TWO_DIGIT_TRAJECTORY_RECIPE"]

DTYPES = ("float32", "float64")

# log10 ranges of the values, per range name and dtype (see the module docstring).
RANGES: dict[str, dict[str, tuple[int, int]]] = {
    "domain": SCALE_LIMITS,  # squash, capsule_lengths, mask: any finite |s|^2
    "linear": {"float32": (-8, 8), "float64": (-80, 80)},  # conv2d, primary_capsules, predictions
    "routing": {"float32": (-6, 1), "float64": (-40, 6)},
    # The decoder's sigmoid saturates beyond |z| ~ 40: larger inputs test nothing but rounding.
    "decoder": {"float32": (-6, 1), "float64": (-40, 1)},
}

# "normal" first: Hypothesis shrinks towards the first choice, so a minimal failing example is
# ordinary random values unless the corner itself is what fails.
KINDS = ("normal", "zeros", "equal", "zero_rows", "mixed")

seeds = st.fixed_dictionaries({"seed": st.integers(0, 2**16)})
batch = st.fixed_dictionaries({"B": st.integers(1, 4)})
# The label layout of an op that takes labels: K = 0 for (B,) labels (one digit per image; drawn
# first, so a shrunk failure keeps the plain layout unless the layout is what fails), 1 or 2 for
# (B, K) labels with K distinct classes per row (MultiMNIST: K = 2).
label_rows = st.fixed_dictionaries({"K": st.sampled_from((0, 1, 2))})
# Images with one digit ((B,) labels) or two ((B, 2) labels and a target image per digit).
_DIGITS = st.sampled_from((1, 2))


def values(range_name: str, dtype: str, kinds: tuple[str, ...] = KINDS) -> st.SearchStrategy[dict[str, Any]]:
    """{kind, scale, row_scales}: mostly moderate scales, sometimes the extremes of the range."""
    lo, hi = RANGES[range_name][dtype]
    scale = st.one_of(st.integers(-2, 2), st.integers(lo, hi)).map(lambda s: max(lo, min(hi, s)))
    return st.fixed_dictionaries({"kind": st.sampled_from(kinds), "scale": scale, "row_scales": st.just([lo, hi])})


cotangents = st.fixed_dictionaries({"cot": st.fixed_dictionaries({
    "seed": st.integers(0, 2**16), "kind": st.sampled_from(("normal", "zeros")), "with_gc": st.booleans()})})


def sizes(**bounds: tuple[int, int]) -> st.SearchStrategy[dict[str, int]]:
    """Independent integer sizes: sizes(J=(2, 5), E=(1, 6)) draws {"J": .., "E": ..}."""
    return st.fixed_dictionaries({k: st.integers(lo, hi) for k, (lo, hi) in bounds.items()})


@st.composite
def conv_geometry(draw: Any, square: bool, max_stride: int) -> dict[str, int]:
    """{C, H, W, kh, kw, stride} of a valid convolution (the kernel fits the input)."""
    kh = draw(st.integers(1, 4))
    kw = kh if square else draw(st.integers(1, 4))
    return {"C": draw(st.integers(1, 3)), "kh": kh, "kw": kw, "stride": draw(st.integers(1, max_stride)),
            "H": kh + draw(st.integers(0, 6)), "W": kw + draw(st.integers(0, 6))}


@st.composite
def capsule_shape(draw: Any, with_axis: bool) -> dict[str, Any]:
    """{shape[, axis]}: a batch, up to two more axes, then 1 to 16 capsule dims; any valid axis."""
    shape = [draw(st.integers(1, 4))] + draw(st.lists(st.integers(1, 6), max_size=2)) + [draw(st.integers(1, 16))]
    out: dict[str, Any] = {"shape": shape}
    if with_axis:
        out["axis"] = draw(st.sampled_from([-1] + list(range(-len(shape), len(shape)))))
    return out


@st.composite
def margins(draw: Any) -> dict[str, float]:
    """The paper's margins, or other valid ones (m- < m+ <= 1)."""
    if draw(st.booleans(), label="paper margins"):
        return {"m_plus": 0.9, "m_minus": 0.1, "lambda_": 0.5}
    return {"m_plus": draw(st.sampled_from((0.6, 0.8, 0.9, 0.95))),
            "m_minus": draw(st.sampled_from((0.05, 0.1, 0.2, 0.3))),
            "lambda_": draw(st.sampled_from((0.5, 0.25, 1.0)))}


def _merge(parts: tuple[Mapping[str, Any], ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in parts:
        out.update(p)
    return out


def recipe(*parts: st.SearchStrategy[Mapping[str, Any]], **fixed: Any) -> st.SearchStrategy[dict[str, Any]]:
    """One flat recipe from several dict strategies (later keys win), plus fixed entries."""
    return st.tuples(*parts, st.just(fixed)).map(_merge)


@st.composite
def configs(draw: Any) -> dict[str, Any]:
    """A small CapsNetConfig (as its dict): any kernels, strides, channels, capsule types and dims,
    2 to 12 classes, 1 to 5 routing iterations, with or without a decoder, non-square inputs."""
    conv1_kernel, conv1_stride = draw(st.integers(1, 5)), draw(st.integers(1, 2))
    primary_kernel, primary_stride = draw(st.integers(1, 4)), draw(st.integers(1, 2))
    grid = [draw(st.integers(1, 3), label="grid h"), draw(st.integers(1, 3), label="grid w")]
    hw = []
    for g in grid:
        h1 = (g - 1) * primary_stride + primary_kernel + draw(st.integers(0, primary_stride - 1))
        hw.append((h1 - 1) * conv1_stride + conv1_kernel + draw(st.integers(0, conv1_stride - 1)))
    use_decoder = draw(st.booleans(), label="use_decoder")
    config = CapsNetConfig(
        input_channels=draw(st.integers(1, 2)), input_height=hw[0], input_width=hw[1],
        conv1_channels=draw(st.integers(1, 6)), conv1_kernel=conv1_kernel, conv1_stride=conv1_stride,
        primary_types=draw(st.integers(1, 3)), primary_dim=draw(st.integers(1, 5)),
        primary_kernel=primary_kernel, primary_stride=primary_stride,
        num_classes=draw(st.integers(2, 12), label="classes"), class_dim=draw(st.integers(1, 6)),
        routing_iterations=draw(st.integers(1, 5), label="routing iterations"),
        use_decoder=use_decoder,
        decoder_widths=tuple(draw(st.lists(st.integers(1, 8), min_size=0, max_size=2))),
        reconstruction_scale=draw(st.sampled_from((0.0005, 0.05, 1.0))),
        **draw(margins()),
    )
    return config.to_dict()


def _images(draw: Any, min_batch: int = 1) -> dict[str, Any]:
    kind = draw(st.sampled_from(("unit", "zeros", "equal", "normal")), label="image kind")
    return {"seed": draw(st.integers(0, 2**16)), "B": draw(st.integers(min_batch, 4), label="batch"), "kind": kind,
            "scale": draw(st.sampled_from((0, 0, -3, 2, 5)))}


# A two-digit batch on a small model with a decoder: an explicit example of every model check
# (test_model.py, test_optim.py), so MultiMNIST's loss is checked in every profile, whatever is drawn.
_TWO_DIGIT_CONFIG: dict[str, Any] = CapsNetConfig(
    input_channels=1, input_height=8, input_width=7, conv1_channels=3, conv1_kernel=3, primary_types=2,
    primary_dim=3, primary_kernel=3, primary_stride=1, num_classes=4, class_dim=3, routing_iterations=3,
    use_decoder=True, decoder_widths=(6,), reconstruction_scale=0.05).to_dict()
TWO_DIGIT_MODEL_RECIPE: dict[str, Any] = {
    "config": _TWO_DIGIT_CONFIG, "seed": 17, "digit_scale": 300.0, "with_labels": True,
    "x": {"seed": 18, "B": 3, "kind": "unit", "scale": 0, "digits": 2}}
TWO_DIGIT_TRAJECTORY_RECIPE: dict[str, Any] = {
    "config": _TWO_DIGIT_CONFIG, "seed": 19, "digit_scale": 30.0, "adam": {},
    "batches": [{"seed": 20 + i, "B": 3, "kind": "unit", "scale": 0, "digits": 2} for i in range(3)]}


# One small model with a decoder, for checks whose subject is not the numbers (the error contract,
# purity): one shape per dtype, so a compiling backend traces each function once.
SMALL_CONFIG: dict[str, Any] = CapsNetConfig(
    input_channels=1, input_height=6, input_width=5, conv1_channels=2, conv1_kernel=3, primary_types=2,
    primary_dim=2, primary_kernel=2, primary_stride=1, num_classes=3, class_dim=2, routing_iterations=2,
    use_decoder=True, decoder_widths=(4,)).to_dict()


def small_model_recipes() -> st.SearchStrategy[dict[str, Any]]:
    """model_recipes on SMALL_CONFIG with a batch of 2 unit images: only seeds and the digit scale vary."""
    return st.fixed_dictionaries({
        "config": st.just(SMALL_CONFIG), "seed": st.integers(0, 2**16), "digit_scale": st.sampled_from((1.0, 30.0)),
        "x": st.fixed_dictionaries({"seed": st.integers(0, 2**16), "B": st.just(2), "kind": st.just("unit"),
                                    "scale": st.just(0), "digits": st.just(1)}),
        "with_labels": st.just(True)})


@st.composite
def model_recipes(draw: Any, with_labels: bool | None = True, min_batch: int = 1) -> dict[str, Any]:
    """A recipe for cases.model_case: a config, a parameter seed and scale, and a batch."""
    r = {"config": draw(configs()), "seed": draw(st.integers(0, 2**16)),
         # The spec's initial digit.weight (std 0.01) leaves routing undecided; larger scales
         # make the coupling coefficients move.
         "digit_scale": draw(st.sampled_from((1.0, 30.0, 300.0)), label="digit weight scale"),
         "x": dict(_images(draw, min_batch), digits=draw(_DIGITS, label="digits per image"))}
    r["with_labels"] = draw(st.booleans()) if with_labels is None else with_labels
    return r


@st.composite
def adam_recipes(draw: Any) -> dict[str, Any]:
    return {"config": draw(configs()), "seed": draw(st.integers(0, 2**16)),
            "step": draw(st.sampled_from((0, 1, 7, 2000, 10**6)), label="step"),
            "grad_scale": draw(st.integers(-8, 1)),
            "grad_kind": draw(st.sampled_from(("normal", "zero_rows", "zeros"))),
            "adam": draw(st.sampled_from(({}, {"lr": 0.01, "decay_steps": 3},
                                          {"beta1": 0.5, "beta2": 0.9, "epsilon": 1e-4, "lr_floor": 1e-4})))}


@st.composite
def trajectory_recipes(draw: Any, steps: int = 3) -> dict[str, Any]:
    config = draw(configs())
    digits = draw(_DIGITS, label="digits per image")
    return {"config": config, "seed": draw(st.integers(0, 2**16)),
            "digit_scale": draw(st.sampled_from((1.0, 30.0))),
            "batches": [dict(_images(draw), kind="unit", scale=0, digits=digits) for _ in range(steps)],
            "adam": draw(st.sampled_from(({}, {"lr": 0.01, "decay_steps": 2})))}
