"""One record per op: everything the suite knows about it, in one place.

In the spirit of PyTorch's OpInfo and JAX's op_record, an OpRecord holds an op's name (its
argument names come from capsspec.spec.OPS), how its recipes are drawn (a composition of the
named strategies of strategies.py), how a case is built from a recipe, its tolerance levels
(forward, VJP; tolerances.py says what each level means), its magnitude functions
(magnitudes.py: how large the terms behind each value are), and its error inputs (what must
raise ValueError naming the argument). Changing an op means editing the reference function and
its one record here. op_case builds an op's case from a recipe through its record.

Error inputs are derived from what the record declares about its arguments (which are batched,
which have a fixed rank, which carry data that must be finite, which are labels) plus a few
op-specific ones; each is a change applied to a valid case built from the record's `example`.
The model and optimizer functions have their error inputs in MODEL_ERRORS, in the same form.

What this module must never do: call a backend (the checks do), or draw NaN or inf outside an
error input.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from hypothesis import strategies as st

from capsspec import ops as ref_ops
from capsspec.spec import OPS, OpSpec

from . import magnitudes as mag
from . import strategies as S
from .cases import OpCase, cotangent, generator, labels_for, values, widen

__all__ = ["ErrorInput", "OpRecord", "RECORDS", "MODEL_ERRORS", "error_ids", "record", "op_of", "op_case"]

Builder = Callable[[Mapping[str, Any], str, np.random.Generator], tuple[list[Any], dict[str, Any]]]


@dataclass(frozen=True)
class ErrorInput:
    """A bad input: `change` turns a valid case into it; the ValueError must name one of `names`."""

    id: str
    names: tuple[str, ...]
    change: Callable[[Any], None]
    vjp_only: bool = False


@dataclass(frozen=True)
class OpRecord:
    name: str
    recipes: Callable[[str], st.SearchStrategy[dict[str, Any]]]  # dtype -> recipe dicts
    build: Builder  # recipe, dtype, rng -> (array args in spec order, static args)
    levels: tuple[str, str]  # tolerance level of the forward and of the VJP
    example: dict[str, Any]  # a small valid recipe: the base of every error input
    forward_magnitude: Callable[..., Any] | None = None
    vjp_magnitude: Callable[..., Any] | None = None
    batched: tuple[str, ...] = ()  # array args whose axis 0 is the batch
    ranks: Mapping[str, int] = field(default_factory=dict)  # array args of a fixed rank
    finite: tuple[str, ...] = ()  # args whose NaN or inf must be refused
    labels: str | None = None
    extra_errors: tuple[ErrorInput, ...] = ()

    @property
    def spec(self) -> OpSpec:
        return next(op for op in OPS if op.name == self.name)

    def errors(self) -> tuple[ErrorInput, ...]:
        """Every error input of this op (forward and VJP; the vjp_only ones are for the VJP alone)."""
        out: list[ErrorInput] = []
        args = self.spec.array_args
        floats = [a for a in args if a != self.labels]
        for a, n in self.ranks.items():
            out.append(ErrorInput(f"{a}-rank", (a,), _on_arg(args.index(a), lambda x: x[None])))
        first = floats[0]
        out.append(ErrorInput(f"{first}-int-dtype", (first,), _on_arg(args.index(first), _as_int)))
        if len(floats) > 1:
            second = floats[1]
            out.append(ErrorInput(f"{second}-other-float", (second, first),
                                  _on_arg(args.index(second), _other_float)))
        for a in self.finite:
            out.append(ErrorInput(f"{a}-nan", (a,), _on_arg(args.index(a), _poison(np.nan))))
            out.append(ErrorInput(f"{a}-inf", (a,), _on_arg(args.index(a), _poison(np.inf))))
        if self.batched:
            idx = [args.index(a) for a in self.batched]
            out.append(ErrorInput("empty-batch", tuple(self.batched), _empty_batch(idx)))
        if self.labels is not None:
            i = args.index(self.labels)
            out.append(ErrorInput("labels-out-of-range", ("labels",), _on_arg(i, _label_out_of_range)))
            out.append(ErrorInput("labels-negative", ("labels",), _on_arg(i, _label_negative)))
            out.append(ErrorInput("labels-float", ("labels",), _on_arg(i, lambda y: y.astype(np.float32))))
            out.append(ErrorInput("labels-rank", ("labels",), _on_arg(i, lambda y: y.reshape(len(y), 1, -1))))
            out.append(ErrorInput("labels-repeated", ("labels",), _repeated_labels(i)))
        out.append(ErrorInput("g-shape", ("g", "g_v"), _bad_cotangent, vjp_only=True))
        return tuple(out) + self.extra_errors


# ---------------------------------------------------------------------------------------- changes
def _on_arg(i: int, f: Callable[[Any], Any]) -> Callable[[OpCase], None]:
    def change(case: OpCase) -> None:
        case.args[i] = f(case.args[i])
    return change


def _as_int(a: Any) -> Any:
    if isinstance(a, list):
        return [_as_int(x) for x in a]
    return np.round(a).astype(np.int64)


def _other_float(a: Any) -> Any:
    if isinstance(a, list):
        return [_other_float(x) for x in a]
    return a.astype(np.float64 if a.dtype == np.float32 else np.float32)


def _poison(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def f(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a.flat[a.size // 2] = value
        return a
    return f


def _empty_batch(indices: list[int]) -> Callable[[OpCase], None]:
    def change(case: OpCase) -> None:
        for i in indices:
            case.args[i] = case.args[i][:0]
        if isinstance(case.cot, tuple):
            case.cot = tuple(None if c is None else c[:0] for c in case.cot)
        elif case.cot is not None and np.ndim(case.cot):
            case.cot = case.cot[:0]
    return change


def _label_out_of_range(y: np.ndarray) -> np.ndarray:
    y = y.copy()
    y[0] = _CLASSES  # the examples with labels have _CLASSES classes
    return y


def _label_negative(y: np.ndarray) -> np.ndarray:
    y = y.copy()
    y[0] = -1
    return y


def _repeated_labels(i: int) -> Callable[[OpCase], None]:
    """(B,) labels -> (B, 2) rows naming their class twice; an array cotangent (mask's) gains the K axis,
    so that the repeated class is the only thing wrong."""
    def change(case: OpCase) -> None:
        y = case.args[i].reshape(len(case.args[i]), -1)[:, :1]
        case.args[i] = np.ascontiguousarray(np.concatenate([y, y], axis=1))
        if isinstance(case.cot, np.ndarray) and case.cot.ndim == 2:
            case.cot = np.ascontiguousarray(np.stack([case.cot, case.cot], axis=1))
    return change


def _bad_cotangent(case: OpCase) -> None:
    if isinstance(case.cot, tuple):
        case.cot = (case.cot[0][None],) + tuple(case.cot[1:])
    elif np.ndim(case.cot) == 0:
        case.cot = np.ones(2, dtype=case.cot.dtype)
    else:
        case.cot = case.cot[None]


def _static(key: str, value: Any) -> Callable[[OpCase], None]:
    def change(case: OpCase) -> None:
        case.static[key] = value
    return change


# The examples below draw labels among this many classes (J); a label equal to it is out of range.
_CLASSES = 4


# ---------------------------------------------------------------------------------------- builders
def _scaled(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, dtype: str) -> np.ndarray:
    """Weights of N(0, 1/fan_in), as an initialiser would draw them."""
    return values(rng, shape, "normal", 0, dtype) / np.sqrt(fan_in).astype(dtype)


def _data(r: Mapping[str, Any], rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    scale = int(r.get("scale", 0))
    return values(rng, shape, r.get("kind", "normal"), scale, dtype, tuple(r.get("row_scales", (scale, scale))))


def _build_conv2d(r, dtype, rng):
    x = _data(r, rng, (r["B"], r["C"], r["H"], r["W"]), dtype)
    w = _scaled(rng, (r["O"], r["C"], r["kh"], r["kw"]), r["C"] * r["kh"] * r["kw"], dtype)
    b = values(rng, (r["O"],), "normal", -1, dtype)
    return [x, w, b], {"stride": r["stride"]}


def _build_squash(r, dtype, rng):
    return [_data(r, rng, tuple(r["shape"]), dtype)], {"axis": r.get("axis", -1)}


def _build_primary(r, dtype, rng):
    x = _data(r, rng, (r["B"], r["C"], r["H"], r["W"]), dtype)
    w = _scaled(rng, (r["T"] * r["D"], r["C"], r["kh"], r["kh"]), r["C"] * r["kh"] * r["kh"], dtype)
    b = values(rng, (r["T"] * r["D"],), "normal", -1, dtype)
    return [x, w, b], {"capsule_dim": r["D"], "stride": r["stride"]}


def _build_predictions(r, dtype, rng):
    u = _data(r, rng, (r["B"], r["N"], r["D"]), dtype)
    w = values(rng, (r["N"], r["J"], r["E"], r["D"]), "normal", int(r.get("weight_scale", 0)), dtype)
    return [u, w], {}


def _build_routing(r, dtype, rng):
    # Recipes saved before none_of_the_above existed lack the key: they meant the plain softmax.
    return [_data(r, rng, (r["B"], r["N"], r["J"], r["E"]), dtype)], {
        "iterations": r["iterations"], "none_of_the_above": bool(r.get("none_of_the_above", False))}


def _build_lengths(r, dtype, rng):
    return [_data(r, rng, tuple(r["shape"]), dtype)], {}


def _build_margin(r, dtype, rng):
    b, j, k = r["B"], r["J"], int(r.get("K", 0))
    if r.get("kind") == "satisfied":  # true lengths >= m+, every other <= m-: the loss is exactly 0
        labels = labels_for(rng, b, j, k)
        lengths = rng.uniform(0.0, r["m_minus"], size=(b, j))
        rows = labels.reshape(b, -1)
        lengths[np.arange(b)[:, None], rows] = rng.uniform(r["m_plus"], 1.0, size=rows.shape)
    else:
        lengths = rng.uniform(0.0, 1.0, size=(b, j))
        labels = labels_for(rng, b, j, k)
    static = {"m_plus": r["m_plus"], "m_minus": r["m_minus"], "lambda_": r["lambda_"]}
    return [np.ascontiguousarray(lengths.astype(dtype)), labels], static


def _build_mask(r, dtype, rng):
    v = _data(r, rng, (r["B"], r["J"], r["E"]), dtype)
    k = min(int(r.get("K", 0)), r["J"])
    return [v, labels_for(rng, r["B"], r["J"], k) if r.get("labels", True) else None], {}


def _build_decoder(r, dtype, rng):
    widths = list(r["widths"])
    k = int(r.get("K", 0))  # K > 0: x (B, K, width), one masked row per digit
    x = _data(r, rng, (r["B"], *((k,) if k else ()), widths[0]), dtype)
    ws = [_scaled(rng, (widths[k + 1], widths[k]), widths[k], dtype) for k in range(len(widths) - 1)]
    bs = [values(rng, (widths[k + 1],), "normal", -1, dtype) for k in range(len(widths) - 1)]
    return [x, ws, bs], {}


def _build_reconstruction(r, dtype, rng):
    digits = (int(r["K"]),) if int(r.get("K", 0)) else ()  # (B, K, ...): one reconstruction per digit
    images = values(rng, (r["B"], *digits, r["C"], r["H"], r["W"]), "zeros" if r.get("kind") == "zeros" else "unit",
                    0, dtype)
    recon = values(rng, (r["B"], *digits, r["C"] * r["H"] * r["W"]), "unit", 0, dtype)
    return [recon, images], {"scale": r["loss_scale"]}


# ---------------------------------------------------------------------------------------- the records
_COT = S.cotangents
_D = S.DTYPES

RECORDS: dict[str, OpRecord] = {rec.name: rec for rec in (
    OpRecord(
        "conv2d",
        recipes=lambda dt: S.recipe(S.seeds, S.values("linear", dt), S.batch, S.conv_geometry(False, 3),
                                    S.sizes(O=(1, 4)), _COT),
        build=_build_conv2d, levels=("contraction", "contraction"),
        example={"seed": 1, "B": 2, "C": 2, "H": 5, "W": 4, "kh": 3, "kw": 2, "stride": 1, "O": 3},
        forward_magnitude=mag.conv2d_forward, vjp_magnitude=mag.conv2d_vjp,
        batched=("x",), ranks={"x": 4, "weight": 4, "bias": 1}, finite=("x",),
        extra_errors=(ErrorInput("stride-zero", ("stride",), _static("stride", 0)),
                      ErrorInput("kernel-larger-than-x", ("weight", "x"),
                                 _on_arg(1, lambda w: np.concatenate([w] * 4, axis=2))))),
    OpRecord(
        "squash",
        recipes=lambda dt: S.recipe(S.seeds, S.values("domain", dt), S.capsule_shape(with_axis=True), _COT),
        build=_build_squash, levels=("elementwise", "elementwise"),
        example={"seed": 2, "shape": [2, 3, 4], "axis": -1},
        vjp_magnitude=mag.squash_vjp, finite=("s",),
        extra_errors=(ErrorInput("axis-out-of-range", ("axis",), _static("axis", 3)),)),
    OpRecord(
        "primary_capsules",
        recipes=lambda dt: S.recipe(S.seeds, S.values("linear", dt), S.batch, S.conv_geometry(True, 2),
                                    S.sizes(T=(1, 3), D=(1, 5)), _COT),
        build=_build_primary, levels=("contraction", "contraction"),
        example={"seed": 3, "B": 2, "C": 2, "H": 5, "W": 5, "kh": 3, "kw": 3, "stride": 2, "T": 2, "D": 3},
        forward_magnitude=mag.primary_forward, vjp_magnitude=mag.primary_vjp,
        batched=("h",), ranks={"h": 4, "weight": 4, "bias": 1}, finite=("h",),
        extra_errors=(ErrorInput("capsule-dim-not-dividing", ("capsule_dim", "weight"), _static("capsule_dim", 4)),
                      ErrorInput("stride-zero", ("stride",), _static("stride", 0)))),
    OpRecord(
        "predictions",
        recipes=lambda dt: S.recipe(S.seeds, S.values("linear", dt), S.batch,
                                    S.sizes(N=(1, 10), D=(1, 6), J=(2, 5), E=(1, 6)), _COT),
        build=_build_predictions, levels=("contraction", "contraction"),
        example={"seed": 4, "B": 2, "N": 5, "D": 3, "J": 4, "E": 2},
        forward_magnitude=mag.predictions_forward, vjp_magnitude=mag.predictions_vjp,
        batched=("u",), ranks={"u": 3, "weight": 4}, finite=("u",),
        extra_errors=(ErrorInput("children-mismatch", ("weight", "u"), _on_arg(1, lambda w: w[:-1])),)),
    OpRecord(
        "routing",
        recipes=lambda dt: S.recipe(S.seeds, S.values("routing", dt), S.batch,
                                    S.sizes(N=(1, 12), J=(2, 6), E=(1, 6), iterations=(1, 5)), S.none_of_the_above,
                                    _COT),
        build=_build_routing, levels=("routing", "routing"),
        example={"seed": 5, "B": 2, "N": 5, "J": 3, "E": 2, "iterations": 3},
        vjp_magnitude=mag.routing_vjp,
        batched=("u_hat",), ranks={"u_hat": 4}, finite=("u_hat",),
        extra_errors=(ErrorInput("iterations-zero", ("iterations",), _static("iterations", 0)),
                      ErrorInput("none-of-the-above-not-bool", ("none_of_the_above",),
                                 _static("none_of_the_above", 2)))),
    OpRecord(
        "capsule_lengths",
        recipes=lambda dt: S.recipe(S.seeds, S.values("domain", dt), S.capsule_shape(with_axis=False), _COT),
        build=_build_lengths, levels=("reduction", "elementwise"),
        example={"seed": 6, "shape": [2, 3, 4]}, finite=("v",),
        extra_errors=(ErrorInput("v-0d", ("v",), _on_arg(0, lambda v: v.reshape(-1)[0].copy())),)),
    OpRecord(
        "margin_loss",
        recipes=lambda dt: S.recipe(S.seeds, S.batch, S.sizes(J=(2, 12)), S.margins(), S.label_rows, _COT,
                                    kind="uniform"),
        build=_build_margin, levels=("reduction", "elementwise"),
        example={"seed": 7, "B": 3, "J": _CLASSES, "kind": "uniform", "m_plus": 0.9, "m_minus": 0.1, "lambda_": 0.5},
        batched=("lengths", "labels"), ranks={"lengths": 2}, finite=("lengths",), labels="labels"),
    OpRecord(
        "mask",
        recipes=lambda dt: S.recipe(S.seeds, S.values("domain", dt), S.batch, S.sizes(J=(2, 8), E=(1, 6)),
                                    st.fixed_dictionaries({"labels": st.booleans()}), S.label_rows, _COT),
        build=_build_mask, levels=("exact", "exact"),
        example={"seed": 8, "B": 3, "J": _CLASSES, "E": 2, "labels": True},
        batched=("v", "labels"), ranks={"v": 3}, finite=("v",), labels="labels"),
    OpRecord(
        "decoder",
        recipes=lambda dt: S.recipe(S.seeds, S.values("decoder", dt), S.batch, S.shapes(st.fixed_dictionaries(
            {"widths": st.lists(st.integers(1, 10), min_size=2, max_size=4)}),
            [{"widths": [5, 3, 7]}, {"widths": [1, 1]}, {"widths": [10, 10, 10, 10]}, {"widths": [10, 1, 10]}]),
            S.label_rows, _COT),
        build=_build_decoder, levels=("contraction", "contraction"),
        example={"seed": 9, "B": 2, "widths": [4, 3, 5]},
        forward_magnitude=mag.decoder_forward, vjp_magnitude=mag.decoder_vjp,
        batched=("x",), finite=("x",),  # x is (..., width) of at least 2 dims: a 1-d x is the bad rank
        extra_errors=(ErrorInput("x-rank", ("x",), _on_arg(0, lambda x: x.reshape(-1))),
                      ErrorInput("biases-missing-layer", ("biases", "weights"), _on_arg(2, lambda bs: bs[:-1])),
                      ErrorInput("weights-misshapen", ("weights",), _on_arg(1, lambda ws: [ws[0][:, :-1]] + ws[1:])))),
    OpRecord(
        "reconstruction_loss",
        recipes=lambda dt: S.recipe(S.seeds, S.batch, S.sizes(C=(1, 2), H=(1, 6), W=(1, 6)), st.fixed_dictionaries(
            {"kind": st.sampled_from(("unit", "zeros")), "loss_scale": st.sampled_from((0.0005, 1.0, 0.01))}),
            S.label_rows, _COT),
        build=_build_reconstruction, levels=("reduction", "elementwise"),
        example={"seed": 10, "B": 2, "C": 1, "H": 3, "W": 2, "kind": "unit", "loss_scale": 0.0005},
        batched=("reconstruction", "images"), finite=("reconstruction", "images"),
        # reconstruction is (B, C*H*W) or (B, K, C*H*W): a 4-d one is the bad rank.
        extra_errors=(ErrorInput("reconstruction-rank", ("reconstruction",), _on_arg(0, lambda r: r[None, None])),
                      ErrorInput("images-size-mismatch", ("images", "reconstruction"),
                                 _on_arg(1, lambda im: im[:, :, :-1])),
                      ErrorInput("images-digits-mismatch", ("images", "reconstruction"),
                                 _on_arg(1, lambda im: np.stack([im, im], axis=1))))),
)}

assert set(RECORDS) == {op.name for op in OPS}, "every op of capsspec.spec.OPS needs exactly one record"


def record(name: str) -> OpRecord:
    if name not in RECORDS:
        raise ValueError(f"op must be one of {sorted(RECORDS)}, got {name!r}")
    return RECORDS[name]


def op_of(name: str) -> str | None:
    """The op whose forward or VJP spec name `name` is (squash for squash_vjp); None for the model's
    and the optimizer's names."""
    if name in RECORDS:
        return name
    if name.endswith("_vjp") and name[:-4] in RECORDS:
        return name[:-4]
    return None


def op_case(name: str, r: Mapping[str, Any], dtype: str) -> OpCase:
    """The inputs of op `name` described by recipe `r`, in `dtype`, with a cotangent for its VJP
    (shaped like the reference's output on those inputs)."""
    args, static = record(name).build(r, dtype, generator(r["seed"]))
    case = OpCase(name, args, static)
    ref_out = getattr(ref_ops, name)(*case.ref_args, **static)
    case.cot = cotangent(r, ref_out, dtype)
    case.ref_cot = widen(case.cot)
    return case


# ---------------------------------------------------------------------------------------- model errors
@dataclass
class ModelErrorCase:
    """A valid model-level call's inputs (NumPy), changed by a model error input before use."""

    config: Any
    params: dict[str, np.ndarray]
    x: np.ndarray
    labels: np.ndarray
    grads: dict[str, np.ndarray]
    state: dict[str, Any]  # NumPy, for state_from_numpy
    call_config: Any = None  # the config passed to the call (None: the params' own)
    targets: np.ndarray | None = None  # passed to loss, value_and_grad and train_step (None: x)


def _x(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[ModelErrorCase], None]:
    def change(case: ModelErrorCase) -> None:
        case.x = f(case.x)
    return change


def _labels(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[ModelErrorCase], None]:
    def change(case: ModelErrorCase) -> None:
        case.labels = f(case.labels)
    return change


def _two_digits(targets: Callable[[ModelErrorCase, np.ndarray], np.ndarray | None],
                repeat: bool = False) -> Callable[[ModelErrorCase], None]:
    """(B, 2) labels (each row's class and the next one, or the same one twice if `repeat`) with the
    targets that `targets` makes from valid ones (B, 2, C, H, W): MultiMNIST's inputs, one thing wrong."""
    def change(case: ModelErrorCase) -> None:
        y = case.labels
        case.labels = np.stack([y, y if repeat else (y + 1) % case.config.num_classes], axis=1)
        case.targets = targets(case, np.ascontiguousarray(np.stack([case.x, case.x[::-1]], axis=1)))
    return change


def _other_config(case: ModelErrorCase) -> None:
    case.call_config = type(case.config).from_dict(dict(case.config.to_dict(),
                                                        num_classes=case.config.num_classes + 1))


def _not_a_config(case: ModelErrorCase) -> None:
    case.call_config = case.config.to_dict()


def _dict_change(attr: str, how: str) -> Callable[[ModelErrorCase], None]:
    def change(case: ModelErrorCase) -> None:
        d = dict(getattr(case, attr))
        first = next(iter(d))
        if how == "missing":
            del d[first]
        elif how == "extra":
            d["surplus.weight"] = d[first].copy()
        elif how == "misshapen":
            d[first] = d[first][..., :-1] if d[first].shape[-1] > 1 else np.concatenate([d[first]] * 2, axis=-1)
        else:  # integer dtype
            d[first] = np.round(d[first]).astype(np.int64)
        setattr(case, attr, d)
    return change


def _state_misshapen(case: ModelErrorCase) -> None:
    s = copy.deepcopy(case.state)
    first = next(iter(s["m"]))
    s["m"][first] = s["m"][first][..., :-1] if s["m"][first].shape[-1] > 1 else np.concatenate(
        [s["m"][first]] * 2, axis=-1)
    case.state = s


_X_ERRORS = (
    ErrorInput("x-rank", ("x",), _x(lambda x: x[0])),
    ErrorInput("x-shape", ("x",), _x(lambda x: x[:, :, :-1])),
    ErrorInput("x-int-dtype", ("x",), _x(lambda x: np.round(x).astype(np.int64))),
    ErrorInput("x-other-float", ("x",), _x(lambda x: x.astype(np.float64 if x.dtype == np.float32 else np.float32))),
    ErrorInput("x-nan", ("x",), _x(_poison(np.nan))),
    ErrorInput("x-inf", ("x",), _x(_poison(np.inf))),
    ErrorInput("empty-batch", ("x",), lambda c: (_x(lambda x: x[:0])(c), _labels(lambda y: y[:0])(c))),
)
_LABEL_ERRORS = (
    ErrorInput("labels-out-of-range", ("labels",), lambda c: _labels(lambda y: np.where(
        np.arange(len(y)) == 0, c.config.num_classes, y))(c)),
    ErrorInput("labels-negative", ("labels",), _labels(_label_negative)),
    ErrorInput("labels-float", ("labels",), _labels(lambda y: y.astype(np.float32))),
    ErrorInput("labels-shape", ("labels",), _labels(lambda y: np.concatenate([y, y[:1]]))),
)
# (B, K) labels: a row naming a class twice; and the targets that must come with them.
_TWO_DIGIT_LABEL_ERRORS = (
    ErrorInput("labels-repeated", ("labels",), _two_digits(lambda c, t: t, repeat=True)),
    ErrorInput("labels-rank", ("labels",), _labels(lambda y: y[:, None, None])),
)
_TARGET_ERRORS = (
    ErrorInput("targets-missing", ("targets",), _two_digits(lambda c, t: None)),
    ErrorInput("targets-one-digit", ("targets",), _two_digits(lambda c, t: np.ascontiguousarray(t[:, :1]))),
    ErrorInput("targets-shape", ("targets",), _two_digits(lambda c, t: np.ascontiguousarray(t[..., :-1]))),
    ErrorInput("targets-other-float", ("targets", "x"), _two_digits(lambda c, t: _other_float(t))),
    ErrorInput("targets-nan", ("targets",), _two_digits(lambda c, t: _poison(np.nan)(t))),
)
_CONFIG_ERRORS = (
    ErrorInput("config-mismatch", ("config", "params"), _other_config),
    ErrorInput("config-not-a-config", ("config",), _not_a_config),
)
_PARAMS_ERRORS = tuple(ErrorInput(f"params-{how}-entry", ("params",), _dict_change("params", how))
                       for how in ("missing", "extra", "misshapen", "int")) + (
    ErrorInput("params-config-mismatch", ("params", "config"), _other_config),)

# The model and optimizer functions, and the conversions that take a parameter dict or a state.
MODEL_ERRORS: dict[str, tuple[ErrorInput, ...]] = {
    "forward": _X_ERRORS + _LABEL_ERRORS + _TWO_DIGIT_LABEL_ERRORS + _CONFIG_ERRORS,
    "loss": _X_ERRORS + _LABEL_ERRORS + _TWO_DIGIT_LABEL_ERRORS + _TARGET_ERRORS + _CONFIG_ERRORS,
    "value_and_grad": _X_ERRORS + _LABEL_ERRORS + _TWO_DIGIT_LABEL_ERRORS + _TARGET_ERRORS + _CONFIG_ERRORS,
    "predict": _X_ERRORS + _CONFIG_ERRORS,
    "adam_update": tuple(ErrorInput(f"grads-{how}-entry", ("grads",), _dict_change("grads", how))
                         for how in ("missing", "extra", "misshapen")) + (
        ErrorInput("state-misshapen-moment", ("state",), _state_misshapen),),
    "train_step": _X_ERRORS + _LABEL_ERRORS + _TWO_DIGIT_LABEL_ERRORS + _TARGET_ERRORS + _CONFIG_ERRORS,
    "params_from_numpy": _PARAMS_ERRORS,
}


def error_ids() -> list[tuple[str, str]]:
    """(spec name or conversion, error id) for every error input of the suite, ops' VJPs included."""
    out = []
    for rec in RECORDS.values():
        for e in rec.errors():
            if not e.vjp_only:
                out.append((rec.name, e.id))
            out.append((rec.spec.vjp_name, e.id))
    for name, errs in MODEL_ERRORS.items():
        out += [(name, e.id) for e in errs]
    return out
