"""The pieces of a user's CapsNet that check_op holds to the reference: what is drawn for each, how the
reference's inputs reach the user's function in the user's layout, and how its outputs come back.

Every piece reuses its op's record (records.py): the same recipes (strategies.py's building blocks),
the same case builder, tolerance levels and magnitude functions as a backend's op checks. What a
piece adds is the user's side: a fixed rank of the capsule tensors (the layout names each axis),
the paper's constants where the user's code has them built in (margins, reconstruction scale),
labels as indices or one-hot rows, and the routing iterations as a fixed number or a keyword.

What this module must never do: compute anything the reference does not (the expected values
are capsspec.ops's), or call the user's function (own.py does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from hypothesis import strategies as st

from capsspec import ops as ref_ops

from . import own_head
from . import strategies as S
from .cases import OpCase, cotangent, generator, widen
from .check_kit import reference_float32
from .layouts import Layout
from .records import record

__all__ = ["PIECES", "Options", "Draw", "piece_recipes", "draw_case", "user_args", "outputs_to_canonical",
           "cotangents_to_user", "grads_to_canonical", "with_iterations", "check_order", "levels"]

PAPER_MARGINS = own_head.PAPER_MARGINS

# piece -> (tensors given to the user's function, in order; tensors it returns; indices of the inputs
# that are differentiated). "labels" is an input that is never differentiated.
PIECES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]] = {
    "squash": (("s",), ("v",), (0,)),
    "capsule_lengths": (("v",), ("lengths",), (0,)),
    "predictions": (("u", "weight"), ("u_hat",), (0, 1)),
    "routing": (("u_hat",), ("v", "c"), (0,)),
    "margin_loss": (("lengths", "labels"), ("loss",), (0,)),
    "mask": (("v", "labels"), ("masked",), (0,)),
    "reconstruction_loss": (("reconstruction", "images"), ("loss",), (0,)),
    "capsule_head": (("u", "weight", "labels"), ("lengths", "loss"), (0, 1)),
}


@dataclass(frozen=True)
class Options:
    """What the user told check_op about their function beyond its layout."""

    layout: Layout
    labels: str = "index"  # "index": (B,) integers; "onehot": (B, J) floats in the layout's order
    iterations: int | str = 3  # a fixed count, or the keyword of the user's function that takes it
    scale: float = 0.0005  # the reconstruction loss's scale built into the user's function
    inference: bool = True  # mask: also call fn(v) without labels (the longest capsule is kept)
    outputs: int = 0  # how many outputs the user's function returns (routing: 1 for v alone); 0: all
    order: tuple[str, ...] = ()  # the user's order of the inputs, e.g. ("labels", "lengths"); (): PIECES's
    extremes: bool = True  # draw the edges of the float range; False: log10 scales within +-MODERATE


@dataclass
class Draw:
    """One drawn case: the reference's inputs, outputs and gradients, canonical; the user's inputs."""

    piece: str
    recipe: dict[str, Any]
    case: OpCase
    ref_out: list[Any] = field(default_factory=list)  # float64, canonical, one per output
    ref32_out: list[Any] = field(default_factory=list)
    cots: list[Any] = field(default_factory=list)  # canonical cotangents in the dtype under test
    ref_grads: list[Any] = field(default_factory=list)  # float64, canonical, one per wrt input
    ref32_grads: list[Any] = field(default_factory=list)
    magnitudes: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the iteration count drawn


# ---------------------------------------------------------------------------------------- recipes
MODERATE = 6  # |log10 scale| of the values drawn with extremes=False


def _moderate(r: dict[str, Any]) -> dict[str, Any]:
    """The recipe with its value scales clipped to +-MODERATE (the same draws otherwise)."""
    out = dict(r)
    if "scale" in out:
        out["scale"] = max(-MODERATE, min(MODERATE, int(out["scale"])))
    if "row_scales" in out:
        out["row_scales"] = [max(-MODERATE, min(MODERATE, int(x))) for x in out["row_scales"]]
    return out


def piece_recipes(piece: str, dtype: str, opts: Options) -> st.SearchStrategy[dict[str, Any]]:
    """The recipes of a piece: its record's building blocks, with the user's fixed rank and constants."""
    recipes = _recipes(piece, dtype, opts)
    return recipes if opts.extremes else recipes.map(_moderate)


def _shape3(r: dict[str, Any]) -> dict[str, Any]:
    return {**r, "shape": [r["B"], r["N"], r["D"]], "axis": -1}


def levels(piece: str) -> tuple[str, str]:
    """The tolerance levels of a piece's values and gradients: its op record's, the model's for the head."""
    return own_head.LEVELS if piece == "capsule_head" else record(piece).levels


def _recipes(piece: str, dtype: str, opts: Options) -> st.SearchStrategy[dict[str, Any]]:
    if piece == "capsule_head":
        return own_head.head_recipes(dtype, None if isinstance(opts.iterations, str) else opts.iterations)
    cot = S.cotangents
    if piece in ("squash", "capsule_lengths"):
        return S.recipe(S.seeds, S.values("domain", dtype), S.sizes(B=(1, 4), N=(1, 6), D=(1, 16)), cot).map(_shape3)
    if piece == "routing":
        # A user's routing is the paper's MNIST routing: the record also draws the section-7 variant
        # with a none-of-the-above outlet (none_of_the_above), which no user function is asked for.
        base = record("routing").recipes(dtype).map(lambda r: {**r, "none_of_the_above": False})
        return base if isinstance(opts.iterations, str) else base.map(lambda r: {**r, "iterations": opts.iterations})
    if piece == "margin_loss":
        return S.recipe(S.seeds, S.batch, S.sizes(J=(2, 12)), cot, kind="uniform", K=0, **PAPER_MARGINS)
    if piece == "mask":
        return S.recipe(S.seeds, S.values("domain", dtype), S.batch, S.sizes(J=(2, 8), E=(1, 6)), cot, K=0,
                        labels=True)
    if piece == "reconstruction_loss":
        return S.recipe(S.seeds, S.batch, S.sizes(C=(1, 3), H=(1, 6), W=(1, 6)), cot,
                        st.fixed_dictionaries({"kind": st.sampled_from(("unit", "zeros"))}), K=0, loss_scale=opts.scale)
    return record(piece).recipes(dtype)


# ---------------------------------------------------------------------------------------- the reference side
def _reference(piece: str) -> tuple[Any, Any, Any, Any]:
    """(build, forward, vjp, vjp magnitude) of a piece: its op record's and capsspec.ops's, or the head's."""
    if piece == "capsule_head":
        return own_head.build_head, own_head.head, own_head.head_vjp, None
    rec = record(piece)
    return rec.build, getattr(ref_ops, piece), getattr(ref_ops, f"{piece}_vjp"), rec.vjp_magnitude


def _as_list(out: Any, n: int) -> list[Any]:
    if out is None:
        return [None] * n
    return list(out) if isinstance(out, tuple) else [out]


def draw_case(piece: str, recipe: Mapping[str, Any], dtype: str, outputs: int = 0) -> Draw:
    """The reference's inputs, outputs, cotangents and gradients for one recipe (canonical axes); with
    `outputs` n > 0 the user's function returns the first n outputs only, and the others get no cotangent."""
    build, fwd, bwd, vjp_magnitude = _reference(piece)
    args, static = build(recipe, dtype, generator(recipe["seed"]))
    case = OpCase(piece, args, static)
    d = Draw(piece, dict(recipe), case)
    out = fwd(*case.ref_args, **static)
    outs = _as_list(out, 1)
    outs32 = _as_list(reference_float32(fwd, *case.ref_args, **static), len(outs))
    if piece == "mask":  # (B, J*E) -> the masked capsules (B, J, E)
        shape = case.args[0].shape
        outs, outs32 = [outs[0].reshape(shape)], [None if outs32[0] is None else outs32[0].reshape(shape)]
    d.ref_out, d.ref32_out = outs, outs32
    if piece == "capsule_head":  # one cotangent per output: the lengths' and the loss's
        d.cots = [cotangent(recipe, o, dtype) for o in outs]
    else:
        cot = cotangent(recipe, out, dtype)
        d.cots = list(cot) if isinstance(cot, tuple) else [cot]
    if piece == "mask":
        d.cots = [d.cots[0].reshape(case.args[0].shape)]
    if outputs:
        d.cots = d.cots[:outputs] + [None] * (len(d.cots) - outputs)
    ref_cot = tuple(None if c is None else widen(c) for c in d.cots) if len(d.cots) > 1 else widen(d.cots[0])
    if piece == "mask":
        ref_cot = ref_cot.reshape(len(ref_cot), -1)
    d.ref_grads = list(bwd(ref_cot, *case.ref_args, **static))
    d.ref32_grads = _as_list(reference_float32(bwd, ref_cot, *case.ref_args, **static), len(d.ref_grads))
    d.magnitudes = (list(vjp_magnitude(ref_cot, case.ref_args, static)) if vjp_magnitude
                    else [None] * len(d.ref_grads))
    return d


# ---------------------------------------------------------------------------------------- the user's side
def _labels_to_user(labels: np.ndarray, classes: int, dtype: str, opts: Options) -> np.ndarray:
    if opts.labels == "index":
        return labels
    onehot = (labels[:, None] == np.arange(classes)).astype(dtype)
    return opts.layout.to_user("labels", onehot) if "labels" in opts.layout.order else onehot


def _image_shape(case: OpCase) -> tuple[int, ...]:
    return tuple(case.args[1].shape)


def user_args(d: Draw, dtype: str, opts: Options, with_labels: bool = True) -> list[Any]:
    """The arguments of the user's function for draw d, in the user's layout."""
    lay, a = opts.layout, d.case.args
    p = d.piece
    if p in ("squash", "capsule_lengths"):
        return [lay.to_user("s" if p == "squash" else "v", a[0])]
    if p == "predictions":
        return [lay.to_user("u", a[0]), lay.to_user("weight", a[1])]
    if p == "routing":
        return [lay.to_user("u_hat", a[0])]
    if p == "capsule_head":
        return [lay.to_user("u", a[0]), lay.to_user("weight", a[1]), _labels_to_user(a[2], a[1].shape[1], dtype, opts)]
    if p == "margin_loss":
        return [lay.to_user("lengths", a[0]), _labels_to_user(a[1], a[0].shape[1], dtype, opts)]
    if p == "mask":
        v = lay.to_user("v", a[0])
        return [v, _labels_to_user(a[1], a[0].shape[1], dtype, opts)] if with_labels else [v]
    images = lay.to_user("images", a[1])  # reconstruction_loss: the reconstruction flattened in the images' order
    recon = lay.to_user("reconstruction", a[0].reshape(_image_shape(d.case)))
    return [recon.reshape(len(recon), -1), images]


def _expected_shape(d: Draw, tensor: str) -> tuple[int, ...]:
    if d.piece == "mask":
        return tuple(d.case.args[0].shape)
    if d.piece == "reconstruction_loss":
        return _image_shape(d.case)
    return tuple(np.shape(d.ref_out[d_index(d, tensor)]))


def d_index(d: Draw, tensor: str) -> int:
    return PIECES[d.piece][1].index(tensor)


def outputs_to_canonical(d: Draw, outs: Any, opts: Options, what: str) -> list[np.ndarray]:
    """The user's outputs in the canonical layout; ValueError naming the axis where they do not fit it."""
    names = PIECES[d.piece][1][:opts.outputs or None]
    got = list(outs) if isinstance(outs, tuple) else [outs]
    if len(got) != len(names):
        raise ValueError(f"{what} returned {len(got)} output(s), expected {len(names)} ({', '.join(names)}); "
                         f"pass outputs=1 if it returns {names[0]} alone")
    out = []
    for name, g in zip(names, got):
        g = np.asarray(g)
        if name == "loss":
            if g.size != 1:
                raise ValueError(f"{what} returned a loss of shape {g.shape}; expected a scalar (the batch's loss)")
            out.append(g.reshape(()))
            continue
        expected = _expected_shape(d, name)
        if d.piece == "mask" and g.ndim == 2:  # flattened: from the user's own order of the masked capsules
            user_shape = tuple(expected[opts.layout.perm("masked")[k]] for k in range(3))
            if g.shape[1:] == (int(np.prod(user_shape[1:])),):
                g = g.reshape(user_shape)
        out.append(opts.layout.to_canonical(name, g, expected, f"{what}'s {name}"))
    return out


def cotangents_to_user(d: Draw, opts: Options) -> list[Any]:
    """The canonical cotangents of the user's outputs, in the user's layout."""
    names = PIECES[d.piece][1][:opts.outputs or None]
    out = []
    for name, c in zip(names, d.cots):
        if c is None or name == "loss":
            out.append(c)
        else:
            out.append(opts.layout.to_user(name, c))
    return out


def grads_to_canonical(d: Draw, grads: list[Any], opts: Options) -> list[Any]:
    """The user's gradients (one per differentiated input, user layout) in the canonical layout."""
    inputs = PIECES[d.piece][0]
    out = []
    for i, g in zip(PIECES[d.piece][2], grads):
        if g is None:
            out.append(None)
            continue
        name = inputs[i]
        canon = d.case.args[i]
        if d.piece == "reconstruction_loss":
            user_shape = opts.layout.to_user("images", d.case.args[1]).shape
            g = opts.layout.to_canonical("reconstruction", np.asarray(g).reshape(user_shape), _image_shape(d.case),
                                         "the gradient").reshape(canon.shape)
        else:
            g = opts.layout.to_canonical(name, np.asarray(g), canon.shape, f"the gradient for {name}")
        out.append(np.ascontiguousarray(g))
    return out


def with_iterations(fn: Callable[..., Any], d: Draw, opts: Options) -> Callable[..., Any]:
    """The user's function called with the inputs in PIECES's order: the drawn iteration count passed where
    their routing takes it as a keyword, the inputs reordered where they take them in another order."""
    if opts.order and tuple(opts.order) != PIECES[d.piece][0][:len(opts.order)]:
        perm = [PIECES[d.piece][0].index(n) for n in opts.order]
        inner = fn
        fn = lambda *a: inner(*[a[i] for i in perm]) if len(a) == len(perm) else inner(*a)  # noqa: E731
    if d.piece not in ("routing", "capsule_head") or not isinstance(opts.iterations, str):
        return fn
    k = int(d.case.static["iterations"])
    return lambda *a: fn(*a, **{opts.iterations: k})


def check_order(piece: str, order: Any) -> tuple[str, ...]:
    """The user's order of a piece's inputs, checked: every input named once (ValueError otherwise)."""
    if not order:
        return ()
    names = tuple(n.strip() for n in (order.split(",") if isinstance(order, str) else order))
    if sorted(names) != sorted(PIECES[piece][0]):
        raise ValueError(f"order must name the inputs of {piece} once each ({', '.join(PIECES[piece][0])}), "
                         f"got {', '.join(names)}")
    return names
