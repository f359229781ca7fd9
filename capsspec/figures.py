"""Figures from a checkpoint, drawn with Pillow only: reconstructions, the paper's Figure 4, training curves.

* reconstructions.png: test images (top of each pair) over their reconstructions (below), the
  decoder fed the longest class capsule (no label is used, as at test time).
* perturbations-<i>.png: the paper's Figure 4 for test image i: each of the 16 dimensions of the
  winning class capsule is moved by -0.25, -0.20, ..., +0.25 (steps of 0.05) while the others
  stay put, and each perturbed capsule is decoded: 16 rows (dimensions) x 11 columns (offsets).
* training-curves.png: loss and accuracies per epoch from the metrics.jsonl beside the checkpoint.

The model runs through a backend (numpy by default: figures are small and the reference is exact).
What this module must never do: import matplotlib or a framework (a backend does that itself).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .checkpoint import load_checkpoint
from .config import CapsNetConfig

__all__ = ["PERTURBATION_OFFSETS", "perturbed_capsules", "make_figures", "draw_reconstructions",
           "draw_perturbations", "draw_training_curves"]

# Figure 4: offsets -0.25..0.25 in steps of 0.05 (11 columns), computed exactly rather than accumulated.
PERTURBATION_OFFSETS = np.round(np.arange(-5, 6) * 0.05, 2)

_SCALE = 3  # pixels per image pixel in the saved PNGs
_GAP = 2


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as exc:
        raise ValueError("figures need Pillow: pip install 'capsspec[train]'") from exc
    return Image, ImageDraw, ImageFont


def _to_gray(img: np.ndarray, config: CapsNetConfig) -> np.ndarray:
    """One image (flat or C,H,W) as an (H, W) uint8 picture; several channels are averaged."""
    a = np.asarray(img, dtype=np.float64).reshape(config.input_shape).mean(axis=0)
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def _grid(tiles: Sequence[Sequence[np.ndarray]], top: int = 0, left: int = 0):
    """Paste rows of (H, W) uint8 tiles into one white-gapped picture with room for labels."""
    Image, _, _ = _pil()
    rows, cols = len(tiles), max(len(r) for r in tiles)
    h, w = tiles[0][0].shape
    th, tw = h * _SCALE, w * _SCALE
    canvas = Image.new("L", (left + cols * (tw + _GAP) + _GAP, top + rows * (th + _GAP) + _GAP), 255)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            im = Image.fromarray(np.ascontiguousarray(tile, dtype=np.uint8)).resize((tw, th), Image.Resampling.NEAREST)
            canvas.paste(im, (left + _GAP + c * (tw + _GAP), top + _GAP + r * (th + _GAP)))
    return canvas, th, tw


def perturbed_capsules(v: np.ndarray, winner: int, offsets: np.ndarray = PERTURBATION_OFFSETS) -> np.ndarray:
    """Decoder inputs for Figure 4: (E * len(offsets), J * E), row d * len(offsets) + k holding the
    winning capsule with dimension d moved by offsets[k], every other capsule masked to 0 (class-major)."""
    v = np.asarray(v)
    j, e = v.shape
    if not 0 <= winner < j:
        raise ValueError(f"winner must be a class index in [0, {j}), got {winner}")
    moved = np.repeat(v[winner][None, :], e * offsets.size, axis=0)
    rows = np.arange(e * offsets.size)
    moved[rows, rows // offsets.size] += np.tile(offsets, e).astype(v.dtype)
    out = np.zeros((e * offsets.size, j * e), dtype=v.dtype)
    out[:, winner * e:(winner + 1) * e] = moved
    return out


def draw_reconstructions(path: Path, images: np.ndarray, reconstructions: np.ndarray, predictions: np.ndarray,
                         labels: np.ndarray, config: CapsNetConfig, per_row: int = 8) -> Path:
    """Pairs of (input over reconstruction), with 'label->prediction' under each."""
    _, ImageDraw, _ = _pil()
    n = images.shape[0]
    rows: list[list[np.ndarray]] = []
    for start in range(0, n, per_row):
        idx = range(start, min(start + per_row, n))
        rows.append([_to_gray(images[i], config) for i in idx])
        rows.append([_to_gray(reconstructions[i], config) for i in idx])
    canvas, th, tw = _grid(rows, top=14)
    draw = ImageDraw.Draw(canvas)
    draw.text((_GAP, 1), "input (upper) / reconstruction (lower); true->predicted", fill=0)
    for i in range(n):
        r, c = divmod(i, per_row)
        x = _GAP + c * (tw + _GAP)
        y = 14 + _GAP + (2 * r + 1) * (th + _GAP) + th - 11
        draw.text((x + 2, y), f"{labels[i]}->{predictions[i]}", fill=255 if predictions[i] == labels[i] else 128)
    canvas.save(path)
    return path


def draw_perturbations(path: Path, decoded: np.ndarray, config: CapsNetConfig, title: str = "") -> Path:
    """Figure 4: decoded (E * 11, pixels) as E rows of 11 columns, labelled with offsets and dims."""
    _, ImageDraw, _ = _pil()
    k = PERTURBATION_OFFSETS.size
    e = decoded.shape[0] // k
    tiles = [[_to_gray(decoded[d * k + c], config) for c in range(k)] for d in range(e)]
    top, left = 28, 44
    canvas, th, tw = _grid(tiles, top=top, left=left)
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill=0)
    for c, off in enumerate(PERTURBATION_OFFSETS):
        draw.text((left + _GAP + c * (tw + _GAP) + 4, 15), f"{off:+.2f}", fill=0)
    for d in range(e):
        draw.text((2, top + _GAP + d * (th + _GAP) + th // 2 - 5), f"dim {d}", fill=0)
    canvas.save(path)
    return path


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _panel(draw: Any, box: tuple[int, int, int, int], series: list[tuple[str, tuple[int, int, int], list[tuple[float, float]]]],
           title: str, ylabel: str) -> None:
    x0, y0, x1, y1 = box
    pts = [p for _, _, s in series for p in s]
    draw.text((x0, y0 - 16), title, fill=(0, 0, 0))
    draw.rectangle(box, outline=(0, 0, 0))
    if not pts:
        draw.text((x0 + 10, y0 + 10), "no data", fill=(0, 0, 0))
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xlo, xhi = min(xs), max(xs)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.05 or abs(yhi) * 0.05 or 1.0
    ylo, yhi = ylo - pad, yhi + pad

    def sx(x: float) -> float:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def sy(y: float) -> float:
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for t in _nice_ticks(ylo, yhi):
        draw.line([(x0, sy(t)), (x1, sy(t))], fill=(225, 225, 225))
        draw.text((x0 - 46, sy(t) - 5), f"{t:.3g}", fill=(0, 0, 0))
    for t in _nice_ticks(xlo, xhi):
        if abs(t - round(t)) < 1e-9:
            draw.text((sx(t) - 3, y1 + 4), f"{int(round(t))}", fill=(0, 0, 0))
    draw.text((x0 + (x1 - x0) // 2 - 15, y1 + 18), "epoch", fill=(0, 0, 0))
    draw.text((x0, y1 + 32), ylabel, fill=(80, 80, 80))
    for i, (name, color, s) in enumerate(series):
        line = [(sx(x), sy(y)) for x, y in s]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.line([(x1 - 120, y0 + 12 + 14 * i), (x1 - 100, y0 + 12 + 14 * i)], fill=color, width=2)
        draw.text((x1 - 95, y0 + 6 + 14 * i), name, fill=(0, 0, 0))


def draw_training_curves(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Loss (left) and error rates in % (right) per epoch, as simple line plots."""
    Image, ImageDraw, _ = _pil()
    canvas = Image.new("RGB", (1000, 420), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def series(key: str, scale: float = 1.0, error: bool = False) -> list[tuple[float, float]]:
        out = []
        for r in rows:
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                out.append((float(r["epoch"]), 100 * (1 - v) if error else v * scale))
        return out

    _panel(draw, (70, 40, 470, 340), [("total", (31, 119, 180), series("loss")),
                                      ("margin", (255, 127, 14), series("margin")),
                                      ("reconstr.", (44, 160, 44), series("reconstruction"))],
           "training loss (mean per image)", "loss")
    _panel(draw, (570, 40, 970, 340), [("train", (31, 119, 180), series("train_accuracy", error=True)),
                                       ("validation", (255, 127, 14), series("val_accuracy", error=True)),
                                       ("test", (214, 39, 40), series("test_accuracy", error=True))],
           "error rate (%)", "error %")
    canvas.save(path)
    return path


def make_figures(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, backend: Any = None,
                 images: np.ndarray | None = None, labels: np.ndarray | None = None, samples: int = 3,
                 pairs: int = 16) -> list[Path]:
    """Draw every figure for a checkpoint into out_dir (default: the checkpoint's folder); returns the paths.

    images/labels: test images (float NCHW in [0, 1]) and labels for the reconstruction figures;
    without them only the training curves are drawn.
    """
    from .registry import get_backend

    ck = load_checkpoint(checkpoint)
    config = ck.config
    out = Path(out_dir) if out_dir is not None else Path(checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    backend = get_backend("numpy") if backend is None else backend
    written: list[Path] = []

    if images is not None and labels is not None and config.use_decoder:
        if tuple(images.shape[1:]) != config.input_shape:
            raise ValueError(f"images have shape {images.shape[1:]}, the checkpoint's model takes {config.input_shape}")
        n = min(max(pairs, samples), images.shape[0])
        params = backend.params_from_numpy(ck.params, config)
        x = np.ascontiguousarray(images[:n], dtype=ck.dtype)
        result = backend.forward(params, backend.asarray(x), config)
        v = np.asarray(backend.to_numpy(result.v))
        lengths = np.asarray(backend.to_numpy(result.lengths))
        recon = np.asarray(backend.to_numpy(result.reconstruction))
        preds = np.argmax(lengths, axis=1)
        written.append(draw_reconstructions(out / "reconstructions.png", images[:pairs], recon[:pairs], preds[:pairs],
                                            np.asarray(labels[:pairs]), config))
        ws = [backend.asarray(ck.params[f"decoder.{k}.weight"]) for k in range(config.num_decoder_layers)]
        bs = [backend.asarray(ck.params[f"decoder.{k}.bias"]) for k in range(config.num_decoder_layers)]
        for i in range(min(samples, n)):
            winner = int(preds[i])
            decoded = backend.decoder(backend.asarray(perturbed_capsules(v[i], winner)), ws, bs)
            written.append(draw_perturbations(
                out / f"perturbations-{i}.png", np.asarray(backend.to_numpy(decoded)), config,
                title=f"test image {i} (label {int(labels[i])}, capsule {winner}): dims x offsets"))
    metrics = Path(checkpoint).parent / "metrics.jsonl"
    if metrics.is_file():
        rows = []
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if rows:
            written.append(draw_training_curves(out / "training-curves.png", rows))
    return written
