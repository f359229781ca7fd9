"""Training the capsule network on any backend, through the protocol only.

The trainer speaks to a backend exclusively through the spec: params_from_numpy / adam_init,
asarray for batches, train_step(params, state, x, labels, config, adam), predict for evaluation,
params_to_numpy / state_to_numpy for checkpoints. Parameters start from capsspec.init_params,
so every backend starts from the same model for a given seed.

Reproducibility. Every random choice derives from (seed, purpose[, epoch]) through
numpy.random.SeedSequence: the validation split from (seed, 1), epoch e's shuffle from
(seed, 2, e) and its augmentation shifts from (seed, 3, e). Checkpoints are written at epoch
boundaries, so a resumed run draws exactly what the uninterrupted run would have drawn, and on
the numpy backend reproduces it bit for bit. The generator states for the next epoch are also
stored in the checkpoint and checked on resume, so a change of this scheme cannot go unnoticed.

Honest accuracy. Validation images are held out of the training set. Each epoch the model is
evaluated on validation and test, but the accuracy the run reports is the final model's, or
(select="val") the one of the epoch with the best validation accuracy; never the best of the
test evaluations (docs/spec.md, mistake 6). The summary says which.

Speed. StepMetrics stay backend scalars: they are summed on the device and read back only every
`log_every` steps and at the end of an epoch (when a backend already returns Python numbers,
reading is free and the progress bar updates every step).

What this module must never do: import a framework, augment anything but training batches, or
let a non-finite model overwrite a checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import numpy as np

from .augment import MAX_SHIFT, augment_batch
from .backend import Backend, BackendUnavailable
from .checkpoint import CHECKPOINT_NAME, FINAL_NAME, load_checkpoint, save_checkpoint
from .config import AdamConfig, CapsNetConfig
from .evaluate import accuracy, predict_all
from .fileio import atomic_write_text
from .model import init_params

__all__ = [
    "TrainSettings", "Splits", "TrainingDiverged", "split_data", "epoch_generators", "choose_backend", "train",
    "METRICS_NAME", "SUMMARY_NAME", "BEST_VAL_NAME", "REPRODUCIBILITY_FIELDS",
]

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
BEST_VAL_NAME = "best-val.safetensors"

# SeedSequence purposes: one stream per kind of random choice.
_STREAM_VALIDATION, _STREAM_SHUFFLE, _STREAM_AUGMENT = 1, 2, 3
RNG_SCHEME = "numpy PCG64 from SeedSequence((seed, stream, epoch)); streams: 1 validation split, 2 shuffle, 3 shifts"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf. The message says when, and which checkpoint is the last good one."""


@dataclass(frozen=True)
class TrainSettings:
    """How a run trains (the model itself is a CapsNetConfig, the optimizer an AdamConfig)."""

    epochs: int = 50
    batch_size: int = 128  # the official code's
    seed: int = 0
    val_size: int = 5000
    train_subset: int | None = None  # training images used (after the validation hold-out); None: all
    test_subset: int | None = None  # the first N test images; None: all 10,000
    max_shift: int = MAX_SHIFT  # the paper's shifts of up to 2 px; 0 turns augmentation off
    select: str = "final"  # "final": report the last epoch's model; "val": the best validation epoch's
    dtype: str = "float32"
    eval_batch_size: int = 500
    log_every: int = 50  # steps between reads of device-side metrics

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            _check_int(f"TrainSettings.{name}", getattr(self, name), 1)
        for name in ("seed", "val_size", "max_shift"):
            _check_int(f"TrainSettings.{name}", getattr(self, name), 0)
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                _check_int(f"TrainSettings.{name}", getattr(self, name), 1)
        if self.select not in ("final", "val"):
            raise ValueError(f"TrainSettings.select must be 'final' or 'val', got {self.select!r}")
        if self.select == "val" and self.val_size == 0:
            raise ValueError("TrainSettings.select='val' needs a validation set, but val_size is 0")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"TrainSettings.dtype must be 'float32' or 'float64', got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainSettings got unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**dict(d))


# Settings a resumed run must share with the run it continues, or it would not be the same run.
REPRODUCIBILITY_FIELDS = ("batch_size", "seed", "val_size", "train_subset", "test_subset", "max_shift", "select",
                          "dtype")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# ===================================================================================== data
@dataclass(frozen=True)
class Splits:
    """Training, validation and test arrays (images float NCHW in [0, 1], labels int64)."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def split_data(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
               test_labels: np.ndarray, settings: TrainSettings) -> Splits:
    """Hold out settings.val_size training images (chosen by the seed), then take the subsets.

    The validation images are drawn from the whole training set by the seed alone, so they do
    not depend on train_subset; the training subset is a seeded choice among the rest, and the
    test subset is the first test_subset test images (the same for every seed).
    """
    n = train_images.shape[0]
    if train_labels.shape != (n,) or test_labels.shape != (test_images.shape[0],):
        raise ValueError(f"labels must have one entry per image: train {train_images.shape[0]} images vs "
                         f"{train_labels.shape} labels, test {test_images.shape[0]} images vs {test_labels.shape} labels")
    if settings.val_size >= n:
        raise ValueError(f"val_size={settings.val_size} leaves no training images out of {n}")
    perm = np.random.default_rng(np.random.SeedSequence([settings.seed, _STREAM_VALIDATION])).permutation(n)
    val_idx, rest = np.sort(perm[:settings.val_size]), perm[settings.val_size:]
    if settings.train_subset is not None:
        if settings.train_subset > rest.size:
            raise ValueError(f"train_subset={settings.train_subset} is more than the {rest.size} training images left "
                             f"after holding out val_size={settings.val_size}")
        rest = rest[:settings.train_subset]
    train_idx = np.sort(rest)
    n_test = test_images.shape[0] if settings.test_subset is None else settings.test_subset
    if n_test > test_images.shape[0]:
        raise ValueError(f"test_subset={settings.test_subset} is more than the {test_images.shape[0]} test images")
    return Splits(train_x=train_images[train_idx], train_y=train_labels[train_idx].astype(np.int64),
                  val_x=train_images[val_idx], val_y=train_labels[val_idx].astype(np.int64),
                  test_x=test_images[:n_test], test_y=test_labels[:n_test].astype(np.int64))


def epoch_generators(seed: int, epoch: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(shuffle, augmentation) generators of epoch `epoch` (1-based): functions of (seed, epoch) only."""
    return (np.random.default_rng(np.random.SeedSequence([seed, _STREAM_SHUFFLE, epoch])),
            np.random.default_rng(np.random.SeedSequence([seed, _STREAM_AUGMENT, epoch])))


def _rng_record(seed: int, next_epoch: int) -> dict[str, Any]:
    shuffle, shifts = epoch_generators(seed, next_epoch)
    return {"scheme": RNG_SCHEME, "seed": seed, "next_epoch": next_epoch,
            "shuffle": shuffle.bit_generator.state, "augment": shifts.bit_generator.state}


# ===================================================================================== backends
def choose_backend(name: str | None = None, device: str | None = None,
                   options: Mapping[str, Any] | None = None) -> tuple[Backend, str]:
    """The backend to train with, and a sentence saying why it was chosen.

    With a name, that backend. Without, the available backend with the highest speed_rank
    (availability is checked from the fastest down, so slower frameworks are not even imported).
    Without a device, the backend's default_device() (torch: "cuda" when it sees one).
    """
    from .registry import backend_names, get_backend

    options = dict(options or {})
    if name is not None:
        # An unknown name (ValueError) or a missing framework (BackendUnavailable) stops here.
        named = get_backend(name)
        named.require_available()
        if not named.trains:
            raise ValueError(f"backend {name!r} is inference-only and cannot train; choose a training backend "
                             "(see `capsspec backends`)")
        why = f"{name}: asked for with --backend"
    else:
        candidates = []
        for n in backend_names():
            try:
                candidates.append(get_backend(n, check=False))
            except Exception:  # a broken plugin must not stop training on the others
                continue
        candidates = [b for b in candidates if b.trains]
        candidates.sort(key=lambda b: (-int(getattr(b, "speed_rank", 0)), b.name))
        skipped: list[str] = []
        for cand in candidates:
            avail = cand.availability()
            if avail.available:
                name = cand.name
                why = f"{name}: the fastest available backend (speed_rank {cand.speed_rank})"
                break
            skipped.append(f"{cand.name} ({avail.reason or 'unavailable'})")
        else:
            raise BackendUnavailable("no backend is available: " + "; ".join(skipped))
        if skipped:
            why += "; faster but unavailable: " + "; ".join(skipped)
    if device is None:
        # The backend names its preferred device (torch: CUDA when it sees one); no framework
        # is imported here.
        device = get_backend(name, check=False, **options).default_device()
        if device is not None:
            why += f"; device {device} (the backend's default here)"
    backend = get_backend(name, device=device, check=False, **options)
    backend.require_available()
    return backend, why


def _host_float(backend: Backend, x: Any) -> float:
    if isinstance(x, (int, float, np.generic, np.ndarray)):
        return float(x)
    return float(np.asarray(backend.to_numpy(x)))


# ===================================================================================== output
class _Progress:
    """A one-line progress bar on a text stream (\\r updates on a terminal, sparse lines otherwise)."""

    def __init__(self, stream: TextIO | None, total: int, label: str, show_bar: bool = True) -> None:
        self.stream, self.total, self.label, self.show_bar = stream, total, label, show_bar
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.last_width = 0
        self.last_plain = time.monotonic()

    def update(self, done: int, text: str) -> None:
        if self.stream is None or not self.show_bar:
            return
        width = 24
        filled = int(width * done / max(self.total, 1))
        line = f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {text}"
        if self.tty:
            pad = max(self.last_width - len(line), 0)
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
            self.last_width = len(line)
        elif time.monotonic() - self.last_plain > 30:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_plain = time.monotonic()

    def finish(self, text: str) -> None:
        if self.stream is None:
            return
        if self.tty:
            self.stream.write("\r" + " " * self.last_width + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash while appending
                continue
    return rows


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _data_fingerprint(data: Splits) -> str:
    """A hash of the splits' sizes, labels and a sparse sample of pixels: a resumed run must see the same data."""
    h = hashlib.sha256()
    for a in (data.train_y, data.val_y, data.test_y):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    for x in (data.train_x, data.val_x, data.test_x):
        h.update(str(x.shape).encode())
        flat = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
        h.update(np.ascontiguousarray(flat[::97, ::7], dtype=np.float32).tobytes())
    return h.hexdigest()


# ===================================================================================== training
def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def train(backend: Backend, config: CapsNetConfig, data: Splits, out_dir: str | os.PathLike, *,
          adam: AdamConfig = AdamConfig(), settings: TrainSettings = TrainSettings(), resume: bool = False,
          progress: TextIO | None = sys.stderr, show_bar: bool = True,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train, evaluate each epoch, checkpoint each epoch into out_dir; returns the run's summary.

    resume=True continues from out_dir/checkpoint.safetensors, which must have been written with
    the same config, AdamConfig and reproducibility settings (REPRODUCIBILITY_FIELDS); only
    `epochs` (and evaluation/logging details) may change. Without resume, an out_dir that already
    holds a checkpoint is refused rather than overwritten.

    progress: where the progress bar and per-epoch lines go (None: nowhere); show_bar=False keeps
    only the per-epoch lines.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not isinstance(config, CapsNetConfig):
        raise ValueError(f"config must be a CapsNetConfig, got {type(config).__name__}")
    if settings.dtype not in getattr(backend, "dtypes", ("float32", "float64")):
        raise ValueError(f"dtype={settings.dtype!r} is not supported by backend {backend.name!r} "
                         f"(it supports {', '.join(backend.dtypes)})")
    for name, x in (("train", data.train_x), ("validation", data.val_x), ("test", data.test_x)):
        if x.ndim != 4 or (x.shape[0] and tuple(x.shape[1:]) != config.input_shape):
            raise ValueError(f"{name} images must have shape (N, {', '.join(map(str, config.input_shape))}) for "
                             f"this config, got {x.shape}")
    n_train = data.train_x.shape[0]
    if n_train == 0:
        raise ValueError("there are no training images")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, final_path, best_path = out / CHECKPOINT_NAME, out / FINAL_NAME, out / BEST_VAL_NAME
    metrics_path, summary_path = out / METRICS_NAME, out / SUMMARY_NAME

    start_epoch, train_seconds = 0, 0.0
    best_val, best_epoch = -1.0, 0
    history: list[dict[str, Any]] = []
    if resume:
        ck = load_checkpoint(ckpt_path, config=config, require_optimizer=True)
        if ck.adam != adam:
            raise ValueError(f"cannot resume {ckpt_path}: it was trained with {ck.adam}, this run asks for {adam}")
        theirs = ck.training
        for field in REPRODUCIBILITY_FIELDS:
            if theirs.get(field) != getattr(settings, field):
                raise ValueError(f"cannot resume {ckpt_path}: it was trained with {field}={theirs.get(field)!r}, this "
                                 f"run asks for {field}={getattr(settings, field)!r} (resuming must not change it)")
        if ck.rng != json.loads(json.dumps(_rng_record(settings.seed, ck.epoch + 1))):
            raise ValueError(f"cannot resume {ckpt_path}: its random generator states differ from the ones this "
                             "version derives, so the resumed run would not be the same run")
        if ck.extra.get("data_fingerprint") != _data_fingerprint(data):
            raise ValueError(f"cannot resume {ckpt_path}: the training, validation or test data differ from the run's "
                             f"({ck.extra.get('n_train')} training images then, {n_train} now)")
        if ck.dtype != settings.dtype:
            raise ValueError(f"cannot resume {ckpt_path}: it holds {ck.dtype} parameters, this run asks for {settings.dtype}")
        params = backend.params_from_numpy(ck.params, config)
        state = backend.state_from_numpy(ck.state, params)
        start_epoch, step = ck.epoch, ck.step
        train_seconds = float(ck.extra.get("train_seconds", 0.0))
        best_val = float(ck.extra.get("best_val_accuracy", -1.0))
        best_epoch = int(ck.extra.get("best_epoch", 0))
        # Epochs after the checkpoint may have been logged before a crash; they will be redone.
        history = [r for r in _read_metrics(metrics_path) if int(r.get("epoch", 0)) <= start_epoch]
        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        log(f"capsspec: resuming from {ckpt_path} at epoch {start_epoch} (step {ck.step}), written by backend "
            f"{ck.backend!r}")
    else:
        if ckpt_path.exists():
            raise ValueError(f"{out} already holds {CHECKPOINT_NAME}: pass --resume to continue that run, or choose "
                             "another --out")
        params = backend.params_from_numpy(init_params(config, settings.seed, settings.dtype), config)
        state = backend.adam_init(params)
        atomic_write_text(metrics_path, "")
        step = 0

    if start_epoch >= settings.epochs:
        raise ValueError(f"{ckpt_path} is already at epoch {start_epoch}; pass a larger --epochs to train further")
    steps_per_epoch = math.ceil(n_train / settings.batch_size)
    last_good = f"{ckpt_path} (epoch {start_epoch})" if resume else "none: no epoch completed"
    extra_base = {"n_train": n_train, "n_val": int(data.val_x.shape[0]), "n_test": int(data.test_x.shape[0]),
                  "data_fingerprint": _data_fingerprint(data)}
    lr = adam.learning_rate(step)
    for epoch in range(start_epoch + 1, settings.epochs + 1):
        shuffle_rng, shift_rng = epoch_generators(settings.seed, epoch)
        perm = shuffle_rng.permutation(n_train)
        bar = _Progress(progress, steps_per_epoch, f"epoch {epoch}/{settings.epochs}", show_bar)
        sums = {"total": 0.0, "margin": 0.0, "reconstruction": 0.0, "correct": 0.0}
        window: dict[str, Any] = {}
        seen = 0
        t0 = time.perf_counter()

        def read_window() -> None:
            # Reading device scalars forces a sync, so it happens only here.
            for key, value in window.items():
                sums[key] += _host_float(backend, value)
            window.clear()
            if not math.isfinite(sums["total"]):
                raise TrainingDiverged(
                    f"the loss became {sums['total']} in epoch {epoch} (by step {step}); training stopped. The last "
                    f"good checkpoint is {last_good}; try a lower --lr")

        for b in range(steps_per_epoch):
            idx = perm[b * settings.batch_size:(b + 1) * settings.batch_size]
            xb = data.train_x[idx]
            if settings.max_shift:
                xb = augment_batch(xb, shift_rng, settings.max_shift)
            xb = np.ascontiguousarray(xb, dtype=settings.dtype)
            params, state, m = backend.train_step(params, state, backend.asarray(xb), backend.asarray(data.train_y[idx]),
                                                  config, adam)
            nb = idx.size
            step += 1
            seen += nb
            lr = float(m.lr)
            for key, value in (("total", m.total * nb), ("margin", m.margin * nb),
                               ("reconstruction", m.reconstruction * nb), ("correct", m.correct)):
                window[key] = value if key not in window else window[key] + value
            host_numbers = isinstance(m.total, (int, float, np.generic))
            if host_numbers or (b + 1) % settings.log_every == 0 or b + 1 == steps_per_epoch:
                read_window()
                elapsed = time.perf_counter() - t0
                bar.update(b + 1, f"loss {sums['total'] / seen:.4f} acc {100 * sums['correct'] / seen:.2f}% "
                                  f"{seen / max(elapsed, 1e-9):.0f} img/s")
        backend.synchronize()
        epoch_train_seconds = time.perf_counter() - t0
        train_seconds += epoch_train_seconds

        t1 = time.perf_counter()
        val_acc = None
        if data.val_x.shape[0]:
            val_acc = accuracy(predict_all(backend, params, data.val_x, config, batch_size=settings.eval_batch_size,
                                           dtype=settings.dtype), data.val_y)
        test_acc = accuracy(predict_all(backend, params, data.test_x, config, batch_size=settings.eval_batch_size,
                                        dtype=settings.dtype), data.test_y) if data.test_x.shape[0] else None
        eval_seconds = time.perf_counter() - t1

        params_np = backend.params_to_numpy(params)
        state_np = backend.state_to_numpy(state)
        bad = [k for k, a in params_np.items() if not np.all(np.isfinite(a))]
        if bad:
            raise TrainingDiverged(f"parameters {bad[:3]} became NaN or inf in epoch {epoch}; training stopped. The "
                                   f"last good checkpoint is {last_good}; try a lower --lr")
        improved = val_acc is not None and val_acc > best_val
        if improved:
            best_val, best_epoch = val_acc, epoch
        row = {
            "epoch": epoch, "step": step, "loss": sums["total"] / seen, "margin": sums["margin"] / seen,
            "reconstruction": sums["reconstruction"] / seen, "train_accuracy": sums["correct"] / seen,
            "val_accuracy": val_acc, "test_accuracy": test_acc, "lr": lr, "seconds": epoch_train_seconds,
            "images_per_second": seen / max(epoch_train_seconds, 1e-9), "eval_seconds": eval_seconds,
        }
        history.append(row)
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        extra = {**extra_base, "train_seconds": train_seconds, "best_val_accuracy": best_val, "best_epoch": best_epoch,
                 "val_accuracy": val_acc, "test_accuracy": test_acc}
        common = dict(config=config, state=state_np, adam=adam, epoch=epoch, rng=_rng_record(settings.seed, epoch + 1),
                      training=settings.to_dict(), extra=extra, backend=backend.name)
        if improved and settings.select == "val":
            save_checkpoint(best_path, params_np, **common)
        save_checkpoint(ckpt_path, params_np, **common)
        last_good = f"{ckpt_path} (epoch {epoch})"
        bar.finish(f"epoch {epoch}/{settings.epochs}: loss {row['loss']:.4f} (margin {row['margin']:.4f}, "
                   f"reconstruction {row['reconstruction']:.4f}) train {_fmt_pct(row['train_accuracy'])} "
                   f"val {_fmt_pct(val_acc)} test {_fmt_pct(test_acc)} lr {lr:.3g} "
                   f"{row['images_per_second']:.0f} img/s {epoch_train_seconds:.1f}s (+{eval_seconds:.1f}s eval)")

    save_checkpoint(final_path, params_np, **common)
    return _summary(backend, config, adam, settings, history, out, train_seconds, best_epoch, summary_path, log)


def _summary(backend: Backend, config: CapsNetConfig, adam: AdamConfig, settings: TrainSettings,
             history: list[dict[str, Any]], out: Path, train_seconds: float, best_epoch: int, summary_path: Path,
             log: Callable[[str], None]) -> dict[str, Any]:
    from . import __version__

    final = history[-1]
    if settings.select == "val":
        # The chosen epoch's row; a resumed run whose metrics file was lost falls back to nothing.
        chosen = next((r for r in history if r["epoch"] == best_epoch),
                      {"epoch": best_epoch, "test_accuracy": None, "val_accuracy": None})
        basis = (f"the model of epoch {best_epoch}, chosen by validation accuracy {_fmt_pct(chosen['val_accuracy'])} "
                 f"on {settings.val_size} held-out training images; the test set played no part in the choice")
        reported_checkpoint = str(out / BEST_VAL_NAME)
    else:
        chosen = final
        basis = f"the final model (after epoch {final['epoch']}); no checkpoint was selected"
        reported_checkpoint = str(out / FINAL_NAME)
    avail = backend.availability()
    summary = {
        "capsspec_version": __version__,
        "backend": backend.name, "framework_version": avail.version, "device": avail.device,
        "config": config.to_dict(), "adam": adam.to_dict(), "settings": settings.to_dict(),
        "parameters": config.parameter_count(),
        "epochs_completed": final["epoch"], "steps": final["step"],
        "test_accuracy": chosen["test_accuracy"],
        "test_error_percent": None if chosen["test_accuracy"] is None else 100 * (1 - chosen["test_accuracy"]),
        "val_accuracy": chosen["val_accuracy"],
        "reported_model": basis,
        "reported_checkpoint": reported_checkpoint,
        "note": ("The reported test accuracy is that of the final model or of the validation-selected epoch; it is "
                 "never the best of the per-epoch test evaluations."),
        "final_test_accuracy": final["test_accuracy"],
        "train_seconds": train_seconds,
        "mean_images_per_second": float(np.mean([r["images_per_second"] for r in history])),
        "checkpoint": str(out / CHECKPOINT_NAME), "final_checkpoint": str(out / FINAL_NAME),
        "metrics": str(out / METRICS_NAME),
    }
    atomic_write_text(summary_path, json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2) + "\n")
    err = summary["test_error_percent"]
    log(f"capsspec: done. test accuracy {_fmt_pct(summary['test_accuracy'])}"
        f"{'' if err is None else f' (error {err:.2f}%)'} on {settings.test_subset or 'all'} test images: {basis}. "
        f"Training took {train_seconds:.1f}s on {backend.name} ({avail.device}). Summary: {summary_path}")
    return summary
