"""The door: every argument check of every spec name, written once, for the reference and every backend.

Implementations (the reference's math in capsspec.ops / model / optim and each backend's
ops / model / optim) check nothing. Every call to a spec name passes this door first: the
Backend base class wraps each implementation it resolves with `guard`, and the reference's
own modules put each public name behind it where it is defined (the `@checked` decorator), so
`capsspec.ops.squash` and `get_backend("torch").squash` refuse the same inputs with the same
messages.

Bad input raises ValueError whose message names the argument (as the reference's signature
spells it), says what was expected and what came.

The checks are written against a small adapter, `ArrayAdapter`, which every Backend is (the
base class's defaults are NumPy's, so the reference and NumPy-based backends override
nothing). A backend with other arrays overrides:

    array_type             how messages name its arrays ("torch.Tensor")
    is_array(a)            whether a is one of its arrays
    dtype_name(a)          "float32", "float64", "int64", ...
    shape_of(a)            a tuple of ints
    device_of(a)           a device name, or None where placement never conflicts
    all_finite(a)          bool: no NaN or inf (a host read)
    min_max(a)             (lowest, highest) as Python ints (a host read)
    repeated_row(a)        for (B, K) labels: the index of the first row that names a class
                           twice, or None (a host read; the default reads through NumPy)
    defers(a)              True where a host read of a would stall a device (see below)
    deferred_flags(a, n)   only where defers() can be True: a device-side 0-d flag that is
                           true when a has a NaN/inf (n is None) or a label outside [0, n)
    deferred_repeats(a)    likewise: a flag that is true when a row of (B, K) labels repeats a class
    native_params(params)  None for a dict of arrays under the canonical names (the default);
                           for a backend whose params are one object (an nn.Module, a
                           tf.Module): (config it was built for, dtype name, device), or a
                           ValueError message when params are not such an object
    native_state(state)    likewise: None for the reference's state dict, else the params
                           object the state belongs to, or a ValueError message

The value-check policy (the same on every backend): checks that read values (NaN/inf in float
inputs, label ranges, repeated classes in a row of (B, K) labels) always run on the CPU, before
the implementation. Where the array lives on a device whose reads stall it (defers(a) is True),
the check is queued as a device-side flag instead and settled at the next host read the caller
makes through the backend (to_numpy, params_to_numpy, state_to_numpy, synchronize,
settle_checks), which then raises the ValueError: deferred, never dropped.

What this module must never do: import a framework, or do any model arithmetic.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .config import MAX_ROUTING_ITERATIONS, AdamConfig, CapsNetConfig, check_loss_constants

FLOAT_DTYPES = ("float32", "float64")
REPEATS = "distinct classes per row"  # the door's value check of (B, K) labels (a marker, compared by identity)
INT_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")

__all__ = ["FLOAT_DTYPES", "ArrayAdapter", "NUMPY", "Door", "CHECKS", "guard", "checked", "unchecked",
           "check_params", "check_state", "spec_signature"]


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


# ============================================================================== the adapter
class ArrayAdapter:
    """What the door needs to know about a backend's arrays; NumPy's answers by default."""

    array_type = "numpy.ndarray"

    def is_array(self, a: Any) -> bool:
        return isinstance(a, np.ndarray)

    def dtype_name(self, a: Any) -> str:
        return a.dtype.name

    def shape_of(self, a: Any) -> tuple[int, ...]:
        return tuple(int(s) for s in a.shape)

    def device_of(self, a: Any) -> str | None:
        return None

    def all_finite(self, a: Any) -> bool:
        return bool(np.isfinite(a).all())

    def min_max(self, a: Any) -> tuple[int, int]:
        return int(a.min()), int(a.max())

    def repeated_row(self, a: Any) -> int | None:
        rows = np.sort(np.asarray(a), axis=1)
        bad = np.flatnonzero(np.any(rows[:, 1:] == rows[:, :-1], axis=1))
        return int(bad[0]) if bad.size else None

    def defers(self, a: Any) -> bool:
        return False

    def deferred_flags(self, a: Any, num_classes: int | None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} defers value checks but has no deferred_flags")

    def deferred_repeats(self, a: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} defers value checks but has no deferred_repeats")

    def native_params(self, params: Any) -> tuple[Any, str, str | None] | str | None:
        return None

    def native_state(self, state: Any) -> Any:
        return None

    # ------------------------------------------------------------------ deferred value checks
    def settle_checks(self) -> None:
        """Read back the value checks deferred so far and raise the first that failed."""
        pending = self.__dict__.get("_pending_checks")
        if not pending:
            return
        self.__dict__["_pending_checks"] = []
        for flag, message in pending:
            if bool(np.asarray(self._read_flag(flag))):
                raise ValueError(message + " (found when the device was next read; the check was deferred so that "
                                 "the call did not stall the device)")

    def _read_flag(self, flag: Any) -> Any:
        return flag.item() if hasattr(flag, "item") else flag

    def _defer(self, flag: Any, message: str) -> None:
        self.__dict__.setdefault("_pending_checks", []).append((flag, message))


NUMPY = ArrayAdapter()  # the reference's adapter


# ============================================================================== one call's checks
class Door:
    """The checks of one call against one adapter: structure first, values (NaN/inf, ranges) last."""

    def __init__(self, adapter: ArrayAdapter) -> None:
        self.k = adapter
        # (name, array, what): None for finiteness, num_classes for a label range, REPEATS for distinct rows
        self._values: list[tuple[str, Any, Any]] = []

    # ------------------------------------------------------------------ arrays
    def array(self, name: str, a: Any, *, ndim: int | None = None, shape: Sequence[int | None] | None = None,
              min_ndim: int = 0, batch: bool = False, finite: bool = True) -> tuple[int, ...]:
        """A float32/float64 array of the backend of the given rank/shape; returns its shape."""
        got = self._typed(name, a, FLOAT_DTYPES, "float32 or float64", "dtype float32 or float64")
        if shape is not None:
            ndim = len(shape)
        if ndim is not None and len(got) != ndim:
            want = f"shape {_fmt_shape(shape)}" if shape is not None else f"{ndim} dimensions"
            raise ValueError(f"{name} must have {want}, got shape {got}")
        if shape is not None and any(w is not None and w != g for w, g in zip(shape, got)):
            raise ValueError(f"{name} must have shape {_fmt_shape(shape)}, got shape {got}")
        if len(got) < min_ndim:
            raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got a {len(got)}-d array")
        if batch:
            self.nonempty(name, got)
        if finite:
            self._values.append((name, a, None))
        return got

    def _typed(self, name: str, a: Any, dtypes: tuple[str, ...], of: str, want: str) -> tuple[int, ...]:
        if not self.k.is_array(a):
            raise ValueError(f"{name} must be a {self.k.array_type} of {of}, got {type(a).__name__}")
        if self.k.dtype_name(a) not in dtypes:
            raise ValueError(f"{name} must have {want}, got {self.k.dtype_name(a)}")
        return self.k.shape_of(a)

    def nonempty(self, name: str, shape: tuple[int, ...]) -> None:
        if shape and shape[0] == 0:
            raise ValueError(f"{name} must hold at least one example: an empty batch has no loss or prediction, "
                             f"got shape {shape}")

    def labels(self, name: str, labels: Any, batch: int, num_classes: int) -> tuple[int, ...]:
        """Integer class labels, (batch,) or (batch, K) with K distinct classes per row, in
        [0, num_classes) (the range and the distinctness are value checks); returns the shape."""
        got = self._typed(name, labels, INT_DTYPES, "integers", "an integer dtype")
        if len(got) not in (1, 2) or got[0] != batch:
            raise ValueError(f"{name} must have shape ({batch},) or ({batch}, K) to match the batch, got shape {got}")
        if len(got) == 2 and not 1 <= got[1] <= num_classes:
            raise ValueError(f"{name} of shape ({batch}, K) must list 1 <= K <= {num_classes} distinct classes per "
                             f"example, got shape {got}")
        self._values.append((name, labels, num_classes))
        if len(got) == 2 and got[1] > 1:
            self._values.append((name, labels, REPEATS))
        return got

    def same(self, **arrays: Any) -> None:
        """The named arrays (None skipped) share one dtype and one device."""
        items = [(k, v) for k, v in arrays.items() if v is not None]
        first_name, first = items[0]
        for k, v in items[1:]:
            if self.k.dtype_name(v) != self.k.dtype_name(first):
                raise ValueError(f"{k} has dtype {self.k.dtype_name(v)} but {first_name} has dtype "
                                 f"{self.k.dtype_name(first)}: all float inputs of one call must share a dtype")
        self.same_device(**dict(items))

    def same_device(self, **arrays: Any) -> None:
        placed = [(k, self.k.device_of(v)) for k, v in arrays.items() if v is not None]
        placed = [(k, d) for k, d in placed if d is not None]
        for k, d in placed[1:]:
            if d != placed[0][1]:
                raise ValueError(f"{k} is on {d} but {placed[0][0]} is on {placed[0][1]}: they must share a device")

    # ------------------------------------------------------------------ Python values
    def integer(self, name: str, value: object, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        return int(value)

    def number(self, name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)

    def axis(self, name: str, axis: object, ndim: int) -> int:
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
            raise ValueError(f"{name} must be an int in [{-ndim}, {ndim}) for a {ndim}-d input, got {axis!r}")
        return int(axis)

    def scalar_cotangent(self, g: Any, like: Any) -> None:
        """The cotangent of a scalar loss: a 0-d array of the backend or a Python/NumPy number."""
        if self.k.is_array(g) or isinstance(g, np.ndarray):
            shape = self.k.shape_of(g) if self.k.is_array(g) else g.shape
            if shape != ():
                raise ValueError(f"g must be a scalar (the loss is a scalar), got shape {shape}")
            return
        if isinstance(g, bool) or not isinstance(g, (int, float, np.generic)):
            raise ValueError(f"g must be a scalar array or number, got {type(g).__name__}")

    def cotangent(self, g: Any, shape: tuple[int, ...], like: Any, like_name: str) -> None:
        self.array("g", g, shape=shape)
        self.same(**{like_name: like, "g": g})

    # ------------------------------------------------------------------ values, last
    def settle(self, where: str) -> None:
        """Run the value checks: now, or (where a read would stall a device) deferred to the next read."""
        for name, a, classes in self._values:
            if classes is REPEATS:
                if self.k.defers(a):
                    self.k._defer(self.k.deferred_repeats(a), f"{name} passed to {where} must list distinct classes "
                                                              "in each row")
                elif (row := self.k.repeated_row(a)) is not None:
                    raise ValueError(f"{name} must list distinct classes in each row (one class per digit), got row "
                                     f"{row} naming a class twice")
            elif self.k.defers(a):
                what = "only finite values" if classes is None else f"labels in [0, {classes})"
                self.k._defer(self.k.deferred_flags(a, classes), f"{name} passed to {where} must contain {what}")
            elif classes is None:
                if not self.k.all_finite(a):
                    raise ValueError(f"{name} must contain only finite values, got NaN or inf")
            elif math.prod(self.k.shape_of(a)):
                lo, hi = self.k.min_max(a)
                if lo < 0 or hi >= classes:
                    raise ValueError(f"{name} must lie in [0, {classes}), got a label {lo if lo < 0 else hi}")


# ============================================================================== the checks of each name
# Each check takes the Door and the spec name's arguments, with the reference's parameter names
# and defaults (its signature is the spec's: spec_signature reads it), and returns the
# arguments it normalised (ints, floats), if any.
def _conv(d: Door, x, weight, bias, stride, xname="x"):
    xs = d.array(xname, x, ndim=4, batch=True)
    ws = d.array("weight", weight, ndim=4)
    stride = d.integer("stride", stride)
    if ws[1] != xs[1]:
        raise ValueError(f"weight must have shape (out, {xs[1]}, kh, kw) to match {xname}'s {xs[1]} channels, got {ws}")
    d.array("bias", bias, shape=(ws[0],))
    if ws[2] > xs[2] or ws[3] > xs[3]:
        raise ValueError(f"weight's kernel {ws[2:]} is larger than {xname}'s spatial size {xs[2:]}")
    d.same(**{xname: x, "weight": weight, "bias": bias})
    return xs, ws, stride


def conv2d(d: Door, x, weight, bias, stride=1):
    return {"stride": _conv(d, x, weight, bias, stride)[2]}


def conv2d_vjp(d: Door, g, x, weight, bias, stride=1):
    (b, _, h, w), (o, _, kh, kw), stride = _conv(d, x, weight, bias, stride)
    d.cotangent(g, (b, o, (h - kh) // stride + 1, (w - kw) // stride + 1), x, "x")
    return {"stride": stride}


def squash(d: Door, s, axis=-1):
    shape = d.array("s", s, min_ndim=1)
    return {"axis": d.axis("axis", axis, len(shape))}


def squash_vjp(d: Door, g, s, axis=-1):
    fixed = squash(d, s, axis)
    d.cotangent(g, d.k.shape_of(s), s, "s")
    return fixed


def _primary(d: Door, h, weight, bias, capsule_dim, stride):
    (b, _, hh, ww), (o, _, kh, kw), stride = _conv(d, h, weight, bias, stride, xname="h")
    capsule_dim = d.integer("capsule_dim", capsule_dim)
    if o % capsule_dim:
        raise ValueError(f"weight's {o} output channels are not a whole number of {capsule_dim}-D capsule types")
    n = (o // capsule_dim) * ((hh - kh) // stride + 1) * ((ww - kw) // stride + 1)
    return (b, n, capsule_dim), {"capsule_dim": capsule_dim, "stride": stride}


def primary_capsules(d: Door, h, weight, bias, capsule_dim, stride):
    return _primary(d, h, weight, bias, capsule_dim, stride)[1]


def primary_capsules_vjp(d: Door, g, h, weight, bias, capsule_dim, stride):
    out_shape, fixed = _primary(d, h, weight, bias, capsule_dim, stride)
    d.cotangent(g, out_shape, h, "h")
    return fixed


def _predictions(d: Door, u, weight):
    b, n, dim = d.array("u", u, ndim=3, batch=True)
    ws = d.array("weight", weight, ndim=4)
    if ws[0] != n or ws[3] != dim:
        raise ValueError(f"weight must have shape ({n}, J, E, {dim}) to match u's {n} capsules of {dim} dims, got {ws}")
    d.same(u=u, weight=weight)
    return b, n, ws[1], ws[2]


def predictions(d: Door, u, weight):
    _predictions(d, u, weight)


def predictions_vjp(d: Door, g, u, weight):
    d.cotangent(g, _predictions(d, u, weight), u, "u")


def routing(d: Door, u_hat, iterations, none_of_the_above=False):
    d.array("u_hat", u_hat, ndim=4, batch=True)
    fixed = {"iterations": d.integer("iterations", iterations)}
    if fixed["iterations"] > MAX_ROUTING_ITERATIONS:
        raise ValueError(f"iterations must be at most {MAX_ROUTING_ITERATIONS} (CapsNetConfig's bound), got {iterations}")
    if not isinstance(none_of_the_above, (bool, np.bool_)):
        raise ValueError(f"none_of_the_above must be a bool, got {none_of_the_above!r}")
    fixed["none_of_the_above"] = bool(none_of_the_above)
    return fixed


def routing_vjp(d: Door, g, u_hat, iterations, none_of_the_above=False):
    fixed = routing(d, u_hat, iterations, none_of_the_above)
    if not isinstance(g, (tuple, list)) or len(g) != 2:
        raise ValueError(f"g must be a pair (g_v, g_c) with g_c possibly None, got {type(g).__name__}")
    bsz, n, j, e = d.k.shape_of(u_hat)
    d.array("g_v", g[0], shape=(bsz, j, e))
    if g[1] is not None:
        d.array("g_c", g[1], shape=(bsz, n, j))
    d.same(u_hat=u_hat, g_v=g[0], g_c=g[1])
    return fixed


def capsule_lengths(d: Door, v):
    d.array("v", v, min_ndim=1)


def capsule_lengths_vjp(d: Door, g, v):
    d.cotangent(g, d.array("v", v, min_ndim=1)[:-1], v, "v")


def _margin(d: Door, lengths, labels, m_plus, m_minus, lambda_):
    b, j = d.array("lengths", lengths, ndim=2, batch=True)
    d.labels("labels", labels, b, j)
    d.same_device(lengths=lengths, labels=labels)
    fixed = {"m_plus": d.number("m_plus", m_plus), "m_minus": d.number("m_minus", m_minus),
             "lambda_": d.number("lambda_", lambda_)}
    check_loss_constants(**fixed)  # CapsNetConfig's own rule: what it refuses, the spec's ops refuse
    return fixed


def margin_loss(d: Door, lengths, labels, m_plus=0.9, m_minus=0.1, lambda_=0.5):
    return _margin(d, lengths, labels, m_plus, m_minus, lambda_)


def margin_loss_vjp(d: Door, g, lengths, labels, m_plus=0.9, m_minus=0.1, lambda_=0.5):
    fixed = _margin(d, lengths, labels, m_plus, m_minus, lambda_)
    d.scalar_cotangent(g, lengths)
    return fixed


def _mask(d: Door, v, labels):
    b, j, e = d.array("v", v, ndim=3, batch=True)
    if labels is None:
        return b, j * e
    got = d.labels("labels", labels, b, j)
    d.same_device(v=v, labels=labels)
    return (*got, j * e)  # (B, J*E), or (B, K, J*E): one masked row per listed class


def mask(d: Door, v, labels=None):
    _mask(d, v, labels)


def mask_vjp(d: Door, g, v, labels=None):
    d.cotangent(g, _mask(d, v, labels), v, "v")


def _decoder(d: Door, x, weights, biases):
    *lead, width = d.array("x", x, min_ndim=2, batch=True)  # (..., width): the MLP on every row
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise ValueError("weights and biases must be sequences of arrays, one per layer")
    if len(weights) == 0 or len(weights) != len(biases):
        raise ValueError(f"weights and biases must be non-empty and of equal length, got {len(weights)} and "
                         f"{len(biases)}")
    for k, (w, bias) in enumerate(zip(weights, biases)):
        width = d.array(f"weights[{k}]", w, shape=(None, width))[0]
        d.array(f"biases[{k}]", bias, shape=(width,))
        d.same(x=x, **{f"weights[{k}]": w, f"biases[{k}]": bias})
    return (*lead, width)


def decoder(d: Door, x, weights, biases):
    _decoder(d, x, weights, biases)


def decoder_vjp(d: Door, g, x, weights, biases):
    d.cotangent(g, _decoder(d, x, weights, biases), x, "x")


def _reconstruction(d: Door, reconstruction, images, scale):
    # (B, C*H*W) with images (B, C, H, W), or (B, K, C*H*W) with (B, K, C, H, W): one row per digit.
    rs = d.array("reconstruction", reconstruction, min_ndim=2, batch=True)
    if len(rs) > 3:
        raise ValueError(f"reconstruction must have shape (B, C*H*W) or (B, K, C*H*W), got shape {rs}")
    ims = d.array("images", images, min_ndim=len(rs) - 1)
    lead = len(rs) - 1
    if ims[:lead] != rs[:lead] or math.prod(ims[lead:]) != rs[-1]:
        raise ValueError(f"images {ims} do not match reconstruction {rs}: each image must flatten to one "
                         "reconstruction row")
    d.same(reconstruction=reconstruction, images=images)
    fixed = {"scale": d.number("scale", scale)}
    check_loss_constants(**fixed)
    return fixed


def reconstruction_loss(d: Door, reconstruction, images, scale=0.0005):
    return _reconstruction(d, reconstruction, images, scale)


def reconstruction_loss_vjp(d: Door, g, reconstruction, images, scale=0.0005):
    fixed = _reconstruction(d, reconstruction, images, scale)
    d.scalar_cotangent(g, reconstruction)
    return fixed


# ------------------------------------------------------------------------------ model inputs
def check_params(params: Any, shapes: Mapping[str, tuple[int, ...]], *, name: str = "params",
                 door: Door | None = None) -> str:
    """A dict with exactly the canonical names and shapes, one float dtype (and one device); returns
    the dtype. Without a door (conversions from NumPy) it checks NumPy arrays, values included."""
    d = door if door is not None else Door(NUMPY)
    if not isinstance(params, Mapping):
        raise ValueError(f"{name} must be a dict of arrays keyed by canonical names, got {type(params).__name__}")
    missing = [k for k in shapes if k not in params]
    extra = [k for k in params if k not in shapes]
    if missing or extra:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise ValueError(f"{name} does not match the config: " + "; ".join(parts)
                         + f". Expected exactly {list(shapes)}")
    for k, want in shapes.items():
        a = params[k]
        if d.k.is_array(a) and d.k.shape_of(a) != tuple(want):
            raise ValueError(f"{name}[{k!r}] must have shape {tuple(want)} to match the config, got shape "
                             f"{d.k.shape_of(a)}")
        d.array(f"{name}[{k!r}]", a, shape=tuple(want))
    dtypes = sorted({d.k.dtype_name(a) for a in params.values()})
    if len(dtypes) > 1:
        raise ValueError(f"{name} mixes dtypes {dtypes}: all parameters must share one dtype")
    d.same_device(**{f"{name}[{k!r}]": a for k, a in params.items()})
    if door is None:
        d.settle("params_from_numpy")
    return dtypes[0]


def _model(d: Door, params, x, config, labels, *, labels_required: bool = False):
    if not isinstance(config, CapsNetConfig):
        raise ValueError(f"config must be a CapsNetConfig, got {type(config).__name__}")
    native = d.k.native_params(params)
    if isinstance(native, str):
        raise ValueError(native)
    if native is None:
        dtype = check_params(params, config.param_shapes(), door=d)
        device = d.k.device_of(next(iter(params.values())))
    else:
        built_for, dtype, device = native
        if built_for != config:
            # Name only the fields that differ: two whole config reprs bury the one that matters.
            ours, theirs = config.to_dict(), built_for.to_dict()
            diff = ", ".join(f"{k}={ours[k]!r} but params have {theirs[k]!r}" for k in ours if ours[k] != theirs[k])
            raise ValueError(f"config does not match the config params were built for: {diff}")
    xs = d.array("x", x, shape=(None, *config.input_shape), batch=True)
    if d.k.dtype_name(x) != dtype:
        raise ValueError(f"x has dtype {d.k.dtype_name(x)} but params have dtype {dtype}: they must match")
    where = d.k.device_of(x)
    if device is not None and where is not None and where != device:
        raise ValueError(f"x is on {where} but params are on {device}: they must share a device")
    if labels is None and labels_required:
        raise ValueError("labels are required here (the loss needs the true classes), got None")
    if labels is not None:
        d.labels("labels", labels, xs[0], config.num_classes)
        d.same_device(x=x, labels=labels)


def _targets(d: Door, x, labels, config, targets) -> None:
    """The images the reconstructions are compared with: one per listed class, shaped
    (*labels.shape, C, H, W); None stands for x, which only (B,) labels allow."""
    want = (*d.k.shape_of(labels), *config.input_shape)
    if targets is None:
        if len(want) > 4 and config.use_decoder:
            raise ValueError(f"targets are required with (B, K) labels: each of the K decodings is compared with its "
                             f"own digit's image, shape {want}; got None (x itself stands in only for (B,) labels)")
        return
    d.array("targets", targets, shape=want)
    d.same(x=x, targets=targets)


def forward(d: Door, params, x, config, labels=None):
    _model(d, params, x, config, labels)


def loss(d: Door, params, x, labels, config, targets=None):
    _model(d, params, x, config, labels, labels_required=True)
    _targets(d, x, labels, config, targets)


def value_and_grad(d: Door, params, x, labels, config, targets=None):
    _model(d, params, x, config, labels, labels_required=True)
    _targets(d, x, labels, config, targets)


def predict(d: Door, params, x, config):
    _model(d, params, x, config, None)


# ------------------------------------------------------------------------------ optimizer
def adam_init(d: Door, params):
    native = d.k.native_params(params)
    if isinstance(native, str):
        raise ValueError(native)
    if native is None:
        if not isinstance(params, Mapping) or not params:
            raise ValueError(f"params must be a non-empty dict of arrays, got {type(params).__name__}")
        for k, a in params.items():
            d.array(f"params[{k!r}]", a, finite=False)


def _adam_config(adam: Any) -> None:
    if not isinstance(adam, AdamConfig):
        raise ValueError(f"adam must be an AdamConfig, got {type(adam).__name__}")


def _state(d: Door, state: Any, params: Any) -> None:
    owner = d.k.native_state(state)
    if isinstance(owner, str):
        raise ValueError(owner)
    if owner is not None:
        if owner is not params:
            raise ValueError("state belongs to other params: make it with adam_init(params) for these params")
        return
    check_state(state, {k: d.k.shape_of(p) for k, p in params.items()}, d.k.dtype_name(next(iter(params.values()))),
                door=d, params=params)


def check_state(state: Any, shapes: Mapping[str, tuple[int, ...]], dtype: str, *, door: Door | None = None,
                params: Mapping[str, Any] | None = None) -> int:
    """A {"step", "m", "v"} dict whose moments match the parameters' names, shapes and dtype (and,
    given params, their array type and device); returns the step. Without a door: NumPy arrays."""
    d = door if door is not None else Door(NUMPY)
    if not isinstance(state, Mapping) or not {"step", "m", "v"} <= set(state):
        raise ValueError("state must be a dict with 'step', 'm' and 'v', as adam_init returns")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"state['step'] must be a non-negative int, got {step!r}")
    for part in ("m", "v"):
        arrays = state[part]
        if not isinstance(arrays, Mapping) or set(arrays) != set(shapes):
            got = sorted(arrays) if isinstance(arrays, Mapping) else type(arrays).__name__
            raise ValueError(f"state[{part!r}] has keys {got} but params have {sorted(shapes)}")
        for k, want in shapes.items():
            name, a = f"state[{part!r}][{k!r}]", arrays[k]
            if not d.k.is_array(a) or d.k.shape_of(a) != tuple(want) or d.k.dtype_name(a) != dtype:
                got = f"{d.k.shape_of(a)} {d.k.dtype_name(a)}" if d.k.is_array(a) else type(a).__name__
                raise ValueError(f"{name} must be a {d.k.array_type} of the parameter's shape {tuple(want)} and "
                                 f"dtype {dtype}, got {got}")
            if params is not None:
                d.same_device(**{name: a, "the parameter": params[k]})
    return int(step)


def _like(d: Door, name: str, a: Any, p: Any, whose: str) -> None:
    shape = d.k.shape_of(p)
    if not d.k.is_array(a) or d.k.shape_of(a) != shape or d.k.dtype_name(a) != d.k.dtype_name(p):
        got = (f"{type(a).__name__} {d.k.shape_of(a)} {d.k.dtype_name(a)}" if d.k.is_array(a)
               else type(a).__name__)
        raise ValueError(f"{name} must be a {d.k.array_type} of {whose} shape {shape} and dtype "
                         f"{d.k.dtype_name(p)}, got {got}")
    d.same_device(**{name: a, "the parameter": p})


def adam_update(d: Door, params, grads, state, adam=AdamConfig()):
    _adam_config(adam)
    native = d.k.native_params(params)
    if isinstance(native, str):
        raise ValueError(native)
    if native is None and not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict of arrays keyed by canonical names, got {type(params).__name__}")
    _state(d, state, params)
    shapes = (native[0].param_shapes() if isinstance(native, tuple) and isinstance(native[0], CapsNetConfig)
              else {k: d.k.shape_of(p) for k, p in params.items()})
    if not isinstance(grads, Mapping) or set(grads) != set(shapes):
        got = sorted(grads) if isinstance(grads, Mapping) else type(grads).__name__
        raise ValueError(f"grads have keys {got} but params have {list(shapes)}")
    for k, want in shapes.items():
        g = grads[k]
        if native is None:
            _like(d, f"grads[{k!r}]", g, params[k], "the parameter's")
        else:
            got = d.array(f"grads[{k!r}]", g, finite=False)
            if got != tuple(want) or d.k.dtype_name(g) != native[1]:
                raise ValueError(f"grads[{k!r}] must have the parameter's shape {tuple(want)} and dtype {native[1]}, "
                                 f"got {got} {d.k.dtype_name(g)}")


def train_step(d: Door, params, state, x, labels, config, adam=AdamConfig(), targets=None):
    _model(d, params, x, config, labels, labels_required=True)
    _targets(d, x, labels, config, targets)
    _state(d, state, params)
    _adam_config(adam)


# The spec names' checks, by name (capsspec.spec.SPEC_NAMES lists the same names).
CHECKS: dict[str, Callable[..., Any]] = {f.__name__: f for f in (
    conv2d, conv2d_vjp, squash, squash_vjp, primary_capsules, primary_capsules_vjp, predictions, predictions_vjp,
    routing, routing_vjp, capsule_lengths, capsule_lengths_vjp, margin_loss, margin_loss_vjp, mask, mask_vjp,
    decoder, decoder_vjp, reconstruction_loss, reconstruction_loss_vjp, forward, loss, value_and_grad, predict,
    adam_init, adam_update, train_step)}


@functools.lru_cache(maxsize=None)
def spec_signature(name: str) -> inspect.Signature:
    """The signature of a spec name, as its check spells it (the door's first parameter dropped)."""
    sig = inspect.signature(CHECKS[name])
    return sig.replace(parameters=list(sig.parameters.values())[1:])


# ============================================================================== wrapping
def guard(name: str, impl: Callable[..., Any], adapter: ArrayAdapter) -> Callable[..., Any]:
    """impl behind the door: the checks of `name` against `adapter`, then impl with the normalised arguments."""
    impl = getattr(impl, "__capsspec_unchecked__", impl)  # never two doors
    check = CHECKS[name]
    sig = spec_signature(name)

    @functools.wraps(impl)
    def through_door(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        d = Door(adapter)
        fixed = check(d, **bound.arguments)
        if fixed:
            bound.arguments.update(fixed)
        d.settle(name)
        return impl(*bound.args, **bound.kwargs)

    through_door.__signature__ = sig  # type: ignore[attr-defined]
    through_door.__capsspec_unchecked__ = impl  # type: ignore[attr-defined]
    return through_door


def unchecked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The implementation behind a guarded name (fn itself when it has no door)."""
    return getattr(fn, "__capsspec_unchecked__", fn)


def checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of the reference's public functions: fn behind the door of the spec name it is defined
    under (its checks in CHECKS, against NumPy arrays). `unchecked(name)` is fn itself, for the
    reference's own calls with arguments already checked."""
    if fn.__name__ not in CHECKS:
        raise TypeError(f"@checked: {fn.__module__}.{fn.__name__} is not a spec name (no check in CHECKS)")
    return guard(fn.__name__, fn, NUMPY)
