"""Test cases from recipes: small JSON-like dicts that Hypothesis draws and a failure prints.

A recipe holds only plain numbers, strings and lists (seeds, sizes, the kind and scale of the
values); the functions here turn it into NumPy inputs deterministically. That is what makes
every failure reproducible from its printed snippet: the snippet carries the recipe, not the
arrays.

Each case has the inputs in the dtype under test and the same values widened to float64 for
the reference (widening is exact), so comparisons measure the backend's error alone.

What this module must never do: call a backend (checks.py does), or draw randomness from
anything but the recipe's seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

import capsspec
from capsspec.config import AdamConfig, CapsNetConfig

__all__ = ["OpCase", "ModelCase", "values", "op_case", "model_case", "adam_case", "state_case", "widen",
           "SCALE_LIMITS"]

# log10 of the largest / smallest magnitude of drawn values, per dtype, for ops whose domain is
# "any finite |s|^2" (squash, lengths): |s|^2 of a capsule of up to 16 such values stays finite.
SCALE_LIMITS = {"float32": (-15, 17), "float64": (-140, 150)}


def widen(a: Any) -> Any:
    """float arrays to float64 (exactly); lists, tuples and None kept in shape; ints untouched."""
    if a is None:
        return None
    if isinstance(a, (list, tuple)):
        return type(a)(widen(x) for x in a)
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        return a.astype(np.float64)
    return a


def values(rng: np.random.Generator, shape: tuple[int, ...], kind: str, scale: int, dtype: str,
           row_scales: tuple[int, int] | None = None) -> np.ndarray:
    """An array of `dtype` whose values follow `kind`:

    normal: N(0, 1) * 10**scale; zeros; equal: one value everywhere; zero_rows: normal with about
    half of the last-axis vectors set to 0; mixed: normal with each last-axis vector scaled by its
    own 10**k, k in row_scales (huge and tiny norms side by side); unit: uniform in [0, 1).
    """
    shape = tuple(int(s) for s in shape)
    if kind == "zeros":
        a = np.zeros(shape)
    elif kind == "equal":
        a = np.full(shape, rng.uniform(0.5, 2.0) * rng.choice([-1.0, 1.0]) * 10.0 ** scale)
    elif kind == "unit":
        a = rng.random(shape)
    elif kind in ("normal", "zero_rows", "mixed"):
        a = rng.standard_normal(shape) * 10.0 ** scale
        if kind == "zero_rows" and a.ndim:
            rows = rng.random(shape[:-1]) < 0.5
            a[rows] = 0.0
        if kind == "mixed" and a.ndim:
            lo, hi = row_scales if row_scales is not None else (scale, scale)
            a = rng.standard_normal(shape) * 10.0 ** rng.integers(lo, hi + 1, size=shape[:-1] + (1,))
    else:
        raise ValueError(f"kind must be one of normal, zeros, equal, zero_rows, mixed, unit; got {kind!r}")
    return np.ascontiguousarray(a.astype(dtype))


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(int(seed))


def _labels(rng: np.random.Generator, batch: int, classes: int) -> np.ndarray:
    return rng.integers(0, classes, size=batch).astype(np.int64)


@dataclass
class OpCase:
    """Inputs of one op call: array args in the order of capsspec.spec.OPS, static args, a cotangent."""

    name: str
    args: list[Any]  # in the dtype under test (labels int64, decoder weights as lists)
    static: dict[str, Any]
    cot: Any = None  # cotangent for the VJP: array, scalar array, or (g_v, g_c) for routing
    ref_args: list[Any] = field(default_factory=list)
    ref_cot: Any = None

    def __post_init__(self) -> None:
        self.ref_args = [widen(a) for a in self.args]
        self.ref_cot = widen(self.cot)


def _cotangent(r: Mapping[str, Any], out: Any, dtype: str) -> Any:
    """A cotangent shaped like the reference output `out` (float64), drawn from r["cot"]."""
    c = r.get("cot", {"seed": 0, "kind": "normal"})
    rng = _rng(c["seed"])
    if isinstance(out, tuple):  # routing: (v, c)
        g_v = values(rng, out[0].shape, c["kind"], 0, dtype)
        g_c = values(rng, out[1].shape, c["kind"], 0, dtype) if c.get("with_gc", False) else None
        return (g_v, g_c)
    return values(rng, np.shape(out), c["kind"], 0, dtype)


def op_case(name: str, r: Mapping[str, Any], dtype: str) -> OpCase:
    """The inputs of op `name` described by recipe `r`, in `dtype`, with a cotangent for its VJP."""
    rng = _rng(r["seed"])
    kind, scale = r.get("kind", "normal"), int(r.get("scale", 0))
    rows = tuple(r.get("row_scales", (scale, scale)))
    if name == "conv2d":
        x = values(rng, (r["B"], r["C"], r["H"], r["W"]), kind, scale, dtype, rows)
        fan_in = r["C"] * r["kh"] * r["kw"]
        w = values(rng, (r["O"], r["C"], r["kh"], r["kw"]), "normal", 0, dtype) / np.sqrt(fan_in).astype(dtype)
        b = values(rng, (r["O"],), "normal", -1, dtype)
        args, static = [x, w, b], {"stride": r["stride"]}
    elif name == "squash":
        args, static = [values(rng, tuple(r["shape"]), kind, scale, dtype, rows)], {"axis": r.get("axis", -1)}
    elif name == "primary_capsules":
        x = values(rng, (r["B"], r["C"], r["H"], r["W"]), kind, scale, dtype, rows)
        fan_in = r["C"] * r["k"] * r["k"]
        w = values(rng, (r["T"] * r["D"], r["C"], r["k"], r["k"]), "normal", 0, dtype) / np.sqrt(fan_in).astype(dtype)
        b = values(rng, (r["T"] * r["D"],), "normal", -1, dtype)
        args, static = [x, w, b], {"capsule_dim": r["D"], "stride": r["stride"]}
    elif name == "predictions":
        u = values(rng, (r["B"], r["N"], r["D"]), kind, scale, dtype, rows)
        w = values(rng, (r["N"], r["J"], r["E"], r["D"]), "normal", int(r.get("weight_scale", 0)), dtype)
        args, static = [u, w], {}
    elif name == "routing":
        args = [values(rng, (r["B"], r["N"], r["J"], r["E"]), kind, scale, dtype, rows)]
        static = {"iterations": r["iterations"]}
    elif name == "capsule_lengths":
        args, static = [values(rng, tuple(r["shape"]), kind, scale, dtype, rows)], {}
    elif name == "margin_loss":
        b, j = r["B"], r["J"]
        if kind == "satisfied":  # true length >= m+, every other <= m-: the loss is exactly 0
            labels = _labels(rng, b, j)
            lengths = rng.uniform(0.0, r["m_minus"], size=(b, j))
            lengths[np.arange(b), labels] = rng.uniform(r["m_plus"], 1.0, size=b)
        else:
            lengths = rng.uniform(0.0, 1.0, size=(b, j))
            labels = _labels(rng, b, j)
        args = [np.ascontiguousarray(lengths.astype(dtype)), labels]
        static = {"m_plus": r["m_plus"], "m_minus": r["m_minus"], "lambda_": r["lambda_"]}
    elif name == "mask":
        v = values(rng, (r["B"], r["J"], r["E"]), kind, scale, dtype, rows)
        labels = _labels(rng, r["B"], r["J"]) if r.get("labels", True) else None
        args, static = [v, labels], {}
    elif name == "decoder":
        widths = list(r["widths"])
        x = values(rng, (r["B"], widths[0]), kind, scale, dtype, rows)
        ws = [values(rng, (widths[k + 1], widths[k]), "normal", 0, dtype) / np.sqrt(widths[k]).astype(dtype)
              for k in range(len(widths) - 1)]
        bs = [values(rng, (widths[k + 1],), "normal", -1, dtype) for k in range(len(widths) - 1)]
        args, static = [x, ws, bs], {}
    elif name == "reconstruction_loss":
        shape = (r["B"], r["C"], r["H"], r["W"])
        images = values(rng, shape, "unit" if kind != "zeros" else "zeros", 0, dtype)
        recon = values(rng, (r["B"], r["C"] * r["H"] * r["W"]), "unit", 0, dtype)
        args, static = [recon, images], {"scale": r["loss_scale"]}
    else:
        raise ValueError(f"op must be one of {capsspec.spec.OP_NAMES}, got {name!r}")
    case = OpCase(name, args, static)
    ref_out = getattr(capsspec.ops, name)(*case.ref_args, **static)
    if name in ("margin_loss", "reconstruction_loss"):
        c = r.get("cot", {"seed": 0, "kind": "normal"})
        g = 0.0 if c["kind"] == "zeros" else float(_rng(c["seed"]).standard_normal())
        case.cot = np.asarray(g, dtype=dtype)
    else:
        case.cot = _cotangent(r, ref_out, dtype)
    case.ref_cot = widen(case.cot)
    return case


@dataclass
class ModelCase:
    """A config, parameters and a batch for the model-level checks."""

    config: CapsNetConfig
    params: dict[str, np.ndarray]  # in the dtype under test
    x: np.ndarray
    labels: np.ndarray
    ref_params: dict[str, np.ndarray] = field(default_factory=dict)
    ref_x: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ref_params = {k: widen(v) for k, v in self.params.items()}
        self.ref_x = widen(self.x)


def model_params(config: CapsNetConfig, seed: int, digit_scale: float, dtype: str) -> dict[str, np.ndarray]:
    """The spec's initial parameters for `seed`, with digit.weight scaled so routing has something to decide."""
    p = capsspec.init_params(config, seed=int(seed), dtype="float64")
    p["digit.weight"] = p["digit.weight"] * float(digit_scale)
    return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in p.items()}


def batch(config: CapsNetConfig, r: Mapping[str, Any], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels for batch recipe r = {seed, B, kind, scale}."""
    rng = _rng(r["seed"])
    x = values(rng, (r["B"], *config.input_shape), r.get("kind", "unit"), int(r.get("scale", 0)), dtype)
    if r.get("kind", "unit") == "unit" and int(r.get("scale", 0)) != 0:
        x = np.ascontiguousarray((x.astype(np.float64) * 10.0 ** int(r["scale"])).astype(dtype))
    return x, _labels(rng, r["B"], config.num_classes)


def model_case(r: Mapping[str, Any], dtype: str) -> ModelCase:
    """r = {config: dict, seed, digit_scale, x: batch recipe}."""
    config = CapsNetConfig.from_dict(r["config"])
    params = model_params(config, r["seed"], r.get("digit_scale", 1.0), dtype)
    x, labels = batch(config, r["x"], dtype)
    return ModelCase(config, params, x, labels)


def adam_case(r: Mapping[str, Any], dtype: str) -> tuple[CapsNetConfig, dict, dict, dict, AdamConfig]:
    """(config, params, grads, state as NumPy dicts, AdamConfig) for one adam_update."""
    config = CapsNetConfig.from_dict(r["config"])
    params = model_params(config, r["seed"], 1.0, dtype)
    rng = _rng(r["seed"] + 1)
    grads = {k: values(rng, p.shape, r.get("grad_kind", "normal"), int(r.get("grad_scale", -2)), dtype)
             for k, p in params.items()}
    state = state_case(params, int(r["step"]), rng, dtype)
    return config, params, grads, state, AdamConfig(**r.get("adam", {}))


def state_case(params: Mapping[str, np.ndarray], step: int, rng: np.random.Generator, dtype: str) -> dict:
    """An Adam state after `step` updates with plausible moments (zero when step is 0)."""
    if step == 0:
        return {"step": 0, "m": {k: np.zeros_like(p) for k, p in params.items()},
                "v": {k: np.zeros_like(p) for k, p in params.items()}}
    m = {k: values(rng, p.shape, "normal", -3, dtype) for k, p in params.items()}
    v = {k: np.ascontiguousarray((values(rng, p.shape, "normal", -3, dtype).astype(np.float64) ** 2).astype(dtype))
         for k, p in params.items()}
    return {"step": step, "m": m, "v": v}
