"""How a training run is set up: its settings, the rule for what a resumed run may change, and
the backend it trains on.

TrainSettings is the run (the model is a CapsNetConfig, the optimizer an AdamConfig). The rule
for what a resumed run may change lives here, once (`plan_resume`, RESUME_MAY_CHANGE,
RESUME_MAY_SWITCH, REPRODUCIBILITY_FIELDS); the command line and the trainer read it.
choose_backend picks the backend (the fastest available one when none is named) without
importing any framework it does not choose.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..backend import Backend, BackendUnavailable
from ..config import AdamConfig, CapsNetConfig, from_fields
from .augmentation import MAX_SHIFT
from .checkpoint import CHECKPOINT_NAME, read_metadata

DATASETS = ("mnist", "multimnist", "images")


# Default checkpoint interval, in seconds of training: the most work an interrupted run loses.
# A paper-model step takes 2.5-3.5 s on a 2-core CPU, so 2 minutes is ~35-50 steps; an
# accelerator does far more work per minute, so it checkpoints twice as often.
CHECKPOINT_SECONDS_CPU = 120.0
CHECKPOINT_SECONDS_ACCELERATOR = 60.0


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf. The message says when, and which checkpoint is the last good one."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run. `checkpoint` is the checkpoint to resume from (None: none was
    written), `step` the step it holds, `signal_name` what stopped the run ("SIGINT", "SIGTERM")."""

    def __init__(self, message: str, checkpoint: Path | None, step: int | None, signal_name: str) -> None:
        super().__init__(message)
        self.checkpoint, self.step, self.signal_name = checkpoint, step, signal_name

    def __str__(self) -> str:
        return str(self.args[0])


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
    log_every: int = 5  # steps between reads of device-side metrics: a point of the training curve each
    # Checkpoints within an epoch: every checkpoint_every steps (0: at epoch ends only); when
    # None, after checkpoint_seconds of training (None: CHECKPOINT_SECONDS_CPU on a CPU,
    # CHECKPOINT_SECONDS_ACCELERATOR elsewhere).
    checkpoint_every: int | None = None
    checkpoint_seconds: float | None = None
    # "mnist", or "multimnist": pairs of overlapping digits generated on the fly (capsspec.training.multimnist), each
    # epoch images_per_epoch fresh pairs (None: its default); its own shifts replace max_shift's, which must be 0.
    dataset: str = "mnist"
    images_per_epoch: int | None = None
    # "images": your own (capsspec.training.image_data): data is the folder, CSV or .npz; image_height/width
    # resize (None: the data's size), channels converts (None: the data's), layout says how an .npz's
    # arrays are laid out (None: told from their shapes), skip_bad_images skips unreadable files.
    data: str | None = None
    image_height: int | None = None
    image_width: int | None = None
    channels: int | None = None
    layout: str | None = None
    skip_bad_images: bool = False
    # crop_height/width: the model sees crops of the (resized) images, random in training, the centre
    # elsewhere (capsspec.training.presets); preset: the name of the preset the run was started with.
    crop_height: int | None = None
    crop_width: int | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            _check_int(f"TrainSettings.{name}", getattr(self, name), 1)
        for name in ("seed", "val_size", "max_shift"):
            _check_int(f"TrainSettings.{name}", getattr(self, name), 0)
        for name, minimum in (("train_subset", 1), ("test_subset", 1), ("checkpoint_every", 0)):
            if getattr(self, name) is not None:
                _check_int(f"TrainSettings.{name}", getattr(self, name), minimum)
        s = self.checkpoint_seconds
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf):
            raise ValueError(f"TrainSettings.checkpoint_seconds must be a positive number of seconds, got {s!r}")
        if self.select not in ("final", "val"):
            raise ValueError(f"TrainSettings.select must be 'final' or 'val', got {self.select!r}")
        if self.select == "val" and self.val_size == 0:
            raise ValueError("TrainSettings.select='val' needs a validation set, but val_size is 0")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"TrainSettings.dtype must be 'float32' or 'float64', got {self.dtype!r}")
        self._check_dataset()

    def _check_dataset(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"TrainSettings.dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.images_per_epoch is not None:
            _check_int("TrainSettings.images_per_epoch", self.images_per_epoch, 1)
            if self.dataset != "multimnist":
                raise ValueError("TrainSettings.images_per_epoch is for generated data (multimnist); an epoch of "
                                 "stored images is its training set (see train_subset)")
        self._check_images()
        if self.dataset == "multimnist" and self.max_shift:
            raise ValueError(f"TrainSettings.max_shift={self.max_shift}: MultiMNIST pairs are already shifted by up to "
                             "4 px by their generator, so max_shift must be 0")

    def _check_images(self) -> None:
        if (self.dataset == "images") != (self.data is not None):
            raise ValueError("TrainSettings.data names the images of dataset 'images' (and only those): set both or "
                             "neither")
        if (self.image_height is None) != (self.image_width is None):
            raise ValueError("TrainSettings.image_height and image_width go together: set both or neither")
        for name in ("image_height", "image_width"):
            if getattr(self, name) is not None:
                _check_int(f"TrainSettings.{name}", getattr(self, name), 1)
        if self.channels not in (None, 1, 2, 3):
            raise ValueError(f"TrainSettings.channels must be 1, 2 or 3 (or None: the data's), got {self.channels!r}")
        self._check_crop()
        if self.layout not in (None, "nchw", "nhwc"):
            raise ValueError(f"TrainSettings.layout must be 'nchw' or 'nhwc' (or None), got {self.layout!r}")
        if not isinstance(self.skip_bad_images, bool):
            raise ValueError(f"TrainSettings.skip_bad_images must be a bool, got {self.skip_bad_images!r}")

    def _check_crop(self) -> None:
        if (self.crop_height is None) != (self.crop_width is None):
            raise ValueError("TrainSettings.crop_height and crop_width go together: set both or neither")
        if self.crop is None:
            return
        for name in ("crop_height", "crop_width"):
            _check_int(f"TrainSettings.{name}", getattr(self, name), 1)
        if self.dataset != "images":
            raise ValueError("TrainSettings.crop_height/crop_width are for your own images (dataset 'images')")
        if self.max_shift:
            raise ValueError(f"TrainSettings.max_shift={self.max_shift}: a random crop already moves the image, so "
                             "max_shift must be 0 with a crop")
        size = self.image_size
        if size is not None and (self.crop_height > size[0] or self.crop_width > size[1]):
            raise ValueError(f"TrainSettings: a {self.crop_height}x{self.crop_width} crop does not fit in images "
                             f"resized to {size[0]}x{size[1]}")

    @property
    def crop(self) -> tuple[int, int] | None:
        """(crop_height, crop_width), or None: the model sees the whole image."""
        return None if self.crop_height is None else (self.crop_height, self.crop_width)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(image_height, image_width) to resize to, or None."""
        return None if self.image_height is None else (self.image_height, self.image_width)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainSettings":
        return from_fields(cls, d)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# ===================================================================================== the resume rule
# A resumed run is the same run. These settings may change freely when it resumes ...
# (data: the images' path may change, e.g. a moved folder; the data fingerprint checks they are the same)
RESUME_MAY_CHANGE = ("epochs", "eval_batch_size", "log_every", "checkpoint_every", "checkpoint_seconds", "data")
# ... these are kept from the checkpoint unless the user names another, which is allowed but
# costs bit-exactness (train() says so when it resumes) ...
RESUME_MAY_SWITCH = ("backend", "device", "backend_options", "dtype")
# ... and these settings, the whole CapsNetConfig and the whole AdamConfig must not change.
REPRODUCIBILITY_FIELDS = tuple(f.name for f in dataclasses.fields(TrainSettings)
                               if f.name not in RESUME_MAY_CHANGE + RESUME_MAY_SWITCH)
SETTING_DEFAULTS = {"dataset": "mnist", "images_per_epoch": None, "data": None, "image_height": None,
                    "image_width": None, "channels": None, "layout": None, "skip_bad_images": False,
                    "crop_height": None, "crop_width": None, "preset": None}  # fields added after checkpoints were written


@dataclass(frozen=True)
class ResumePlan:
    """What a resumed run is: the run's own model, optimizer and settings, and where it continues."""

    checkpoint: Path
    config: CapsNetConfig
    adam: AdamConfig
    settings: TrainSettings
    backend: str
    device: str | None  # None: that backend's default
    backend_options: dict[str, Any]
    started_on: str  # "numpy (device None, float32)": what the run was started with


def plan_resume(out_dir: str | os.PathLike, *, config: Mapping[str, Any] | None = None,
                adam: Mapping[str, Any] | None = None, settings: Mapping[str, Any] | None = None,
                backend: str | None = None, device: str | None = None,
                backend_options: Mapping[str, Any] | None = None) -> ResumePlan:
    """The resumed run of out_dir: the checkpoint's values, changed only where the rule allows.

    config / adam / settings: the fields the user named (None values count as not named). A named
    field outside RESUME_MAY_CHANGE and RESUME_MAY_SWITCH that differs from the run's raises a
    ValueError naming it. backend / device / backend_options / settings["dtype"]: left out, the
    run's own; named, they win (train() then says the result will not be bit-exact).
    """
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise ValueError(f"cannot resume: {path} does not exist (is --out the folder of the run to continue?)")
    meta = read_metadata(path)
    try:
        run_config = CapsNetConfig.from_dict(json.loads(meta["config"]))
        run_adam = AdamConfig.from_dict(json.loads(meta["adam"])) if meta.get("adam") else AdamConfig()
        run_settings = TrainSettings.from_dict(json.loads(meta.get("training") or "{}"))
        extra = json.loads(meta.get("extra") or "{}")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot resume from {path}: its metadata is invalid ({exc})") from exc
    named = lambda d: {k: v for k, v in (d or {}).items() if v is not None}  # noqa: E731
    for what, obj, changes in (("model", run_config, named(config)), ("optimizer", run_adam, named(adam)),
                               ("run", run_settings, named(settings))):
        for key, value in changes.items():
            if key not in RESUME_MAY_CHANGE + RESUME_MAY_SWITCH and getattr(obj, key) != value:
                raise ValueError(f"the run in {out_dir} has {what} setting {key}={getattr(obj, key)!r}; a resumed run "
                                 f"cannot change it to {value!r}")
    kept = {k: v for k, v in named(settings).items() if k in RESUME_MAY_CHANGE + RESUME_MAY_SWITCH}
    run_backend, run_device = meta.get("backend") or "numpy", extra.get("device")
    run_options = dict(extra.get("backend_options") or {})
    same_backend = backend is None or backend == run_backend
    return ResumePlan(
        checkpoint=path, config=run_config, adam=run_adam,
        settings=TrainSettings.from_dict({**run_settings.to_dict(), **kept}),
        backend=run_backend if backend is None else backend,
        device=device if device is not None or not same_backend else run_device,
        backend_options=dict(backend_options or {}) if backend_options is not None or not same_backend else run_options,
        started_on=describe_where(run_backend, run_device, run_options, run_settings.dtype))


def describe_where(backend: str, device: str | None, options: Mapping[str, Any], dtype: str) -> str:
    opts = "".join(f", {k}={v!r}" for k, v in sorted(options.items()))
    return f"{backend} (device {device or 'default'}{opts}, {dtype})"



# ===================================================================================== backends
def choose_backend(name: str | None = None, device: str | None = None,
                   options: Mapping[str, Any] | None = None) -> tuple[Backend, str]:
    """The backend to train with, and a sentence saying why it was chosen.

    With a name, that backend. Without, the available backend with the highest speed_rank
    (availability is checked from the fastest down, so slower frameworks are not even imported).
    Without a device, the backend's default_device() (torch: "cuda" when it sees one).
    """
    from ..registry import backend_names, get_backend

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

