"""Your own images as a run's data: a class-folder tree, a CSV of files and labels, or an .npz of arrays,
brought into the trainer's one path (Splits' fields, plus describe() and fingerprint()).

`open_images(path, ...)` reads any of the three (capsspec.training.image_folders, arrays; folders
are decoded once into capsspec.training.decode_cache) into an ImageData: one pool of images
(N, C, H, W), uint8 or float32, with labels, class names and the positions of each part.
`image_splits(data, settings)` splits it as an MNIST run is split (splits.split_data: the seed's
validation hold-out, then the subsets) into ImageSplits, whose images are views (ImageView) that
read only the rows a batch asks for from the pool (a memory map for folders) and scale uint8 by
1/255: a data set larger than memory trains without being loaded whole.

The test set is the source's own (a test/ folder, x_test) when it has one; otherwise
TEST_FRACTION of each class (of all images, for several labels per image) is held out by
TEST_SEED, the same for every run and every --seed, so `capsspec eval` finds the same test images
again. The validation set is the source's own (val/, x_val) or --val-size images held out of the
rest by the seed (default: VAL_FRACTION of them).

What the model gets from the data: input channels, height, width and the number of classes
(`config_for`); several labels per image ((N, K) labels) train with the margin loss's (B, K)
form and no decoder (docs/own-images.md says why).

With a crop (settings.crop, from a preset of capsspec.training.presets or --crop) the model's input
is the crop: every split's view gives the centre crop, and training batches
(CroppedImageSplits.training_batch, which the trainer calls in place of indexing train_x) a
random crop per image, drawn by splits.epoch_crops from (seed, epoch) alone.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import numpy as np

from ..config import CapsNetConfig
from .augmentation import centre_offset, crop_images
from .splits import Splits, epoch_crops, split_data

__all__ = ["TEST_FRACTION", "TEST_SEED", "VAL_FRACTION", "ImageView", "ImageSplits", "CroppedImageSplits", "ImageData",
           "open_images", "image_splits", "config_for", "default_val_size", "data_kind", "check_crop"]

TEST_FRACTION = 0.2
TEST_SEED = 0
VAL_FRACTION = 0.1


class ImageView:
    """Rows `index` of an (N, C, H, W) pool, indexable like a float32 array in [0, 1] (uint8 rows scaled by 1/255);
    with crop (h, w), the centre h x w of each image."""

    def __init__(self, pool: np.ndarray, index: np.ndarray, crop: tuple[int, int] | None = None) -> None:
        self.pool, self.index = pool, np.asarray(index, dtype=np.int64)
        self.crop = None if crop is None or tuple(crop) == tuple(pool.shape[2:]) else tuple(crop)
        self.shape = (int(self.index.size), pool.shape[1], *(self.crop or pool.shape[2:]))
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = self.index[key]
        if np.ndim(rows) == 0:
            rows = np.asarray([rows])
        a = self.pool[rows]
        if self.crop is not None:
            top, left = (centre_offset(s, c) for s, c in zip(self.pool.shape[2:], self.crop))
            a = a[:, :, top:top + self.crop[0], left:left + self.crop[1]]
        return a.astype(np.float32) / np.float32(255.0) if a.dtype == np.uint8 else np.array(a, dtype=np.float32)


@dataclass(frozen=True)
class ImageSplits(Splits):
    """Splits of your own images (images are ImageViews), with their class names and how they were made."""

    class_names: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    name: str = "images"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "class_names": list(self.class_names), **self.info}

    def fingerprint(self) -> str:
        """A hash of the class names, the labels of each split and a sparse sample of their pixels."""
        h = hashlib.sha256(repr(self.class_names).encode())
        for y, x in ((self.train_y, self.train_x), (self.val_y, self.val_x), (self.test_y, self.test_x)):
            h.update(f"{y.shape}{x.shape}".encode())
            h.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
            if len(x):
                h.update(np.ascontiguousarray(x[np.arange(0, len(x), 97)][:, :, ::3, ::3]).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class CroppedImageSplits(ImageSplits):
    """ImageSplits whose model sees crops: train_x (like val_x and test_x) gives centre crops, and the trainer
    takes its training batches from `training_batch`, a random crop of each image drawn for the epoch."""

    seed: int = 0

    def training_batch(self, epoch: int, idx: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, None]:
        """(images, labels, None) of training positions idx in epoch `epoch` (1-based): random crops, the same
        for the same (seed, epoch, image) however the epoch is split into runs."""
        view = self.train_x
        _, _, h, w = view.pool.shape
        ch, cw = view.shape[2:]
        top, left = epoch_crops(self.seed, epoch, view.shape[0], (h - ch, w - cw))
        whole = ImageView(view.pool, view.index)[idx]
        return crop_images(whole, top[idx], left[idx], ch, cw).astype(dtype), self.train_y[idx], None


@dataclass
class ImageData:
    """A source's images in one pool, its labels (N,) or (N, K), class names, and each part's positions."""

    pool: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    parts: dict[str, np.ndarray | None]  # "train" (the pool the test may be held out of), "val", "test"
    info: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # lines to show the user (skipped files, held-out test)

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2


def data_kind(path: str | os.PathLike) -> str:
    """'npz', 'csv' or 'folder', by the path's name (a folder when it is one)."""
    p = Path(path)
    if p.is_dir():
        return "folder"
    if p.suffix.lower() in (".npz", ".csv"):
        if not p.is_file():
            raise ValueError(f"--data {path}: no such file")
        return p.suffix.lower()[1:]
    if not p.exists():
        raise ValueError(f"--data {path}: no such file or folder")
    raise ValueError(f"--data {path}: expected a folder of class subfolders, an .npz file or a .csv of file,labels")


def open_images(path: str | os.PathLike, *, size: tuple[int, int] | None = None, channels: int | None = None,
                layout: str | None = None, skip_bad: bool = False, progress: TextIO | None = sys.stderr,
                check: Callable[[tuple[int, int, int], int], Any] | None = None) -> ImageData:
    """The images of a folder, CSV or .npz (see the module's docstring), decoded (folders: through the cache).

    check, when given, is called with the images' shape (C, H, W) and the number of classes before any
    image is decoded (to refuse a model those cannot make before the work)."""
    kind = data_kind(path)
    if kind == "npz":
        if skip_bad:
            raise ValueError("--skip-bad-images is for image files; an .npz holds arrays (leave the flag out)")
        data = _from_arrays(path, size, channels, layout)
        if check is not None:
            check(tuple(int(v) for v in data.pool.shape[1:]), len(data.class_names))
        return data
    if layout is not None:
        raise ValueError("--layout is for .npz arrays; image files have no layout to choose (leave the flag out)")
    if channels == 2:
        raise ValueError(f"--data {path}: image files have 1 (grey) or 3 (RGB) channels, not 2; give 2-channel images "
                         "(smallNORB's stereo pairs) as an .npz with x_train, x_test of shape (N, 2, H, W) "
                         "(docs/own-images.md, Presets)")
    return _from_files(path, kind, size, channels, skip_bad, progress, check)


def _from_arrays(path: str | os.PathLike, size: Any, channels: int | None, layout: str | None) -> ImageData:
    from .arrays import load_npz

    src = load_npz(path, layout=layout, size=size, channels=channels)
    order = [p for p in ("train", "val", "test") if p in src.x]
    xs = [src.x[p] for p in order]
    if len({x.dtype for x in xs}) > 1:
        xs = [x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x for x in xs]
    k = {y.shape[1] if y.ndim == 2 else 1 for y in src.y.values()}
    if len(k) > 1:
        raise ValueError(f"--data {path}: the parts' labels differ in how many labels an image has; use one form")
    sizes = np.cumsum([0] + [x.shape[0] for x in xs])
    parts: dict[str, np.ndarray | None] = {"val": None, "test": None}
    parts.update({p: np.arange(sizes[i], sizes[i + 1]) for i, p in enumerate(order)})
    info = {"source": str(Path(path).resolve()), "kind": "npz", "layout": src.layout}
    return ImageData(np.concatenate(xs), np.concatenate([src.y[p] for p in order]), src.class_names, parts, info)


def _from_files(path: str | os.PathLike, kind: str, size: Any, channels: int | None, skip_bad: bool,
                progress: TextIO | None, check: Any) -> ImageData:
    from .decode_cache import RESIZE_FILTER, cache_key, cached, decode_images
    from .image_folders import read_headers, scan_csv, scan_folder

    src = scan_folder(path) if kind == "folder" else scan_csv(path)
    key = cache_key(src.files, size, channels)
    hit = cached(key, len(src.files))  # a cache hit needs no pass over the headers
    if hit is not None:
        decoded = hit
    else:
        shape, bad = read_headers(src, size, channels, path)
        if check is not None:
            check(shape, len(src.class_names))
        decoded = decode_images(src.files, shape, size=size, channels=channels, bad=bad, progress=progress, key=key)
    info = {"source": str(Path(path).resolve()), "kind": kind, "files": len(src.files),
            "resize_filter": RESIZE_FILTER if size is not None else None}
    data = ImageData(decoded.images, src.labels, src.class_names, dict(src.parts), info)
    n = len(src.files)
    data.notes.append(f"{n} images ({decoded.images.shape[1]}x{decoded.images.shape[2]}x{decoded.images.shape[3]}) "
                      + (f"read from the cache {decoded.folder}" if decoded.cached else
                         f"decoded in {decoded.seconds:.1f}s ({n / max(decoded.seconds, 1e-9):.0f} images/s) into "
                         f"the cache {decoded.folder}"))
    if src.ignored:
        data.notes.append(f"{src.ignored} files in {path} are not images by their extension and were ignored")
    if decoded.bad:
        _drop_bad(data, src.files, decoded.bad, skip_bad, path)
    return data


def _drop_bad(data: ImageData, files: list[Path], bad: dict[int, str], skip: bool, path: Any) -> None:
    first = min(bad)
    if not skip:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"--data {path}: cannot read {files[first]}: {bad[first]}{more}; fix or remove it, or pass "
                         "--skip-bad-images to skip unreadable files")
    keep = np.ones(len(files), dtype=bool)
    keep[list(bad)] = False
    for part, idx in data.parts.items():
        if idx is not None:
            data.parts[part] = idx[keep[idx]]
    data.info["skipped_bad_images"] = len(bad)
    data.notes.append(f"skipped {len(bad)} unreadable image file{'s' if len(bad) > 1 else ''} (--skip-bad-images; "
                      f"first: {files[first]}: {bad[first]})")


def _held_out_test(data: ImageData) -> tuple[np.ndarray, np.ndarray]:
    """(training pool, test) positions: the source's test part, or TEST_FRACTION of the pool by TEST_SEED."""
    pool = data.parts["train"]
    if data.parts["test"] is not None:
        return pool, data.parts["test"]
    rng = np.random.default_rng(np.random.SeedSequence([TEST_SEED, 4]))
    groups = [pool] if data.multi_label else [pool[data.labels[pool] == j] for j in range(len(data.class_names))]
    test = []
    for g in groups:
        take = int(round(TEST_FRACTION * g.size)) if g.size > 1 else 0
        test.append(rng.permutation(g)[:take])
    test = np.sort(np.concatenate(test))
    return np.setdiff1d(pool, test), test


def default_val_size(data: ImageData) -> int:
    """--val-size when left out: 0 with the source's own validation part, else VAL_FRACTION of the training pool."""
    if data.parts["val"] is not None:
        return 0
    return max(1, int(round(VAL_FRACTION * _held_out_test(data)[0].size)))


def image_splits(data: ImageData, settings: Any) -> ImageSplits:
    """The run's training, validation and test splits of data (settings: a TrainSettings)."""
    pool, test = _held_out_test(data)
    if data.parts["val"] is not None and settings.val_size:
        raise ValueError(f"--val-size {settings.val_size}: the data have their own validation images (val/ or "
                         "x_val); leave --val-size out")
    if pool.size < 1 or test.size < 1:
        raise ValueError(f"--data {data.info['source']}: {pool.size} training and {test.size} test images are too "
                         "few; add images (each class needs at least two)")
    idx = split_data(np.arange(pool.size), np.zeros(pool.size), np.arange(test.size), np.zeros(test.size), settings)
    val = data.parts["val"] if data.parts["val"] is not None else pool[idx.val_x]
    train, test = pool[idx.train_x], test[idx.test_x]
    info = dict(data.info)
    info["test"] = ("the source's own" if data.parts["test"] is not None else
                    f"held out: {TEST_FRACTION:.0%} of {'the images' if data.multi_label else 'each class'} "
                    f"(fixed seed {TEST_SEED}, the same for every run), {test.size} images")
    info["labels_per_image"] = int(data.labels.shape[1]) if data.multi_label else 1
    info["validation"] = "the source's own" if data.parts["val"] is not None else f"{val.size} held out by the seed"
    crop = getattr(settings, "crop", None)
    views = [ImageView(data.pool, i, crop) for i in (train, val, test)]
    arrays = (views[0], data.labels[train], views[1], data.labels[val], views[2], data.labels[test])
    if crop is None:
        return ImageSplits(*arrays, class_names=data.class_names, info=info)
    info["crop"] = f"{crop[0]}x{crop[1]}: random in training, the centre for validation and test"
    return CroppedImageSplits(*arrays, class_names=data.class_names, info=info, seed=settings.seed)


def check_crop(shape: tuple[int, ...], crop: tuple[int, int] | None, path: Any) -> tuple[int, int, int]:
    """The model's input (C, H, W) for images of shape (C, H, W) and crop; refuses a crop larger than the images."""
    c, h, w = (int(s) for s in shape)
    if crop is None:
        return c, h, w
    if crop[0] > h or crop[1] > w:
        raise ValueError(f"--crop {crop[0]} {crop[1]}: the images of {path} are {h}x{w}, smaller than the crop; "
                         "choose a smaller --crop or a larger --image-size")
    return c, int(crop[0]), int(crop[1])


def config_for(data: ImageData, flags: Mapping[str, Any], crop: tuple[int, int] | None = None) -> CapsNetConfig:
    """The model for data: the given config fields (None: the default), the data's input shape (the crop's, with
    a crop) and classes, and no decoder for several labels per image."""
    c, h, w = check_crop(data.pool.shape[1:], crop, data.info["source"])
    fields: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    fields.update(input_channels=int(c), input_height=int(h), input_width=int(w), num_classes=len(data.class_names))
    if data.multi_label:
        fields["use_decoder"] = False
    return CapsNetConfig(**fields)
