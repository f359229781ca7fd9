"""PyTorch pieces in the style of nn.Module-based CapsNets: capsules (batch, caps, dim), routing on
priors laid out (classes, batch, in_caps, dim), one-hot targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _norm_terms(s: torch.Tensor, dim: int):
    """|s|, s / |s| (0 at s = 0) and |s| / (1 + |s|^2), with the largest component divided out first so that
    neither huge nor tiny vectors over- or underflow."""
    m = s.abs().amax(dim=dim, keepdim=True)
    nonzero = m > 0
    t = s / torch.where(nonzero, m, torch.ones_like(m))
    r = torch.sqrt(torch.where(nonzero, (t * t).sum(dim=dim, keepdim=True), torch.ones_like(m)))
    n = torch.where(nonzero, m * r, torch.zeros_like(m))
    safe = torch.where(nonzero, n, torch.ones_like(n))
    f = torch.where(nonzero, 1 / (safe + 1 / safe), torch.zeros_like(n))
    return n, t / r, f


class Squash(torch.autograd.Function):
    """squash with its gradient written out: d/ds [f(|s|) s] g = f (g + q u (u . g)), q = (1 - n^2) / (1 + n^2)."""

    @staticmethod
    def forward(ctx, s, dim):
        n, unit, f = _norm_terms(s, dim)
        ctx.save_for_backward(s)
        ctx.dim = dim
        return f * s

    @staticmethod
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        n, unit, f = _norm_terms(s, ctx.dim)
        q = 2 / (1 + n * n) - 1
        return f * (g + q * unit * (unit * g).sum(dim=ctx.dim, keepdim=True)), None


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return Squash.apply(s, dim)


def squash_eps(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    norm = s.norm(dim=dim, keepdim=True)
    return norm ** 2 / (1 + norm ** 2) * s / (norm + 1e-8)


# Routing on priors laid out (classes, batch, in_caps, dim), as in implementations that stack one
# prior tensor per class capsule: b and c are (classes, batch, in_caps), v is (classes, batch, dim).
def _route(u_hat: torch.Tensor, iterations: int, softmax_dim: int = 0, detach: bool = False):
    b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype)
    for r in range(iterations):
        c = F.softmax(b, dim=softmax_dim)
        if detach:
            c = c.detach()  # "c is not a parameter"
        v = squash((c.unsqueeze(-1) * u_hat).sum(dim=2))
        if r < iterations - 1:
            b = b + (u_hat * v.unsqueeze(2)).sum(dim=-1)
    return v, c


def squash_plain(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Guarded at 0, but |s|^2 overflows float32 for |s| beyond ~1.8e19."""
    n2 = (s ** 2).sum(dim=dim, keepdim=True)
    safe = torch.where(n2 > 0, n2, torch.ones_like(n2))
    return torch.where(n2 > 0, n2 / (1 + n2) / torch.sqrt(safe), torch.zeros_like(n2)) * s


def routing(u_hat: torch.Tensor, iterations: int = 3):
    return _route(u_hat, iterations)


def routing_softmax_over_inputs(u_hat: torch.Tensor, iterations: int = 3):
    return _route(u_hat, iterations, softmax_dim=2)  # over the input capsules


def routing_detached(u_hat: torch.Tensor, iterations: int = 3):
    return _route(u_hat, iterations, detach=True)


def routing_fixed_three(u_hat: torch.Tensor, iterations: int = 3):
    return _route(u_hat, 3)  # the argument is never read


def margin_loss(lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """lengths (batch, classes), target one-hot (batch, classes)."""
    present = F.relu(0.9 - lengths) ** 2
    absent = F.relu(lengths - 0.1) ** 2
    return (target * present + 0.5 * (1 - target) * absent).sum(dim=1).mean()


def margin_loss_mean(lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    present = F.relu(0.9 - lengths) ** 2
    absent = F.relu(lengths - 0.1) ** 2
    return (target * present + 0.5 * (1 - target) * absent).mean()


def _longest(v: torch.Tensor) -> torch.Tensor:
    m = v.abs().amax(dim=(1, 2), keepdim=True)
    return (v / torch.where(m > 0, m, torch.ones_like(m))).norm(dim=-1).argmax(dim=1)


def mask(v: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """v (batch, classes, dim) -> (batch, classes * dim), all but one capsule zeroed."""
    if labels is None:
        labels = _longest(v)
    keep = F.one_hot(labels, v.shape[1]).to(v.dtype)
    return (v * keep.unsqueeze(-1)).flatten(1)


def mask_by_prediction(v: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    keep = F.one_hot(_longest(v), v.shape[1]).to(v.dtype)  # the labels are never used
    return (v * keep.unsqueeze(-1)).flatten(1)


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """reconstruction (batch, pixels), images (batch, channels, height, width)."""
    return 0.0005 * ((reconstruction - images.flatten(1)) ** 2).sum(dim=1).mean()


# An epsilon shows on small vectors only: the ci profile's draws (and its shrinking) find them.
EPS = {"layout": "batch caps dim", "extremes": False, "profile": "ci"}
ROUTE = {"layout": "classes batch in_caps dim", "iterations": "iterations"}
CASES = [
    ("squash", "squash", squash, {"layout": "batch caps dim"}, None),
    ("squash_eps", "squash", squash_eps, EPS, "squash_epsilon_on_norm"),
    # Overflow needs |s| > 1.8e19: about one draw in six goes that far.
    ("squash_plain", "squash", squash_plain, {"layout": "batch caps dim", "max_examples": 40}, "overflow"),
    ("routing", "routing", routing, ROUTE, None),
    ("routing_softmax_over_inputs", "routing", routing_softmax_over_inputs, ROUTE, "softmax_over_children"),
    # Detaching changes the gradient only where the agreement moves c: several iterations on large enough u_hat.
    ("routing_detached", "routing", routing_detached, {**ROUTE, "max_examples": 30}, "detached_routing"),
    ("routing_fixed_three", "routing", routing_fixed_three, ROUTE, "iterations_always_3"),
    ("margin_loss", "margin_loss", margin_loss, {"layout": "batch classes", "labels": "onehot"}, None),
    ("margin_loss_mean", "margin_loss", margin_loss_mean, {"layout": "batch classes", "labels": "onehot"},
     "margin_mean_over_classes"),
    ("mask", "mask", mask, {"layout": "batch classes dim"}, None),
    ("mask_by_prediction", "mask", mask_by_prediction, {"layout": "batch classes dim"},
     "mask_by_prediction_in_training"),
    ("reconstruction_loss", "reconstruction_loss", reconstruction_loss, {"layout": "b c h w"}, None),
]


# The capsule head from the pieces above: primary capsules (batch, in_caps, in_dim) and W laid out
# (classes, in_caps, out_dim, in_dim) to the class lengths and the margin loss, one-hot targets.
def capsule_head(u: torch.Tensor, W: torch.Tensor, target: torch.Tensor, iterations: int = 3):
    priors = torch.einsum("jned,bnd->jbne", W, u)  # (classes, batch, in_caps, out_dim)
    v, _ = routing(priors, iterations)
    lengths = squash_free_lengths(v).transpose(0, 1)  # (batch, classes)
    return lengths, margin_loss(lengths, target)


def capsule_head_softmax_over_inputs(u: torch.Tensor, W: torch.Tensor, target: torch.Tensor, iterations: int = 3):
    priors = torch.einsum("jned,bnd->jbne", W, u)
    v, _ = routing_softmax_over_inputs(priors, iterations)
    lengths = squash_free_lengths(v).transpose(0, 1)
    return lengths, margin_loss(lengths, target)


def squash_free_lengths(v: torch.Tensor) -> torch.Tensor:
    """|v| over the last axis, with gradient 0 at v = 0."""
    n, _, _ = _norm_terms(v, -1)
    return n.squeeze(-1)


HEAD = {"layout": {"*": "batch in_caps classes out_dim in_dim", "weight": "classes in_caps out_dim in_dim"},
        "labels": "onehot", "iterations": "iterations"}
CASES += [
    ("capsule_head", "capsule_head", capsule_head, HEAD, None),
    ("capsule_head_softmax_over_inputs", "capsule_head", capsule_head_softmax_over_inputs, HEAD,
     "softmax_over_children"),
]
