"""Named axes: the user states the order of their tensors' axes once, and the check permutes.

A layout is a string of axis names separated by spaces or commas, e.g. "batch in_caps classes dim".
Each op has canonical axes (the reference's order, AXES below); the user's string orders all of
them, and every tensor of the op takes the axes it has in that order: with routing's layout
"batch classes in_caps dim", u_hat is (B, J, N, E), v is (B, J, E) and c is (B, J, N). A tensor
whose order is not that restriction gets its own string (layout={"weight": "..."}).

The names, with the short forms accepted for each:

    batch      b, n_batch                        the examples of a batch
    in_caps    i, n, children, inputs, primary   the lower capsules (routing's children)
    classes    j, k, parents, out_caps, digits   the class capsules (routing's parents)
    caps       capsules, and any of the above    squash's and capsule_lengths' capsule axis
    dim        d, e, dims, atoms                 a capsule's dimension
    in_dim     d                                 predictions: the lower capsules' dimension
    out_dim    e                                 predictions: the class capsules' dimension
    channels   c, ch                             images: colour channels
    height     h, rows                           images
    width      w, cols                           images

What this module must never do: guess an order the user did not state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["AXES", "ALIASES", "Layout", "parse"]

# The canonical axes of each tensor of each op (the reference's order).
AXES: dict[str, dict[str, tuple[str, ...]]] = {
    "squash": {"s": ("batch", "caps", "dim"), "v": ("batch", "caps", "dim")},
    "capsule_lengths": {"v": ("batch", "caps", "dim"), "lengths": ("batch", "caps")},
    "predictions": {"u": ("batch", "in_caps", "in_dim"), "weight": ("in_caps", "classes", "out_dim", "in_dim"),
                    "u_hat": ("batch", "in_caps", "classes", "out_dim")},
    "routing": {"u_hat": ("batch", "in_caps", "classes", "dim"), "v": ("batch", "classes", "dim"),
                "c": ("batch", "in_caps", "classes")},
    "margin_loss": {"lengths": ("batch", "classes"), "labels": ("batch", "classes")},
    "mask": {"v": ("batch", "classes", "dim"), "masked": ("batch", "classes", "dim")},
    "capsule_head": {"u": ("batch", "in_caps", "in_dim"), "weight": ("in_caps", "classes", "out_dim", "in_dim"),
                     "lengths": ("batch", "classes"), "labels": ("batch", "classes")},
    "reconstruction_loss": {"images": ("batch", "channels", "height", "width"),
                            "reconstruction": ("batch", "channels", "height", "width")},
}

ALIASES: dict[str, tuple[str, ...]] = {
    "batch": ("b", "n_batch", "examples"),
    "in_caps": ("i", "n", "children", "inputs", "primary", "in", "input_caps", "num_caps"),
    "classes": ("j", "k", "parents", "out_caps", "digits", "out", "output_caps", "num_classes"),
    "caps": ("capsules",),
    "dim": ("d", "e", "dims", "atoms", "dimension"),
    "in_dim": ("d", "in_dims"),
    "out_dim": ("e", "out_dims"),
    "channels": ("c", "ch", "channel"),
    "height": ("h", "rows"),
    "width": ("w", "cols"),
}


def _canonical(name: str, axes: set[str]) -> str | None:
    """The op's axis that the user's `name` stands for (None: no such axis in this op)."""
    if name in axes:
        return name
    for axis in sorted(axes):
        if name in ALIASES.get(axis, ()):
            return axis
    if "caps" in axes and (name in ("in_caps", "classes") or any(name in ALIASES[a] for a in ("in_caps", "classes"))):
        return "caps"  # squash and lengths: any capsule axis is "the capsules"
    return None


def _op_axes(op: str) -> list[str]:
    seen: list[str] = []
    for axes in AXES[op].values():
        seen += [a for a in axes if a not in seen]
    return seen


def _names(text: str) -> list[str]:
    return [n for n in re.split(r"[\s,]+", text.strip().lower()) if n]


@dataclass(frozen=True)
class Layout:
    """The user's order of an op's axes; `order[tensor]` is each tensor's axes in the user's order."""

    op: str
    text: str
    order: Mapping[str, tuple[str, ...]]

    def perm(self, tensor: str) -> tuple[int, ...]:
        """The transpose that takes the canonical array of `tensor` to the user's order."""
        canon = AXES[self.op][tensor]
        return tuple(canon.index(a) for a in self.order[tensor])

    def to_user(self, tensor: str, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(a, self.perm(tensor)))

    def to_canonical(self, tensor: str, a: np.ndarray, expected: Sequence[int], what: str) -> np.ndarray:
        """The user's array of `tensor` in the canonical order; ValueError naming the axis whose size (or the
        rank) does not match the layout. `expected` is the canonical shape."""
        user_axes = self.order[tensor]
        want = tuple(int(expected[AXES[self.op][tensor].index(x)]) for x in user_axes)
        a = np.asarray(a)
        if a.ndim != len(want):
            raise ValueError(f"{what} has rank {a.ndim} (shape {tuple(a.shape)}), but layout {self.text!r} gives "
                             f"{tensor} {len(want)} axes ({' '.join(user_axes)}, shape {want})")
        for axis, got, size in zip(user_axes, a.shape, want):
            if got != size:
                raise ValueError(f"{what} has shape {tuple(a.shape)}, but layout {self.text!r} expects {want}: "
                                 f"axis {axis!r} has size {got}, expected {size}")
        inverse = np.argsort(self.perm(tensor))
        return np.transpose(a, inverse)


def parse(op: str, layout: str | Mapping[str, str] | None) -> Layout:
    """The user's layout of op `op`: a string naming every axis of the op once (None: the reference's
    order), or a dict {tensor or "*": string} for tensors whose order is not the string's restriction."""
    if op not in AXES:
        raise ValueError(f"op must be one of {sorted(AXES)}, got {op!r}")
    axes = _op_axes(op)
    texts = dict(layout) if isinstance(layout, Mapping) else {"*": layout or " ".join(axes)}
    base = texts.pop("*", None) or " ".join(axes)
    unknown = sorted(set(texts) - set(AXES[op]))
    if unknown:
        raise ValueError(f"layout names tensor {unknown[0]!r}, which {op} does not have (its tensors: "
                         f"{', '.join(AXES[op])})")
    order = {t: _order(op, base, set(axes), axes, t) for t in AXES[op]}
    for tensor, text in texts.items():
        order[tensor] = _order(op, text, set(AXES[op][tensor]), list(AXES[op][tensor]), tensor, exact=True)
    shown = base if not texts else f"{base}; " + "; ".join(f"{t}: {x}" for t, x in texts.items())
    return Layout(op, shown, order)


def _order(op: str, text: str, axes: set[str], listed: list[str], tensor: str, exact: bool = False) -> tuple[str, ...]:
    names = _names(text)
    mapped = []
    for n in names:
        axis = _canonical(n, axes)
        if axis is None:
            raise ValueError(f"layout {text!r}: unknown axis {n!r} for {op} (its axes: {', '.join(listed)}; "
                             f"see docs/check-your-own.md#layouts)")
        if axis in mapped:
            raise ValueError(f"layout {text!r}: axis {axis!r} is named twice")
        mapped.append(axis)
    missing = [a for a in listed if a not in mapped]
    if missing:
        raise ValueError(f"layout {text!r} does not name axis {missing[0]!r} of {op} (its axes: {', '.join(listed)})")
    if exact:
        return tuple(mapped)
    return tuple(a for a in mapped if a in AXES[op][tensor])
