"""The `capsspec` command line: backends, data, train, eval, figures, and the conformance/bench front doors.

    capsspec backends                     which backends run here, or why not
    capsspec data [--data-dir DIR]        fetch and verify MNIST, print where it is
    capsspec train [--backend NAME] ...   train with the paper's settings (flags change them); under
                                          torchrun, data-parallel over its processes (capsspec.training.distributed)
    capsspec eval [--backend NAME] CKPT   test accuracy, per-class accuracy, confusion matrix
    capsspec figures CKPT [--out DIR]     reconstructions, Figure 4, training curves (PNG)
    capsspec predict CKPT FILE...         each image's predicted class and every class's capsule length
    capsspec export CKPT --out FILE       the inference graph as ONNX (capsspec.tools.onnx_export)
    capsspec conformance ...              the conformance suite's own command line
    capsspec bench ...                    the benchmark's own command line
    capsspec gpu-check --out DIR ...      every GPU claim checked within a time budget (capsspec.tools.gpucheck)

Errors caused by the input (bad flags or files, values out of range, an unavailable backend,
missing data) print one line to stderr, saying what was wrong and what to do, and exit with
status 2: never the whole usage text, never a traceback. A diverged run or a refusal by the
machine (disk full) exits with 1; Ctrl-C with 130; a reader that closes the pipe early
(`capsspec eval ... | head`) ends the command quietly with 141, as SIGPIPE would.
What this module must never do: import a framework at import time (a backend imports its own
framework when it is used).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from ..config import FIELD_LIMITS
from ..training.presets import PRESETS, preset_help
from .args import (OneLineParser, UsageError, backend_option, check_out_file, check_out_folder, finite_float,
                   int_in)

__all__ = ["main", "build_parser"]

# Subcommands whose arguments belong to another module's parser, passed through untouched.
_PASSTHROUGH = ("conformance", "bench", "gpu-check")


# The parser contract (one line, exit 2, no abbreviations, output paths checked first) lives in .args,
# shared with bench and gpu-check; the names below are this module's own spellings of it.
_UsageError = UsageError
_Parser = OneLineParser
_check_out_folder = check_out_folder
_check_out_file = check_out_file
_positive_int = int_in(1)
_nonnegative_int = int_in(0)
_positive_float = finite_float(0.0, exclusive=True)
_nonnegative_float = finite_float(0.0)


def _add_backend_flags(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--backend", default=None, help=f"backend name (see `capsspec backends`); {default_help}")
    p.add_argument("--device", default=None, help="device for the backend, e.g. cpu, cuda, cuda:1")
    p.add_argument("--backend-option", dest="backend_options", action="append", type=backend_option, default=[],
                   metavar="KEY=VALUE", help="an option for the backend's constructor (e.g. fast=true for torch on "
                                             "CUDA); repeatable")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one function below per subcommand adds its flags."""
    parser = _Parser(
        prog="capsspec", description="The capsule network of 'Dynamic Routing Between Capsules' as a specification: "
                                     "a NumPy reference, framework backends held to it, and MNIST training on any of them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_backends_parser, _data_parser, _train_parser, _eval_parser, _figures_parser, _export_parser,
                _predict_parser, _import_parser):
        add(sub)
    # Listed for --help; main() hands their arguments over before argparse sees them.
    sub.add_parser("conformance", help="run the conformance suite (arguments go to its own parser)", add_help=False)
    sub.add_parser("bench", help="benchmark a backend (arguments go to its own parser)", add_help=False)
    sub.add_parser("gpu-check", help="prove the GPU claims within a time budget (capsspec.tools.gpucheck)", add_help=False)
    parser.set_defaults(commands=sub.choices)  # main() refuses a subcommand's unknown flags with its own parser
    return parser


def _backends_parser(sub: Any) -> None:
    p = sub.add_parser("backends", help="list the backends: available or why not, version, device")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _data_parser(sub: Any) -> None:
    p = sub.add_parser("data", help="fetch and verify MNIST, print where it is cached")
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: $CAPSSPEC_DATA, else "
                                                    "$XDG_CACHE_HOME/capsspec/mnist or ~/.cache/capsspec/mnist)")
    p.add_argument("--no-download", action="store_true", help="only check the cache; fetch nothing")


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="train on MNIST or MultiMNIST (the paper's settings unless flags say otherwise)",
                       description="Train on MNIST. Flags left out take the paper's settings (or, with --resume, the "
                                   "resumed run's, its backend, device and dtype included). A resumed run refuses "
                                   "flags that would change it, except --epochs, --eval-batch-size, --log-every and "
                                   "--checkpoint-every; naming another --backend, --device or --dtype is allowed but "
                                   "the result is then not bit-exact. Ctrl-C or SIGTERM checkpoints the step under "
                                   "way and stops.")
    _add_backend_flags(p, "default: the fastest available one (with --resume: the one the run was started on)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/capsspec", help="output folder (checkpoint, metrics, summary); "
                                                          "default runs/capsspec")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, at the step "
                                                          "it holds (mid-epoch too)")
    g.add_argument("--data-dir", default=None, help="MNIST folder (see `capsspec data`)")
    g.add_argument("--dataset", choices=("mnist", "multimnist"), default=None,
                   help="mnist (default), or multimnist: pairs of overlapping digits on 36x36, generated on the fly "
                        "(the model's input becomes 36x36; docs/multimnist.md)")
    _image_flags(g)
    g.add_argument("--images-per-epoch", type=_positive_int, default=None,
                   help="multimnist: fresh pairs per epoch (default 60000)")
    g.add_argument("--epochs", type=_positive_int, default=None, help="epochs in all (default 50)")
    g.add_argument("--batch-size", type=_positive_int, default=None, help="training batch size (default 128)")
    g.add_argument("--seed", type=_nonnegative_int, default=None, help="seed of init, split, shuffles, shifts (default 0)")
    g.add_argument("--val-size", type=_nonnegative_int, default=None,
                   help="training images held out for validation (default 5000; 0 for none)")
    g.add_argument("--train-subset", type=_positive_int, default=None,
                   help="train on N images (a seeded choice, after the validation hold-out)")
    g.add_argument("--test-subset", type=_positive_int, default=None,
                   help="evaluate on the first N test images (multimnist: N test pairs, default 10000)")
    g.add_argument("--max-shift", type=_nonnegative_int, default=None,
                   help="augmentation: random shifts of up to this many pixels (default 2, the paper's; 0: none)")
    g.add_argument("--select", choices=("final", "val"), default=None,
                   help="which model's test accuracy to report: the final one (default) or the epoch with the best "
                        "validation accuracy; never the best test accuracy")
    g.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default float32")
    g.add_argument("--eval-batch-size", type=_positive_int, default=None, help="default 500")
    g.add_argument("--log-every", type=_positive_int, default=None,
                   help="steps between reads of device-side metrics: the progress bar's numbers and a point of the "
                        "training curve in metrics.jsonl each (default 5; more on a GPU, where each read waits for it)")
    g.add_argument("--checkpoint-every", type=_nonnegative_int, default=None, metavar="STEPS",
                   help="also write a checkpoint every STEPS training steps within an epoch (default: after every 2 "
                        "minutes of training on a CPU, every minute on a GPU; 0: at each epoch's end only). Ctrl-C "
                        "or SIGTERM always writes one of the step under way")
    g.add_argument("--quiet", action="store_true", help="no progress bar (one line per epoch only)")
    g.add_argument("--dist-timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others in a collective before the run "
                        "fails (default 600)")
    _train_model_flags(p)


def _image_flags(g: Any) -> None:
    """The flags of `capsspec train --data` (your own images; docs/own-images.md)."""
    g.add_argument("--data", default=None, metavar="PATH",
                   help="train on your own images: a folder with one subfolder of images per class (optionally in "
                        "train/, val/, test/), an .npz of x_train, y_train, x_test, y_test, or a CSV of file,labels "
                        "(several labels separated by ';'); the model's channels, size and classes come from them")
    g.add_argument("--image-size", type=int_in(1, FIELD_LIMITS["input_height"]), nargs=2, default=None, metavar=("H", "W"),
                   help="--data: resize every image to H x W (Pillow, bilinear)")
    g.add_argument("--channels", type=int, choices=(1, 2, 3), default=None,
                   help="--data: convert the images to 1 (grey) or 3 (RGB) channels (default: as the data are); 2: "
                        "an .npz of 2-channel images, taken as they are")
    g.add_argument("--crop", type=int_in(1, FIELD_LIMITS["input_height"]), nargs=2, default=None, metavar=("H", "W"),
                   help="--data: the model sees H x W crops: random ones in training (replacing the shifts), the "
                        "centre one in evaluation, eval, predict and figures")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="--data: the paper's section-7 settings; flags you name override the preset's values. "
                        + preset_help())
    g.add_argument("--layout", choices=("nchw", "nhwc"), default=None,
                   help="--data FILE.npz: the arrays' layout, when their shapes cannot tell it")
    g.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="--data: skip (and count) image files that cannot be decoded instead of stopping")


def _train_model_flags(p: argparse.ArgumentParser) -> None:
    """The model's and the optimizer's flags of `capsspec train` (left out: the paper's values)."""
    g = p.add_argument_group("model (paper defaults)")
    g.add_argument("--routing-iterations", type=int_in(1, FIELD_LIMITS["routing_iterations"]), default=None, help="default 3")
    g.add_argument("--no-decoder", action="store_true", default=None, help="train without the reconstruction decoder")
    g.add_argument("--conv1-channels", type=int_in(1, FIELD_LIMITS["conv1_channels"]), default=None, help="default 256")
    g.add_argument("--primary-types", type=int_in(1, FIELD_LIMITS["primary_types"]), default=None, help="capsule types in PrimaryCaps (default 32)")
    g.add_argument("--primary-dim", type=int_in(1, FIELD_LIMITS["primary_dim"]), default=None, help="default 8")
    g.add_argument("--class-dim", type=int_in(1, FIELD_LIMITS["class_dim"]), default=None, help="default 16")
    g.add_argument("--none-of-the-above", action="store_true", default=None,
                   help="routing's softmax gets one more logit, fixed at 0, that no class stands for (docs/spec.md)")
    g.add_argument("--conv1-kernel", type=int_in(1, FIELD_LIMITS["conv1_kernel"]), default=None, help="default 9")
    g.add_argument("--conv1-stride", type=int_in(1, FIELD_LIMITS["conv1_stride"]), default=None, help="default 1")
    g.add_argument("--primary-kernel", type=int_in(1, FIELD_LIMITS["primary_kernel"]), default=None, help="default 9")
    g.add_argument("--primary-stride", type=int_in(1, FIELD_LIMITS["primary_stride"]), default=None, help="default 2")
    g.add_argument("--reconstruction-scale", type=_nonnegative_float, default=None, help="default 0.0005")
    g = p.add_argument_group("optimizer (the official code's defaults)")
    g.add_argument("--lr", type=_positive_float, default=None, help="initial learning rate (default 1e-3)")
    g.add_argument("--lr-decay-rate", type=_positive_float, default=None, help="default 0.96")
    g.add_argument("--lr-decay-steps", type=_positive_int, default=None, help="default 2000")
    g.add_argument("--lr-floor", type=_positive_float, default=None, help="default 1e-6")


def _eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on the MNIST test set (or MultiMNIST's test pairs)")
    p.add_argument("checkpoint", help="a .safetensors checkpoint")
    _add_backend_flags(p, "default: the fastest available one")
    p.add_argument("--data-dir", default=None, help="MNIST folder")
    p.add_argument("--test-subset", type=_positive_int, default=None,
                   help="the first N test images only (a MultiMNIST checkpoint: N test pairs, default 10000)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="a checkpoint trained on your own images: where they are (default: the path it was trained on)")
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON to FILE")


def _figures_parser(sub: Any) -> None:
    p = sub.add_parser("figures", help="draw reconstructions, Figure 4 and training curves (PNG)")
    p.add_argument("checkpoint", help="a .safetensors checkpoint")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    _add_backend_flags(p, "default: numpy")
    p.add_argument("--data-dir", default=None, help="MNIST folder")
    p.add_argument("--samples", type=_nonnegative_int, default=3, help="Figure 4 panels to draw (default 3)")
    p.add_argument("--pairs", type=_positive_int, default=16, help="input/reconstruction pairs (default 16)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="a checkpoint trained on your own images: where they are (default: the path it was trained on)")


def _predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="predict the class of image files with a checkpoint trained on your own images",
                       description="For each image: the predicted class and every class's capsule length (a "
                                   "probability-like score in [0, 1)). A folder predicts every image in it. Files "
                                   "that cannot be read get one line each; the others are still predicted.")
    p.add_argument("checkpoint", help="a .safetensors checkpoint")
    p.add_argument("files", nargs="+", metavar="FILE", help="image files or folders of them")
    _add_backend_flags(p, "default: numpy")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--batch-size", type=_positive_int, default=64)


def _export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a checkpoint's inference graph (ONNX) for deployment")
    p.add_argument("checkpoint", help="a .safetensors checkpoint")
    p.add_argument("--format", default="onnx", choices=("onnx",), help="the export format (default onnx)")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.onnx")


def _import_parser(sub: Any) -> None:
    p = sub.add_parser("import", help="turn a CapsNet's weights trained elsewhere into a capsspec checkpoint",
                       description="Reads a PyTorch state_dict (.pt/.pth), a Keras .weights.h5/.keras file or an .npz, "
                                   "maps its names and axis orders to capsspec's canonical parameters with a mapping "
                                   "file (JSON or TOML, see docs/import-your-model.md) and writes a checkpoint that "
                                   "eval, figures and export accept.")
    p.add_argument("weights", help="the weights file (.pt, .pth, .npz, .weights.h5, .keras)")
    p.add_argument("--mapping", metavar="FILE", help="the mapping file (.json or .toml); required unless --list")
    p.add_argument("--out", metavar="FILE", help="the checkpoint to write, e.g. model.safetensors; required unless --list")
    p.add_argument("--list", action="store_true", help="only list the file's names and shapes (to write a mapping)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="the checkpoint's dtype (default: float64 if every weight is, else float32)")


# ===================================================================================== commands
def _cmd_backends(args: argparse.Namespace) -> int:
    from ..registry import describe_backends

    rows = describe_backends()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'backend':<12}{'available':<11}{'version':<14}{'device':<28}{'speed':>5}  note")
    for r in rows:
        print(f"{r['name']:<12}{'yes' if r['available'] else 'no':<11}{str(r['version'] or '-'):<14}"
              f"{str(r['device'] or '-'):<28}{r['speed_rank']:>5}  {'' if r['available'] else r['reason']}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from ..training.mnist import MNIST_FILES, fetch_mnist, load_mnist

    directory = fetch_mnist(args.data_dir, download=not args.no_download)
    m = load_mnist(directory, download=False)
    print(f"MNIST is in {directory} (verified by SHA-256; read from {m.source})")
    for name, sha in MNIST_FILES.items():
        print(f"  {name}  {sha}")
    print(f"  train: {m.train_images.shape[0]} images, test: {m.test_images.shape[0]} images")
    return 0


def _check_train_flags(args: argparse.Namespace, config: Any, adam: Any, settings: Any) -> None:
    """Refuse train settings that each parse but make no sense together or for MNIST (before any work).

    Called by the train command with the values it resolved (from the flags, the paper's defaults
    or the resumed run), so a value is checked whichever way it came.
    """
    _check_out_folder(args.out)
    _check_affordable(config, settings.batch_size, settings.dtype, "--batch-size", training=True)
    _check_affordable(config, settings.eval_batch_size, settings.dtype, "--eval-batch-size", training=False)
    h, w = config.input_height, config.input_width
    if settings.max_shift >= min(h, w):
        raise _UsageError(f"--max-shift {settings.max_shift} would move a {h}x{w} image entirely out of view: use a "
                          f"value below {min(h, w)} (the paper shifts by up to 2 px; 0 turns shifts off)")
    if adam.lr_floor > adam.lr:
        floor = f"{'' if args.lr_floor is not None else 'the default '}--lr-floor {adam.lr_floor:g}"
        raise _UsageError(f"{floor} is above --lr {adam.lr:g}, so every step would use the floor, "
                          f"never --lr: pass a --lr-floor of at most {adam.lr:g}")
    if adam.decay_rate > 1:
        raise _UsageError(f"--lr-decay-rate {adam.decay_rate:g} is above 1, so the learning rate would grow: use a "
                          f"rate in (0, 1] (1 keeps it constant; the default is 0.96)")


def _check_affordable(config: Any, batch_size: int, dtype: str, flag: str, *, training: bool) -> None:
    """Refuse, before any work, a batch of this model that cannot fit in this machine's memory."""
    from ..config import check_affordable

    try:
        check_affordable(config, batch_size, dtype=dtype, training=training, flags={"batch_size": flag})
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _config_from_flags(config: Any, given: dict[str, Any]) -> Any:
    """config.replace(**given), its refusals in terms of the flags that set the fields, not the fields."""
    try:
        return config.replace(**given)
    except ValueError as exc:
        message = str(exc)
        for key, value in given.items():
            message = message.replace(f"CapsNetConfig.{key}", f"--{key.replace('_', '-')}")
        named = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items() if k != "use_decoder")
        raise _UsageError(f"{message} (from {named})" if named and "--" not in message else message) from None


def _train_values(args: argparse.Namespace):
    """(config, adam, settings, backend, device, options, why) from the flags; with --resume, train.plan_resume
    fills what was left out from the run itself (its backend, device and dtype included)."""
    from ..config import AdamConfig, CapsNetConfig
    from ..training.settings import TrainSettings, plan_resume
    from .own_images import apply_preset, image_settings

    apply_preset(args)
    config_flags = _config_flags(args)
    adam_flags = {"lr": args.lr, "decay_rate": args.lr_decay_rate, "decay_steps": args.lr_decay_steps,
                  "lr_floor": args.lr_floor}
    settings_flags = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
                      "val_size": args.val_size, "train_subset": args.train_subset, "test_subset": args.test_subset,
                      "max_shift": args.max_shift, "select": args.select, "dtype": args.dtype,
                      "eval_batch_size": args.eval_batch_size, "log_every": args.log_every,
                      "checkpoint_every": args.checkpoint_every, "dataset": args.dataset,
                      "images_per_epoch": args.images_per_epoch, **image_settings(args)}
    options = dict(args.backend_options) if args.backend_options else None
    if args.dataset == "multimnist" and args.max_shift:
        raise _UsageError(f"--max-shift {args.max_shift} is for MNIST: MultiMNIST pairs are already shifted by up to 4 px "
                          "by their generator; leave --max-shift out")
    if args.images_per_epoch is not None and args.dataset != "multimnist" and not args.resume:
        raise _UsageError("--images-per-epoch is for --dataset multimnist (an MNIST epoch is its training set; see "
                          "--train-subset)")
    if not args.resume:
        given = lambda d: {k: v for k, v in d.items() if v is not None}  # noqa: E731
        config, settings = CapsNetConfig(), given(settings_flags)
        if args.data is not None:  # sized by the data (own_images.prepare_training)
            return config, AdamConfig(**given(adam_flags)), TrainSettings(**settings), args.backend, args.device, \
                options or {}, None
        if args.dataset == "multimnist":  # the paper's 36x36 model; the generator does the shifting
            config = config.replace(input_height=36, input_width=36)
            settings.setdefault("max_shift", 0)
        return (_config_from_flags(config, given(config_flags)), AdamConfig(**given(adam_flags)),
                TrainSettings(**settings), args.backend, args.device, options or {}, None)
    plan = plan_resume(args.out, config=config_flags, adam=adam_flags, settings=settings_flags, backend=args.backend,
                       device=args.device, backend_options=options)
    why = None if args.backend else f"{plan.backend}: the backend the run was started on"
    return plan.config, plan.adam, plan.settings, plan.backend, plan.device, plan.backend_options, why


def _config_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The model's fields the train flags name (None: not named)."""
    return {"routing_iterations": args.routing_iterations, "conv1_channels": args.conv1_channels,
            "primary_types": args.primary_types, "primary_dim": args.primary_dim, "class_dim": args.class_dim,
            "none_of_the_above": args.none_of_the_above,
            "reconstruction_scale": args.reconstruction_scale, "use_decoder": False if args.no_decoder else None,
            "conv1_kernel": args.conv1_kernel, "conv1_stride": args.conv1_stride,
            "primary_kernel": args.primary_kernel, "primary_stride": args.primary_stride}


def _mnist_splits(data_dir: str | None, config: Any, settings: Any):
    from ..training.mnist import load_mnist
    from ..training.splits import split_data

    if settings.dataset == "multimnist":
        from ..training.multimnist import multimnist_data

        if config.input_shape != (1, 36, 36):
            raise ValueError(f"MultiMNIST images are 1x36x36 but the model takes {config.input_shape}")
        m = load_mnist(data_dir)
        return multimnist_data(m.train_images, m.train_labels, m.test_images, m.test_labels, settings,
                               images_per_epoch=settings.images_per_epoch)
    if config.input_shape != (1, 28, 28):
        raise ValueError(f"MNIST images are 1x28x28 but the model takes {config.input_shape}")
    m = load_mnist(data_dir)
    return split_data(m.train_images, m.train_labels, m.test_images, m.test_labels, settings)


def _cmd_train(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ..backend import BackendUnavailable
    from ..training.distributed import DEFAULT_TIMEOUT_SECONDS, launch, plan_device, setup
    from ..training.settings import TrainingInterrupted, choose_backend
    from ..training.train import train

    def terminated(signum: int, frame: Any) -> None:  # before training starts; train() then handles it itself
        raise KeyboardInterrupt("SIGTERM")

    in_main = threading.current_thread() is threading.main_thread()  # only there can handlers be set
    previous = signal.signal(signal.SIGTERM, terminated) if in_main else None
    where, dist = launch(), None  # where: this process's place in a torchrun launch of several, or None
    say = (lambda msg: print(msg, file=sys.stderr)) if where is None or where.rank == 0 else (lambda msg: None)
    try:
        if where is None and args.dist_timeout is not None:
            raise _UsageError("--dist-timeout applies to runs on several processes started by torchrun only (see the "
                              "docs/distributed.md); leave it out here")
        config, adam, settings, name, device, options, why_resumed = _train_values(args)
        own = None
        if settings.dataset == "images":
            from .own_images import prepare_training

            config, settings, own = prepare_training(args, config, _config_flags(args), settings, say)
        _check_train_flags(args, config, adam, settings)
        if where is not None:
            name, device = plan_device(name, device, where)
        try:
            backend, why = choose_backend(name, device, options)
        except BackendUnavailable as exc:
            if why_resumed is None:
                raise
            raise BackendUnavailable(f"{exc}. The run was started there; to continue it elsewhere, name another "
                                     "--backend or --device (the result will then not be bit-exact)") from None
        avail = backend.availability()
        if why_resumed is not None:  # not "asked for with --backend": the run's own
            why = why_resumed + (why[why.index(";"):] if ";" in why else "")
        if where is not None:
            dist = setup(backend, where, timeout=args.dist_timeout or DEFAULT_TIMEOUT_SECONDS)
            why += f"; one of {dist.describe()}, rank {dist.rank} on {backend.device}"
        say(f"capsspec: training on backend {why}; {avail.version or ''} on {avail.device}")
        splits = own if own is not None else _mnist_splits(args.data_dir, config, settings)
        shifts = ("MultiMNIST pairs, each digit shifted up to 4 px" if settings.dataset == "multimnist" else
                  f"random {settings.crop[0]}x{settings.crop[1]} crops" if settings.crop else
                  f"shifts up to {settings.max_shift} px")
        say(f"capsspec: {splits.train_x.shape[0]} training images per epoch ({shifts}), "
              f"{splits.val_x.shape[0]} validation, {splits.test_x.shape[0]} test; {config.parameter_count():,} "
              f"parameters; batch {settings.batch_size}, {settings.epochs} epochs, routing {config.routing_iterations}, "
              f"decoder {'on' if config.use_decoder else 'off'}, {settings.dtype}; output in {args.out}")
        summary = train(backend, config, splits, args.out, adam=adam, settings=settings, resume=args.resume,
                        progress=sys.stderr, show_bar=not args.quiet, backend_options=options,
                        distributed=dist if dist is not None else False)
    except TrainingInterrupted as exc:
        again = "capsspec train" if where is None else "torchrun ... -m capsspec train (on any number of processes)"
        hint = f"; continue with: {again} --resume --out {args.out}" if exc.checkpoint is not None else ""
        say(f"capsspec train: {exc}{hint}")
        return 143 if exc.signal_name == "SIGTERM" else 130
    except KeyboardInterrupt as exc:  # before training started: nothing was written
        kept = (f"the checkpoint in {args.out} is unchanged; continue with: capsspec train --resume --out {args.out}"
                if args.resume else "no checkpoint was written")
        name = "SIGTERM" if str(exc) == "SIGTERM" else "SIGINT"
        print(f"\ncapsspec train: stopped by {name} before training started; {kept}", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        if dist is not None:
            dist.close()
    if where is not None and where.rank != 0:
        return 0
    print(json.dumps({k: summary[k] for k in ("backend", "device", "epochs_completed", "test_accuracy",
                                              "test_error_percent", "val_accuracy", "reported_model", "train_seconds",
                                              "train_seconds_by_backend", "reported_checkpoint")}, indent=2))
    return 0


def _load_for_backend(args: argparse.Namespace, default: str | None):
    from ..training.checkpoint import load_checkpoint
    from ..registry import get_backend
    from ..training.settings import choose_backend

    ck = load_checkpoint(args.checkpoint)  # its config within CapsNetConfig's bounds; now the batch's memory
    _check_affordable(ck.config, getattr(args, "batch_size", 1), ck.dtype, "--batch-size", training=False)
    name = args.backend if args.backend is not None else default
    # An inference-only backend (onnxruntime) can evaluate; choose_backend refuses it for training.
    if name is not None and args.command == "eval" and not get_backend(name, check=False).trains:
        backend, why = get_backend(name, device=args.device, **dict(args.backend_options)), f"{name}: asked for"
    else:
        backend, why = choose_backend(name, args.device, dict(args.backend_options))
    if ck.dtype not in backend.dtypes:
        raise ValueError(f"the checkpoint holds {ck.dtype} parameters, which backend {backend.name!r} does not support")
    return ck, backend, why


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..training.mnist import load_mnist
    from ..training.evaluate import evaluate
    from ..training.atomic_files import atomic_write_text

    if args.json:
        _check_out_file(args.json, "--json")
    ck, backend, why = _load_for_backend(args, None)
    if ck.training.get("dataset") == "images":
        from .own_images import eval_images

        return eval_images(args, ck, backend, why)
    if ck.training.get("dataset") == "multimnist":
        return _eval_multimnist(args, ck, backend, why)
    if ck.config.input_shape != (1, 28, 28):
        raise ValueError(f"MNIST images are 1x28x28 but the checkpoint's model takes {ck.config.input_shape}")
    m = load_mnist(args.data_dir)
    available = m.test_images.shape[0]
    if args.test_subset is not None and args.test_subset > available:
        raise _UsageError(f"--test-subset {args.test_subset} is more than the {available} test images: pass at most "
                          f"{available}, or leave it out to use them all")
    n = available if args.test_subset is None else args.test_subset
    params = backend.params_from_numpy(ck.params, ck.config)
    result = evaluate(backend, params, m.test_images[:n], m.test_labels[:n], ck.config, batch_size=args.batch_size,
                      dtype=ck.dtype)
    print(f"checkpoint {args.checkpoint} (epoch {ck.epoch}, step {ck.step}, written by {ck.backend or '?'}), "
          f"evaluated on backend {why}")
    print(result.format())
    if args.json:
        report = {"checkpoint": str(args.checkpoint), "epoch": ck.epoch, "step": ck.step, "backend": backend.name,
                  "device": backend.availability().device, **result.to_dict()}
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def _eval_multimnist(args: argparse.Namespace, ck: Any, backend: Any, why: str) -> int:
    """A MultiMNIST checkpoint: the two longest capsules against the two labels of the first N test pairs."""
    from ..training.mnist import load_mnist
    from ..training.evaluate import evaluate_multi
    from ..training.atomic_files import atomic_write_text
    from ..training.multimnist import DEFAULT_TEST_PAIRS, PairImages, test_generator

    import numpy as np

    m = load_mnist(args.data_dir)
    n = args.test_subset or DEFAULT_TEST_PAIRS
    gen = test_generator(m.test_images, m.test_labels)
    params = backend.params_from_numpy(ck.params, ck.config)
    result = evaluate_multi(backend, params, PairImages(gen, n, 0, ck.dtype), gen.labels(np.arange(n)), ck.config,
                            batch_size=args.batch_size, dtype=ck.dtype)
    print(f"checkpoint {args.checkpoint} (MultiMNIST, epoch {ck.epoch}, step {ck.step}, written by "
          f"{ck.backend or '?'}), evaluated on backend {why}; {n} test pairs")
    print(result.format())
    if args.json:
        report = {"checkpoint": str(args.checkpoint), "dataset": "multimnist", "epoch": ck.epoch, "step": ck.step,
                  "backend": backend.name, "device": backend.availability().device, **result.to_dict()}
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    from ..training.mnist import load_mnist
    from .figures import make_figures, read_metrics_rows
    from ..training.checkpoint import METRICS_NAME

    if args.out is not None:
        _check_out_folder(args.out)
    ck, backend, _ = _load_for_backend(args, "numpy")
    metrics = Path(args.checkpoint).parent / METRICS_NAME
    if not ck.config.use_decoder and not (metrics.is_file() and read_metrics_rows(metrics)):
        raise _UsageError(f"nothing to draw: the model in {args.checkpoint} has no decoder (so no reconstructions or "
                          f"Figure 4) and there is no {METRICS_NAME} with an epoch in it beside it (so no training "
                          f"curves): pass a checkpoint in a training run's --out folder")
    images = labels = targets = overlaps = names = None
    if ck.config.use_decoder and ck.training.get("dataset") == "images":
        from .own_images import figures_data

        images, labels, names = figures_data(ck, args.data)
    elif ck.config.use_decoder and ck.training.get("dataset") == "multimnist":
        from ..training.multimnist import PairImages, frame_overlap, test_generator

        m = load_mnist(args.data_dir)
        pairs = PairImages(test_generator(m.test_images, m.test_labels), max(args.pairs, args.samples, 12), 0,
                           ck.dtype).batch(slice(None))
        images, labels, targets, overlaps = pairs.images, pairs.labels, pairs.targets, frame_overlap(pairs.shifts)
    elif ck.config.use_decoder:
        if ck.config.input_shape != (1, 28, 28):
            raise ValueError(f"MNIST images are 1x28x28 but the checkpoint's model takes {ck.config.input_shape}")
        m = load_mnist(args.data_dir)
        images, labels = m.test_images, m.test_labels
    paths = make_figures(args.checkpoint, args.out, backend=backend, images=images, labels=labels,
                         samples=args.samples, pairs=args.pairs, targets=targets, overlaps=overlaps, class_names=names,
                         log=lambda msg: print(f"capsspec figures: {msg}", file=sys.stderr))
    if not paths:
        raise _UsageError(f"nothing was drawn from {args.checkpoint}: see the lines above for why")
    for p in paths:
        print(p)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .onnx_export import export_checkpoint

    path, note = export_checkpoint(args.checkpoint, args.out, format=args.format)
    if note:
        print(f"capsspec export: note: {note}", file=sys.stderr)
    print(path)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_command

    ck, backend, why = _load_for_backend(args, "numpy")
    return predict_command(args, ck, backend, why)


def _cmd_import(args: argparse.Namespace) -> int:
    from .import_weights import import_weights, read_weights

    if args.list:
        for name, a in read_weights(args.weights).items():
            print(f"{name}\t{a.dtype}\t{tuple(a.shape)}")
        return 0
    missing = [flag for flag, value in (("--mapping", args.mapping), ("--out", args.out)) if value is None]
    if missing:
        raise _UsageError(f"capsspec import needs {' and '.join(missing)} (or --list to see the file's names)")
    _check_out_file(args.out, "--out")
    path, summary = import_weights(args.weights, args.mapping, args.out, dtype=args.dtype)
    print(f"capsspec import: {summary}", file=sys.stderr)
    print(path)
    return 0


_COMMANDS = {"import": _cmd_import, "backends": _cmd_backends, "data": _cmd_data, "train": _cmd_train, "eval": _cmd_eval,
             "figures": _cmd_figures,
             "export": _cmd_export, "predict": _cmd_predict}


def _reader_went_away() -> int:
    """stdout's reader closed the pipe (`capsspec eval ... | head`): stop quietly, as other tools do."""
    try:
        # Point stdout at /dev/null so the interpreter's final flush of what is left has nowhere to fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    return 128 + 13  # what the shell reports for a writer ended by SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from ..backend import BackendUnavailable
    from ..training.mnist import MnistUnavailable
    from ..training.distributed import PeerFailure
    from ..training.settings import TrainingDiverged

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:
        command, rest = argv[0], argv[1:]
        try:
            if command == "conformance":
                from capsspec.conformance.cli import main as m
            elif command == "gpu-check":
                from capsspec.tools.gpucheck import main as m
            else:
                from capsspec.tools.bench import main as m
            status = m(rest)
            sys.stdout.flush()
            return status
        except BrokenPipeError:
            return _reader_went_away()

    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra:
            args.commands[args.command].unrecognized(extra)  # the subcommand's own one-line error
    except SystemExit as exc:  # --help, or a usage error argparse has already reported in one line
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return _reader_went_away()
        return exc.code if isinstance(exc.code, int) else 2
    from ..training.host_memory import reuse_freed_memory

    reuse_freed_memory()  # large arrays reused from step to step, not faulted in again (host_memory.py)
    try:
        status = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's flush at exit
        return status
    except BrokenPipeError:
        return _reader_went_away()
    except (ValueError, BackendUnavailable, MnistUnavailable, FileNotFoundError) as exc:
        print(f"capsspec {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except (TrainingDiverged, PeerFailure) as exc:
        print(f"capsspec {args.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # The machine refused (disk full, permissions changed mid-run): one line, not a traceback.
        where = f": {exc.filename}" if exc.filename else ""
        print(f"capsspec {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # train reports its own stops (and its checkpoint); the others have nothing to keep
        print(f"\ncapsspec {args.command}: interrupted", file=sys.stderr)
        return 130
