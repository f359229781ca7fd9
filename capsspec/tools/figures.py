"""Figures from a checkpoint, drawn with matplotlib: reconstructions, the paper's Figure 4, training curves.

* reconstructions.png: test images (upper row of each pair) over their reconstructions (lower),
  the decoder fed the longest class capsule (no label is used, as at test time); each pair is
  titled with the true and the predicted class, a wrong prediction in red; one colour bar for
  the pixel intensity.
* perturbations-<i>.png: the paper's Figure 4 for test image i: each of the 16 dimensions of the
  winning class capsule is moved by -0.25, -0.20, ..., +0.25 (steps of 0.05) while the others
  stay put, and each perturbed capsule is decoded: 16 rows (dimensions) x 11 columns (offsets).
* training-curves.png: loss (total, margin, reconstruction) and error rates (train, validation,
  test) against training steps and minutes, from the metrics.jsonl a training run writes beside
  its checkpoints (a point every log_every steps, so one epoch draws a curve).

For a MultiMNIST checkpoint (two overlapping digits per image), also:

* multimnist-examples.png: test pairs as the generator makes them: each composite (gray) beside
  its two shifted digits in two colours (first red, second green, yellow where they overlap),
  titled with the two classes and the overlap of their 28x28 frames;
* multimnist-reconstructions.png: the paper's Figure 5: each test input (gray) over the decoder's
  two reconstructions drawn in red and green, once from the capsules of the two true classes and
  once from the two longest capsules (the prediction); titles give the labels and predictions, a
  wrong prediction in red.

Every PNG is written whole or not at all (capsspec.training.atomic_files.atomic_path). The model runs through a
backend (numpy by default: figures are small and the reference is exact).
What this module must never do: import matplotlib or a framework at import time (matplotlib is
imported when a figure is drawn; a backend imports its framework itself).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..training.checkpoint import METRICS_NAME, load_checkpoint
from ..training.evaluate import NonFiniteOutputs, check_finite_lengths
from ..config import CapsNetConfig
from ..training.atomic_files import atomic_path

__all__ = ["PERTURBATION_OFFSETS", "perturbed_capsules", "make_figures", "draw_reconstructions",
           "draw_perturbations", "draw_training_curves", "curve_intervals", "read_metrics_rows", "two_colour", "draw_multimnist_examples",
           "draw_multimnist_reconstructions"]

# Figure 4: offsets -0.25..0.25 in steps of 0.05 (11 columns), computed exactly rather than accumulated.
PERTURBATION_OFFSETS = np.round(np.arange(-5, 6) * 0.05, 2)

_DPI = 100
_CMAP = "gray"  # MNIST is shown as it is: white strokes on black


def _figure(width: float, height: float):
    """A matplotlib Figure that is not registered with pyplot (no global state, no GUI backend)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ValueError("figures need matplotlib: pip install 'capsspec[train]'") from exc
    return Figure(figsize=(width, height), dpi=_DPI)


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight")
    return path


def _picture(img: np.ndarray, config: CapsNetConfig) -> np.ndarray:
    """One image (flat or C,H,W) as an (H, W) float array in [0, 1], or (H, W, 3) in colour for 3 channels;
    other channel counts are averaged."""
    a = np.asarray(img, dtype=np.float64).reshape(config.input_shape)
    a = a.transpose(1, 2, 0) if config.input_channels == 3 else a.mean(axis=0)
    return np.clip(a, 0.0, 1.0)


def _name(j: Any, class_names: Any) -> str:
    return str(int(j)) if class_names is None else str(class_names[int(j)])


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
                         labels: np.ndarray, config: CapsNetConfig, per_row: int = 8, class_names: Any = None) -> Path:
    """Pairs of (input over reconstruction), each titled 'true t, pred p' (red when p != t); in colour for RGB."""
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("draw_reconstructions needs at least one image")
    cols = min(per_row, n)
    pair_rows = math.ceil(n / cols)
    fig = _figure(1.15 * cols + 1.2, 2.35 * pair_rows + 0.7)
    axes = fig.subplots(2 * pair_rows, cols, squeeze=False)
    shown = None
    for i in range(2 * pair_rows * cols):
        r, c = divmod(i, cols)
        ax = axes[r][c]
        ax.set_xticks([])
        ax.set_yticks([])
        pair, lower = divmod(r, 2)
        k = pair * cols + c
        if k >= n:
            ax.set_axis_off()
            continue
        source = reconstructions if lower else images
        shown = ax.imshow(_picture(source[k], config), cmap=_CMAP, vmin=0.0, vmax=1.0)
        if not lower:
            wrong = int(predictions[k]) != int(labels[k])
            sep = ", " if class_names is None else "\n"  # names are longer than digits: one per line
            ax.set_title(f"true {_name(labels[k], class_names)}{sep}pred {_name(predictions[k], class_names)}",
                         fontsize=8,
                         color="tab:red" if wrong else "black")
        if c == 0:
            ax.set_ylabel("reconstruction" if lower else "input", fontsize=8)
    fig.suptitle("Test images (upper) and their reconstructions from the longest capsule (lower)", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.86, top=1 - 0.55 / fig.get_figheight(), bottom=0.03, wspace=0.08,
                        hspace=0.3)
    if config.input_channels != 3:  # a colour picture has no single intensity scale
        bar = fig.colorbar(shown, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
        bar.set_label("pixel intensity")
    return _save(fig, path)


def draw_perturbations(path: Path, decoded: np.ndarray, config: CapsNetConfig, title: str = "") -> Path:
    """Figure 4: decoded (E * 11, pixels) as E rows (capsule dimensions) by 11 columns (offsets)."""
    k = PERTURBATION_OFFSETS.size
    e = decoded.shape[0] // k
    if e * k != decoded.shape[0] or e == 0:
        raise ValueError(f"decoded must have a multiple of {k} rows (one per offset per dimension), "
                         f"got {decoded.shape[0]}")
    h, w = config.input_height, config.input_width
    gap = 1
    # One mosaic with a thin gap between tiles, shown as a single image so the axes can carry
    # the offsets (x) and the dimensions (y) as tick labels.
    colour = config.input_channels == 3  # gaps: NaN (drawn as the gap colour) in grey, white in colour
    mosaic = np.full((e * (h + gap) - gap, k * (w + gap) - gap, *((3,) if colour else ())), 1.0 if colour else np.nan)
    for d in range(e):
        for c in range(k):
            mosaic[d * (h + gap):d * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = _picture(decoded[d * k + c],
                                                                                                config)
    fig = _figure(7.0, 7.0 * mosaic.shape[0] / mosaic.shape[1])
    ax = fig.add_subplot()
    cmap = _cmap_with_gaps()
    shown = ax.imshow(mosaic, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([c * (w + gap) + (w - 1) / 2 for c in range(k)], [f"{o:+.2f}" for o in PERTURBATION_OFFSETS],
                  fontsize=7)
    ax.set_yticks([d * (h + gap) + (h - 1) / 2 for d in range(e)], [str(d) for d in range(e)], fontsize=7)
    ax.set_xlabel("offset added to the dimension")
    ax.set_ylabel("capsule dimension")
    ax.tick_params(length=0)
    ax.set_title(title or "Decoded class capsule, one dimension perturbed per row", fontsize=9)
    if not colour:
        bar = fig.colorbar(shown, ax=ax, fraction=0.04, pad=0.02)
        bar.set_label("pixel intensity")
    return _save(fig, path)


def two_colour(first: np.ndarray, second: np.ndarray, config: CapsNetConfig) -> np.ndarray:
    """Two images (flat or C,H,W) as one RGB picture (H, W, 3): the first in red, the second in green over black
    (their overlap is yellow)."""
    a, b = _picture(first, config), _picture(second, config)
    return np.stack([a, b, np.zeros_like(a)], axis=-1)


def _tile(ax: Any, picture: np.ndarray, title: str = "", colour: str = "black", gray: bool = False) -> None:
    ax.imshow(picture, cmap=_CMAP if gray else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8, color=colour)


def draw_multimnist_examples(path: Path, images: np.ndarray, labels: np.ndarray, targets: np.ndarray,
                             overlaps: np.ndarray, config: CapsNetConfig, per_row: int = 6) -> Path:
    """Generated pairs: each composite (gray) beside its two digits (first red, second green)."""
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("draw_multimnist_examples needs at least one pair")
    cols = min(per_row, n)
    rows = math.ceil(n / cols)
    fig = _figure(2.3 * cols, 1.45 * rows + 0.6)
    axes = fig.subplots(rows, 2 * cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for k in range(n):
        r, c = divmod(k, cols)
        left, right = axes[r][2 * c], axes[r][2 * c + 1]
        left.set_axis_on()
        right.set_axis_on()
        _tile(left, _picture(images[k], config), f"{int(labels[k, 0])} + {int(labels[k, 1])}", gray=True)
        _tile(right, two_colour(targets[k, 0], targets[k, 1], config), f"overlap {100 * float(overlaps[k]):.0f}%")
    fig.suptitle("MultiMNIST test pairs: the input (gray) and its two shifted digits (first red, second green; "
                 "overlap: of their 28x28 frames)", fontsize=9)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.55 / fig.get_figheight(), bottom=0.02, wspace=0.05,
                        hspace=0.35)
    return _save(fig, path)


def draw_multimnist_reconstructions(path: Path, images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                                    by_labels: np.ndarray, by_predictions: np.ndarray, config: CapsNetConfig,
                                    per_row: int = 8) -> Path:
    """The paper's Figure 5: inputs (gray) over their two reconstructions in red and green, from the true classes'
    capsules and from the two longest capsules. by_labels / by_predictions: (N, 2, C*H*W)."""
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("draw_multimnist_reconstructions needs at least one image")
    cols = min(per_row, n)
    blocks = math.ceil(n / cols)
    fig = _figure(1.35 * cols + 1.3, 4.0 * blocks + 0.8)
    axes = fig.subplots(3 * blocks, cols, squeeze=False)
    names = ("input", "from the labels", "from the prediction")
    for i in range(3 * blocks * cols):
        r, c = divmod(i, cols)
        ax = axes[r][c]
        block, part = divmod(r, 3)
        k = block * cols + c
        if k >= n:
            ax.set_axis_off()
            continue
        l0, l1 = int(labels[k, 0]), int(labels[k, 1])
        p0, p1 = int(predictions[k, 0]), int(predictions[k, 1])
        if part == 0:
            _tile(ax, _picture(images[k], config), f"labels {l0}, {l1}", gray=True)
        elif part == 1:
            _tile(ax, two_colour(by_labels[k, 0], by_labels[k, 1], config), f"R {l0}, G {l1}")
        else:
            wrong = sorted((p0, p1)) != sorted((l0, l1))
            _tile(ax, two_colour(by_predictions[k, 0], by_predictions[k, 1], config), f"R {p0}, G {p1}",
                  colour="tab:red" if wrong else "black")
        if c == 0:
            ax.set_ylabel(names[part], fontsize=8)
    fig.suptitle("MultiMNIST: each input (gray) and the decoder's two reconstructions, one per capsule, first red, "
                 "second green\n(middle: the two labelled classes' capsules; lower: the two longest capsules, titled "
                 "red when they are not the two labels)", fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.75 / fig.get_figheight(), bottom=0.02, wspace=0.08,
                        hspace=0.35)
    return _save(fig, path)


def _cmap_with_gaps():
    """The gray colour map with NaN (the gaps between tiles) drawn white."""
    from matplotlib import colormaps

    return colormaps[_CMAP].with_extremes(bad="white")


def read_metrics_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl that parse and name their epoch (a torn last line is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), (int, float)):
            rows.append(row)
    return rows


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve_intervals(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, means) of key over each interval between two curve points of metrics.jsonl.

    A point holds its epoch's running mean up to its step (after epoch_images images), so the mean
    over the images since the epoch's previous point is a difference of running sums. Metrics
    written before curve points existed give each epoch's row instead (at its last step)."""
    points = [r for r in rows if r.get("kind") == "point" and _finite(r.get(key)) and _finite(r.get("step"))]
    if not points:
        epochs = [r for r in rows if "kind" not in r and _finite(r.get(key))]
        return [float(r.get("step", r["epoch"])) for r in epochs], [float(r[key]) for r in epochs]
    xs, ys, last = [], [], {}
    for r in points:
        n, (n0, sum0) = int(r.get("epoch_images", 0)), last.get(r["epoch"], (0, 0.0))
        if n > n0:
            xs.append(float(r["step"]))
            ys.append((r[key] * n - sum0) / (n - n0))
        last[r["epoch"]] = (n, r[key] * n)
    return xs, ys


def _minutes_axis(ax: Any, rows: list[dict[str, Any]]) -> None:
    """A second x axis on top: training time (minutes, or seconds for a short run), interpolated from
    the points' (step, seconds) and extended past the last point at the run's mean rate."""
    pairs = sorted({(float(r["step"]), float(r["seconds"])) for r in rows
                    if r.get("kind") == "point" and _finite(r.get("seconds")) and _finite(r.get("step"))})
    if len(pairs) < 2:
        return
    steps, seconds = np.array([0.0, *(s for s, _ in pairs)]), np.array([0.0, *(m for _, m in pairs)])
    if np.any(np.diff(seconds) < 0) or np.any(np.diff(steps) <= 0) or seconds[-1] <= 0:
        return  # not monotonic (a run whose points were rewritten out of order): no honest mapping
    unit, scale = ("minutes", 60.0) if seconds[-1] >= 120 else ("seconds", 1.0)
    # Beyond both ends the run's mean rate: past the last point so that ticks stay apart, and before
    # step 0 (the plot's left margin) so that the mapping stays one to one there; a flat stretch would
    # let matplotlib stretch the top axis over the margin and misplace every tick.
    steps = np.concatenate([[-100 * steps[-1]], steps, [100 * steps[-1]]])
    times = np.concatenate([[-100 * seconds[-1]], seconds, [100 * seconds[-1]]]) / scale
    top = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, steps, times),
                                               lambda m: np.interp(m, times, steps)))
    top.set_xlabel(f"training {unit}")


def draw_training_curves(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Loss (left) and error rates in % (right) against training steps (and minutes, on top).

    The training curves are means over the intervals between the run's curve points (every
    log_every steps); validation and test errors are drawn where they were measured, at the end of
    each epoch."""
    if not rows:
        raise ValueError("draw_training_curves needs at least one row of metrics")
    epochs = [r for r in rows if "kind" not in r]
    fig = _figure(11.0, 4.6)
    loss_ax, err_ax = fig.subplots(1, 2)
    for key, name in (("loss", "total"), ("margin", "margin"), ("reconstruction", "reconstruction (scaled)")):
        xs, ys = curve_intervals(rows, key)
        if xs:
            loss_ax.plot(xs, ys, linewidth=1.2, marker="o" if len(xs) < 3 else None, markersize=3, label=name)
    loss_ax.set_title("Training loss (mean per image)")
    loss_ax.set_ylabel("loss")
    xs, ys = curve_intervals(rows, "train_accuracy")
    if xs:
        err_ax.plot(xs, [100.0 * (1.0 - y) for y in ys], linewidth=1.2, marker="o" if len(xs) < 3 else None,
                    markersize=3, label="train (during training)")
    for key, name in (("val_accuracy", "validation"), ("test_accuracy", "test")):
        pts = [(float(r.get("step", r["epoch"])), 100.0 * (1.0 - r[key])) for r in epochs if _finite(r.get(key))]
        if pts:
            err_ax.plot(*zip(*pts), marker="o", markersize=4, linestyle="--" if len(pts) > 1 else "none",
                        label=name)
    err_ax.set_title("Error rate")
    err_ax.set_ylabel("error (%, log scale)")
    # Log scale: a run's error falls from ~90% to ~1%, and the part a reader compares (validation and
    # test near the end) would be a flat line at the bottom of a linear axis. An error of exactly 0
    # (a perfect interval) is drawn at the axis' bottom edge.
    if err_ax.get_lines():
        err_ax.set_yscale("log", nonpositive="clip")
        from matplotlib.ticker import FuncFormatter

        err_ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    for ax in (loss_ax, err_ax):
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
            _minutes_axis(ax, rows)
        else:
            ax.text(0.5, 0.5, "no values recorded", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, path)


def _label_text(label: Any, class_names: Any = None) -> str:
    values = [_name(v, class_names) for v in np.atleast_1d(np.asarray(label))]
    return f"label{'s' if len(values) > 1 else ''} {', '.join(values)}"


def _multimnist_figures(out: Path, backend: Any, params: Any, x: np.ndarray, images: np.ndarray, labels: np.ndarray,
                        lengths: np.ndarray, targets: np.ndarray | None, overlaps: np.ndarray | None,
                        config: CapsNetConfig, pairs: int) -> list[Path]:
    """multimnist-examples.png and multimnist-reconstructions.png (Figure 5) for the first `pairs` test pairs."""
    from ..training.evaluate import top_k

    written = []
    k = min(pairs, images.shape[0])
    if targets is not None and overlaps is not None:
        written.append(draw_multimnist_examples(out / "multimnist-examples.png", images[:12], labels[:12],
                                                targets[:12], overlaps[:12], config))
    predicted = top_k(lengths, 2)

    def decoded(which: np.ndarray) -> np.ndarray:
        result = backend.forward(params, backend.asarray(x[:k]), config, labels=backend.asarray(which[:k]))
        return np.asarray(backend.to_numpy(result.reconstruction))

    if k > 0:
        written.append(draw_multimnist_reconstructions(out / "multimnist-reconstructions.png", images[:k], labels[:k],
                                                       predicted[:k], decoded(labels), decoded(predicted), config))
    return written


def make_figures(checkpoint: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, backend: Any = None,
                 images: np.ndarray | None = None, labels: np.ndarray | None = None, samples: int = 3,
                 pairs: int = 16, log: Callable[[str], None] | None = None, targets: np.ndarray | None = None,
                 overlaps: np.ndarray | None = None, class_names: Any = None) -> list[Path]:
    """Draw every figure for a checkpoint into out_dir (default: the checkpoint's folder); returns the paths.

    images/labels: test images (float NCHW in [0, 1]) and labels for the reconstruction figures;
    without them only the training curves are drawn. MultiMNIST: labels (N, 2), targets (N, 2, C, H, W)
    the two shifted digits and overlaps (N,) their frames' overlap; the pairs figures are drawn instead
    of reconstructions.png. class_names: your own images' names for the titles. log, when given, is told about each figure
    that cannot be drawn and why (no decoder, no metrics.jsonl beside the checkpoint).
    """
    from ..registry import get_backend

    say = log or (lambda _msg: None)
    ck = load_checkpoint(checkpoint)
    config = ck.config
    out = Path(out_dir) if out_dir is not None else Path(checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    backend = get_backend("numpy") if backend is None else backend
    written: list[Path] = []

    if not config.use_decoder:
        say("the model has no decoder, so there are no reconstructions or Figure 4 to draw")
    elif images is not None and labels is not None:
        if tuple(images.shape[1:]) != config.input_shape:
            raise ValueError(f"images have shape {images.shape[1:]}, the checkpoint's model takes {config.input_shape}")
        n = min(max(pairs, samples), images.shape[0])
        params = backend.params_from_numpy(ck.params, config)
        x = np.ascontiguousarray(images[:n], dtype=ck.dtype)
        result = backend.forward(params, backend.asarray(x), config)
        v = np.asarray(backend.to_numpy(result.v))
        lengths = np.asarray(backend.to_numpy(result.lengths))
        recon = np.asarray(backend.to_numpy(result.reconstruction))
        check_finite_lengths(lengths)  # a figure of NaN would be a wrong picture: one line instead
        if not np.all(np.isfinite(recon)):
            raise NonFiniteOutputs(f"the decoder's reconstructions of {n} images hold NaN or inf: its parameters, "
                                   "though finite, overflow (a diverged or corrupt model?)")
        preds = np.argmax(lengths, axis=1)
        if np.asarray(labels).ndim == 2:
            written += _multimnist_figures(out, backend, params, x, images[:n], np.asarray(labels[:n]), lengths,
                                           targets, overlaps, config, pairs)
        elif pairs > 0:
            written.append(draw_reconstructions(out / "reconstructions.png", images[:pairs], recon[:pairs],
                                                preds[:pairs], np.asarray(labels[:pairs]), config,
                                                class_names=class_names))
        ws = [backend.asarray(ck.params[f"decoder.{k}.weight"]) for k in range(config.num_decoder_layers)]
        bs = [backend.asarray(ck.params[f"decoder.{k}.bias"]) for k in range(config.num_decoder_layers)]
        for i in range(min(samples, n)):
            winner = int(preds[i])
            decoded = backend.decoder(backend.asarray(perturbed_capsules(v[i], winner)), ws, bs)
            written.append(draw_perturbations(
                out / f"perturbations-{i}.png", np.asarray(backend.to_numpy(decoded)), config,
                title=f"Figure 4 for test image {i} ({_label_text(labels[i], class_names)}, predicted "
                      f"{_name(winner, class_names)}): capsule {winner} decoded with one dimension perturbed"))
    metrics = Path(checkpoint).parent / METRICS_NAME
    rows = read_metrics_rows(metrics) if metrics.is_file() else []
    if rows:
        written.append(draw_training_curves(out / "training-curves.png", rows))
    elif metrics.is_file():
        say(f"{metrics} holds no epoch yet, so there are no training curves to draw")
    else:
        say(f"no {METRICS_NAME} beside {checkpoint}, so there are no training curves to draw (a training run "
            f"writes it into its --out folder)")
    return written
