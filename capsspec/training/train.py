"""Training the capsule network on any backend, through the protocol only.

The trainer speaks to a backend exclusively through the spec: params_from_numpy / adam_init,
asarray for batches, train_step(params, state, x, labels, config, adam), forward for evaluation,
params_to_numpy / state_to_numpy for checkpoints. Parameters start from capsspec.init_params,
so every backend starts from the same model for a given seed. It imports no framework: the
backend names its own default device.

A run is a sequence of named steps, each a function below: start or resume (`_start`,
`_resume`), one epoch of training steps (`_train_epoch`), evaluation (`_evaluate`), the end of
an epoch (`_end_epoch`), a checkpoint (`_save`), and the end of the run (`_finish`). `train`
strings them together.

Reproducibility. Every random choice derives from (seed, purpose[, epoch]) through
numpy.random.SeedSequence: the validation split from (seed, 1), epoch e's shuffle from
(seed, 2, e) and its augmentation shifts from (seed, 3, e). A checkpoint records where the run
is (epoch, batches done, step), the epoch's running sums and the generator states at that
point; a resumed run re-derives those states by replaying the epoch's draws and checks them
against the record, so it draws exactly what the uninterrupted run would have drawn and, on the
same backend, device and dtype, reproduces it bit for bit (parameters, optimizer state and
metrics). The rule for what a resumed run may change lives here, once (`plan_resume`,
RESUME_MAY_CHANGE, RESUME_MAY_SWITCH, REPRODUCIBILITY_FIELDS); the command line reads it.

Checkpoints. out_dir/checkpoint.safetensors is written at each epoch's end and during epochs:
every `checkpoint_every` steps when set, otherwise after `checkpoint_seconds` of training
(default: 2 minutes on a CPU, 1 minute on an accelerator, so an interrupted run loses at most
that much work). SIGINT (Ctrl-C) and SIGTERM let the step under way finish, write a checkpoint
of it and stop with TrainingInterrupted naming it; a second signal stops at once, naming the
last checkpoint actually written (or saying there is none). Every file goes through
capsspec.training.atomic_files, so a kill at any moment leaves each file whole (old or new); temporary files
a killed writer left behind are removed when the run is started or resumed.

Data. MNIST comes as Splits (arrays). Generated data (settings.dataset "multimnist":
capsspec.training.multimnist.MultiMnistData) has the same fields, its images made on demand, plus
`training_batch(epoch, idx, dtype)` -> (images, (B, K) labels, targets) that the trainer passes
to train_step (targets=...), `fingerprint()` and `describe()` (recorded in checkpoints); with
(B, K) labels, evaluation takes the K longest capsules (evaluate.predict_top_k).

Honest accuracy. Validation images are held out of the training set. Each epoch the model is
evaluated on validation and test, but the accuracy the run reports is the final model's, or
(select="val") the one of the epoch with the best validation accuracy; never the best of the
test evaluations (docs/spec.md, mistake 6). The summary says which. An evaluation whose outputs
hold NaN or inf stops the run as diverged: it reports no accuracy (evaluate.NonFiniteOutputs).

Speed. StepMetrics stay backend scalars, summed on the device and read every `log_every` steps;
each read adds a point to the training curve (metrics.jsonl).

Several processes (torchrun). In a run on several processes (`distributed`, capsspec.training.distributed)
every process draws the same global batch and trains its slice of it (`_process_slice`), the
metrics' sums and the evaluation's counts are summed over the processes (`_read_window`,
`_evaluate_sharded`), decisions between steps are agreed (`_stopping`, the time rule), and rank 0
alone writes files and reports; a checkpoint is the same whatever the number of processes.

What this module must never do: import a framework, augment anything but training batches, or let a
non-finite model overwrite a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn, TextIO

import numpy as np

from ..version import __version__
from ..backend import Backend
from ..config import AdamConfig, CapsNetConfig
from ..model import init_params
from .atomic_files import atomic_write_text, stale_temporaries
from .augmentation import augment_batch
from .checkpoint import (BEST_VAL_NAME, CHECKPOINT_NAME, FINAL_NAME, METRICS_NAME, SUMMARY_NAME, load_checkpoint,
                         read_metadata, run_folder, save_checkpoint)
from .distributed import PeerFailure, collective
from .evaluate import NonFiniteOutputs, accuracy, predict_top_k
from .run_control import StopSignals, progress_bar
from .settings import (CHECKPOINT_SECONDS_ACCELERATOR, CHECKPOINT_SECONDS_CPU, REPRODUCIBILITY_FIELDS,
                       SETTING_DEFAULTS, TrainingDiverged, TrainingInterrupted, TrainSettings, describe_where)
from .splits import Splits, data_fingerprint, describe_data, epoch_draws, rng_record

__all__ = ["train"]


# ===================================================================================== the run's state
_SUMS = ("total", "margin", "reconstruction", "correct")
_ROW_KEYS = ("epoch", "step", "loss", "margin", "reconstruction", "train_accuracy", "val_accuracy", "test_accuracy",
             "lr", "seconds", "images_per_second", "eval_seconds")  # a metrics.jsonl row, in order
# A point of the training curve, written at every read of the device-side metrics (every log_every
# steps): the epoch's running means so far, so that a resumed run rewrites the same points, and the
# mean over each interval between two points can be derived from them (capsspec.tools.figures does).
_POINT_KEYS = ("kind", "epoch", "step", "epoch_images", "loss", "margin", "reconstruction", "train_accuracy",
               "seconds")


@dataclass
class _Run:
    """Everything a run carries from step to step: what a checkpoint saves and a resume restores."""

    backend: Backend
    config: CapsNetConfig
    adam: AdamConfig
    settings: TrainSettings
    data: Splits
    out: Path
    log: Callable[[str], None]
    backend_options: dict[str, Any]
    params: Any = None
    state: Any = None
    epoch: int = 1  # the epoch in progress (1-based); settings.epochs + 1 once all are done
    batch: int = 0  # its batches done
    step: int = 0  # optimizer updates done in all
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SUMS, 0.0))  # this epoch's, read
    window: dict[str, Any] = field(default_factory=dict)  # this epoch's device-side sums, not yet read
    seen: int = 0  # this epoch's training images so far
    epoch_seconds: float = 0.0  # this epoch's training time so far (over every process that ran it)
    seconds_by_backend: dict[str, float] = field(default_factory=dict)  # training time per backend (device)
    best_val: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)  # the points of the training curve (_POINT_KEYS)
    lr: float = 0.0
    saved: tuple[int, int, int] | None = None  # (epoch, batch, step) of checkpoint.safetensors; None: none
    resumed: tuple[int, int, int] | None = None  # (epoch, batch, step) of the checkpoint this run resumed from
    clock: float = 0.0  # perf_counter at the last time accounting
    fingerprint: str = ""
    dist: Any = None  # a capsspec.training.distributed.Distributed in a run on several processes, else None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.data.train_x.shape[0] / self.settings.batch_size)

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT_NAME

    @property
    def where(self) -> str:
        processes = "" if self.dist is None else f" x {self.dist.world_size} processes"
        return f"{self.backend.name} ({self.backend.availability().device}){processes}"

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files: always, except on ranks other than 0 of a distributed run."""
        return self.dist is None or self.dist.writes

    @property
    def world_size(self) -> int:
        return 1 if self.dist is None else self.dist.world_size

    def last_good(self) -> str:
        if self.saved is None:
            return "none: no checkpoint was written"
        if self.saved == self.resumed:  # no step trained from it reached a checkpoint: it may be the cause itself
            return (f"none known: {self.checkpoint} ({self.position(*self.saved)}) is the one this run resumed from, "
                    f"and it led here within {self.step - self.saved[2]} step(s)")
        return f"{self.checkpoint} ({self.position(*self.saved)})"

    def position(self, epoch: int, batch: int, step: int) -> str:
        """Where a run is, in words: "step 6: epoch 2, 2/4 batches" or "step 4: the end of epoch 1"."""
        if batch == 0:
            return f"step {step}: the end of epoch {epoch - 1}" if epoch > 1 else f"step {step}: the start"
        if batch == self.steps_per_epoch:
            return f"step {step}: epoch {epoch} trained, its evaluation not yet done"
        return f"step {step}: epoch {epoch}, {batch}/{self.steps_per_epoch} batches"

    def account(self) -> None:
        """Credit the training time since the last call to this epoch and to the backend running it."""
        now = time.perf_counter()
        self.epoch_seconds += now - self.clock
        self.seconds_by_backend[self.where] = self.seconds_by_backend.get(self.where, 0.0) + now - self.clock
        self.clock = now


def _host_float(backend: Backend, x: Any) -> float:
    if isinstance(x, (int, float, np.generic, np.ndarray)):
        return float(x)
    return float(np.asarray(backend.to_numpy(x)))


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


# ===================================================================================== stop signals
def _stop(run: _Run, stop: StopSignals) -> NoReturn:
    """Checkpoint the current step (unless that checkpoint exists) and stop with a message naming it."""
    if run.saved != (run.epoch, run.batch, run.step):
        _save(run, run.checkpoint)
    raise TrainingInterrupted(
        f"stopped by {stop.name} at {run.position(run.epoch, run.batch, run.step)}; {run.checkpoint} holds that step",
        run.checkpoint, run.step, stop.name)


def _stopped_at_once(run: _Run, stop: StopSignals) -> TrainingInterrupted:
    """A second signal (or a KeyboardInterrupt from elsewhere): no new checkpoint; name the last one written."""
    # The file itself says what it holds: the interrupt may have landed just after a rename.
    try:
        meta = read_metadata(run.checkpoint)
        progress = json.loads(meta.get("extra") or "{}")["progress"]
        run.saved = (int(progress["epoch"]), int(progress["batch"]), int(meta["step"]))
    except (OSError, ValueError, KeyError, TypeError):
        run.saved = None
    what, name = (f"a second {stop.name}", stop.name) if stop.received is not None else ("an interrupt", "SIGINT")
    if run.saved is None:
        return TrainingInterrupted(f"stopped at once by {what} at step {run.step}, before any checkpoint was written: "
                                   "there is nothing to resume", None, None, name)
    return TrainingInterrupted(f"stopped at once by {what} at step {run.step}; the last checkpoint written is "
                               f"{run.checkpoint} ({run.position(*run.saved)})", run.checkpoint, run.saved[2], name)


# ===================================================================================== start or resume
def _start(run: _Run) -> None:
    """A fresh run: the seed's initial model, zero optimizer state, an empty metrics file."""
    if run.checkpoint.exists():
        raise ValueError(f"{run.out} already holds {CHECKPOINT_NAME}: pass --resume to continue that run, or choose "
                         "another --out")
    s = run.settings
    run.params = run.backend.params_from_numpy(init_params(run.config, s.seed, s.dtype), run.config)
    run.state = run.backend.adam_init(run.params)
    run.lr = run.adam.learning_rate(0)
    if run.writes:
        atomic_write_text(run.out / METRICS_NAME, "")


def _resume(run: _Run) -> None:
    """Continue from checkpoint.safetensors: the same run, from the very step it holds."""
    ck = load_checkpoint(run.checkpoint, config=run.config, require_optimizer=True)
    s, path = run.settings, run.checkpoint
    if ck.adam != run.adam:
        raise ValueError(f"cannot resume {path}: it was trained with {ck.adam}, this run asks for {run.adam}")
    for name in REPRODUCIBILITY_FIELDS:
        # A field a checkpoint predates had its default value when the checkpoint was written.
        recorded = ck.training.get(name, SETTING_DEFAULTS.get(name))
        if recorded != getattr(s, name):
            raise ValueError(f"cannot resume {path}: it was trained with {name}={recorded!r}, this run "
                             f"asks for {name}={getattr(s, name)!r} (resuming must not change it)")
    if ck.extra.get("data_fingerprint") != run.fingerprint:
        raise ValueError(f"cannot resume {path}: the training, validation or test data differ from the run's "
                         f"({ck.extra.get('n_train')} training images then, {run.data.train_x.shape[0]} now)")
    progress = ck.extra.get("progress") or {}
    run.epoch, run.batch, run.step = int(progress.get("epoch", ck.epoch + 1)), int(progress.get("batch", 0)), ck.step
    if ck.rng != json.loads(json.dumps(rng_record(s, run.epoch, run.batch, run.data.train_x.shape[0]))):
        raise ValueError(f"cannot resume {path}: its random generator states differ from the ones this version "
                         "derives, so the resumed run would not be the same run")
    params, state = ck.params, ck.state
    if ck.dtype != s.dtype:  # asked for explicitly (plan_resume keeps the run's dtype otherwise)
        params = {k: a.astype(s.dtype) for k, a in params.items()}
        state = {"step": ck.step, **{p: {k: a.astype(s.dtype) for k, a in state[p].items()} for p in ("m", "v")}}
    run.params = run.backend.params_from_numpy(params, run.config)
    run.state = run.backend.state_from_numpy(state, run.params)
    run.sums = {k: float(progress.get("sums", {}).get(k, 0.0)) for k in _SUMS}
    run.window = {k: run.backend.asarray(np.asarray(v, dtype=dt)) for k, (v, dt) in progress.get("window", {}).items()}
    if run.dist is not None:  # the window holds the whole run's sums: fold it in once, not once per process
        for k, (v, _) in progress.get("window", {}).items():
            run.sums[k] += float(v)
        run.window = {}
    run.seen, run.epoch_seconds = int(progress.get("seen", 0)), float(progress.get("seconds", 0.0))
    run.seconds_by_backend = {k: float(v) for k, v in ck.extra.get("seconds_by_backend", {}).items()}
    run.best_val, run.best_epoch = float(ck.extra.get("best_val_accuracy", -1.0)), int(ck.extra.get("best_epoch", 0))
    # The history went through JSON with sorted keys: put each row's fields back in the order a run writes them.
    run.history = [{k: r[k] for k in _ROW_KEYS if k in r} for r in ck.extra.get("history", [])]
    run.curve = [{k: r[k] for k in _POINT_KEYS if k in r} for r in ck.extra.get("curve", [])]
    run.lr = float(progress.get("lr", run.adam.learning_rate(max(ck.step - 1, 0))))  # the last step's, as it reported
    run.saved = run.resumed = (run.epoch, run.batch, run.step)
    # Epochs logged after this checkpoint (before a crash) are redone: the metrics file follows the checkpoint.
    _write_metrics(run)
    started = describe_where(ck.backend, ck.extra.get("device"), ck.extra.get("backend_options") or {}, ck.dtype)
    now = describe_where(run.backend.name, run.backend.device, run.backend_options, s.dtype)
    how = ("as the run was started" if now == started else
           f"as asked; the run was started on {started}, so the result will not be bit-exact with an uninterrupted run")
    before = int(ck.extra.get("world_size", 1))
    if before != run.world_size:
        how += (f"; it ran on {before} process{'es' if before > 1 else ''} and now on {run.world_size}: the same "
                "trajectory up to float32 reductions, not bit for bit")
    run.log(f"capsspec: resuming {path} at {run.position(run.epoch, run.batch, run.step)} on {now}, {how}")


def _write_metrics(run: _Run) -> None:
    if not run.writes:
        return
    # One file, in step order: each epoch's curve points, then its row (the row comes at its last step).
    rows = sorted([*run.curve, *run.history], key=lambda r: (r["step"], "kind" not in r))
    atomic_write_text(run.out / METRICS_NAME,
                      "".join(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n" for r in rows))


# ===================================================================================== one epoch
def _train_epoch(run: _Run, stop: StopSignals, progress: TextIO | None, show_bar: bool) -> bool:
    """The batches of run.epoch from run.batch on, checkpointing as the settings say; False if stopped."""
    s, data, backend, spe = run.settings, run.data, run.backend, run.steps_per_epoch
    perm, _, shift_rng = epoch_draws(s, run.epoch, run.batch, data.train_x.shape[0])
    every, seconds = _checkpoint_rule(run)
    bar = progress_bar(progress, show_bar and run.batch < spe, spe, run.batch, f"epoch {run.epoch}/{s.epochs}")
    run.clock = last_save = time.perf_counter()
    try:
        while run.batch < spe:
            if _stopping(run, stop):
                run.account()
                return False
            idx = perm[run.batch * s.batch_size:(run.batch + 1) * s.batch_size]
            xb, yb, tb = _training_batch(run, idx, shift_rng)
            n = idx.size
            if run.dist is not None:  # the same global batch on every process; this one trains its slice
                xb, yb, tb, n = _process_slice(run, xb, yb, tb)
            targets = {} if tb is None else {"targets": backend.asarray(tb)}
            with collective("a training step (its gradient all-reduce)") if run.dist is not None else nullcontext():
                run.params, run.state, m = backend.train_step(run.params, run.state, backend.asarray(xb),
                                                              backend.asarray(yb), run.config, run.adam, **targets)
            run.batch, run.step, run.seen, run.lr = run.batch + 1, run.step + 1, run.seen + idx.size, float(m.lr)
            for key, value in zip(_SUMS, (m.total * n, m.margin * n, m.reconstruction * n,
                                          m.correct if n else m.correct * 0)):
                run.window[key] = value if key not in run.window else run.window[key] + value
            point = run.batch % s.log_every == 0 or run.batch == spe
            if point or isinstance(m.total, (int, float, np.generic)):
                _read_window(run)
                if point:
                    _add_point(run)
                bar.set_postfix_str(f"loss {run.sums['total'] / run.seen:.4f} acc "
                                    f"{100 * run.sums['correct'] / run.seen:.2f}% "
                                    f"{run.seen / max(run.epoch_seconds + time.perf_counter() - run.clock, 1e-9):.0f}"
                                    " img/s", refresh=False)
            bar.update(1)  # after the postfix, so that the refresh shows this step's numbers
            due = (run.step % every == 0) if every else (every is None and time.perf_counter() - last_save >= seconds)
            if run.dist is not None and every is None:  # the time rule: each process has its own clock
                due = run.dist.agree(due)[0]
            if due and run.batch < spe:  # an epoch's end is checkpointed after its evaluation
                run.account()
                _save(run, run.checkpoint)
                last_save = run.clock = time.perf_counter()  # the write is not training time
        backend.synchronize()
        run.account()
        return True
    finally:
        bar.close()


def _training_batch(run: _Run, idx: np.ndarray, shift_rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(images, labels, targets or None) of the training examples idx of run.epoch (the global batch)."""
    s, data = run.settings, run.data
    if callable(getattr(data, "training_batch", None)):  # generated data: a function of (seed, epoch, idx)
        xb, yb, tb = data.training_batch(run.epoch, idx, s.dtype)
        return np.ascontiguousarray(xb, dtype=s.dtype), yb, None if tb is None else np.ascontiguousarray(tb, s.dtype)
    xb = augment_batch(data.train_x[idx], shift_rng, s.max_shift) if s.max_shift else data.train_x[idx]
    return np.ascontiguousarray(xb, dtype=s.dtype), data.train_y[idx], None


def _process_slice(run: _Run, xb: np.ndarray, yb: np.ndarray, tb: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """(images, labels, targets, count) of this process's contiguous slice of a global batch (capsspec.training.distributed).

    A process whose slice is empty (a last batch smaller than the number of processes) still runs
    the step, so that it takes part in the gradient's all-reduce: on the batch's first image, with
    a weight of 0, and its metrics are not counted.
    """
    lo, hi = run.dist.shard(xb.shape[0])
    run.dist.begin_step(run.backend, run.state, hi - lo, xb.shape[0])
    if hi == lo:
        lo, hi, n = 0, 1, 0
    else:
        n = hi - lo
    return xb[lo:hi], yb[lo:hi], None if tb is None else tb[lo:hi], n


def _checkpoint_rule(run: _Run) -> tuple[int | None, float]:
    """(steps between checkpoints or None for the time rule, seconds between checkpoints)."""
    s = run.settings
    if s.checkpoint_seconds is not None:
        return s.checkpoint_every, float(s.checkpoint_seconds)
    on_cpu = str(run.backend.availability().device or "cpu").lower().startswith("cpu")
    return s.checkpoint_every, CHECKPOINT_SECONDS_CPU if on_cpu else CHECKPOINT_SECONDS_ACCELERATOR


def _stopping(run: _Run, stop: StopSignals) -> bool:
    """Whether the run stops here: a signal came (in a distributed run: to any of its processes)."""
    if run.dist is None:
        return stop.received is not None
    return run.dist.agree(stop.received is not None)[0]


def _read_window(run: _Run) -> None:
    if run.dist is not None and run.window:  # every process's sums (all processes read at the same steps)
        run.window = dict(zip(run.window, run.dist.sum(list(run.window.values()))))
    # Reading device scalars forces a sync, so it happens only here.
    for key, value in run.window.items():
        run.sums[key] += _host_float(run.backend, value)
    run.window.clear()
    if not math.isfinite(run.sums["total"]):
        raise TrainingDiverged(f"the loss became {run.sums['total']} in epoch {run.epoch} (by step {run.step}); "
                               f"training stopped. The last good checkpoint is {run.last_good()}; try a lower --lr")


def _add_point(run: _Run) -> None:
    """A point of the training curve at this step (see _POINT_KEYS), after a read of the window."""
    seen = max(run.seen, 1)
    seconds = sum(run.seconds_by_backend.values()) + time.perf_counter() - run.clock
    run.curve.append({"kind": "point", "epoch": run.epoch, "step": run.step, "epoch_images": run.seen,
                      "loss": run.sums["total"] / seen, "margin": run.sums["margin"] / seen,
                      "reconstruction": run.sums["reconstruction"] / seen,
                      "train_accuracy": run.sums["correct"] / seen, "seconds": seconds})


# ===================================================================================== evaluate
def _evaluate(run: _Run, stop: StopSignals) -> tuple[float | None, float | None, float] | None:
    """(validation accuracy, test accuracy, seconds) of the current model; None if a stop signal came first."""
    if run.dist is not None:
        return _evaluate_sharded(run, stop)
    t0, s, accs = time.perf_counter(), run.settings, []
    for x, y in ((run.data.val_x, run.data.val_y), (run.data.test_x, run.data.test_y)):
        predictions = []
        for start in range(0, x.shape[0], s.eval_batch_size):
            if stop.received is not None:
                return None
            predictions.append(_predict(run, x[start:start + s.eval_batch_size], y))
        accs.append(accuracy(np.concatenate(predictions), y) if predictions else None)
    return accs[0], accs[1], time.perf_counter() - t0


def _predict(run: _Run, xb: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The predicted class of each image of xb, or its K longest classes when the labels y are (N, K)."""
    try:  # the K longest (K = 1: the predicted class), refused when any length is NaN or inf
        top = predict_top_k(run.backend, run.params, xb, run.config, 1 if y.ndim == 1 else y.shape[1],
                            batch_size=run.settings.eval_batch_size, dtype=run.settings.dtype)
    except NonFiniteOutputs as exc:  # diverged, whatever the loss said
        raise TrainingDiverged(f"evaluating epoch {run.epoch} (by step {run.step}): {exc}; training stopped. The last "
                               f"good checkpoint is {run.last_good()}; try a lower --lr") from None
    return top[:, 0] if y.ndim == 1 else top


def _evaluate_sharded(run: _Run, stop: StopSignals) -> tuple[float | None, float | None, float] | None:
    """_evaluate in a distributed run: each process predicts its contiguous shard of each set, and the
    counts of correct predictions are summed over the processes, so the accuracy is exact."""
    t0, s, counts = time.perf_counter(), run.settings, []
    for x, y in ((run.data.val_x, run.data.val_y), (run.data.test_x, run.data.test_y)):
        lo, hi = run.dist.shard(x.shape[0])
        # As many rounds on every process (the largest shard's), so that they agree on stops together.
        rounds = math.ceil(math.ceil(x.shape[0] / run.world_size) / s.eval_batch_size)
        correct = 0
        for k in range(rounds):
            if _stopping(run, stop):
                return None
            a, b = min(hi, lo + k * s.eval_batch_size), min(hi, lo + (k + 1) * s.eval_batch_size)
            if b > a:
                correct += int(round(accuracy(_predict(run, x[a:b], y), y[a:b]) * (b - a)))
        counts += [correct, hi - lo]
    totals = run.dist.sum(counts)
    val, test = (c / n if n else None for c, n in zip(totals[0::2], totals[1::2]))
    return val, test, time.perf_counter() - t0


# ===================================================================================== save
def _save(run: _Run, path: Path) -> dict[str, np.ndarray]:
    """Checkpoint where the run is (mid-epoch or not) to `path`; returns the parameters as NumPy arrays.

    In a distributed run every process calls it at the same point (the parameters are the same on all
    of them, so all reach the same verdict on them) and rank 0 alone writes."""
    if run.dist is not None:
        _read_window(run)  # the sums of every process, so that the checkpoint holds the whole run's
    params_np = run.backend.params_to_numpy(run.params)
    bad = [k for k, a in params_np.items() if not np.all(np.isfinite(a))]
    if bad:
        raise TrainingDiverged(f"parameters {bad[:3]} became NaN or inf in epoch {run.epoch} (by step {run.step}); "
                               f"training stopped. The last good checkpoint is {run.last_good()}; try a lower --lr")
    window = {}
    for key, value in run.window.items():  # read, not folded into the sums: the next read adds them as usual
        a = np.asarray(run.backend.to_numpy(value)) if not isinstance(value, (int, float, np.generic)) else \
            np.asarray(value)
        window[key] = [a.item(), a.dtype.name]
    progress = {"epoch": run.epoch, "batch": run.batch, "sums": run.sums, "seen": run.seen, "window": window,
                "seconds": run.epoch_seconds, "lr": run.lr}
    data = run.data
    extra = {"n_train": int(data.train_x.shape[0]), "n_val": int(data.val_x.shape[0]),
             "n_test": int(data.test_x.shape[0]), "data_fingerprint": run.fingerprint, "progress": progress,
             "history": [{k: _jsonable(v) for k, v in r.items()} for r in run.history],
             "curve": [{k: _jsonable(v) for k, v in r.items()} for r in run.curve],
             "train_seconds": sum(run.seconds_by_backend.values()), "seconds_by_backend": run.seconds_by_backend,
             "best_val_accuracy": run.best_val, "best_epoch": run.best_epoch, "device": run.backend.device,
             "backend_options": run.backend_options, "world_size": run.world_size,
             "dataset": describe_data(data)}
    if not run.writes:
        if path == run.checkpoint:
            run.saved = (run.epoch, run.batch, run.step)
        return params_np
    save_checkpoint(path, params_np, run.config, state=run.backend.state_to_numpy(run.state), adam=run.adam,
                    epoch=run.epoch - 1, rng=rng_record(run.settings, run.epoch, run.batch, data.train_x.shape[0]),
                    training=run.settings.to_dict(), extra=extra, backend=run.backend.name)
    if path == run.checkpoint:
        run.saved = (run.epoch, run.batch, run.step)
    return params_np


# ===================================================================================== end of an epoch
def _end_epoch(run: _Run, val_acc: float | None, test_acc: float | None, eval_seconds: float,
               progress: TextIO | None) -> None:
    """Record the epoch, move to the next, and checkpoint: best-val first, then the run, then its metrics."""
    s, seen = run.settings, max(run.seen, 1)
    row = {"epoch": run.epoch, "step": run.step, "loss": run.sums["total"] / seen, "margin": run.sums["margin"] / seen,
           "reconstruction": run.sums["reconstruction"] / seen, "train_accuracy": run.sums["correct"] / seen,
           "val_accuracy": val_acc, "test_accuracy": test_acc, "lr": run.lr, "seconds": run.epoch_seconds,
           "images_per_second": run.seen / max(run.epoch_seconds, 1e-9), "eval_seconds": eval_seconds}
    run.history.append(row)
    improved = val_acc is not None and val_acc > run.best_val
    if improved:
        run.best_val, run.best_epoch = val_acc, run.epoch
    run.epoch, run.batch, run.seen, run.epoch_seconds = run.epoch + 1, 0, 0, 0.0
    run.sums, run.window = dict.fromkeys(_SUMS, 0.0), {}
    # Each write is atomic, and a kill between two of them is repaired by resuming: the epoch is
    # redone from the previous checkpoint (bit for bit), and metrics.jsonl is rewritten from the
    # history a checkpoint carries.
    if improved and s.select == "val":
        _save(run, run.out / BEST_VAL_NAME)
    _save(run, run.checkpoint)
    _write_metrics(run)
    if progress is not None:
        progress.write(f"epoch {row['epoch']}/{s.epochs}: loss {row['loss']:.4f} (margin {row['margin']:.4f}, "
                       f"reconstruction {row['reconstruction']:.4f}) train {_fmt_pct(row['train_accuracy'])} "
                       f"val {_fmt_pct(val_acc)} test {_fmt_pct(test_acc)} lr {run.lr:.3g} "
                       f"{row['images_per_second']:.0f} img/s {row['seconds']:.1f}s (+{eval_seconds:.1f}s eval)\n")
        progress.flush()


# ===================================================================================== the run
def train(backend: Backend, config: CapsNetConfig, data: Splits, out_dir: str | os.PathLike, *,
          adam: AdamConfig = AdamConfig(), settings: TrainSettings = TrainSettings(), resume: bool = False,
          progress: TextIO | None = sys.stderr, show_bar: bool = True, log: Callable[[str], None] | None = None,
          backend_options: Mapping[str, Any] | None = None, distributed: Any = None) -> dict[str, Any]:
    """Train, evaluate each epoch, checkpoint into out_dir; returns the run's summary.

    resume=True continues from out_dir/checkpoint.safetensors (mid-epoch or not), which must have
    been written with the same config, AdamConfig and REPRODUCIBILITY_FIELDS (plan_resume gives
    the values the rule allows). Without resume, an out_dir that already holds a checkpoint is
    refused rather than overwritten. SIGINT/SIGTERM stop the run with TrainingInterrupted after
    checkpointing the current step.

    progress: where the progress bar and per-epoch lines go (None: nowhere); show_bar=False keeps
    only the per-epoch lines. backend_options: the options the backend was built with, recorded
    so that a resumed run uses them again.

    distributed: a capsspec.training.distributed.Distributed to train data-parallel over its processes; None
    (the default) joins torchrun's processes when this process is one of several it started, and
    is an ordinary run otherwise; False is always an ordinary run. Only rank 0 writes and reports.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    _check_inputs(backend, config, data, settings)
    dist = _join(backend, distributed)
    if dist is not None and not dist.writes:
        progress, log = None, (lambda msg: None)
    out = run_folder(out_dir)
    for name in (CHECKPOINT_NAME, FINAL_NAME, BEST_VAL_NAME, METRICS_NAME, SUMMARY_NAME):
        for tmp in stale_temporaries(out / name) if dist is None or dist.writes else ():  # left by a killed writer
            tmp.unlink(missing_ok=True)
    run = _Run(backend, config, adam, settings, data, out, log, dict(backend_options or {}),
               fingerprint=data_fingerprint(data), dist=dist)
    _resume(run) if resume else _start(run)
    if dist is not None:
        dist.attach(backend, run.params, run.state)
        log(f"capsspec: data-parallel on {dist.describe()}: global batch {settings.batch_size}, each process "
            f"trains its slice of it and the gradients are all-reduced; rank 0 writes")
    if run.epoch > settings.epochs and _finished(run):
        raise ValueError(f"{run.checkpoint} is already at epoch {run.epoch - 1}; pass a larger --epochs to train "
                         "further")
    every, seconds = _checkpoint_rule(run)
    rule = (f"every {every} steps" if every else "at each epoch's end only" if every == 0 else
            f"every {seconds / 60:g} minute{'' if seconds == 60 else 's'} of training")
    log(f"capsspec: checkpoints {rule} and at each epoch's end into {run.checkpoint}; Ctrl-C or SIGTERM writes "
        "one of the step under way, then stops")
    with StopSignals(progress) as stop:
        try:
            while run.epoch <= settings.epochs:
                if not _train_epoch(run, stop, progress, show_bar):
                    _stop(run, stop)
                evaluation = _evaluate(run, stop)
                if evaluation is None:
                    _stop(run, stop)
                _end_epoch(run, *evaluation, progress=progress)
                if run.epoch <= settings.epochs and _stopping(run, stop):
                    _stop(run, stop)
            return _finish(run)
        except TrainingInterrupted:
            raise
        except PeerFailure as exc:
            if dist is None:
                raise
            raise PeerFailure(f"process {dist.rank} of {dist.world_size}: {exc}. Another process of this run probably "
                              "stopped or became unreachable (torchrun's report names it). The last checkpoint is "
                              f"{run.last_good()}; it is whole, and `torchrun ... -m capsspec train --resume --out "
                              f"{run.out}` continues from it") from exc
        except KeyboardInterrupt:
            raise _stopped_at_once(run, stop) from None


def _join(backend: Backend, distributed: Any) -> Any:
    """The run's capsspec.training.distributed.Distributed, or None for an ordinary run (see train's distributed)."""
    if distributed is False:
        return None
    if distributed is not None:
        return distributed
    from .distributed import launch, setup

    where = launch()
    return None if where is None else setup(backend, where)


def _check_inputs(backend: Backend, config: CapsNetConfig, data: Splits, settings: TrainSettings) -> None:
    if not isinstance(config, CapsNetConfig):
        raise ValueError(f"config must be a CapsNetConfig, got {type(config).__name__}")
    if settings.dtype not in getattr(backend, "dtypes", ("float32", "float64")):
        raise ValueError(f"dtype={settings.dtype!r} is not supported by backend {backend.name!r} "
                         f"(it supports {', '.join(backend.dtypes)})")
    for name, x in (("train", data.train_x), ("validation", data.val_x), ("test", data.test_x)):
        if x.ndim != 4 or (x.shape[0] and tuple(x.shape[1:]) != config.input_shape):
            raise ValueError(f"{name} images must have shape (N, {', '.join(map(str, config.input_shape))}) for "
                             f"this config, got {x.shape}")
    if data.train_x.shape[0] == 0:
        raise ValueError("there are no training images")
    if getattr(data, "name", "mnist") != settings.dataset:
        raise ValueError(f"the data are {getattr(data, 'name', 'mnist')} but settings.dataset is {settings.dataset!r}")


def _finished(run: _Run) -> bool:
    """Whether final.safetensors and summary.json already describe the checkpoint's last step."""
    try:
        summary = json.loads((run.out / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (run.out / FINAL_NAME).is_file() and summary.get("steps") == run.step


def _finish(run: _Run) -> dict[str, Any]:
    """The end of the run: final.safetensors, then summary.json."""
    _save(run, run.out / FINAL_NAME)
    return _summary(run)


def _summary(run: _Run) -> dict[str, Any]:

    s, history, out = run.settings, run.history, run.out
    final = history[-1]
    if s.select == "val":
        # The chosen epoch's row; a resumed run whose history was lost falls back to nothing.
        chosen = next((r for r in history if r["epoch"] == run.best_epoch),
                      {"epoch": run.best_epoch, "test_accuracy": None, "val_accuracy": None})
        basis = (f"the model of epoch {run.best_epoch}, chosen by validation accuracy "
                 f"{_fmt_pct(chosen['val_accuracy'])} on {s.val_size} held-out training images; the test set played "
                 "no part in the choice")
        reported_checkpoint = str(out / BEST_VAL_NAME)
    else:
        chosen, reported_checkpoint = final, str(out / FINAL_NAME)
        basis = f"the final model (after epoch {final['epoch']}); no checkpoint was selected"
    avail = run.backend.availability()
    train_seconds = sum(run.seconds_by_backend.values())
    summary = {
        "capsspec_version": __version__,
        "backend": run.backend.name, "framework_version": avail.version, "device": avail.device,
        "config": run.config.to_dict(), "adam": run.adam.to_dict(), "settings": s.to_dict(),
        "parameters": run.config.parameter_count(), "dataset": s.dataset, "data": describe_data(run.data),
        "epochs_completed": final["epoch"], "steps": run.step,
        "test_accuracy": chosen["test_accuracy"],
        "test_error_percent": None if chosen["test_accuracy"] is None else 100 * (1 - chosen["test_accuracy"]),
        "val_accuracy": chosen["val_accuracy"],
        "reported_model": basis,
        "reported_checkpoint": reported_checkpoint,
        "note": ("The reported test accuracy is that of the final model or of the validation-selected epoch; it is "
                 "never the best of the per-epoch test evaluations."),
        "final_test_accuracy": final["test_accuracy"],
        "train_seconds": train_seconds,
        "train_seconds_by_backend": run.seconds_by_backend,
        "mean_images_per_second": float(np.mean([r["images_per_second"] for r in history])),
        "checkpoint": str(run.checkpoint), "final_checkpoint": str(out / FINAL_NAME),
        "metrics": str(out / METRICS_NAME),
        "world_size": run.world_size,
    }
    summary_path = out / SUMMARY_NAME
    if not run.writes:
        return summary
    atomic_write_text(summary_path, json.dumps({k: _jsonable(v) for k, v in summary.items()}, indent=2) + "\n")
    err = summary["test_error_percent"]
    where = (f"on {next(iter(run.seconds_by_backend))}" if len(run.seconds_by_backend) == 1 else
             "(" + ", ".join(f"{t:.1f}s on {b}" for b, t in run.seconds_by_backend.items()) + ")")
    run.log(f"capsspec: done. test accuracy {_fmt_pct(summary['test_accuracy'])}"
            f"{'' if err is None else f' (error {err:.2f}%)'} on {s.test_subset or 'all'} test images: {basis}. "
            f"Training took {train_seconds:.1f}s {where}. Summary: {summary_path}")
    return summary
