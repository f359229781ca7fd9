"""`capsspec predict CKPT FILE...`: the class of each image file, and every class's capsule length.

Each file is read as training read it (capsspec.training.decode_cache.read_image: converted to
the model's channels, resized with the same filter to the model's size when it differs, scaled
by 1/255; a model trained on crops: resized as training resized it, then its centre crop), so a
test image gets the prediction `capsspec eval` counted for it. A capsule's
length lies in [0, 1) and is the network's probability-like score that the class is present
(the lengths are not a distribution: they need not sum to 1). A checkpoint trained with K labels
per image predicts its K longest capsules. A folder argument predicts every image file under it
(sorted); a file that cannot be read gets one line on stderr and the others are still predicted
(exit status 2 then, else 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["predict_command", "expand_files", "predict_files", "reading"]


def expand_files(paths: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """(image files to predict, [(path, why not)]): folders become the image files under them."""
    from ..training.decode_cache import image_extensions

    extensions = image_extensions()
    files, bad = [], []
    for text in paths:
        p = Path(text)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in extensions
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                bad.append((text, "a folder with no image files in it"))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            bad.append((text, "no such file or folder"))
    return files, bad


def reading(ck: Any) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(the size to resize a file to, the centre crop to take then) that give the checkpoint's model its input."""
    s, config = ck.training or {}, ck.config
    if not s.get("crop_height"):
        return (config.input_height, config.input_width), None
    size = (s["image_height"], s["image_width"]) if s.get("image_height") else None
    return size, (config.input_height, config.input_width)


def _read(path: Path, channels: int, size: tuple[int, int] | None, crop: tuple[int, int] | None) -> np.ndarray:
    from ..training.augmentation import centre_offset
    from ..training.decode_cache import read_image

    a = read_image(path, channels, size)
    if crop is None:
        return a
    if a.shape[1] < crop[0] or a.shape[2] < crop[1]:
        raise ValueError(f"a {a.shape[1]}x{a.shape[2]} image is smaller than the model's {crop[0]}x{crop[1]} crop")
    top, left = centre_offset(a.shape[1], crop[0]), centre_offset(a.shape[2], crop[1])
    return a[:, top:top + crop[0], left:left + crop[1]]


def predict_files(backend: Any, ck: Any, files: list[Path], batch_size: int = 64
                  ) -> tuple[list[tuple[Path, np.ndarray]], list[tuple[str, str]]]:
    """([(file, capsule lengths (J,))], [(file, why it could not be read)])."""
    config = ck.config
    if config.input_channels not in (1, 3):
        raise ValueError(f"this checkpoint's model takes {config.input_channels}-channel images; image files have 1 "
                         "or 3 channels (evaluate it on an .npz with capsspec eval --data)")
    params = backend.params_from_numpy(ck.params, config)
    size, crop = reading(ck)
    good, bad, images = [], [], []
    for f in files:
        try:
            images.append(_read(f, config.input_channels, size, crop))
            good.append(f)
        except (OSError, ValueError, SyntaxError) as exc:
            bad.append((str(f), " ".join(str(exc).split()) or type(exc).__name__))
    lengths = []
    for start in range(0, len(images), batch_size):
        x = np.stack(images[start:start + batch_size]).astype(np.float32) / np.float32(255.0)
        out = backend.forward(params, backend.asarray(np.ascontiguousarray(x, dtype=ck.dtype)), config)
        lengths.append(np.asarray(backend.to_numpy(out.lengths), dtype=np.float64))
    rows = np.concatenate(lengths) if lengths else np.zeros((0, config.num_classes))
    return list(zip(good, rows)), bad


def _class_names(ck: Any) -> list[str]:
    names = (ck.extra.get("dataset") or {}).get("class_names")
    return [str(n) for n in names] if names else [str(j) for j in range(ck.config.num_classes)]


def predict_command(args: Any, ck: Any, backend: Any, why: str) -> int:
    """Print the predictions of args.files (a table, or JSON with --json); 2 when some file could not be read."""
    names = _class_names(ck)
    k = int((ck.extra.get("dataset") or {}).get("labels_per_image") or 1)
    files, missing = expand_files(args.files)
    predicted, unreadable = predict_files(backend, ck, files, args.batch_size)
    for path, reason in missing + unreadable:
        print(f"capsspec predict: error: {path}: {reason}", file=sys.stderr)
    rows = []
    for f, lengths in predicted:
        top = [names[j] for j in np.argsort(-lengths, kind="stable")[:k]]
        rows.append({"file": str(f), "predicted": top[0] if k == 1 else top,
                     "scores": {n: round(float(v), 6) for n, v in zip(names, lengths)}})
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "backend": backend.name, "predictions": rows,
                          "unreadable": [{"file": p, "error": r} for p, r in missing + unreadable]}, indent=2))
    else:
        _table(rows, names, k)
    return 2 if missing or unreadable else 0


def _table(rows: list[dict[str, Any]], names: list[str], k: int) -> None:
    if not rows:
        return
    fw = max(4, *(len(r["file"]) for r in rows))
    pred = [r["predicted"] if k == 1 else "+".join(r["predicted"]) for r in rows]
    pw = max(9, *(len(p) for p in pred))
    cw = [max(6, len(n)) for n in names]
    print(f"{'file':<{fw}}  {'predicted':<{pw}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, cw)))
    for r, p in zip(rows, pred):
        print(f"{r['file']:<{fw}}  {p:<{pw}}  " + "  ".join(f"{r['scores'][n]:>{w}.4f}" for n, w in zip(names, cw)))
