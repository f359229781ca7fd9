"""The spec's ops on torch tensors, with VJPs computed by torch.autograd.

Every op of capsspec.spec.OPS has the reference's name and signature (capsspec.ops) and the
same arithmetic, written with torch operations so that autograd differentiates it; each
``<op>_vjp(g, *args)`` runs the op on detached copies of its differentiable arguments and asks
``torch.autograd.grad`` for the vector-Jacobian product. The layers of the model (model.py)
call the private, unchecked forms of these functions (``_squash``, ``_routing``, ...), so each
piece of math exists once.

Numerics the spec fixes (capsspec.ops states them) and how they are met under autograd:
* squash(s) = s |s| / (1 + |s|^2) with value and gradient exactly 0 at s = 0. |s| is taken as
  sqrt(where(|s|^2 > 0, |s|^2, 1)) and the result masked again ("double where"), so autograd
  never sees sqrt'(0) = inf (inf * 0 = NaN). The factor |s| / (1 + |s|^2) is evaluated as
  n / (1 + n^2) for n <= 1 and 1 / (n + 1/n) for n > 1, each branch on a clamped n, so no
  value or gradient overflows for any s whose |s|^2 is finite (a tiny n would make (1/n)^2
  overflow in the backward of the second form; a huge one n^2 in the first).
* capsule_lengths has gradient 0 at v = 0 (same double where).
* routing: b starts at 0 per example, softmax over the parents j, nothing detached, the
  coupling coefficients returned are the last iteration's; only the iterations are a loop.

Inputs are validated like the reference's (ValueError naming the argument, what was expected
and what came) on shape, dtype and device, which cost no device synchronisation. Two checks
differ: values are not checked for NaN/inf (that would read every tensor back to the host),
and label ranges are checked here (a host read) but skipped by train_step on CUDA.

What this module must never do: import the reference's implementation, or change its inputs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from capsspec.validation import check_same_dtype

__all__ = [
    "conv2d", "conv2d_vjp",
    "squash", "squash_vjp",
    "primary_capsules", "primary_capsules_vjp",
    "predictions", "predictions_vjp",
    "routing", "routing_vjp",
    "capsule_lengths", "capsule_lengths_vjp",
    "margin_loss", "margin_loss_vjp",
    "mask", "mask_vjp",
    "decoder", "decoder_vjp",
    "reconstruction_loss", "reconstruction_loss_vjp",
    "check_tensor", "check_label_tensor",
]

_FLOATS = (torch.float32, torch.float64)


# ============================================================================== validation
def _shape_text(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_tensor(name: str, t: Any, *, ndim: int | None = None, shape: Sequence[int | None] | None = None) -> torch.Tensor:
    """A float32/float64 torch.Tensor of the given rank/shape (values are not read)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of float32 or float64, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must have dtype float32 or float64, got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        want = f"shape {_shape_text(shape)}" if shape is not None else f"{ndim} dimensions"
        raise ValueError(f"{name} must have {want}, got shape {tuple(t.shape)}")
    if shape is not None and any(w is not None and w != g for w, g in zip(shape, t.shape)):
        raise ValueError(f"{name} must have shape {_shape_text(shape)}, got shape {tuple(t.shape)}")
    return t


def check_same(**tensors: Any) -> None:
    """The named tensors share one dtype and one device."""
    check_same_dtype(**tensors)
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for k, v in items[1:]:
        if v.device != first.device:
            raise ValueError(f"{k} is on {v.device} but {first_name} is on {first.device}: they must share a device")


def check_label_tensor(name: str, labels: Any, batch: int, num_classes: int, *, check_range: bool = True) -> torch.Tensor:
    """Integer class labels of shape (batch,) in [0, num_classes). The range check reads the labels
    back to the host (a device synchronisation on CUDA); check_range=False skips it."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of integers, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {str(labels.dtype).replace('torch.', '')}")
    if tuple(labels.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got shape {tuple(labels.shape)}")
    if check_range and labels.numel():
        lo, hi = (int(a) for a in torch.aminmax(labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got a label {lo if lo < 0 else hi}")
    return labels


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_cotangent(name: str, g: Any, like: torch.Tensor) -> torch.Tensor:
    check_tensor(name, g, shape=tuple(like.shape))
    check_same(**{name: g, "the op's output": like})
    return g


def _scalar_cotangent(g: Any, like: torch.Tensor) -> torch.Tensor:
    """The cotangent of a scalar loss: a 0-d tensor or a Python/NumPy number, in like's dtype."""
    if isinstance(g, torch.Tensor):
        if g.dim() != 0:
            raise ValueError(f"g must be a scalar (the loss is a scalar), got shape {tuple(g.shape)}")
        return g.to(dtype=like.dtype, device=like.device)
    if isinstance(g, (np.ndarray, np.generic)) and np.shape(g) != ():
        raise ValueError(f"g must be a scalar (the loss is a scalar), got shape {np.shape(g)}")
    if isinstance(g, bool) or not isinstance(g, (int, float, np.ndarray, np.generic)):
        raise ValueError(f"g must be a scalar tensor or number, got {type(g).__name__}")
    return torch.tensor(float(g), dtype=like.dtype, device=like.device)


# ============================================================================== autograd plumbing
def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _vjp(outputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor | None],
         inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """sum_k <cotangent_k, d output_k / d input> for each input; zeros where an input is unused."""
    # An output may not depend on the inputs at all (routing's c with one iteration is uniform).
    pairs = [(o, g) for o, g in zip(outputs, cotangents) if g is not None and o.requires_grad]
    if not pairs:
        return tuple(torch.zeros_like(i) for i in inputs)
    grads = torch.autograd.grad([o for o, _ in pairs], list(inputs), [g for _, g in pairs], allow_unused=True)
    return tuple(torch.zeros_like(i) if gi is None else gi for i, gi in zip(inputs, grads))


# ============================================================================== conv2d
def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int) -> torch.Tensor:
    return F.conv2d(x, weight, bias, stride=stride)


def _check_conv2d(x, weight, bias, stride) -> int:
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    stride = _check_int("stride", stride)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must have shape (out, {x.shape[1]}, kh, kw) to match x's {x.shape[1]} channels, "
            f"got {tuple(weight.shape)}"
        )
    check_tensor("bias", bias, shape=(weight.shape[0],))
    if weight.shape[2] > x.shape[2] or weight.shape[3] > x.shape[3]:
        raise ValueError(f"weight's kernel {tuple(weight.shape[2:])} is larger than x's spatial size {tuple(x.shape[2:])}")
    check_same(x=x, weight=weight, bias=bias)
    return stride


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Cross-correlation with valid padding: x (B,C,H,W), weight (O,C,kh,kw), bias (O,) -> (B,O,Ho,Wo)."""
    stride = _check_conv2d(x, weight, bias, stride)
    return _conv2d(x, weight, bias, stride)


def conv2d_vjp(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int = 1):
    """Gradients of conv2d with respect to (x, weight, bias)."""
    stride = _check_conv2d(x, weight, bias, stride)
    with torch.enable_grad():
        args = [_leaf(x), _leaf(weight), _leaf(bias)]
        y = _conv2d(*args, stride)
        _check_cotangent("g", g, y)
        return _vjp([y], [g], args)


# ============================================================================== squash
def _safe_norm(sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|s| where |s|^2 > 0 else 1, the mask |s|^2 > 0): a norm whose autograd is finite everywhere."""
    nz = sq > 0
    return torch.sqrt(torch.where(nz, sq, torch.ones_like(sq))), nz


def _squash(s: torch.Tensor, axis: int = -1) -> torch.Tensor:
    n, nz = _safe_norm(torch.sum(s * s, dim=axis, keepdim=True))
    small = n.clamp(max=1.0)
    large = n.clamp(min=1.0)
    f = torch.where(n <= 1, small / (1 + small * small), 1 / (large + 1 / large))
    return torch.where(nz, f, torch.zeros_like(f)) * s


def _check_axis(axis: object, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be an int in [{-ndim}, {ndim}), got {axis!r}")
    return int(axis)


def squash(s: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Eq. 1: v = |s|^2 / (1 + |s|^2) * s / |s|, along `axis`; 0 at s = 0."""
    check_tensor("s", s)
    return _squash(s, _check_axis(axis, max(s.dim(), 1)))


def squash_vjp(g: torch.Tensor, s: torch.Tensor, axis: int = -1):
    """Gradient of squash with respect to (s,); 0 at s = 0."""
    check_tensor("s", s)
    axis = _check_axis(axis, max(s.dim(), 1))
    with torch.enable_grad():
        s_ = _leaf(s)
        out = _squash(s_, axis)
        _check_cotangent("g", g, out)
        return _vjp([out], [g], [s_])


# ============================================================================== primary capsules
def _to_capsules(a: torch.Tensor, capsule_dim: int) -> torch.Tensor:
    b, ch, gh, gw = a.shape
    t = ch // capsule_dim
    # Channels to the last axis *before* the reshape, so one capsule is D channels at one grid
    # position (not D neighbouring positions of one channel).
    return a.reshape(b, t, capsule_dim, gh, gw).permute(0, 1, 3, 4, 2).reshape(b, t * gh * gw, capsule_dim)


def _primary_capsules(h, weight, bias, capsule_dim: int, stride: int) -> torch.Tensor:
    # No ReLU before squash: the spec's PrimaryCaps is the convolution, regrouped, squashed.
    return _squash(_to_capsules(_conv2d(h, weight, bias, stride), capsule_dim))


def _check_primary(h, weight, bias, capsule_dim, stride) -> tuple[int, int]:
    stride = _check_conv2d(h, weight, bias, stride)
    capsule_dim = _check_int("capsule_dim", capsule_dim)
    if weight.shape[0] % capsule_dim:
        raise ValueError(
            f"weight's {weight.shape[0]} output channels are not a whole number of {capsule_dim}-D capsule types"
        )
    return capsule_dim, stride


def primary_capsules(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, capsule_dim: int,
                     stride: int) -> torch.Tensor:
    """PrimaryCaps: conv (no ReLU), channels o = t*D + d regrouped into capsules, squashed.

    h (B,C,H,W), weight (T*D,C,k,k) -> u (B, T*Gh*Gw, D) with capsule i = (t*Gh + y)*Gw + x.
    """
    capsule_dim, stride = _check_primary(h, weight, bias, capsule_dim, stride)
    return _primary_capsules(h, weight, bias, capsule_dim, stride)


def primary_capsules_vjp(g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         capsule_dim: int, stride: int):
    """Gradients of primary_capsules with respect to (h, weight, bias)."""
    capsule_dim, stride = _check_primary(h, weight, bias, capsule_dim, stride)
    with torch.enable_grad():
        args = [_leaf(h), _leaf(weight), _leaf(bias)]
        u = _primary_capsules(*args, capsule_dim, stride)
        _check_cotangent("g", g, u)
        return _vjp([u], [g], args)


# ============================================================================== predictions
def _predictions(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, j, e, d = weight.shape
    # One (B, D) x (D, J*E) product per child capsule, batched over the children.
    out = torch.bmm(u.transpose(0, 1), weight.reshape(n, j * e, d).transpose(1, 2))  # (N, B, J*E)
    return out.reshape(n, u.shape[0], j, e).transpose(0, 1)


def _check_predictions(u, weight) -> None:
    check_tensor("u", u, ndim=3)
    check_tensor("weight", weight, ndim=4)
    n, d = u.shape[1], u.shape[2]
    if weight.shape[0] != n or weight.shape[3] != d:
        raise ValueError(
            f"weight must have shape ({n}, J, E, {d}) to match u's {n} capsules of {d} dims, got {tuple(weight.shape)}"
        )
    check_same(u=u, weight=weight)


def predictions(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """u_hat[b, i, j] = weight[i, j] @ u[b, i]: u (B,N,D), weight (N,J,E,D) -> (B,N,J,E)."""
    _check_predictions(u, weight)
    return _predictions(u, weight)


def predictions_vjp(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor):
    """Gradients of predictions with respect to (u, weight)."""
    _check_predictions(u, weight)
    with torch.enable_grad():
        args = [_leaf(u), _leaf(weight)]
        out = _predictions(*args)
        _check_cotangent("g", g, out)
        return _vjp([out], [g], args)


# ============================================================================== routing
def _routing(u_hat: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, n, j, e = u_hat.shape
    # (B, J, N, E): both contractions below become batched matrix products over (B, J).
    ut = u_hat.permute(0, 2, 1, 3).contiguous()
    logits = u_hat.new_zeros(bsz, j, n)  # b_ij, one set per example, starting at 0
    for t in range(iterations):
        c = torch.softmax(logits, dim=1)  # over the parents j, never over the children i
        s = torch.matmul(c.unsqueeze(2), ut).squeeze(2)  # (B, J, E)
        v = _squash(s)
        if t + 1 < iterations:  # the last update of b cannot change any output
            # Nothing is detached: gradients flow through every iteration.
            logits = logits + torch.matmul(ut, v.unsqueeze(3)).squeeze(3)
    return v, c.transpose(1, 2)


def routing(u_hat: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedure 1, routing by agreement. u_hat (B,N,J,E) -> (v (B,J,E), c (B,N,J)).

    c are the coupling coefficients used in the last iteration: c[b, i] sums to 1 over j.
    """
    check_tensor("u_hat", u_hat, ndim=4)
    return _routing(u_hat, _check_int("iterations", iterations))


def routing_vjp(g: tuple[torch.Tensor, torch.Tensor | None], u_hat: torch.Tensor, iterations: int):
    """Gradient of routing with respect to (u_hat,), given g = (g_v, g_c); g_c may be None."""
    check_tensor("u_hat", u_hat, ndim=4)
    iterations = _check_int("iterations", iterations)
    if not isinstance(g, (tuple, list)) or len(g) != 2:
        raise ValueError(f"g must be a pair (g_v, g_c) with g_c possibly None, got {type(g).__name__}")
    g_v, g_c = g
    bsz, n, j, e = u_hat.shape
    check_tensor("g_v", g_v, shape=(bsz, j, e))
    if g_c is not None:
        check_tensor("g_c", g_c, shape=(bsz, n, j))
    check_same(u_hat=u_hat, g_v=g_v, g_c=g_c)
    with torch.enable_grad():
        u_ = _leaf(u_hat)
        v, c = _routing(u_, iterations)
        return _vjp([v, c], [g_v, g_c], [u_])


# ============================================================================== lengths
def _lengths(v: torch.Tensor) -> torch.Tensor:
    n, nz = _safe_norm(torch.sum(v * v, dim=-1))
    return torch.where(nz, n, torch.zeros_like(n))


def capsule_lengths(v: torch.Tensor) -> torch.Tensor:
    """|v_j| along the last axis: (..., E) -> (...)."""
    check_tensor("v", v)
    if v.dim() == 0:
        raise ValueError("v must have at least 1 dimension (the capsule's), got a 0-d tensor")
    return _lengths(v)


def capsule_lengths_vjp(g: torch.Tensor, v: torch.Tensor):
    """Gradient of capsule_lengths with respect to (v,): g v / |v|, and 0 where v = 0."""
    capsule_lengths(v)
    with torch.enable_grad():
        v_ = _leaf(v)
        out = _lengths(v_)
        _check_cotangent("g", g, out)
        return _vjp([out], [g], [v_])


# ============================================================================== margin loss
def _margin_loss(lengths: torch.Tensor, labels: torch.Tensor, m_plus: float, m_minus: float,
                 lambda_: float) -> torch.Tensor:
    present = F.one_hot(labels.long(), lengths.shape[1]).to(lengths.dtype)
    up = torch.clamp(m_plus - lengths, min=0)
    down = torch.clamp(lengths - m_minus, min=0)
    # On the lengths themselves, never on a softmax of them.
    per_class = present * up * up + lambda_ * (1 - present) * down * down
    return per_class.sum(dim=1).mean()


def _check_margin(lengths, labels, m_plus, m_minus, lambda_) -> tuple[float, float, float]:
    check_tensor("lengths", lengths, ndim=2)
    check_label_tensor("labels", labels, lengths.shape[0], lengths.shape[1])
    if labels.device != lengths.device:
        raise ValueError(f"labels are on {labels.device} but lengths on {lengths.device}: they must share a device")
    return _check_number("m_plus", m_plus), _check_number("m_minus", m_minus), _check_number("lambda_", lambda_)


def margin_loss(lengths: torch.Tensor, labels: torch.Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                lambda_: float = 0.5) -> torch.Tensor:
    """Eq. 4 on the capsule lengths (not a softmax of them), summed over classes, averaged over the batch."""
    m_plus, m_minus, lambda_ = _check_margin(lengths, labels, m_plus, m_minus, lambda_)
    return _margin_loss(lengths, labels, m_plus, m_minus, lambda_)


def margin_loss_vjp(g: Any, lengths: torch.Tensor, labels: torch.Tensor, m_plus: float = 0.9,
                    m_minus: float = 0.1, lambda_: float = 0.5):
    """Gradient of margin_loss with respect to (lengths,)."""
    m_plus, m_minus, lambda_ = _check_margin(lengths, labels, m_plus, m_minus, lambda_)
    g = _scalar_cotangent(g, lengths)
    with torch.enable_grad():
        l_ = _leaf(lengths)
        return _vjp([_margin_loss(l_, labels, m_plus, m_minus, lambda_)], [g], [l_])


# ============================================================================== masking
def _mask(v: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        # torch.argmax returns the first maximum: ties go to the lowest class index.
        labels = torch.argmax(torch.sum(v * v, dim=-1), dim=1)
    onehot = F.one_hot(labels.long(), v.shape[1]).to(v.dtype)
    return (v * onehot.unsqueeze(2)).reshape(v.shape[0], -1)  # class-major: feature j * E + e


def _check_mask(v, labels) -> None:
    check_tensor("v", v, ndim=3)
    if labels is not None:
        check_label_tensor("labels", labels, v.shape[0], v.shape[1])
        if labels.device != v.device:
            raise ValueError(f"labels are on {labels.device} but v on {v.device}: they must share a device")


def mask(v: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Zero every class capsule but one and flatten class-major: v (B,J,E) -> (B, J*E).

    The kept capsule is the true class's when labels are given, else the longest.
    """
    _check_mask(v, labels)
    return _mask(v, labels)


def mask_vjp(g: torch.Tensor, v: torch.Tensor, labels: torch.Tensor | None = None):
    """Gradient of mask with respect to (v,) (the choice of capsule is piecewise constant)."""
    _check_mask(v, labels)
    with torch.enable_grad():
        v_ = _leaf(v)
        out = _mask(v_, labels)
        _check_cotangent("g", g, out)
        return _vjp([out], [g], [v_])


# ============================================================================== decoder
def _decoder(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    h = x
    last = len(weights) - 1
    for k, (w, b) in enumerate(zip(weights, biases)):
        z = F.linear(h, w, b)
        h = torch.sigmoid(z) if k == last else torch.relu(z)
    return h


def _check_decoder(x, weights, biases) -> None:
    check_tensor("x", x, ndim=2)
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise ValueError("weights and biases must be sequences of tensors, one per layer")
    if len(weights) == 0 or len(weights) != len(biases):
        raise ValueError(f"weights and biases must be non-empty and of equal length, got {len(weights)} and {len(biases)}")
    width = x.shape[1]
    for k, (w, b) in enumerate(zip(weights, biases)):
        check_tensor(f"weights[{k}]", w, shape=(None, width))
        check_tensor(f"biases[{k}]", b, shape=(w.shape[0],))
        check_same(x=x, **{f"weights[{k}]": w, f"biases[{k}]": b})
        width = w.shape[0]


def decoder(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fully connected layers y = x @ W.T + b, ReLU between them and a sigmoid at the end."""
    _check_decoder(x, weights, biases)
    return _decoder(x, weights, biases)


def decoder_vjp(g: torch.Tensor, x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]):
    """Gradients of decoder with respect to (x, weights, biases); the last two are lists."""
    _check_decoder(x, weights, biases)
    with torch.enable_grad():
        x_ = _leaf(x)
        ws = [_leaf(w) for w in weights]
        bs = [_leaf(b) for b in biases]
        out = _decoder(x_, ws, bs)
        _check_cotangent("g", g, out)
        grads = _vjp([out], [g], [x_, *ws, *bs])
    k = len(ws)
    return grads[0], list(grads[1:1 + k]), list(grads[1 + k:])


# ============================================================================== reconstruction loss
def _reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, scale: float) -> torch.Tensor:
    d = reconstruction - images.reshape(reconstruction.shape)
    return (scale * torch.sum(d * d, dim=1)).mean()


def _check_reconstruction(reconstruction, images, scale) -> float:
    check_tensor("reconstruction", reconstruction, ndim=2)
    check_tensor("images", images)
    if images.dim() == 0 or images.shape[0] != reconstruction.shape[0] or \
            math.prod(images.shape[1:]) != reconstruction.shape[1]:
        raise ValueError(
            f"images {tuple(images.shape)} do not match reconstruction {tuple(reconstruction.shape)}: "
            "each image must flatten to one reconstruction row"
        )
    check_same(reconstruction=reconstruction, images=images)
    return _check_number("scale", scale)


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor, scale: float = 0.0005) -> torch.Tensor:
    """scale * sum over pixels of (reconstruction - image)^2, averaged over the batch.

    images (B, C, H, W) are flattened row-major from (C, H, W) to match reconstruction (B, C*H*W).
    """
    scale = _check_reconstruction(reconstruction, images, scale)
    return _reconstruction_loss(reconstruction, images, scale)


def reconstruction_loss_vjp(g: Any, reconstruction: torch.Tensor, images: torch.Tensor, scale: float = 0.0005):
    """Gradient of reconstruction_loss with respect to (reconstruction,)."""
    scale = _check_reconstruction(reconstruction, images, scale)
    g = _scalar_cotangent(g, reconstruction)
    with torch.enable_grad():
        r_ = _leaf(reconstruction)
        return _vjp([_reconstruction_loss(r_, images, scale)], [g], [r_])
