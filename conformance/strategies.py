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

Shape pools. A backend that compiles a program for every new shape or static argument
(Backend.compiles_per_shape: JAX under jax.jit) pays a compilation for nearly every example the
ci profile draws (about 17 CPU minutes for JAX on two cores, most of it in XLA's compiler). For
such a backend, and in the ci profile only (the plugin calls pool_shapes), the sizes of every
recipe are drawn from a pool of POOL_SIZE fixed entries, one index per example for all of a
recipe's sizes together: the middle of every range (first: Hypothesis draws the first entry
most often), its low corner, its high corner, and the two corners alternated. Everything else (seeds, value kinds, scales, cotangents, margins, labels) is
drawn as always, so every example still checks new values; what shrinks is the number of
distinct programs. The full profile, and every backend that does not compile per shape, draw
sizes freely.

What this module must never do: draw NaN or inf (that is the error contract's business, in
records.py), or sizes that make a single example take more than a fraction of a second on the
reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from hypothesis import strategies as st

from capsspec.config import CapsNetConfig

__all__ = ["DTYPES", "RANGES", "POOL_SIZE", "Shapes", "pool_shapes", "pooled", "shapes", "seeds", "batch", "values",
           "cotangents", "conv_geometry", "capsule_shape", "sizes", "margins", "label_rows", "recipe", "configs",
           "none_of_the_above",
           "SMALL_CONFIG", "small_model_recipes", "model_recipes", "adam_recipes", "trajectory_recipes",
           "TWO_DIGIT_MODEL_RECIPE", "TWO_DIGIT_TRAJECTORY_RECIPE"]

DTYPES = ("float32", "float64")

# log10 ranges of the values, per range name and dtype (see the module docstring).
RANGES: dict[str, dict[str, tuple[int, int]]] = {
    # squash, capsule_lengths, mask: their domain is any finite s. Past sqrt(float32 max) ~ 1e19 the
    # plain |s|^2 overflows, and the spec's scale-safe form must still give the exact answer.
    "domain": {"float32": (-15, 36), "float64": (-140, 150)},
    "linear": {"float32": (-8, 8), "float64": (-80, 80)},  # conv2d, primary_capsules, predictions
    "routing": {"float32": (-6, 1), "float64": (-40, 6)},
    # The decoder's sigmoid saturates beyond |z| ~ 40: larger inputs test nothing but rounding.
    "decoder": {"float32": (-6, 1), "float64": (-40, 1)},
}

# "normal" first: Hypothesis shrinks towards the first choice, so a minimal failing example is
# ordinary random values unless the corner itself is what fails.
KINDS = ("normal", "zeros", "equal", "zero_rows", "mixed")

# ============================================================================== shape pools
POOL_SIZE = 4
_pooled = False


def pool_shapes(on: bool) -> None:
    """Draw sizes from the pools (see the module docstring) from now on, or freely again."""
    global _pooled
    _pooled = bool(on)


def pooled() -> bool:
    return _pooled


@dataclass(frozen=True)
class Shapes:
    """A block of a recipe that draws sizes: its strategy, and the POOL_SIZE entries that replace
    it when sizes are pooled (recipe() takes the same entry index from every block)."""

    strategy: st.SearchStrategy[dict[str, Any]]
    pool: tuple[dict[str, Any], ...]

    def __post_init__(self) -> None:
        if len(self.pool) != POOL_SIZE:
            raise ValueError(f"a shape pool has {POOL_SIZE} entries, got {len(self.pool)}")


def shapes(strategy: st.SearchStrategy[dict[str, Any]], pool: Sequence[dict[str, Any]]) -> Shapes:
    return Shapes(strategy, tuple(pool))


def _pool_index() -> st.SearchStrategy[int]:
    return st.integers(0, POOL_SIZE - 1)


def _corners(bounds: Mapping[str, tuple[int, int]]) -> list[dict[str, int]]:
    """The pool of independent ranges: the middle, the low corner, the high corner, the corners alternated."""
    keys = list(bounds)
    return [{k: (bounds[k][0] + bounds[k][1]) // 2 for k in keys}, {k: bounds[k][0] for k in keys},
            {k: bounds[k][1] for k in keys}, {k: bounds[k][i % 2] for i, k in enumerate(keys)}]


# ============================================================================== building blocks
seeds = st.fixed_dictionaries({"seed": st.integers(0, 2**16)})
# The label layout of an op that takes labels: K = 0 for (B,) labels (one digit per image; drawn
# first, so a shrunk failure keeps the plain layout unless the layout is what fails), 1 or 2 for
# (B, K) labels with K distinct classes per row (MultiMNIST: K = 2). It changes the arrays' shapes,
# so with pooled sizes it follows the pool index like any other size.
label_rows = shapes(st.fixed_dictionaries({"K": st.sampled_from((0, 1, 2))}), [{"K": 0}, {"K": 2}, {"K": 1}, {"K": 2}])
# Images with one digit ((B,) labels) or two ((B, 2) labels and a target image per digit); with
# pooled sizes, DIGITS_POOL[i] goes with CONFIG_POOL[i] (two digits on two of the pool's models).
_DIGITS = st.sampled_from((1, 2))
DIGITS_POOL = (2, 1, 1, 2)


def values(range_name: str, dtype: str, kinds: tuple[str, ...] = KINDS) -> st.SearchStrategy[dict[str, Any]]:
    """{kind, scale, row_scales}: mostly moderate scales, sometimes the extremes of the range."""
    lo, hi = RANGES[range_name][dtype]
    scale = st.one_of(st.integers(-2, 2), st.integers(lo, hi)).map(lambda s: max(lo, min(hi, s)))
    return st.fixed_dictionaries({"kind": st.sampled_from(kinds), "scale": scale, "row_scales": st.just([lo, hi])})


# Routing's none-of-the-above logit (the paper's section 7), on or off. A static argument, so with pooled
# sizes it follows the pool index: a compiling backend gets no more programs for it.
none_of_the_above = shapes(st.fixed_dictionaries({"none_of_the_above": st.booleans()}),
                           [{"none_of_the_above": v} for v in (False, False, True, True)])

cotangents = st.fixed_dictionaries({"cot": st.fixed_dictionaries({
    "seed": st.integers(0, 2**16), "kind": st.sampled_from(("normal", "zeros")), "with_gc": st.booleans()})})


def sizes(**bounds: tuple[int, int]) -> Shapes:
    """Independent integer sizes: sizes(J=(2, 5), E=(1, 6)) draws {"J": .., "E": ..}."""
    return shapes(st.fixed_dictionaries({k: st.integers(lo, hi) for k, (lo, hi) in bounds.items()}),
                  _corners(bounds))


batch = sizes(B=(1, 4))


@st.composite
def _conv_geometry(draw: Any, square: bool, max_stride: int) -> dict[str, int]:
    kh = draw(st.integers(1, 4))
    kw = kh if square else draw(st.integers(1, 4))
    return {"C": draw(st.integers(1, 3)), "kh": kh, "kw": kw, "stride": draw(st.integers(1, max_stride)),
            "H": kh + draw(st.integers(0, 6)), "W": kw + draw(st.integers(0, 6))}


def conv_geometry(square: bool, max_stride: int) -> Shapes:
    """{C, H, W, kh, kw, stride} of a valid convolution (the kernel fits the input)."""
    def g(c: int, kh: int, kw: int, stride: int, dh: int, dw: int) -> dict[str, int]:
        kw = kh if square else kw
        return {"C": c, "kh": kh, "kw": kw, "stride": stride, "H": kh + dh, "W": kw + dw}

    return shapes(_conv_geometry(square, max_stride),
                  [g(2, 2, 3, 2, 3, 4), g(1, 1, 1, 1, 0, 0), g(3, 4, 4, max_stride, 6, 6), g(3, 3, 1, max_stride, 0, 5)])


@st.composite
def _capsule_shape(draw: Any, with_axis: bool) -> dict[str, Any]:
    shape = [draw(st.integers(1, 4))] + draw(st.lists(st.integers(1, 6), max_size=2)) + [draw(st.integers(1, 16))]
    out: dict[str, Any] = {"shape": shape}
    if with_axis:
        out["axis"] = draw(st.sampled_from([-1] + list(range(-len(shape), len(shape)))))
    return out


def capsule_shape(with_axis: bool) -> Shapes:
    """{shape[, axis]}: a batch, up to two more axes, then 1 to 16 capsule dims; any valid axis."""
    pool = [([2, 3, 8], -3), ([1, 1], -1), ([4, 6, 6, 16], 1), ([4, 1, 16], 2)]
    return shapes(_capsule_shape(with_axis), [dict(shape=sh, **({"axis": ax} if with_axis else {})) for sh, ax in pool])


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


def recipe(*parts: st.SearchStrategy[Mapping[str, Any]] | Shapes, **fixed: Any) -> st.SearchStrategy[dict[str, Any]]:
    """One flat recipe from several dict strategies and Shapes blocks (later keys win), plus fixed
    entries. With pooled sizes, one pool index is drawn and every Shapes block gives that entry."""
    def build(i: int | None) -> st.SearchStrategy[dict[str, Any]]:
        blocks = [p if not isinstance(p, Shapes) else p.strategy if i is None else st.just(p.pool[i]) for p in parts]
        return st.tuples(*blocks, st.just(fixed)).map(_merge)

    return st.deferred(lambda: _pool_index().flatmap(build) if _pooled else build(None))


def _input_size(grid: int, primary_kernel: int, primary_stride: int, conv1_kernel: int, conv1_stride: int,
                spare: tuple[int, int]) -> int:
    """The input height (or width) that gives `grid` capsule positions; spare: the rows left over
    after the last stride of PrimaryCaps and of conv1 (each less than that stride)."""
    h1 = (grid - 1) * primary_stride + primary_kernel + spare[0]
    return (h1 - 1) * conv1_stride + conv1_kernel + spare[1]


# Classes: 2 to 12, with 2 (the fewest routing allows) drawn more often, and sometimes 50 (more classes
# than any of the paper's data sets: the softmax over many parents, a wide decoder input).
_CLASSES = st.one_of(st.integers(2, 12), st.integers(2, 12), st.sampled_from((2, 50)))


@st.composite
def configs(draw: Any) -> dict[str, Any]:
    """A small CapsNetConfig (as its dict): any kernels, strides, capsule types and dims, 1 to 3 input
    channels (3: colour images), 2 to 12 or 50 classes, 1 to 5 routing iterations, with or without
    the none-of-the-above logit and a decoder, non-square inputs."""
    conv1_kernel, conv1_stride = draw(st.integers(1, 5)), draw(st.integers(1, 2))
    primary_kernel, primary_stride = draw(st.integers(1, 4)), draw(st.integers(1, 2))
    grid = [draw(st.integers(1, 3), label="grid h"), draw(st.integers(1, 3), label="grid w")]
    hw = []
    for g in grid:
        spare = (draw(st.integers(0, primary_stride - 1)), draw(st.integers(0, conv1_stride - 1)))
        hw.append(_input_size(g, primary_kernel, primary_stride, conv1_kernel, conv1_stride, spare))
    use_decoder = draw(st.booleans(), label="use_decoder")
    config = CapsNetConfig(
        input_channels=draw(st.integers(1, 3), label="channels"), input_height=hw[0], input_width=hw[1],
        conv1_channels=draw(st.integers(1, 6)), conv1_kernel=conv1_kernel, conv1_stride=conv1_stride,
        primary_types=draw(st.integers(1, 3)), primary_dim=draw(st.integers(1, 5)),
        primary_kernel=primary_kernel, primary_stride=primary_stride,
        num_classes=draw(_CLASSES, label="classes"), class_dim=draw(st.integers(1, 6)),
        routing_iterations=draw(st.integers(1, 5), label="routing iterations"),
        none_of_the_above=draw(st.booleans(), label="none_of_the_above"),
        use_decoder=use_decoder,
        decoder_widths=tuple(draw(st.lists(st.integers(1, 8), min_size=0, max_size=2))),
        reconstruction_scale=draw(st.sampled_from((0.0005, 0.05, 1.0))),
        **draw(margins()),
    )
    return config.to_dict()


def _pool_config(grid: tuple[int, int], spare: tuple[int, int], conv1: tuple[int, int], primary: tuple[int, int],
                 **rest: Any) -> dict[str, Any]:
    (ck, cs), (pk, ps) = conv1, primary
    h, w = (_input_size(g, pk, ps, ck, cs, (min(spare[0], ps - 1), min(spare[1], cs - 1))) for g in grid)
    return CapsNetConfig(input_height=h, input_width=w, conv1_kernel=ck, conv1_stride=cs, primary_kernel=pk,
                         primary_stride=ps, **rest).to_dict()


# The pools of configs() and of the model's batch size, in the same order as _corners'. Between them:
# 1, 2 and 3 channels, square and non-square inputs, 2, 7, 12 and 50 classes, the none-of-the-above logit.
CONFIG_POOL: tuple[dict[str, Any], ...] = (
    _pool_config((2, 3), (1, 0), (3, 1), (2, 2), input_channels=3, conv1_channels=3, primary_types=2, primary_dim=3,
                 num_classes=7, class_dim=3, routing_iterations=3, none_of_the_above=True, use_decoder=True,
                 decoder_widths=(4,)),
    _pool_config((1, 1), (0, 0), (1, 1), (1, 1), input_channels=1, conv1_channels=1, primary_types=1, primary_dim=1,
                 num_classes=2, class_dim=1, routing_iterations=1, use_decoder=False),
    _pool_config((3, 3), (1, 1), (5, 2), (4, 2), input_channels=3, conv1_channels=6, primary_types=3, primary_dim=5,
                 num_classes=50, class_dim=6, routing_iterations=5, use_decoder=True, decoder_widths=(8, 8),
                 reconstruction_scale=1.0, m_plus=0.95, m_minus=0.3, lambda_=1.0),
    _pool_config((3, 1), (0, 1), (5, 2), (1, 1), input_channels=2, conv1_channels=1, primary_types=3, primary_dim=1,
                 num_classes=12, class_dim=1, routing_iterations=5, none_of_the_above=True, use_decoder=True,
                 decoder_widths=(),
                 reconstruction_scale=0.05, m_plus=0.6, m_minus=0.05, lambda_=0.25),
)
BATCH_POOL = (2, 1, 4, 4)


def _images(draw: Any, min_batch: int = 1, pool_index: int | None = None) -> dict[str, Any]:
    kind = draw(st.sampled_from(("unit", "zeros", "equal", "normal")), label="image kind")
    seed = draw(st.integers(0, 2**16))
    batch = (draw(st.integers(min_batch, 4), label="batch") if pool_index is None
             else max(min_batch, BATCH_POOL[pool_index]))
    return {"seed": seed, "B": batch, "kind": kind, "scale": draw(st.sampled_from((0, 0, -3, 2, 5)))}


def _config_or_pooled(draw: Any) -> tuple[dict[str, Any], int | None]:
    """(a config, None), or with pooled sizes (a pooled config, its index for the batch size)."""
    if not _pooled:
        return draw(configs()), None
    i = draw(_pool_index())
    return CONFIG_POOL[i], i


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
    config, i = _config_or_pooled(draw)
    r = {"config": config, "seed": draw(st.integers(0, 2**16)),
         # The spec's initial digit.weight (std 0.01) leaves routing undecided; larger scales
         # make the coupling coefficients move.
         "digit_scale": draw(st.sampled_from((1.0, 30.0, 300.0)), label="digit weight scale"),
         "x": dict(_images(draw, min_batch, i),
                   digits=draw(_DIGITS, label="digits per image") if i is None else DIGITS_POOL[i])}
    r["with_labels"] = draw(st.booleans()) if with_labels is None else with_labels
    return r


@st.composite
def adam_recipes(draw: Any) -> dict[str, Any]:
    return {"config": _config_or_pooled(draw)[0], "seed": draw(st.integers(0, 2**16)),
            "step": draw(st.sampled_from((0, 1, 7, 2000, 10**6)), label="step"),
            "grad_scale": draw(st.integers(-8, 1)),
            "grad_kind": draw(st.sampled_from(("normal", "zero_rows", "zeros"))),
            "adam": draw(st.sampled_from(({}, {"lr": 0.01, "decay_steps": 3},
                                          {"beta1": 0.5, "beta2": 0.9, "epsilon": 1e-4, "lr_floor": 1e-4})))}


@st.composite
def trajectory_recipes(draw: Any, steps: int = 3) -> dict[str, Any]:
    config, i = _config_or_pooled(draw)
    digits = draw(_DIGITS, label="digits per image") if i is None else DIGITS_POOL[i]
    return {"config": config, "seed": draw(st.integers(0, 2**16)),
            "digit_scale": draw(st.sampled_from((1.0, 30.0))),
            "batches": [dict(_images(draw, 1, i), kind="unit", scale=0, digits=digits) for _ in range(steps)],
            "adam": draw(st.sampled_from(({}, {"lr": 0.01, "decay_steps": 2})))}
