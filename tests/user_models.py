"""CapsNets written the way public PyTorch implementations write them (not capsspec's layout), for the
whole-model check's tests (tests/test_check_your_model.py) and the docs' walk-through.

UserCapsNet is correct, in a layout of its own: a conv block named `conv_layer`, PrimaryCaps as
one convolution whose channels are dimension-major (channel d*T + t), the class capsules' W as
one (1, N, J, E, D) parameter, u_hat and v with a trailing axis of 1 (matmul style), a decoder
`nn.Sequential` fed one-hot-masked capsules, reconstructions shaped like the images. Each
subclass below makes one mistake that public implementations make, switched by a class
attribute, so that every model shares the rest of the code. MAPPING and the output layouts say
how this layout maps to capsspec's canonical parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capsspec import CapsNetConfig

SMALL = CapsNetConfig(input_height=16, input_width=16, conv1_channels=8, conv1_kernel=5, primary_types=4,
                      primary_dim=4, primary_kernel=5, primary_stride=2, num_classes=4, class_dim=6,
                      decoder_widths=(16, 32))

# The user's parameter names -> canonical names; layouts per kind where they differ from capsspec's.
MAPPING = {
    "params": {
        "conv_layer.conv.weight": "conv1.weight", "conv_layer.conv.bias": "conv1.bias",
        "primary_caps.conv.weight": {"name": "primary.weight", "layout": "(dim types) in kh kw"},
        "primary_caps.conv.bias": {"name": "primary.bias", "layout": "(dim types)"},
        "digit_caps.W": "digit.weight",
        "decoder.net.0.weight": "decoder.0.weight", "decoder.net.0.bias": "decoder.0.bias",
        "decoder.net.2.weight": "decoder.1.weight", "decoder.net.2.bias": "decoder.1.bias",
        "decoder.net.4.weight": "decoder.2.weight", "decoder.net.4.bias": "decoder.2.bias",
    },
    "layouts": {"digit": "1 in_caps classes out_dim in_dim"},
}
OUTPUTS = ("v", "reconstruction")
OUTPUT_LAYOUTS = {"v": "batch classes dim 1", "reconstruction": "batch channels h w"}


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    sq = (s * s).sum(dim=dim, keepdim=True)
    return s * torch.sqrt(sq) / (1.0 + sq)


class ConvLayer(nn.Module):
    def __init__(self, c: CapsNetConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c.input_channels, c.conv1_channels, c.conv1_kernel, stride=c.conv1_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class PrimaryCaps(nn.Module):
    relu = False  # a ReLU before the squash (a mistake)
    channels_last = True  # False: reshape without moving channels last (a mistake)

    def __init__(self, c: CapsNetConfig) -> None:
        super().__init__()
        self.types, self.dim = c.primary_types, c.primary_dim
        self.conv = nn.Conv2d(c.conv1_channels, c.primary_types * c.primary_dim, c.primary_kernel,
                              stride=c.primary_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)  # (B, D*T, Gh, Gw), channel d*T + t
        if self.relu:
            out = F.relu(out)
        b = out.size(0)
        if self.channels_last:
            out = out.view(b, self.dim, self.types, out.size(2), out.size(3)).permute(0, 2, 3, 4, 1)
        return squash(out.reshape(b, -1, self.dim))


class DigitCaps(nn.Module):
    softmax_dim = 2  # 1: over the children (a mistake)
    iterations = None  # an int: ignore the config's number (a mistake)
    detach = False  # gradients through the last iteration only (a mistake)
    shared = False  # one b for the whole batch (a mistake)

    def __init__(self, c: CapsNetConfig) -> None:
        super().__init__()
        self.routing_iterations = c.routing_iterations
        self.W = nn.Parameter(0.01 * torch.randn(1, c.num_primary, c.num_classes, c.class_dim, c.primary_dim))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u = u[:, :, None, :, None]  # (B, N, 1, D, 1)
        u_hat = torch.matmul(self.W, u)  # (B, N, J, E, 1)
        b = torch.zeros(u_hat.shape[:3] + (1, 1), dtype=u_hat.dtype)
        n_iter = self.iterations or self.routing_iterations
        for it in range(n_iter):
            last = it == n_iter - 1
            uh = u_hat.detach() if self.detach and not last else u_hat
            c = F.softmax(b, dim=self.softmax_dim)
            v = squash((c * uh).sum(dim=1, keepdim=True), dim=-2)  # (B, 1, J, E, 1)
            if not last:
                agreement = (uh * v).sum(dim=-2, keepdim=True)
                b = b + (agreement.mean(dim=0, keepdim=True) if self.shared else agreement)
        return v.squeeze(1)  # (B, J, E, 1)


class Decoder(nn.Module):
    masked = True  # False: every capsule goes in (a mistake)

    def __init__(self, c: CapsNetConfig) -> None:
        super().__init__()
        self.shape = c.input_shape
        self.net = nn.Sequential(nn.Linear(c.num_classes * c.class_dim, c.decoder_widths[0]), nn.ReLU(inplace=True),
                                 nn.Linear(c.decoder_widths[0], c.decoder_widths[1]), nn.ReLU(inplace=True),
                                 nn.Linear(c.decoder_widths[1], c.image_size), nn.Sigmoid())

    def forward(self, v: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        caps = v.squeeze(-1)
        if self.masked:
            caps = caps * onehot[:, :, None]
        return self.net(caps.flatten(1)).view(-1, *self.shape)


class UserCapsNet(nn.Module):
    mask_by_prediction = False  # decode the longest capsule even in training (a mistake)

    def __init__(self, c: CapsNetConfig = SMALL) -> None:
        super().__init__()
        self.num_classes = c.num_classes
        self.conv_layer, self.primary_caps = ConvLayer(c), self.primary_class(c)
        self.digit_caps, self.decoder = self.digit_class(c), self.decoder_class(c)

    primary_class, digit_class, decoder_class = PrimaryCaps, DigitCaps, Decoder

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        v = self.digit_caps(self.primary_caps(self.conv_layer(x)))
        lengths = v.squeeze(-1).norm(dim=-1)
        chosen = lengths.argmax(dim=1) if labels is None or self.mask_by_prediction else labels
        onehot = F.one_hot(chosen, self.num_classes).to(v.dtype)
        return v, self.decoder(v, onehot)


class CapsuleLoss(nn.Module):
    softmax_lengths = False  # the margin loss on softmaxed lengths (a mistake)
    recon_mean = False  # mean over the pixels instead of the sum (a mistake)
    margin_mean = False  # the margin loss averaged over the classes (a mistake)

    def forward(self, v, reconstruction, x, labels):
        lengths = v.squeeze(-1).norm(dim=-1)
        if self.softmax_lengths:
            lengths = F.softmax(lengths, dim=1)
        t = F.one_hot(labels, lengths.size(1)).to(lengths.dtype)
        margin = t * F.relu(0.9 - lengths) ** 2 + 0.5 * (1 - t) * F.relu(lengths - 0.1) ** 2
        err = (reconstruction - x).flatten(1) ** 2
        recon = err.mean(dim=1) if self.recon_mean else err.sum(dim=1)
        margin = margin.mean(dim=1) if self.margin_mean else margin.sum(dim=1)
        return (margin + 0.0005 * recon).mean()


def make_loss(criterion: CapsuleLoss):
    """The check's loss adapter: (model, x, labels) -> the user's total loss."""
    return lambda model, x, labels: criterion(*model(x, labels), x, labels)


# ===================================================================================== one mistake each
def _with(base: type, name: str, **attrs) -> type:
    return type(name, (base,), attrs)


def _model(name: str, **parts) -> type:
    return type(name, (UserCapsNet,), parts)


NoChannelsLast = _model("NoChannelsLast", primary_class=_with(PrimaryCaps, "P", channels_last=False))
ReluOnPrimary = _model("ReluOnPrimary", primary_class=_with(PrimaryCaps, "P", relu=True))
SoftmaxOverChildren = _model("SoftmaxOverChildren", digit_class=_with(DigitCaps, "D", softmax_dim=1))
OneIteration = _model("OneIteration", digit_class=_with(DigitCaps, "D", iterations=1))
SharedLogits = _model("SharedLogits", digit_class=_with(DigitCaps, "D", shared=True))
DetachedRouting = _model("DetachedRouting", digit_class=_with(DigitCaps, "D", detach=True))
DecoderUnmasked = _model("DecoderUnmasked", decoder_class=_with(Decoder, "Dec", masked=False))
MaskByPrediction = _model("MaskByPrediction", mask_by_prediction=True)
