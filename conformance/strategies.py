"""Hypothesis strategies for the suite: bounded, labelled recipes (see cases.py), never raw arrays.

Every strategy draws a small dict of seeds, sizes, value kinds and log10 scales. Sizes are kept
small so that the ci profile checks a backend in minutes on a laptop; the value kinds cover the
corners the paper's implementations got wrong (zeros, all-equal inputs, zero capsule vectors,
huge and tiny norms side by side). Scales are bounded per op and dtype: squash and lengths go to
the edge of their domain (|s|^2 finite), routing stays where it is well conditioned (its
logits are dot products of u_hat with v: at |u_hat| ~ 1e2 in float32 a rounding of the logits
already moves the softmax by more than any sensible tolerance).

What this module must never do: draw NaN or inf (the reference refuses them), or sizes that make
a single example take more than a fraction of a second on the reference.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from capsspec.config import CapsNetConfig

from .cases import SCALE_LIMITS

__all__ = ["op_recipes", "configs", "model_recipes", "adam_recipes", "trajectory_recipes", "DTYPES"]

DTYPES = ("float32", "float64")

# log10 ranges of the values, per kind of op and dtype (see the module docstring).
_RANGES = {
    "domain": SCALE_LIMITS,  # squash, capsule_lengths, mask
    "linear": {"float32": (-8, 8), "float64": (-80, 80)},  # conv2d, primary_capsules, predictions
    "routing": {"float32": (-6, 1), "float64": (-40, 6)},
    # The decoder's sigmoid saturates beyond |z| ~ 40: larger inputs test nothing but rounding.
    "decoder": {"float32": (-6, 1), "float64": (-40, 1)},
}
_OP_RANGE = {"squash": "domain", "capsule_lengths": "domain", "mask": "domain", "routing": "routing",
             "conv2d": "linear", "primary_capsules": "linear", "predictions": "linear", "decoder": "decoder"}

# "normal" first: Hypothesis shrinks towards the first choice, so a minimal failing example is
# ordinary random values unless the corner itself is what fails.
_KINDS = ("normal", "zeros", "equal", "zero_rows", "mixed")

batch_sizes = st.integers(1, 4).map(int)


@st.composite
def _values(draw: Any, op: str, dtype: str, kinds: tuple[str, ...] = _KINDS) -> dict[str, Any]:
    lo, hi = _RANGES[_OP_RANGE[op]][dtype]
    kind = draw(st.sampled_from(kinds), label="kind")
    # Mostly moderate scales, sometimes the extremes of the allowed range.
    scale = draw(st.one_of(st.integers(-2, 2), st.integers(lo, hi)), label="log10 scale")
    scale = max(lo, min(hi, scale))
    return {"kind": kind, "scale": scale, "row_scales": [lo, hi]}


@st.composite
def _cot(draw: Any) -> dict[str, Any]:
    return {"seed": draw(st.integers(0, 2**16)), "kind": draw(st.sampled_from(("normal", "zeros"))),
            "with_gc": draw(st.booleans())}


@st.composite
def op_recipes(draw: Any, op: str, dtype: str) -> dict[str, Any]:
    """A recipe for cases.op_case(op, recipe, dtype)."""
    r: dict[str, Any] = {"seed": draw(st.integers(0, 2**16), label="seed")}
    if op in _OP_RANGE:
        r.update(draw(_values(op, dtype)))
    b = draw(batch_sizes, label="batch")
    if op in ("conv2d", "primary_capsules"):
        k = draw(st.integers(1, 4))
        kh, kw = (k, k) if op == "primary_capsules" else (k, draw(st.integers(1, 4)))
        stride = draw(st.integers(1, 3 if op == "conv2d" else 2))
        r.update(B=b, C=draw(st.integers(1, 3)), H=kh + draw(st.integers(0, 6)), W=kw + draw(st.integers(0, 6)),
                 stride=stride)
        if op == "conv2d":
            r.update(O=draw(st.integers(1, 4)), kh=kh, kw=kw)
        else:
            r.update(T=draw(st.integers(1, 3)), D=draw(st.integers(1, 5)), k=k)
    elif op in ("squash", "capsule_lengths"):
        shape = [b] + draw(st.lists(st.integers(1, 6), min_size=0, max_size=2)) + [draw(st.integers(1, 16))]
        r["shape"] = shape
        if op == "squash":
            r["axis"] = draw(st.sampled_from([-1] + list(range(-len(shape), len(shape)))))
    elif op == "predictions":
        r.update(B=b, N=draw(st.integers(1, 10)), D=draw(st.integers(1, 6)), J=draw(st.integers(2, 5)),
                 E=draw(st.integers(1, 6)))
    elif op == "routing":
        r.update(B=b, N=draw(st.integers(1, 12)), J=draw(st.integers(2, 6)), E=draw(st.integers(1, 6)),
                 iterations=draw(st.integers(1, 5), label="iterations"))
    elif op == "margin_loss":
        r.update(B=b, J=draw(st.integers(2, 12)), kind="uniform")
        r.update(_margins(draw))
    elif op == "mask":
        r.update(B=b, J=draw(st.integers(2, 8)), E=draw(st.integers(1, 6)), labels=draw(st.booleans()))
    elif op == "decoder":
        r.update(B=b, widths=draw(st.lists(st.integers(1, 10), min_size=2, max_size=4)))
    elif op == "reconstruction_loss":
        r.update(B=b, C=draw(st.integers(1, 2)), H=draw(st.integers(1, 6)), W=draw(st.integers(1, 6)),
                 kind=draw(st.sampled_from(("unit", "zeros"))),
                 loss_scale=draw(st.sampled_from((0.0005, 1.0, 0.01))))
    else:
        raise ValueError(f"no recipe strategy for op {op!r}")
    r["cot"] = draw(_cot())
    return r


def _margins(draw: Any) -> dict[str, float]:
    """The paper's margins, or other valid ones (m- < m+ <= 1)."""
    if draw(st.booleans(), label="paper margins"):
        return {"m_plus": 0.9, "m_minus": 0.1, "lambda_": 0.5}
    m_minus = draw(st.sampled_from((0.05, 0.1, 0.2, 0.3)))
    m_plus = draw(st.sampled_from((0.6, 0.8, 0.9, 0.95)))
    return {"m_plus": m_plus, "m_minus": m_minus, "lambda_": draw(st.sampled_from((0.5, 0.25, 1.0)))}


@st.composite
def routing_recipes(draw: Any, dtype: str) -> dict[str, Any]:
    return draw(op_recipes("routing", dtype))


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
    margins = _margins(draw)
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
        **margins,
    )
    return config.to_dict()


def _batch(draw: Any, min_batch: int = 1) -> dict[str, Any]:
    kind = draw(st.sampled_from(("unit", "zeros", "equal", "normal")), label="image kind")
    return {"seed": draw(st.integers(0, 2**16)), "B": draw(st.integers(min_batch, 4), label="batch"), "kind": kind,
            "scale": draw(st.sampled_from((0, 0, -3, 2, 5)))}


@st.composite
def model_recipes(draw: Any, with_labels: bool | None = True, min_batch: int = 1) -> dict[str, Any]:
    """A recipe for cases.model_case: a config, a parameter seed and scale, and a batch."""
    r = {"config": draw(configs()), "seed": draw(st.integers(0, 2**16)),
         # The spec's initial digit.weight (std 0.01) leaves routing undecided; larger scales
         # make the coupling coefficients move.
         "digit_scale": draw(st.sampled_from((1.0, 30.0, 300.0)), label="digit weight scale"),
         "x": _batch(draw, min_batch)}
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
    return {"config": config, "seed": draw(st.integers(0, 2**16)),
            "digit_scale": draw(st.sampled_from((1.0, 30.0))),
            "batches": [dict(_batch(draw), kind="unit", scale=0) for _ in range(steps)],
            "adam": draw(st.sampled_from(({}, {"lr": 0.01, "decay_steps": 2})))}
