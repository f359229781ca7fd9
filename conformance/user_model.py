"""Hold a user's whole CapsNet (a torch nn.Module, a Keras model, a JAX function and its parameter tree) to the reference.

check_model(model, mapping, framework=..., config=...) loads the SAME weights into the user's
model and the reference: canonical weights drawn by capsspec.model.init_params (with
digit.weight scaled up on later draws, so that routing decides), mapped into the user's names
and layouts by param_mapping.ParamMapping. It then compares, draw by draw, with the suite's
tolerances (tolerances.py) and comparisons (compare.py):

  * the outputs the user's model exposes (any of conv1, primary, u_hat, coupling, v, lengths,
    reconstruction; each in a layout the user names, e.g. "batch classes dim 1"), in the
    forward pass's order, so that the first one that differs says where the model goes wrong;
  * the total loss, when the user gives their loss (a function of model, x, labels);
  * the gradient of that loss with respect to every canonical parameter, the user's gradients
    (by their framework's autodiff) mapped back through the same mapping.

A failure is compared with the reference's deviant forms (model_deviations.py); a deviation
that explains every failing draw is named in the report with the paper's rule.

A bad mapping or adapter (an unknown name, a missing canonical parameter, a shape no stated
layout gives, an output of the wrong shape) is one ValueError before anything is compared. The
user's model is deep-copied (torch) or never written (Keras weights are saved and restored).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from capsspec import model as ref_model
from capsspec.config import CapsNetConfig

from . import magnitudes
from .check_kit import narrow, reference_float32
from .compare import ConformanceFailure, Context, assert_all_close, assert_close
from .model_deviations import DEVIATIONS, STAGES, deviant_gradients, reference_outputs
from .param_mapping import ParamMapping, convert, load_mapping, parse_mapping

__all__ = ["check_model", "ModelReport", "CANONICAL_OUTPUT_LAYOUTS", "FRAMEWORKS"]

FRAMEWORKS = ("torch", "jax", "keras")
CANONICAL_INPUT_LAYOUT = "batch channels h w"
CANONICAL_OUTPUT_LAYOUTS = {"conv1": "batch channels h w", "primary": "batch caps dim",
                            "u_hat": "batch caps classes dim", "coupling": "batch caps classes",
                            "v": "batch classes dim", "lengths": "batch classes", "reconstruction": "batch pixels"}
# digit.weight is scaled by these, draw after draw: the spec's std 0.01 leaves routing undecided
# (every coupling near 1/J); larger predictions make it decide, which routing mistakes then show.
DIGIT_SCALES = (1.0, 30.0, 100.0)


@dataclass
class ModelReport:
    """What check_model checked and found. str() is the report; raise_for_failure() raises it as a failure."""

    framework: str
    dtype: str
    checked: list[str]
    draws: int
    batch: int
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (draw, quantity, message)
    first_difference: str | None = None
    deviations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        failed = sorted({d for d, _, _ in self.failures})
        head = (f"whole-model check of your {self.framework} model ({self.dtype}): "
                + ("passed" if self.passed else f"FAILED on {len(failed)} of {self.draws} draws")
                + f" ({self.seconds:.1f} s)")
        lines = [head, f"checked: {', '.join(self.checked)}; {self.draws} draws of {self.batch} images"]
        if self.passed:
            return "\n".join(lines)
        lines.append(f"first difference: {self.first_difference}")
        if self.deviations:
            lines += [f"named deviation: {DEVIATIONS[d].describe()}" for d in self.deviations]
        else:
            lines.append("no known deviation explains every failing draw: values differ")
        draw, what, message = self.failures[0]
        lines += [f"first failure (draw {draw}, {what}):", message]
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        if not self.passed:
            raise ConformanceFailure(str(self))


# ===================================================================================== frameworks
class _TorchGlue:
    def __init__(self, model: Any, call: Callable | None, loss: Callable | None) -> None:
        import torch

        self.torch, self.model = torch, copy.deepcopy(model)
        self.call = call or (lambda m, x, labels: m(x, labels))
        self.loss = loss
        self.named = dict(self.model.named_parameters())
        first = next(iter(self.named.values()), None)
        self.device = first.device if first is not None else "cpu"
        self.dtype = str(first.dtype).replace("torch.", "") if first is not None else "float32"

    def current(self) -> dict[str, np.ndarray]:
        return {n: p.detach().cpu().numpy() for n, p in self.named.items()}

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        with self.torch.no_grad():
            for n, p in self.named.items():
                if n in arrays:  # a parameter the mapping ignores keeps the model's value
                    p.copy_(self.torch.as_tensor(arrays[n], dtype=p.dtype, device=p.device))

    def _inputs(self, x: np.ndarray, labels: np.ndarray) -> tuple[Any, Any]:
        return self.torch.as_tensor(x, device=self.device), self.torch.as_tensor(labels, device=self.device)

    def forward(self, x: np.ndarray, labels: np.ndarray) -> Any:
        with self.torch.no_grad():
            return self.call(self.model, *self._inputs(x, labels))

    def loss_and_grads(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with self.torch.enable_grad():
            total = self.loss(self.model, *self._inputs(x, labels))
            grads = self.torch.autograd.grad(total, list(self.named.values()), allow_unused=True)
        return self.to_numpy(total), {n: np.zeros(p.shape, self.dtype) if g is None else self.to_numpy(g)
                                      for (n, p), g in zip(self.named.items(), grads)}

    def to_numpy(self, t: Any) -> np.ndarray:
        return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def _path_name(path: Sequence[Any]) -> str:
    """A JAX tree path as a dotted name: {"conv1": {"w": ...}} -> conv1.w, a list index -> its number."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return ".".join(parts)


class _JaxGlue:
    def __init__(self, model: Any, call: Callable | None, loss: Callable | None) -> None:
        import jax

        if not (isinstance(model, (tuple, list)) and len(model) == 2 and callable(model[0])):
            raise ValueError("a JAX model is a pair (apply, params): apply(params, x, labels) and its parameter tree")
        self.jax, (self.apply, tree) = jax, model
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.names = [_path_name(p) for p, _ in flat]
        self.params = [leaf for _, leaf in flat]
        self.dtype = str(np.asarray(self.params[0]).dtype) if self.params else "float32"
        self.call = call or (lambda apply, p, x, labels: apply(p, x, labels))
        self.loss = loss
        self._value_and_grad: Callable | None = None

    def current(self) -> dict[str, np.ndarray]:
        return {n: np.asarray(a) for n, a in zip(self.names, self.params)}

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.params = [self.jax.numpy.asarray(arrays[n]) if n in arrays else a for n, a in zip(self.names, self.params)]

    def _tree(self, leaves: list[Any]) -> Any:
        return self.jax.tree_util.tree_unflatten(self.treedef, leaves)

    def forward(self, x: np.ndarray, labels: np.ndarray) -> Any:
        return self.call(self.apply, self._tree(self.params), self.jax.numpy.asarray(x), self.jax.numpy.asarray(labels))

    def loss_and_grads(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if self._value_and_grad is None:  # compiled once: every draw has the same shapes
            self._value_and_grad = self.jax.jit(self.jax.value_and_grad(
                lambda p, x, labels: self.loss(self.apply, p, x, labels)))
        total, g = self._value_and_grad(self._tree(self.params), self.jax.numpy.asarray(x),
                                        self.jax.numpy.asarray(labels))
        leaves = self.jax.tree_util.tree_leaves(g)
        return np.asarray(total), {n: np.asarray(a) for n, a in zip(self.names, leaves)}

    def to_numpy(self, t: Any) -> np.ndarray:
        return np.asarray(t)


class _KerasGlue:
    def __init__(self, model: Any, call: Callable | None, loss: Callable | None) -> None:
        import tensorflow as tf

        self.tf, self.model = tf, model
        self.vars = {w.path: w for w in model.trainable_weights}
        self.saved = {n: np.array(w.numpy()) for n, w in self.vars.items()}
        first = next(iter(self.vars.values()), None)
        self.dtype = str(np.asarray(first.numpy()).dtype) if first is not None else "float32"
        self.call = call or (lambda m, x, labels: m([x, labels]))
        self.loss = loss

    def current(self) -> dict[str, np.ndarray]:
        return dict(self.saved)

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        for n, w in self.vars.items():
            if n in arrays:
                w.assign(arrays[n])

    def restore(self) -> None:
        self.load(self.saved)

    def forward(self, x: np.ndarray, labels: np.ndarray) -> Any:
        return self.call(self.model, self.tf.constant(x), self.tf.constant(labels))

    def loss_and_grads(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        with self.tf.GradientTape() as tape:
            total = self.loss(self.model, self.tf.constant(x), self.tf.constant(labels))
        grads = tape.gradient(total, list(self.vars.values()))
        return self.to_numpy(total), {n: np.zeros(w.shape, self.dtype) if g is None else self.to_numpy(g)
                                      for (n, w), g in zip(self.vars.items(), grads)}

    def to_numpy(self, t: Any) -> np.ndarray:
        return np.asarray(t.numpy() if hasattr(t, "numpy") else t)


_GLUES = {"torch": _TorchGlue, "jax": _JaxGlue, "keras": _KerasGlue}


# ===================================================================================== layouts of the outputs
def _sizes(config: CapsNetConfig, batch: int, name: str) -> tuple[dict[str, int], dict[str, tuple[str, ...]]]:
    """Each axis's size for an output (or "input"), and its aliases: caps = (types h w), pixels = (channels h w)."""
    sizes = {"batch": batch, "classes": config.num_classes, "types": config.primary_types}
    if name in ("input", "reconstruction"):
        sizes.update(channels=config.input_channels, h=config.input_height, w=config.input_width)
        return sizes, {"pixels": ("channels", "h", "w")}
    if name == "conv1":
        h, w = config.conv1_output_hw
        sizes.update(channels=config.conv1_channels, h=h, w=w)
        return sizes, {}
    h, w = config.primary_grid
    sizes.update(h=h, w=w, dim=config.primary_dim if name == "primary" else config.class_dim)
    return sizes, {"caps": ("types", "h", "w")}


def _named_outputs(result: Any, outputs: Sequence[str], layouts: Mapping[str, str], glue: Any,
                   config: CapsNetConfig, batch: int) -> dict[str, np.ndarray]:
    """The user's call's result as canonical outputs (canonical layouts, NumPy); ValueError on a mismatch."""
    if isinstance(result, Mapping):
        named = dict(result)
    elif isinstance(result, (tuple, list)):
        if len(result) != len(outputs):
            raise ValueError(f"your model's call returned {len(result)} values but outputs names {len(outputs)}: "
                             f"{list(outputs)}; name each (None for one to skip)")
        named = {n: r for n, r in zip(outputs, result) if n is not None}
    else:
        named = {outputs[0]: result}
    out = {}
    for name, value in named.items():
        if name not in CANONICAL_OUTPUT_LAYOUTS:
            raise ValueError(f"unknown output {name!r}; the outputs a model can expose are {', '.join(STAGES)}")
        sizes, aliases = _sizes(config, batch, name)
        out[name] = convert(glue.to_numpy(value), layouts.get(name, CANONICAL_OUTPUT_LAYOUTS[name]),
                            CANONICAL_OUTPUT_LAYOUTS[name], sizes, aliases, what=f"output {name!r}")
    return {n: out[n] for n in STAGES if n in out}


# ===================================================================================== the check
@dataclass
class _Draw:
    index: int
    params: dict[str, np.ndarray]  # in the model's dtype
    ref_params: dict[str, np.ndarray]  # the same values in float64
    x: np.ndarray
    labels: np.ndarray
    recipe: dict[str, Any]


def _draw(config: CapsNetConfig, dtype: str, seed: int, k: int, batch: int) -> _Draw:
    params = ref_model.init_params(config, seed + k, "float64")
    scale = DIGIT_SCALES[k % len(DIGIT_SCALES)]
    params["digit.weight"] = params["digit.weight"] * scale
    params = {n: a.astype(dtype) for n, a in params.items()}
    rng = np.random.default_rng([seed, k])
    x = rng.uniform(0.0, 1.0, (batch, *config.input_shape)).astype(dtype)
    labels = rng.integers(0, config.num_classes, batch).astype(np.int64)
    return _Draw(k, params, {n: a.astype(np.float64) for n, a in params.items()}, x, labels,
                 {"seed": seed, "draw": k, "digit_scale": scale, "batch": batch})


def _close(got: np.ndarray, want: np.ndarray, what: str, level: str, ctx: Context, ref32: Any = None,
           magnitude: Any = None) -> str | None:
    """None when got is within the suite's tolerance of want, else the failure's message."""
    try:
        if isinstance(want, Mapping):
            assert_all_close(got, want, what=what, level=level, ctx=ctx, ref_float32=ref32, magnitudes=magnitude)
        else:
            assert_close(np.asarray(got), np.asarray(want), what=what, level=level, ctx=ctx, ref_float32=ref32)
    except ConformanceFailure as exc:
        return str(exc)
    return None


def _compare(user: Mapping[str, Any], ref: Mapping[str, Any], ref32: Mapping[str, Any] | None, ctx: Context,
             mags: Any = None) -> list[tuple[str, str]]:
    """(quantity, message) for every user quantity that differs from ref, in the forward pass's order."""
    found = []
    for name, got in user.items():
        level = "gradients" if name == "gradients" else "model"
        lo = None if ref32 is None else ref32.get(name)
        message = _close(got, ref[name], f"your model's {name}", level, ctx, lo,
                         mags if name == "gradients" else None)
        if message:
            found.append((name, message))
    return found


def _explains(user: Mapping[str, Any], d: _Draw, config: CapsNetConfig, ctx: Context) -> set[str]:
    """The deviations whose form matches every user quantity of this draw. Without the reference's
    conditioning allowance: it measures the reference's rounding, not a deviant form's, and with it
    several deviant forms would match a model that makes one of them."""
    named = set()
    for name, dev in DEVIATIONS.items():
        if dev.gradient_only:
            if "gradients" not in user:
                continue
            want = dict(reference_outputs(d.ref_params, d.x.astype(np.float64), d.labels, config))
            want["gradients"] = deviant_gradients(d.ref_params, d.x.astype(np.float64), d.labels, config, name)
        else:
            want = reference_outputs(d.ref_params, d.x.astype(np.float64), d.labels, config, name)
        if not _compare({k: v for k, v in user.items() if k in want}, want, None, ctx):
            named.add(name)
    return named


def _user_quantities(glue: Any, mapping: ParamMapping, d: _Draw, x_user: np.ndarray, outputs: Sequence[str],
                     layouts: Mapping[str, str], has_loss: bool) -> dict[str, Any]:
    """The user's model on one draw: its outputs, loss and (canonical) gradients, as NumPy."""
    glue.load(mapping.to_user(d.params))
    config = mapping.config
    user = _named_outputs(glue.forward(x_user, d.labels), outputs, layouts, glue, config, d.x.shape[0])
    if has_loss:
        total, grads = glue.loss_and_grads(x_user, d.labels)
        user["loss"] = np.asarray(total)
        user["gradients"] = mapping.to_canonical(grads, where="your model's gradients")
    return user


def _reference(d: _Draw, config: CapsNetConfig, dtype: str, has_loss: bool) -> tuple[dict, dict | None, Any]:
    """The reference's quantities on a draw (float64), their float32 counterparts (the conditioning
    allowance) and the gradients' term magnitudes."""
    x64 = d.x.astype(np.float64)
    ref = reference_outputs(d.ref_params, x64, d.labels, config)
    ref32 = reference_float32(reference_outputs, d.ref_params, x64, d.labels, config) if dtype == "float32" else None
    mags = None
    if has_loss:
        ref["gradients"] = ref_model.value_and_grad(d.ref_params, x64, d.labels, config)[1]
        mags = magnitudes.model_gradients(d.ref_params, x64, d.labels, config)
        if ref32 is not None:
            ref32 = dict(ref32, gradients=ref_model.value_and_grad(narrow(d.ref_params), narrow(x64), d.labels,
                                                                   config)[1])
    return ref, ref32, mags


def check_model(model: Any, mapping: str | os.PathLike | Mapping[str, Any] | ParamMapping, *, framework: str = "torch",
                config: CapsNetConfig | None = None, layouts: Mapping[str, str] | None = None,
                input_layout: str = CANONICAL_INPUT_LAYOUT, outputs: Sequence[str] = ("v", "reconstruction"),
                output_layouts: Mapping[str, str] | None = None, call: Callable | None = None,
                loss: Callable | None = None, draws: int = 3, batch: int = 2, seed: int = 0) -> ModelReport:
    """Hold a user's whole model to the reference on the same weights; returns a ModelReport.

    model: a torch nn.Module, a Keras model, or for JAX a pair (apply, params). mapping: the user's
    parameter names to canonical ones (a mapping file's path, a dict of its form or a flat
    {user: canonical} dict, or a ParamMapping; param_mapping.py),
    with layouts per kind ({"conv": "kh kw in out", "dense": "in out", ...}). config: the model's
    sizes (default: the mapping's, else the paper's). call(model, x, labels) runs the model
    (default model(x, labels); JAX: call(apply, params, x, labels)) on x laid out as input_layout
    and int64 class labels (B,); its result is a dict keyed by output names or a tuple named by
    `outputs` (from conv1, primary, u_hat, coupling, v, lengths, reconstruction; None skips one),
    each laid out as output_layouts says (default CANONICAL_OUTPUT_LAYOUTS). loss(model, x, labels)
    (JAX: loss(apply, params, x, labels)) returns the user's total loss as a scalar: with it, the
    loss and every parameter's gradient are checked too. ValueError on a bad mapping or adapter.
    """
    start = time.perf_counter()
    if framework not in _GLUES:
        raise ValueError(f"framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    if isinstance(mapping, (str, os.PathLike)):
        mapping = load_mapping(mapping, config)
    mapping = parse_mapping(mapping, config, layouts)
    config = mapping.config
    glue = _GLUES[framework](model, call, loss)
    if glue.dtype not in ("float32", "float64"):
        raise ValueError(f"your model's parameters are {glue.dtype}; the check compares float32 or float64 models")
    mapping.to_canonical(glue.current(), where="your model's parameters")  # every name and shape, before any work
    in_sizes, in_aliases = _sizes(config, batch, "input")
    report = ModelReport(framework, glue.dtype, [], draws, batch)
    try:
        _run_draws(report, glue, mapping, outputs, dict(output_layouts or {}), loss is not None, seed,
                   lambda x: convert(x, CANONICAL_INPUT_LAYOUT, input_layout, in_sizes, in_aliases, what="input"))
    finally:
        if hasattr(glue, "restore"):
            glue.restore()
    report.seconds = time.perf_counter() - start
    return report


def _run_draws(report: ModelReport, glue: Any, mapping: ParamMapping, outputs: Sequence[str],
               layouts: Mapping[str, str], has_loss: bool, seed: int, to_input: Callable) -> None:
    config, named = mapping.config, None
    order = list(STAGES) + ["loss", "gradients"]
    for k in range(report.draws):
        d = _draw(config, report.dtype, seed, k, report.batch)
        user = _user_quantities(glue, mapping, d, to_input(d.x), outputs, layouts, has_loss)
        if not report.checked:
            report.checked = [n if n != "gradients" else f"gradients ({len(user[n])} parameters)" for n in user]
        ref, ref32, mags = _reference(d, config, report.dtype, has_loss)
        ctx = Context(f"whole model, draw {k}", SimpleNamespace(spec=f"your {report.framework} model"), report.dtype,
                      d.recipe, f"check_model(..., seed={seed}, draws={k + 1})", {"x": d.x, "labels": d.labels})
        found = _compare(user, ref, ref32, ctx, mags)
        if not found:
            continue
        report.failures += [(k, what, message) for what, message in found]
        explained = _explains(user, d, config, ctx)
        named = explained if named is None else named & explained
    if report.failures:
        failing = {what for _, what, _ in report.failures}
        report.first_difference = next(n for n in order if n in failing)
        report.deviations = sorted(named or ())
