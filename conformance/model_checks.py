"""The model checks: forward, loss, value_and_grad and predict against capsspec.model, and checkpoint
interchange (params exported by one backend give the same results in another).

Parameters reach the backend through params_from_numpy and leave it through params_to_numpy. A
case has one digit per image ((B,) labels) or two ((B, 2) labels with a target image per digit,
MultiMNIST's loss); predictions accept any class tied with the reference's within tolerance.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from capsspec import model as ref_model

from . import cases, magnitudes
from .check_kit import acceptable_argmax, check_choice, context, outputs, reference_float32, target_kwargs
from .compare import assert_all_close, assert_close, assert_true
from .repro_line import reproducible
from .selection import Selected

__all__ = ["model_forward", "model_loss", "model_value_and_grad", "model_predict", "interchange"]


def _labels_or_none(recipe: Mapping[str, Any]) -> bool:
    return bool(recipe.get("with_labels", True))


@reproducible
def model_forward(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """forward(params, x, config, labels): v, lengths, coupling and reconstruction."""
    b = sel.backend
    case = cases.model_case(recipe, dtype)
    use_labels = _labels_or_none(recipe)
    ctx = context("forward", sel, dtype, recipe, {"x": case.x, "labels": case.labels if use_labels else None})
    p = b.params_from_numpy(case.params, case.config)
    out = b.forward(p, b.asarray(case.x), case.config, labels=b.asarray(case.labels) if use_labels else None)
    ref = ref_model.forward(case.ref_params, case.ref_x, case.config, labels=case.labels if use_labels else None)
    r32 = reference_float32(ref_model.forward, case.ref_params, case.ref_x, case.config,
                            labels=case.labels if use_labels else None)
    for f in ("v", "lengths", "coupling", "reconstruction"):
        assert_true(hasattr(out, f), f"forward must return a CapsNetOutput; got {type(out).__name__} without .{f}",
                    ctx)
    lo = (lambda f: None if r32 is None else getattr(r32, f))  # noqa: E731
    assert_close(b.to_numpy(out.v), ref.v, what="forward v", level="model", ctx=ctx, ref_float32=lo("v"))
    lengths = b.to_numpy(out.lengths)
    assert_close(lengths, ref.lengths, what="forward lengths", level="model", ctx=ctx, ref_float32=lo("lengths"))
    assert_close(b.to_numpy(out.coupling), ref.coupling, what="forward coupling", level="model", ctx=ctx,
                 ref_float32=lo("coupling"))
    if not case.config.use_decoder:
        assert_true(out.reconstruction is None, "forward reconstruction must be None when config.use_decoder is "
                    f"False, got {type(out.reconstruction).__name__}", ctx)
        return
    assert_true(out.reconstruction is not None, "forward reconstruction is None but config.use_decoder is True", ctx)
    ref_recon, recon32 = ref.reconstruction, lo("reconstruction")
    if not use_labels:
        # Masking by the longest capsule: where the reference has a near tie, accept the backend's
        # choice among the tied classes and compare with the reference's decoding of that choice.
        choice = np.argmax(lengths, axis=1).astype(np.int64)
        ok = acceptable_argmax(ref.lengths, dtype)
        if any(len(o) > 1 for o in ok) and all(c in o for c, o in zip(choice, ok)):
            ref_recon = ref_model.forward(case.ref_params, case.ref_x, case.config, labels=choice).reconstruction
            recon32 = None
    assert_close(b.to_numpy(out.reconstruction), ref_recon, what="forward reconstruction", level="model", ctx=ctx,
                 ref_float32=recon32)


@reproducible
def model_loss(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """loss(params, x, labels, config, targets): total, margin and reconstruction terms (targets with (B, K) labels)."""
    b = sel.backend
    case = cases.model_case(recipe, dtype)
    ctx = context("loss", sel, dtype, recipe, {"x": case.x, "labels": case.labels, "targets": case.targets})
    p = b.params_from_numpy(case.params, case.config)
    parts = b.loss(p, b.asarray(case.x), b.asarray(case.labels), case.config, **target_kwargs(b, case))
    ref = ref_model.loss(case.ref_params, case.ref_x, case.labels, case.config, case.ref_targets)
    r32 = reference_float32(ref_model.loss, case.ref_params, case.ref_x, case.labels, case.config, case.ref_targets)
    for f in ("total", "margin", "reconstruction"):
        assert_true(hasattr(parts, f), f"loss must return LossParts; got {type(parts).__name__} without .{f}", ctx)
        assert_close(b.to_numpy(getattr(parts, f)), getattr(ref, f), what=f"loss {f}", level="model", ctx=ctx,
                     ref_float32=None if r32 is None else getattr(r32, f))


@reproducible
def model_value_and_grad(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """value_and_grad(params, x, labels, config, targets): the total loss and every parameter's gradient."""
    b = sel.backend
    case = cases.model_case(recipe, dtype)
    ctx = context("value_and_grad", sel, dtype, recipe, {"x": case.x, "labels": case.labels, "targets": case.targets})
    p = b.params_from_numpy(case.params, case.config)
    result = b.value_and_grad(p, b.asarray(case.x), b.asarray(case.labels), case.config, **target_kwargs(b, case))
    got = outputs(ctx, result, 2, "value_and_grad")
    ref_total, ref_grads = ref_model.value_and_grad(case.ref_params, case.ref_x, case.labels, case.config,
                                                    case.ref_targets)
    r32 = reference_float32(ref_model.value_and_grad, case.ref_params, case.ref_x, case.labels, case.config,
                            case.ref_targets)
    assert_close(b.to_numpy(got[0]), ref_total, what="value_and_grad total", level="model", ctx=ctx,
                 ref_float32=None if r32 is None else r32[0])
    grads = got[1]
    if not isinstance(grads, Mapping):
        ctx.fail(f"value_and_grad grads must be a dict keyed by canonical names, got {type(grads).__name__}")
    # The terms behind each gradient (magnitudes.model_gradients): where the squash saturates, a
    # gradient is a small difference of large terms and only known to a few roundings of those.
    mags = magnitudes.model_gradients(case.ref_params, case.ref_x, case.labels, case.config, case.ref_targets)
    assert_all_close({k: b.to_numpy(v) for k, v in grads.items()}, ref_grads, what="grad", level="gradients",
                     ctx=ctx, ref_float32=None if r32 is None else r32[1], magnitudes=mags)


@reproducible
def model_predict(sel: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """predict(params, x, config): the longest class capsule per example, int64 (near ties accepted)."""
    b = sel.backend
    case = cases.model_case(recipe, dtype)
    ctx = context("predict", sel, dtype, recipe, {"x": case.x})
    p = b.params_from_numpy(case.params, case.config)
    pred = b.to_numpy(b.predict(p, b.asarray(case.x), case.config))
    ref = ref_model.forward(case.ref_params, case.ref_x, case.config)
    check_choice(ctx, pred, ref.lengths, "predict")


@reproducible
def interchange(source: Selected, target: Selected, recipe: Mapping[str, Any], dtype: str) -> None:
    """Params exported by `source` (params_to_numpy) load into `target` (params_from_numpy) and give the
    same predictions and losses; the round trip through `source` alone is exact. An inference-only
    side (Backend.trains False) takes part with what it has: it is not trained on (the params are
    the case's own), and it is compared on forward's lengths and predict instead of loss."""
    case = cases.model_case(recipe, dtype)
    a, t = source.backend, target.backend
    ctx = context(f"interchange {source.spec} -> {target.spec}", source, dtype, recipe,
                  {"x": case.x, "labels": case.labels})
    config = case.config
    pa = a.params_from_numpy(case.params, config)
    rt = a.params_to_numpy(pa)
    assert_all_close(rt, case.params, what=f"{source.spec} params round trip", level="exact", ctx=ctx)
    if a.trains:
        pa, _, _ = a.train_step(pa, a.adam_init(pa), a.asarray(case.x), a.asarray(case.labels), config,
                                **target_kwargs(a, case))
    exported = a.params_to_numpy(pa)
    assert_true(isinstance(exported, Mapping) and list(exported) == list(config.param_shapes()),
                f"params_to_numpy must return the canonical names in order, got {list(exported)}", ctx)
    ref_params = {k: cases.widen(v) for k, v in exported.items()}
    ref_out = ref_model.forward(ref_params, case.ref_x, config)
    # With the drawn labels: one digit per image, or two with their targets (MultiMNIST's loss). No
    # second variant per example: a compiling partner (JAX) would compile the loss once more.
    ref_loss = ref_model.loss(ref_params, case.ref_x, case.labels, config, case.ref_targets)
    pb = t.params_from_numpy(exported, config)
    assert_all_close(t.params_to_numpy(pb), exported, what=f"{target.spec} params after loading {source.spec}'s",
                     level="exact", ctx=ctx)
    for who, bk, p in ((source.spec, a, pa), (target.spec, t, pb)):
        pred = bk.to_numpy(bk.predict(p, bk.asarray(case.x), config))
        check_choice(ctx, pred, ref_out.lengths, f"{who} predict on {source.spec}'s exported params")
        if not bk.trains:
            lengths = bk.to_numpy(bk.forward(p, bk.asarray(case.x), config).lengths)
            assert_close(lengths, ref_out.lengths, what=f"{who} forward lengths on {source.spec}'s exported params",
                         level="model", ctx=ctx)
            continue
        parts = bk.loss(p, bk.asarray(case.x), bk.asarray(case.labels), config, **target_kwargs(bk, case))
        digits = "" if case.targets is None else f" with {case.labels.shape[1]} digits per image"
        for f in ("total", "margin", "reconstruction"):
            assert_close(bk.to_numpy(getattr(parts, f)), getattr(ref_loss, f),
                         what=f"{who} loss {f}{digits} on {source.spec}'s exported params", level="model", ctx=ctx)
