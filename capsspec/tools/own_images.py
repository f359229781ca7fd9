"""The command line's side of your own images: `train --data`, `eval --data` and `figures --data`.

capsspec.tools.cli parses the flags; this module turns them into the run's model and data
(capsspec.training.image_data) and reports with the data's class names. A checkpoint trained on
your own images records the run's settings (the data's path, --image-size, --channels, --layout,
--skip-bad-images, --crop, --preset) and its class names, so `eval` and `figures` read the same
images the same way (the same resize and centre crop), from the recorded path unless --data names
another, and refuse data whose classes differ. `apply_preset` fills the flags a --preset sets
(capsspec.training.presets) where the user named none.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

from ..config import CapsNetConfig

__all__ = ["image_settings", "apply_preset", "prepare_training", "checkpoint_data", "eval_images", "figures_data"]



def _open(settings: Any, path: str, progress: Any = sys.stderr, check: Any = None):
    from ..training.image_data import open_images

    return open_images(path, size=settings.image_size, channels=settings.channels, layout=settings.layout,
                       skip_bad=settings.skip_bad_images, progress=progress, check=check)


def prepare_training(args: Any, config: CapsNetConfig, config_flags: dict[str, Any], settings: Any,
                     say: Callable[[str], None]) -> tuple[CapsNetConfig, Any, Any]:
    """(config, settings, splits) of `capsspec train --data`: the model sized by the data (a fresh run) or checked
    against them (--resume), the default validation hold-out, and the splits."""
    from ..training.image_data import check_crop, config_for, default_val_size, image_splits

    def check(shape: tuple[int, int, int], classes: int) -> None:  # the model these images make, before decoding
        if not args.resume:
            c, h, w = check_crop(shape, settings.crop, settings.data)
            CapsNetConfig(**{k: v for k, v in config_flags.items() if v is not None}, input_channels=c,
                          input_height=h, input_width=w, num_classes=max(classes, 2))

    data = _open(settings, settings.data, None if args.quiet else sys.stderr, check)
    for note in data.notes:
        say(f"capsspec: {note}")
    if not args.resume:
        config = config_for(data, config_flags, settings.crop)
        if data.multi_label and config_flags.get("use_decoder") is not False:
            say(f"capsspec: {data.labels.shape[1]} labels per image: trained with the margin loss's several-targets "
                "form and without the decoder (a labelled image has no separate picture of each object to "
                "reconstruct; docs/own-images.md)")
        if args.val_size is None:
            settings = dataclasses.replace(settings, val_size=default_val_size(data))
    else:
        _check_model(config, data, settings, "the run's model")
    splits = image_splits(data, settings)
    say(f"capsspec: {len(data.class_names)} classes ({_names(data.class_names)}); validation: "
        f"{splits.info['validation']}; test: {splits.info['test']}")
    return config, settings, splits


def _names(names: tuple[str, ...], most: int = 12) -> str:
    return ", ".join(names[:most]) + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def _check_model(config: CapsNetConfig, data: Any, settings: Any, what: str) -> None:
    from ..training.image_data import check_crop

    shape = check_crop(data.pool.shape[1:], settings.crop, settings.data)
    if shape != config.input_shape or len(data.class_names) != config.num_classes:
        cropped = f" (cropped to {shape[1]}x{shape[2]})" if settings.crop else ""
        raise ValueError(f"the images in {settings.data} are {'x'.join(map(str, data.pool.shape[1:]))}{cropped} in "
                         f"{len(data.class_names)} classes, but {what} takes {'x'.join(map(str, config.input_shape))} "
                         f"in {config.num_classes}")


def checkpoint_data(ck: Any, path: str | None, test_subset: int | None = None, progress: Any = sys.stderr) -> Any:
    """The ImageSplits of a checkpoint trained on your own images, read as its run read them (path: another place)."""
    from ..training.image_data import image_splits
    from ..training.settings import TrainSettings

    settings = TrainSettings.from_dict(ck.training)
    path = path or settings.data
    if not path:
        raise ValueError("the checkpoint records no data path; name the images with --data PATH")
    settings = dataclasses.replace(settings, data=str(path), test_subset=test_subset)
    data = _open(settings, str(path), progress)
    _check_model(ck.config, data, settings, "the checkpoint's model")
    recorded = tuple((ck.extra.get("dataset") or {}).get("class_names") or ())
    if recorded and recorded != data.class_names:
        raise ValueError(f"the classes of {path} ({_names(data.class_names, 6)}) are not the checkpoint's "
                         f"({_names(recorded, 6)}); evaluate on the data the model was trained on")
    return image_splits(data, settings)


def eval_images(args: Any, ck: Any, backend: Any, why: str) -> int:
    """`capsspec eval` of a checkpoint trained on your own images: its test images, reported with class names."""
    from ..training.atomic_files import atomic_write_text
    from ..training.evaluate import evaluate, evaluate_multi

    splits = checkpoint_data(ck, args.data, args.test_subset)
    params = backend.params_from_numpy(ck.params, ck.config)
    run = evaluate_multi if splits.test_y.ndim == 2 else evaluate
    result = run(backend, params, splits.test_x, splits.test_y, ck.config, batch_size=args.batch_size, dtype=ck.dtype,
                 class_names=splits.class_names)
    print(f"checkpoint {args.checkpoint} (epoch {ck.epoch}, step {ck.step}, written by {ck.backend or '?'}), "
          f"evaluated on backend {why}; {len(splits.test_y)} test images of {splits.info['source']} "
          f"(test: {splits.info['test']})")
    print(result.format())
    if args.json:
        report = {"checkpoint": str(args.checkpoint), "dataset": "images", "data": splits.info["source"],
                  "epoch": ck.epoch, "step": ck.step, "backend": backend.name,
                  "device": backend.availability().device, **result.to_dict()}
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def figures_data(ck: Any, path: str | None) -> tuple[Any, Any, tuple[str, ...]]:
    """(images, labels, class names) of the test images a checkpoint's figures are drawn from."""
    splits = checkpoint_data(ck, path)
    return splits.test_x, splits.test_y, splits.class_names


def apply_preset(args: Any) -> None:
    """args with the values of args.preset (capsspec.training.presets) filled in where no flag named them."""
    from ..training.presets import PRESETS

    if args.preset is None:
        return
    p = PRESETS[args.preset]
    if args.data is None and not args.resume:
        raise ValueError(f"--preset {p.name} is for your own images ({p.dataset} cannot be downloaded "
                         "by capsspec): name a folder or .npz of them with --data PATH")
    for attr, value in {**p.config, "channels": p.channels, "image_size": p.image_size, "crop": p.crop}.items():
        if getattr(args, attr, None) is None and value is not None:
            setattr(args, attr, list(value) if isinstance(value, tuple) else value)


def image_settings(args: Any) -> dict[str, Any]:
    """The TrainSettings fields of `train --data` (None: not named)."""
    if args.data is None:
        flag = next((f for f, v in (("--image-size", args.image_size), ("--channels", args.channels),
                                     ("--layout", args.layout), ("--skip-bad-images", args.skip_bad_images),
                                     ("--crop", args.crop)) if v),
                    None)
        if flag is not None and not args.resume:
            raise ValueError(f"{flag} is for your own images: name them with --data PATH")
        return {}
    if args.dataset is not None:
        raise ValueError(f"--dataset {args.dataset} and --data name two data sets: leave one out")
    size, crop = args.image_size or (None, None), args.crop or (None, None)
    if args.crop and args.max_shift:
        raise ValueError(f"--max-shift {args.max_shift} and --crop: a random crop already moves the image; leave "
                         "--max-shift out")
    if args.crop and args.image_size and (crop[0] > size[0] or crop[1] > size[1]):
        raise ValueError(f"--crop {crop[0]} {crop[1]} does not fit in --image-size {size[0]} {size[1]}: choose a "
                         "smaller --crop or a larger --image-size")
    shifts = {"max_shift": 0} if args.crop else {}  # the crop replaces the shifts
    return {**shifts,"dataset": "images", "data": str(Path(args.data).resolve()), "image_height": size[0],
            "image_width": size[1], "channels": args.channels, "layout": args.layout,
            "skip_bad_images": args.skip_bad_images, "crop_height": crop[0], "crop_width": crop[1],
            "preset": args.preset}
