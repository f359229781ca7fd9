"""A user's parameter names and axis orders, to and from capsspec's canonical parameters (pure NumPy).

A whole-model check (user_model.py) and `capsspec import` (capsspec/tools/import_weights.py) read
one mapping: which of the user's parameters is which canonical parameter
(CapsNetConfig.param_shapes), and in which axis order the user stores it. Axis orders are
*layouts*: space-separated axis names, a parenthesised group for axes flattened into one, and
"1" for an axis of size 1. Each kind of parameter has its names and its canonical layout:

    conv   (conv1.weight, primary.weight)  "out in kh kw"     (Keras: "kh kw in out")
    dense  (decoder.K.weight)              "out in"           (Keras, JAX: "in out")
    bias   (every .bias)                   "out"
    digit  (digit.weight)                  "in_caps classes out_dim in_dim", in_caps = (types h w)
                                           (e.g. "1 in_caps classes out_dim in_dim", or
                                           "classes in_caps out_dim in_dim")

PrimaryCaps' "out" is the group "(types dim)" (channel t*D + d, docs/spec.md section 6), so a
model whose channels are dimension-major writes "(dim types) in kh kw". Layouts serve the
model's outputs too (user_model.py): the same engine, `convert`, with other axis names.

A mapping file is JSON or TOML (docs/import-your-model.md):

    [layouts]            # per kind; leave out what is canonical
    conv = "kh kw in out"
    dense = "in out"
    [params]             # the user's name = the canonical name, or {name = ..., layout = ...}
    "conv1/kernel" = "conv1.weight"
    [config]             # CapsNetConfig fields that differ from the paper's
    conv1_channels = 64
    ignore = ["routing/b"]   # (top level) user entries that are not parameters of the model

Every refusal is one ValueError naming the parameter, what was expected and what came.
This module imports NumPy and capsspec's root only.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from capsspec.config import CapsNetConfig

__all__ = ["KIND_AXES", "ParamMapping", "MappingEntry", "convert", "layout_shape", "parse_mapping", "load_mapping",
           "kind_of"]

KIND_AXES = {"conv": "out in kh kw", "dense": "out in", "bias": "out", "digit": "in_caps classes out_dim in_dim"}
_FILE_KEYS = {"params", "layouts", "config", "ignore"}


def kind_of(canonical: str) -> str:
    """conv, dense, bias or digit: the kind of a canonical parameter name."""
    if canonical.endswith(".bias"):
        return "bias"
    if canonical == "digit.weight":
        return "digit"
    return "dense" if canonical.startswith("decoder.") else "conv"


# ===================================================================================== layouts
def _parse(layout: str, aliases: Mapping[str, tuple[str, ...]]) -> list[list[str]]:
    """'a (b c) 1' -> [['a'], ['b', 'c'], ['1']], aliases expanded; ValueError on a malformed layout."""
    if not isinstance(layout, str) or not layout.strip():
        raise ValueError(f"a layout must be a non-empty string of axis names, got {layout!r}")
    groups: list[list[str]] = []
    current: list[str] | None = None
    for tok in layout.replace("(", " ( ").replace(")", " ) ").split():
        if tok == "(":
            if current is not None:
                raise ValueError(f"layout {layout!r}: groups cannot nest")
            current = []
        elif tok == ")":
            if not current:
                raise ValueError(f"layout {layout!r}: an empty or unopened group")
            groups.append(current)
            current = None
        else:
            names = list(aliases.get(tok, (tok,)))
            if current is None:
                groups.append(names)
            else:
                current.extend(names)
    if current is not None:
        raise ValueError(f"layout {layout!r}: a group is not closed")
    return groups


def layout_shape(layout: str, sizes: Mapping[str, int], aliases: Mapping[str, tuple[str, ...]] = {}) -> tuple[int, ...]:
    """The shape an array in `layout` has, given each axis's size."""
    return tuple(math.prod(1 if a == "1" else sizes[a] for a in g) for g in _parse(layout, aliases))


def _check_axes(groups: list[list[str]], canonical: list[list[str]], layout: str, known: str) -> list[str]:
    atoms = [a for g in groups for a in g if a != "1"]
    want = [a for g in canonical for a in g if a != "1"]
    if sorted(atoms) != sorted(want):
        unknown = sorted(set(atoms) - set(want))
        missing = sorted(set(want) - set(atoms))
        what = (f"unknown axis {unknown[0]!r}" if unknown else f"missing axis {missing[0]!r}" if missing
                else "an axis named twice")
        raise ValueError(f"layout {layout!r}: {what}; its axes are {known}")
    return atoms


def convert(a: np.ndarray, src: str, dst: str, sizes: Mapping[str, int],
            aliases: Mapping[str, tuple[str, ...]] = {}, what: str = "array") -> np.ndarray:
    """a, laid out as `src`, rearranged to `dst` (both over the same axes, sizes given).

    ValueError, naming `what`, when a layout is malformed or a's shape is not src's."""
    sg, dg = _parse(src, aliases), _parse(dst, aliases)
    atoms = _check_axes(sg, dg, src, f"{' '.join(sorted({x for g in dg for x in g if x != '1'}))} (and 1)")
    want = layout_shape(src, sizes, aliases)
    if tuple(a.shape) != want:
        raise ValueError(f"{what} has shape {tuple(a.shape)}; its layout {src!r} needs {want}")
    flat = a.reshape([sizes[x] for x in atoms])
    order = [x for g in dg for x in g if x != "1"]
    return np.ascontiguousarray(flat.transpose([atoms.index(x) for x in order]).reshape(layout_shape(dst, sizes, aliases)))


# ===================================================================================== parameters
def _param_axes(canonical: str, config: CapsNetConfig) -> tuple[dict[str, int], dict[str, tuple[str, ...]]]:
    """Each axis's size for a canonical parameter, and its aliases (PrimaryCaps' out = (types dim))."""
    shape = config.param_shapes()[canonical]
    sizes = dict(zip(KIND_AXES[kind_of(canonical)].split(), shape))
    if canonical.startswith("primary."):
        sizes.update(types=config.primary_types, dim=config.primary_dim)
        return sizes, {"out": ("types", "dim")}
    if canonical == "digit.weight":  # in_caps = (types h w): a model whose capsules run (h w types) says so
        gh, gw = config.primary_grid
        sizes.update(types=config.primary_types, h=gh, w=gw)
        return sizes, {"in_caps": ("types", "h", "w")}
    return sizes, {}


@dataclass(frozen=True)
class MappingEntry:
    user: str  # the user's name of the parameter
    canonical: str  # the canonical name (CapsNetConfig.param_shapes)
    layout: str  # the user's axis order


@dataclass(frozen=True)
class ParamMapping:
    """Which user parameter is which canonical one, in which layout, for one config."""

    entries: tuple[MappingEntry, ...]
    config: CapsNetConfig
    ignore: tuple[str, ...] = ()

    def user_shape(self, e: MappingEntry) -> tuple[int, ...]:
        sizes, aliases = _param_axes(e.canonical, self.config)
        return layout_shape(e.layout, sizes, aliases)

    def to_user(self, canonical: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Canonical arrays -> the user's names and layouts."""
        out = {}
        for e in self.entries:
            sizes, aliases = _param_axes(e.canonical, self.config)
            out[e.user] = convert(np.asarray(canonical[e.canonical]), KIND_AXES[kind_of(e.canonical)], e.layout,
                                  sizes, aliases, what=e.canonical)
        return out

    def to_canonical(self, user: Mapping[str, np.ndarray], where: str = "the weights") -> dict[str, np.ndarray]:
        """The user's arrays (or their gradients) -> canonical names and layouts, in canonical order.

        Refuses a mapped name `user` lacks, an unmapped name it has, and a shape that its layout
        and the config do not give (suggesting a layout that would fit, if one does)."""
        by_user = {e.user: e for e in self.entries}
        extra = sorted(set(user) - set(by_user) - set(self.ignore))
        if extra:
            raise ValueError(f"{where} have a parameter {extra[0]!r} that the mapping does not name: map it to a "
                             f"canonical name, or list it under ignore")
        out = {}
        for e in self.entries:
            if e.user not in user:
                raise ValueError(f"{where} have no parameter {e.user!r} (mapped to {e.canonical}); they have "
                                 f"{sorted(user)[:8]}")
            a = np.asarray(user[e.user])
            self._check_shape(e, tuple(a.shape), where)
            sizes, aliases = _param_axes(e.canonical, self.config)
            out[e.canonical] = convert(a, e.layout, KIND_AXES[kind_of(e.canonical)], sizes, aliases, what=e.user)
        return {k: out[k] for k in self.config.param_shapes()}

    def _check_shape(self, e: MappingEntry, shape: tuple[int, ...], where: str) -> None:
        want = self.user_shape(e)
        if shape == want:
            return
        sizes, aliases = _param_axes(e.canonical, self.config)
        axes = e.layout.split() if "(" not in e.layout else []
        fits = [" ".join(p) for p in permutations(axes) if layout_shape(" ".join(p), sizes, aliases) == shape]
        if fits:
            hint = f"layout {fits[0]!r} would fit"
        elif len(shape) != len(want):
            hint = (f"the array has {len(shape)} axes and the layout {len(want)}: name each axis, with 1 for an axis "
                    f"of size 1 (e.g. '1 {KIND_AXES[kind_of(e.canonical)]}')")
        else:
            hint = "no order of its axes fits: are the config's sizes (a mapping file's [config]) the model's?"
        raise ValueError(f"{where}: parameter {e.user!r} (mapped to {e.canonical}) has shape {shape}; with layout "
                         f"{e.layout!r} the config gives {want}: {hint}")


def _entry(user: str, value: Any, layouts: Mapping[str, str], shapes: Mapping[str, Any]) -> MappingEntry:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"name", "layout"})
        if unknown or "name" not in value:
            raise ValueError(f"mapping entry {user!r} must be a canonical name or {{name, layout}}, got {dict(value)}")
        name, layout = value["name"], value.get("layout")
    else:
        name, layout = value, None
    if not isinstance(name, str) or name not in shapes:
        raise ValueError(f"mapping entry {user!r} names {name!r}, which is not a canonical parameter of this config; "
                         f"they are {', '.join(shapes)}")
    layout = layout if layout is not None else layouts.get(kind_of(name), KIND_AXES[kind_of(name)])
    return MappingEntry(user=str(user), canonical=name, layout=str(layout))


def parse_mapping(spec: Mapping[str, Any] | ParamMapping, config: CapsNetConfig | None = None,
                  layouts: Mapping[str, str] | None = None) -> ParamMapping:
    """A ParamMapping from a file's form ({params, layouts, config, ignore}) or a flat {user: canonical} dict.

    config: the model's (a file's [config] table is used when None); layouts: per kind, over the file's."""
    if isinstance(spec, ParamMapping):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"a mapping must be a dict of user names to canonical names, got {type(spec).__name__}")
    file_form = "params" in spec and set(spec) <= _FILE_KEYS
    if file_form:
        for key, kind in (("params", Mapping), ("layouts", Mapping), ("config", Mapping), ("ignore", list)):
            if not isinstance(spec.get(key, [] if kind is list else {}), kind):
                raise ValueError(f"the mapping's {key} must be a {'list' if kind is list else 'table'}, got "
                                 f"{type(spec[key]).__name__}")
    params = spec["params"] if file_form else {k: v for k, v in spec.items() if v is not None}
    ignore = list(spec.get("ignore", [])) if file_form else [k for k, v in spec.items() if v is None]
    if config is None:
        config = CapsNetConfig.from_dict({**CapsNetConfig().to_dict(), **dict(spec.get("config", {}))}) \
            if file_form else CapsNetConfig()
    kinds = {**(dict(spec.get("layouts", {})) if file_form else {}), **dict(layouts or {})}
    bad = sorted(set(kinds) - set(KIND_AXES))
    if bad:
        raise ValueError(f"layouts has an unknown kind {bad[0]!r}; the kinds are {', '.join(KIND_AXES)}")
    shapes = config.param_shapes()
    entries = tuple(_entry(u, v, kinds, shapes) for u, v in params.items())
    seen: dict[str, str] = {}
    for e in entries:
        if e.canonical in seen:
            raise ValueError(f"mapping entries {seen[e.canonical]!r} and {e.user!r} both name {e.canonical}")
        seen[e.canonical] = e.user
        sizes, aliases = _param_axes(e.canonical, config)
        _check_axes(_parse(e.layout, aliases), _parse(KIND_AXES[kind_of(e.canonical)], aliases), e.layout,
                    f"{KIND_AXES[kind_of(e.canonical)]} (and 1{', ' + ', '.join(sorted(sizes.keys() - set(KIND_AXES[kind_of(e.canonical)].split()))) if aliases else ''})")
    missing = [k for k in shapes if k not in seen]
    if missing:
        raise ValueError(f"the mapping names no user parameter for {missing[0]} (and {len(missing) - 1} more); "
                         f"every canonical parameter needs one" if len(missing) > 1 else
                         f"the mapping names no user parameter for {missing[0]}")
    return ParamMapping(entries=entries, config=config, ignore=tuple(str(i) for i in ignore))


def load_mapping(path: str | os.PathLike, config: CapsNetConfig | None = None) -> ParamMapping:
    """A mapping file (.json or .toml) as a ParamMapping; ValueError naming the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the mapping file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"the mapping file {path} must end in .json or .toml")
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"{path} is not a valid mapping file: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict) or "params" not in data or not set(data) <= _FILE_KEYS:
        raise ValueError(f"{path}: a mapping file has a params table and optionally layouts, config and ignore, "
                         f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    try:
        return parse_mapping(data, config)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
