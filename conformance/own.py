"""Check your own CapsNet: one call holds a user's piece (squash, routing, a loss...) to the reference.

    from capsspec.conformance import check_op
    report = check_op("squash", my_squash, framework="torch", layout="batch caps dim")
    print(report)                 # what was checked, on how many draws; on failure the smallest
                                  # counterexample, reference and user side by side, the named
                                  # deviation and the line that reproduces it
    report.raise_for_failure()    # or assert_conforms(...) in a test

The draws are the suite's (own_ops.py: each piece's record, strategies and tolerance levels);
Hypothesis runs them under a profile of profiles.py (ci: derandomised; full: random, ~10x the
examples) and shrinks a failure to its smallest draw. The user's function runs in its own
framework (frameworks.py), forward and, through that framework's autodiff, backward; its axes
are permuted to and from the reference's order by the layout (layouts.py). A mismatch is named
when it matches a known deviation (deviations.py).

What this module must never do: raise for a mismatch unless asked (raise_for_failure), or report
a pass for a draw it did not compare.
"""

from __future__ import annotations

import importlib
import json
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import frameworks, profiles
from . import strategies as S
from .check_kit import acceptable_argmax
from .compare import ConformanceFailure, Context, assert_close, summarize
from .deviations import Deviation, name_forward, name_gradient
from .layouts import parse
from .own_ops import (PIECES, Draw, Options, cotangents_to_user, draw_case, grads_to_canonical, outputs_to_canonical,
                      piece_recipes, user_args, with_iterations, check_order, levels)

__all__ = ["check_op", "assert_conforms", "Report", "Failure", "PIECES"]


@dataclass
class Failure:
    """The smallest failing draw Hypothesis found, and what went wrong on it."""

    what: str  # e.g. "forward v", "gradient d/du_hat", "raised"
    message: str
    recipe: dict[str, Any]
    dtype: str
    reference: Any = None  # canonical float64
    user: Any = None  # canonical, the user's values
    inputs: dict[str, Any] = field(default_factory=dict)
    deviation: Deviation | None = None
    repro: str = ""
    # Names the deviation; called once, on the smallest failing draw (not on every draw Hypothesis shrinks through).
    namer: Callable[[], Deviation | None] | None = field(default=None, repr=False)

    def side_by_side(self, width: int = 8) -> str:
        """The capsule (last-axis row) with the largest difference: reference and user values."""
        if self.reference is None or self.user is None or np.shape(self.reference) != np.shape(self.user):
            return ""
        r, u = np.asarray(self.reference, np.float64), np.asarray(self.user, np.float64)
        if r.ndim == 0:
            return f"  reference {float(r):.9g}\n  yours     {float(u):.9g}"
        with np.errstate(all="ignore"):
            err = np.where(np.isfinite(u), np.abs(u - r), np.inf)
        idx = np.unravel_index(int(np.argmax(err)), err.shape)
        row = idx[:-1]
        where = f"[{', '.join(str(int(i)) for i in row)}{', ' if row else ''}:]"
        fmt = lambda a: np.array2string(a[:width], max_line_width=200,  # noqa: E731
                                        formatter={"float_kind": lambda x: f"{x:.8g}"})
        more = f" (first {width} of {r.shape[-1]})" if r.shape[-1] > width else ""
        return (f"  at {where} (canonical axes){more}, largest difference at index {int(idx[-1])}:\n"
                f"  reference {fmt(r[row])}\n  yours     {fmt(u[row])}")


@dataclass
class Report:
    """What check_op checked and found. str() reads as a paragraph; raise_for_failure() raises on a failure."""

    op: str
    function: str
    framework: str
    layout: str
    profile: str
    dtypes: tuple[str, ...]
    checked: list[str] = field(default_factory=list)
    draws: dict[str, int] = field(default_factory=dict)  # per dtype: the draws checked, up to the first failing one
    shrinking: dict[str, int] = field(default_factory=dict)  # per dtype: the draws made after it, shrinking it
    failure: Failure | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.failure is None

    @property
    def deviation(self) -> str | None:
        """The key of the named deviation (None: passed, or a mismatch of no known form)."""
        return None if self.failure is None or self.failure.deviation is None else self.failure.deviation.key

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        head = "PASSED" if self.passed else "FAILED"
        total = sum(self.draws.values())
        shrunk = sum(self.shrinking.values())
        more = f" (the last failing; then {shrunk} more to shrink it)" if shrunk else ""
        lines = [f"{head}: {self.op} of {self.function} ({self.framework}, layout {self.layout!r}, profile "
                 f"{self.profile}, {', '.join(self.dtypes)}): {total} draw(s){more} in {self.seconds:.1f} s",
                 f"  checked: {'; '.join(self.checked)}"]
        lines += [f"  note: {n}" for n in self.notes]
        f = self.failure
        if f is not None:
            recipe = json.dumps(f.recipe, sort_keys=True, default=str)
            lines.append(f"smallest failing draw ({f.dtype}{', shrunk' if shrunk else ''}): {recipe}")
            for k, v in f.inputs.items():
                lines.append(f"  input {k}: {summarize(v)}")
            lines.append(f"what differs: {f.what}")
            lines += ["  " + ln for ln in f.message.splitlines()]
            sbs = f.side_by_side()
            if sbs:
                lines.append(sbs)
            if f.deviation is not None:
                lines.append(f"named deviation: {f.deviation.describe()}")
            else:
                lines.append("named deviation: none of the known ones matches; compare the values above with "
                             "docs/spec.md")
            lines.append(f"reproduce with: {f.repro}")
        return "\n".join(lines)

    def raise_for_failure(self) -> "Report":
        if self.failure is not None:
            raise ConformanceFailure(str(self))
        return self


class _Mismatch(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.what)
        self.failure = failure


@dataclass
class _Who:
    """What compare.Context prints as the thing under test."""

    spec: str
    device: Any = None


def _reference_to(fn: Any) -> str | None:
    """'module:qualname' when `fn` can be imported back by that name (for the command line), else None."""
    mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not mod or not qual or "<" in qual or mod == "__main__":
        return None
    try:
        obj: Any = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return f"{mod}:{qual}" if obj is fn else None


def _repro(op: str, fn: Any, framework: str, layout_text: str, opts: Options, recipe: Mapping[str, Any],
           dtype: str) -> str:
    extra = {"labels": opts.labels, "iterations": opts.iterations, "outputs": opts.outputs,
             "order": ",".join(opts.order), "extremes": opts.extremes}
    defaults = {"labels": "index", "iterations": 3, "outputs": 0, "order": "", "extremes": True}
    flags = [f"--{k} {shlex.quote(str(v))}" for k, v in extra.items() if v != defaults[k] and k != "extremes"]
    flags += [] if opts.extremes else ["--no-extremes"]
    ref = _reference_to(fn)
    if ref is not None:
        return " ".join([f"capsspec conformance --op {op}={ref} --framework {framework}",
                         f"--layout {shlex.quote(layout_text)}", *flags, f"--dtype {dtype}",
                         f"--recipe {shlex.quote(json.dumps(dict(recipe), sort_keys=True))}"])
    kwargs = "".join(f", {k}={v!r}" for k, v in extra.items() if v != defaults[k])
    return (f"capsspec.conformance.check_op({op!r}, <your function>, framework={framework!r}, layout="
            f"{layout_text!r}{kwargs}, dtypes=({dtype!r},), recipe={json.dumps(dict(recipe), sort_keys=True)})")


def _compare(d: Draw, user: list[Any], refs: list[Any], refs32: list[Any], names: Sequence[str], level: str,
             dtype: str, who: _Who, mags: Sequence[Any] = ()) -> tuple[str, str, Any, Any] | None:
    """The first of the user's values that is not the reference's: (what, message, reference, user), or None."""
    ctx = Context(f"{d.piece}", who, dtype, d.recipe, "")
    for i, (name, u, r, r32) in enumerate(zip(names, user, refs, refs32)):
        try:
            if u is None:
                u = np.zeros(np.shape(r), dtype=dtype)
            assert_close(np.asarray(u), r, what=name, level=level, ctx=ctx, ref_float32=r32,
                         magnitude=mags[i] if i < len(mags) else None)
        except ConformanceFailure as exc:
            # compare.py speaks of a backend; here it is the user's function.
            return name, str(exc).split("\ncheck:")[0].replace("backend ", "yours "), r, u
    return None


def _one_draw(fn: Callable[..., Any], d: Draw, dtype: str, framework: str, opts: Options, gradients: bool,
              numpy_vjp: Any, who: _Who) -> None:
    """Forward (and gradients) of the user's function on one draw; raises _Mismatch on the first difference."""
    lv = levels(d.piece)
    f = with_iterations(fn, d, opts)
    names = PIECES[d.piece][1][:opts.outputs or None]
    args = user_args(d, dtype, opts)
    try:
        out = frameworks.call(f, args, framework)
    except frameworks.FrameworkError:
        raise
    except Exception as exc:  # the user's function failing on a valid draw is a finding, not a crash
        raise _Mismatch(Failure("raised", f"{type(exc).__name__}: {exc}", d.recipe, dtype)) from None
    user = outputs_to_canonical(d, out, opts, f"{who.spec}")
    bad = _compare(d, user, d.ref_out, d.ref32_out, [f"forward {n}" for n in names], lv[0], dtype, who)
    if bad is not None:
        namer = (lambda: name_forward(d, user, dtype, lv[0])) if len(user) == len(d.ref_out) else None
        raise _Mismatch(Failure(bad[0], bad[1], d.recipe, dtype, bad[2], bad[3], namer=namer))
    if d.piece == "mask" and opts.inference:
        _mask_without_labels(f, d, dtype, framework, opts, who)
    if not gradients:
        return
    wrt = PIECES[d.piece][2]
    cots = cotangents_to_user(d, opts)
    try:
        grads = frameworks.vjp(f, args, cots, wrt, framework, numpy_vjp)
    except frameworks.FrameworkError:
        raise
    except Exception as exc:  # e.g. a backward that fails on this draw
        raise _Mismatch(Failure("raised in the gradient", f"{type(exc).__name__}: {exc}", d.recipe, dtype)) from None
    grads = grads_to_canonical(d, grads, opts)
    inputs = PIECES[d.piece][0]
    gnames = [f"gradient d/d{inputs[i]}" for i in wrt]
    bad = _compare(d, grads, d.ref_grads, d.ref32_grads, gnames, lv[1], dtype, who, d.magnitudes)
    if bad is not None:
        raise _Mismatch(Failure(bad[0], bad[1], d.recipe, dtype, bad[2], bad[3],
                                namer=lambda: name_gradient(d, grads, dtype, lv[1])
                                or _name_on_ordinary_values(fn, d, dtype, framework, opts, who)))


def _name_on_ordinary_values(fn: Callable[..., Any], d: Draw, dtype: str, framework: str, opts: Options,
                             who: _Who) -> Deviation | None:
    """A gradient that differs on a draw whose forward agrees (all capsules equal, say) may come from a
    mistake of the forward that this draw hides: the user's forward on a draw of the same sizes with
    ordinary values (normal, scale 1) names it where it matches a known form there."""
    ordinary = draw_case(d.piece, {**d.recipe, "kind": "normal", "scale": 0}, dtype, opts.outputs)
    try:
        out = frameworks.call(with_iterations(fn, ordinary, opts), user_args(ordinary, dtype, opts), framework)
        user = outputs_to_canonical(ordinary, out, opts, who.spec)
    except Exception:  # the name is a courtesy: a function that fails here has already failed the check
        return None
    level = levels(d.piece)[0]
    names = [f"forward {n}" for n in PIECES[d.piece][1]]
    if len(user) != len(ordinary.ref_out) or _compare(ordinary, user, ordinary.ref_out, ordinary.ref32_out, names,
                                                      level, dtype, who) is None:
        return None  # the forward agrees there too: nothing to name
    return name_forward(ordinary, user, dtype, level)


def _mask_without_labels(f: Callable[..., Any], d: Draw, dtype: str, framework: str, opts: Options,
                         who: _Who) -> None:
    from capsspec import ops as ref_ops

    v = d.case.ref_args[0]
    out = frameworks.call(f, user_args(d, dtype, opts, with_labels=False), framework)
    user = outputs_to_canonical(d, out, opts, f"{who.spec} without labels")
    # Near ties of the lengths may go either way in float32: the user's choice stands where it is tied.
    kept = np.argmax(np.sum(np.asarray(user[0], np.float64) ** 2, axis=-1), axis=1)
    ok = acceptable_argmax(np.sqrt(np.sum(v * v, axis=-1)), dtype, "reduction")
    labels = np.array([k if k in ok[b] else ok[b][0] for b, k in enumerate(kept)], dtype=np.int64)
    ref = ref_ops.mask(v, labels).reshape(v.shape)
    bad = _compare(d, user, [ref], [None], ["forward without labels (the longest capsule kept)"], "exact", dtype, who)
    if bad is not None:
        raise _Mismatch(Failure(bad[0], bad[1], d.recipe, dtype, bad[2], bad[3]))


# ---------------------------------------------------------------------------------------- the one call
def _run_dtype(fn: Callable[..., Any], op: str, dtype: str, framework: str, opts: Options, gradients: bool,
               numpy_vjp: Any, who: _Who, profile: str, max_examples: int | None,
               recipe: Mapping[str, Any] | None) -> tuple[int, Failure | None]:
    """(draws made, the smallest failure or None) for one dtype."""
    from hypothesis import given, settings

    count = [0, 0]  # draws made; the draw that failed first (0: none did)
    first: list[Failure | None] = [None]  # its failure, before shrinking

    def one(r: Mapping[str, Any]) -> None:
        count[0] += 1
        try:
            _one_draw(fn, draw_case(op, r, dtype, opts.outputs), dtype, framework, opts, gradients, numpy_vjp, who)
        except _Mismatch as m:
            if not count[1]:
                count[1], first[0] = count[0], m.failure
            raise

    if recipe is not None:
        try:
            one(dict(recipe))
        except _Mismatch as m:
            return (1, 0), m.failure
        return (1, 0), None
    # The full profile keeps failing draws in its example database, keyed by the test function: one key per
    # piece, function, layout and dtype, so that each check replays its own failures first (Hypothesis's hook).
    one._hypothesis_internal_add_digest = repr((op, who.spec, framework, opts.layout.text, dtype)).encode()
    budget = max_examples or profiles.PROFILES[profile]["ops"]
    # The profile's settings (ci: derandomised; full: random, failures kept in the example database).
    run = settings(profiles._settings(profile), max_examples=budget, report_multiple_bugs=False)(
        given(piece_recipes(op, dtype, opts))(one))
    # JAX compiles every op anew for each new shape: outside the full profile its sizes come from the suite's
    # shape pools, as for the jax backend in the ci profile (strategies.py, "Shape pools").
    was = S.pooled()
    S.pool_shapes(was or (framework == "jax" and profile != "full"))
    try:
        run()
    except _Mismatch as m:
        f = m.failure
        if first[0] is not None and first[0] is not f and first[0].what == f.what and f.namer is not None:
            # Shrinking ends on the edge of the tolerance, where a deviant form may no longer stand apart from
            # the reference: then the first failing draw (the same output failing) names the mistake.
            final, fallback = f.namer, first[0].namer
            f.namer = lambda: final() or (fallback() if fallback is not None else None)
        return (count[1], count[0] - count[1]), f
    finally:
        S.pool_shapes(was)
    return (count[0], 0), None


def check_op(op: str, fn: Callable[..., Any], *, framework: str | None = None,
             layout: str | Mapping[str, str] | None = None, profile: str = "ci",
             dtypes: Sequence[str] = ("float32",), labels: str = "index", iterations: int | str = 3,
             scale: float = 0.0005, inference: bool = True, outputs: int = 0, order: Any = (),
             extremes: bool = True, gradients: bool = True,
             vjp: Callable[..., Any] | None = None, max_examples: int | None = None,
             recipe: Mapping[str, Any] | None = None) -> Report:
    """Hold the user's `fn` for piece `op` (one of PIECES) to the reference; returns a Report (never raises
    for a mismatch). ValueError for bad arguments: an unknown op, framework, layout or profile.

    fn takes the piece's tensors in the user's layout: squash(s), capsule_lengths(v), predictions(u,
    weight), routing(u_hat) -> (v, c) (or v alone with outputs=1), margin_loss(lengths, labels),
    mask(v, labels) and mask(v), reconstruction_loss(reconstruction, images), and capsule_head(u,
    weight, labels) -> (lengths, loss): predictions, routing, lengths and margin loss composed.
    labels: "index" or "onehot". iterations: routing's fixed count, or the name of fn's keyword
    that takes it (then 1 to 5 are drawn). scale: the reconstruction loss's built-in scale. order:
    fn's inputs in its own order, e.g. ("labels", "lengths") for a Keras loss(y_true, y_pred).
    extremes=False keeps the drawn values within 1e-6..1e6 (the suite draws up to the edges of the
    float range, where |s|^2 overflows). vjp: NumPy functions' gradients, vjp(cotangent, *args) ->
    gradients (other frameworks use their autodiff). recipe: one draw only (what a failure's
    reproduction line passes)."""
    if op not in PIECES:
        raise ValueError(f"op must be one of {', '.join(PIECES)}, got {op!r}")
    if profile not in profiles.PROFILES:
        raise ValueError(f"profile must be one of {sorted(profiles.PROFILES)}, got {profile!r}")
    if labels not in ("index", "onehot"):
        raise ValueError(f"labels must be 'index' or 'onehot', got {labels!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, str)) or (
            isinstance(iterations, int) and iterations < 1):
        raise ValueError(f"iterations must be a positive int or the name of fn's keyword, got {iterations!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples must be a positive int, got {max_examples!r}")
    if isinstance(outputs, bool) or not isinstance(outputs, int) or not 0 <= outputs <= len(PIECES[op][1]):
        raise ValueError(f"outputs must be 0 (all) to {len(PIECES[op][1])} for {op}, got {outputs!r}")
    bad = [d for d in dtypes if d not in ("float32", "float64")]
    if bad or not dtypes:
        raise ValueError(f"dtypes must be float32 and/or float64, got {list(dtypes)!r}")
    fw = frameworks.normalize(framework) if framework else frameworks.infer_framework(fn)
    lay = parse(op, layout)
    opts = Options(lay, labels, iterations, float(scale), inference, int(outputs), check_order(op, order),
                   bool(extremes))
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    report = Report(op, f"{getattr(fn, '__module__', '?')}.{name}", fw, lay.text, profile, tuple(dtypes))
    grads = gradients and (frameworks.has_autodiff(fw) or vjp is not None)
    _describe(report, op, opts, grads, fw, gradients)
    who = _Who(f"{fw} {name}")
    start = time.perf_counter()
    for dtype in dtypes:
        (n, shrinking), failure = _run_dtype(fn, op, dtype, fw, opts, grads, vjp, who, profile, max_examples,
                                             recipe)
        report.draws[dtype], report.shrinking[dtype] = n, shrinking
        if failure is not None:
            failure.deviation = failure.namer() if failure.namer is not None else None
            failure.repro = _repro(op, fn, fw, lay.text, opts, failure.recipe, dtype)
            failure.inputs = _inputs(op, failure.recipe, dtype)
            report.failure = failure
            break
    report.seconds = time.perf_counter() - start
    return report


def _inputs(op: str, recipe: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    d = draw_case(op, recipe, dtype)
    return dict(zip(PIECES[op][0], d.case.args))


def _describe(report: Report, op: str, opts: Options, grads: bool, fw: str, asked: bool) -> None:
    outs = PIECES[op][1][:opts.outputs or None]
    report.checked.append(f"forward {', '.join(outs)} against capsspec.ops.{op} (float64), tolerance level "
                          f"{levels(op)[0]!r}")
    if op == "mask" and opts.inference:
        report.checked.append("forward without labels (the longest capsule kept)")
    if grads:
        wrt = ", ".join(f"d/d{PIECES[op][0][i]}" for i in PIECES[op][2])
        report.checked.append(f"gradients {wrt} through {fw}'s autodiff, tolerance level {levels(op)[1]!r}")
    elif asked:
        report.notes.append(f"gradients not checked: {fw} has no autodiff (pass vjp=... to check them)")
    if not opts.extremes:
        report.notes.append("values within 1e-6..1e6 only (extremes=False): the edges of the float range are not "
                            "checked")
    if op in ("routing", "capsule_head"):
        k = opts.iterations
        report.checked.append(f"iterations {'1 to 5 drawn, passed as ' + repr(k) if isinstance(k, str) else k}")


def assert_conforms(op: str, fn: Callable[..., Any], **kwargs: Any) -> Report:
    """check_op that raises ConformanceFailure (an AssertionError) with the report on a failure: for tests."""
    return check_op(op, fn, **kwargs).raise_for_failure()
