"""Test cases from recipes: small JSON-like dicts that Hypothesis draws and a failure prints.

A recipe holds only plain numbers, strings and lists (seeds, sizes, the kind and scale of the
values); the functions here (and records.op_case, with each op's builder) turn it into NumPy
inputs deterministically. That is what makes every failure reproducible from the one line it prints:
the line carries the recipe, not the arrays.

Each case has the inputs in the dtype under test and the same values widened to float64 for
the reference (widening is exact), so comparisons measure the backend's error alone.

What this module must never do: call a backend (the checks do), or draw randomness from
anything but the recipe's seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

import capsspec
from capsspec.config import AdamConfig, CapsNetConfig

__all__ = ["OpCase", "ModelCase", "values", "generator", "cotangent", "labels_for", "distinct_labels",
           "two_digit_variant", "model_case", "model_params", "batch", "digits_batch", "adam_case", "state_case",
           "widen"]


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


def generator(seed: int) -> np.random.Generator:
    """The generator of a recipe's seed: a case draws from nothing else."""
    return np.random.default_rng(int(seed))


def labels_for(rng: np.random.Generator, batch: int, classes: int, k: int = 0) -> np.ndarray:
    """`batch` integer labels (int64) drawn uniformly from [0, classes): (batch,) for k = 0, else
    (batch, k) with k distinct classes per row (k <= classes; MultiMNIST's two digits for k = 2)."""
    if not k:
        return rng.integers(0, classes, size=batch).astype(np.int64)
    return distinct_labels(rng, batch, classes, k)


def distinct_labels(rng: np.random.Generator, batch: int, classes: int, k: int) -> np.ndarray:
    """(batch, k) int64 labels, k distinct classes of [0, classes) per row, in random order."""
    return np.argsort(rng.random((batch, classes)), axis=1)[:, :k].astype(np.int64)


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


def cotangent(r: Mapping[str, Any], out: Any, dtype: str) -> Any:
    """A cotangent shaped like the reference output `out` (float64), drawn from r["cot"]: a scalar for
    a loss, (g_v, g_c or None) for routing, else an array like the output."""
    c = r.get("cot", {"seed": 0, "kind": "normal"})
    rng = generator(c["seed"])
    if isinstance(out, tuple):  # routing: (v, c)
        g_v = values(rng, out[0].shape, c["kind"], 0, dtype)
        g_c = values(rng, out[1].shape, c["kind"], 0, dtype) if c.get("with_gc", False) else None
        return (g_v, g_c)
    if np.ndim(out) == 0:  # a loss
        return np.asarray(0.0 if c["kind"] == "zeros" else rng.standard_normal(), dtype=dtype)
    return values(rng, np.shape(out), c["kind"], 0, dtype)


@dataclass
class ModelCase:
    """A config, parameters and a batch for the model-level checks.

    labels are (B,) (one digit per image; targets None: the reconstructions are compared with x),
    or (B, K) with targets (B, K, C, H, W), each digit's own image (MultiMNIST's loss)."""

    config: CapsNetConfig
    params: dict[str, np.ndarray]  # in the dtype under test
    x: np.ndarray
    labels: np.ndarray
    targets: np.ndarray | None = None
    ref_params: dict[str, np.ndarray] = field(default_factory=dict)
    ref_x: np.ndarray | None = None
    ref_targets: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ref_params = {k: widen(v) for k, v in self.params.items()}
        self.ref_x = widen(self.x)
        self.ref_targets = widen(self.targets)


def model_params(config: CapsNetConfig, seed: int, digit_scale: float, dtype: str) -> dict[str, np.ndarray]:
    """The spec's initial parameters for `seed`, with digit.weight scaled so routing has something to decide."""
    p = capsspec.init_params(config, seed=int(seed), dtype="float64")
    p["digit.weight"] = p["digit.weight"] * float(digit_scale)
    return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in p.items()}


def batch(config: CapsNetConfig, r: Mapping[str, Any], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels for batch recipe r = {seed, B, kind, scale}."""
    x, labels, _ = digits_batch(config, r, dtype)
    return x, labels


def digits_batch(config: CapsNetConfig, r: Mapping[str, Any], dtype: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """Images, labels and targets for batch recipe r = {seed, B, kind, scale[, digits]}.

    digits 1 (the default): labels (B,), targets None. digits K >= 2: labels (B, K) with K distinct
    classes and targets (B, K, C, H, W): unit images, one per digit, like MultiMNIST's digits."""
    rng = generator(r["seed"])
    x = values(rng, (r["B"], *config.input_shape), r.get("kind", "unit"), int(r.get("scale", 0)), dtype)
    if r.get("kind", "unit") == "unit" and int(r.get("scale", 0)) != 0:
        x = np.ascontiguousarray((x.astype(np.float64) * 10.0 ** int(r["scale"])).astype(dtype))
    k = int(r.get("digits", 1))
    if k < 2:
        return x, labels_for(rng, r["B"], config.num_classes), None
    labels = distinct_labels(rng, r["B"], config.num_classes, min(k, config.num_classes))
    targets = values(rng, (*labels.shape, *config.input_shape), "unit", 0, dtype)
    return x, labels, targets


def model_case(r: Mapping[str, Any], dtype: str) -> ModelCase:
    """r = {config: dict, seed, digit_scale, x: batch recipe}."""
    config = CapsNetConfig.from_dict(r["config"])
    params = model_params(config, r["seed"], r.get("digit_scale", 1.0), dtype)
    x, labels, targets = digits_batch(config, r["x"], dtype)
    return ModelCase(config, params, x, labels, targets)


def two_digit_variant(case: ModelCase) -> ModelCase:
    """The same params and images with two digits per image: (B, 2) labels and a target image per
    digit, drawn from a seed fixed by the batch size (the case itself where it has two digits already)."""
    if case.targets is not None:
        return case
    rng = generator(1000 + len(case.x))
    labels = distinct_labels(rng, len(case.x), case.config.num_classes, 2)
    targets = values(rng, (*labels.shape, *case.config.input_shape), "unit", 0, case.x.dtype.name)
    return ModelCase(case.config, case.params, case.x, labels, targets)


def adam_case(r: Mapping[str, Any], dtype: str) -> tuple[CapsNetConfig, dict, dict, dict, AdamConfig]:
    """(config, params, grads, state as NumPy dicts, AdamConfig) for one adam_update."""
    config = CapsNetConfig.from_dict(r["config"])
    params = model_params(config, r["seed"], 1.0, dtype)
    rng = generator(r["seed"] + 1)
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
