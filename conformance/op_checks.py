"""The op checks: every op of capsspec.spec.OPS, forward and VJP, against capsspec.ops in float64.

What is drawn for an op, how its case is built and at which tolerance level it is compared are
its record's (records.py); the comparison's scale follows the record's magnitude functions.
"""

from __future__ import annotations

from typing import Any, Mapping

from capsspec import ops as ref_ops
from capsspec.spec import OPS

from .check_kit import context, outputs, reference_float32, to_backend
from .compare import assert_close
from .records import op_case, record
from .repro_line import reproducible
from .selection import Selected

__all__ = ["op_forward", "op_vjp"]


OP_SPECS = {op.name: op for op in OPS}


@reproducible
def op_forward(sel: Selected, name: str, recipe: Mapping[str, Any], dtype: str) -> None:
    """backend.<op>(*args) against capsspec.ops.<op> in float64."""
    b, spec = sel.backend, OP_SPECS[name]
    case = op_case(name, recipe, dtype)
    ctx = context(f"{name} forward", sel, dtype, recipe, dict(zip(spec.array_args, case.args)))
    out = getattr(b, name)(*to_backend(b, case.args), **case.static)
    ref = getattr(ref_ops, name)(*case.ref_args, **case.static)
    ref32 = reference_float32(getattr(ref_ops, name), *case.ref_args, **case.static)
    n = len(spec.outputs)
    got = outputs(ctx, out, n, name)
    refs = ref if n > 1 else (ref,)
    refs32 = (ref32 if n > 1 else (ref32,)) if ref32 is not None else (None,) * n
    rec = record(name)
    mags = rec.forward_magnitude(case.ref_args, case.static) if rec.forward_magnitude else (None,) * n
    for oname, o, r, r32, mag in zip(spec.outputs, got, refs, refs32, mags):
        assert_close(b.to_numpy(o), r, what=f"{name} {oname}", level=rec.levels[0], ctx=ctx, ref_float32=r32,
                     magnitude=mag)


@reproducible
def op_vjp(sel: Selected, name: str, recipe: Mapping[str, Any], dtype: str) -> None:
    """backend.<op>_vjp(g, *args) against capsspec.ops.<op>_vjp with the same random cotangent."""
    b, spec = sel.backend, OP_SPECS[name]
    case = op_case(name, recipe, dtype)
    inputs = dict(zip(spec.array_args, case.args))
    inputs["g"] = case.cot
    ctx = context(f"{name} vjp", sel, dtype, recipe, inputs)
    out = getattr(b, spec.vjp_name)(to_backend(b, case.cot), *to_backend(b, case.args), **case.static)
    ref = getattr(ref_ops, spec.vjp_name)(case.ref_cot, *case.ref_args, **case.static)
    ref32 = reference_float32(getattr(ref_ops, spec.vjp_name), case.ref_cot, *case.ref_args, **case.static)
    got = outputs(ctx, out, len(spec.differentiable), spec.vjp_name, single=False)
    rec = record(name)
    level = rec.levels[1]
    mags = rec.vjp_magnitude(case.ref_cot, case.ref_args, case.static) if rec.vjp_magnitude else [None] * len(ref)
    for i, (arg, o, r) in enumerate(zip(spec.differentiable, got, ref)):
        r32 = None if ref32 is None else ref32[i]
        mag = mags[i]
        if isinstance(r, list):  # the decoder's weights and biases
            if not isinstance(o, (list, tuple)) or len(o) != len(r):
                ctx.fail(f"{spec.vjp_name}: gradient for {arg} must be a list of {len(r)} arrays, got "
                         f"{type(o).__name__}")
            for k, (ok, rk) in enumerate(zip(o, r)):
                assert_close(b.to_numpy(ok), rk, what=f"d/d{arg}[{k}]", level=level, ctx=ctx,
                             ref_float32=None if r32 is None else r32[k], magnitude=None if mag is None else mag[k])
        else:
            assert_close(b.to_numpy(o), r, what=f"d/d{arg}", level=level, ctx=ctx, ref_float32=r32, magnitude=mag)
