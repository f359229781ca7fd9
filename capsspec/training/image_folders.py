"""Your own image files as a data set: a folder with one subfolder per class, or a CSV of files and labels.

A folder:

    PATH/cat/1.png, PATH/cat/2.jpg, ..., PATH/dog/1.png, ...        (classes: the subfolder names)
    PATH/train/cat/..., PATH/val/cat/..., PATH/test/cat/...          (optional split folders)

With a train/ subfolder, its class subfolders are the classes, and val/ and test/ (each optional)
hold the validation and test images of the same classes. Without one, PATH's subfolders are the
classes. Class names are sorted; class j is the j-th. A file is an image when its name ends in an
extension Pillow reads (decode_cache.image_extensions); other files are ignored and counted;
names starting with "." are skipped. Subfolders of a class folder are searched too.

A CSV (several labels per image): rows `file,labels`, the file relative to the CSV's folder,
its labels separated by ";" (`shapes/12.png,circle;square`); a first row `file,labels` is a
header. Every row must name the same number K of distinct labels (the margin loss's (B, K) form,
docs/spec.md section 5, needs one K per batch); class names are the sorted labels seen.

This module lists files and labels and reads image headers (sizes, colour) only; decoding is
capsspec.training.decode_cache's. Errors are ValueErrors of one line naming what is wrong and
the flag that settles it. Nothing here writes anything.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .decode_cache import header, image_extensions

__all__ = ["FileSource", "scan_folder", "scan_csv", "read_headers"]

SPLIT_FOLDERS = ("train", "val", "test")


@dataclass
class FileSource:
    """Image files with labels: files in order (the training pool, then validation, then test), labels (N,) or
    (N, K) int64, class names, and each part's positions in files (val/test: None when the source has none)."""

    files: list[Path]
    labels: np.ndarray
    class_names: tuple[str, ...]
    parts: dict[str, np.ndarray | None]
    kind: str  # "folder" or "csv"
    ignored: int = 0  # files skipped because their extension is not an image's
    notes: list[str] = field(default_factory=list)


def _image_files(folder: Path, extensions: frozenset[str]) -> tuple[list[Path], int]:
    """The image files under folder (recursively, sorted, hidden names skipped) and the count of other files."""
    found, other = [], 0
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in extensions:
                found.append(Path(root) / name)
            else:
                other += 1
    return found, other


def _class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan_folder(path: str | os.PathLike) -> FileSource:
    """The classes and image files of a class-folder tree (see the module's docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--data {path}: no such folder")
    extensions = image_extensions()
    split = (root / "train").is_dir()
    top = root / "train" if split else root
    names = _class_folders(top)
    if len(names) < 2:
        raise ValueError(f"--data {path}: {top} has {len(names)} class subfolder{'s' if len(names) != 1 else ''} "
                         f"({', '.join(names) or 'none'}); training needs at least two, one folder of images per class")
    files: list[Path] = []
    labels: list[int] = []
    parts: dict[str, np.ndarray | None] = {}
    ignored = 0
    for part in SPLIT_FOLDERS if split else ("train",):
        base = root / part if split else root
        if not base.is_dir():
            parts[part] = None
            continue
        extra = sorted(set(_class_folders(base)) - set(names))
        if extra:
            raise ValueError(f"--data {path}: {base} has class folders that {top} has not: {', '.join(extra[:5])}; "
                             "every class must have training images")
        start = len(files)
        for j, name in enumerate(names):
            if not (base / name).is_dir():
                continue
            found, other = _image_files(base / name, extensions)
            ignored += other
            if not found and base == top:
                raise ValueError(f"--data {path}: the class folder {base / name} holds no image files (Pillow reads "
                                 f"{', '.join(sorted(e for e in extensions if e in _COMMON))}, ...); add images or "
                                 "remove the folder")
            files += found
            labels += [j] * len(found)
        parts[part] = np.arange(start, len(files))
    parts.setdefault("val", None)
    parts.setdefault("test", None)
    return FileSource(files, np.asarray(labels, dtype=np.int64), tuple(names), parts, "folder", ignored)


_COMMON = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def scan_csv(path: str | os.PathLike) -> FileSource:
    """The files and labels of a `file,labels` CSV (see the module's docstring)."""
    csv_path = Path(path)
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--data {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["file", "labels"]:
        rows = rows[1:]
    if not rows:
        raise ValueError(f"--data {path}: the CSV has no rows; write one `file,labels` row per image")
    files, names_per_row = [], []
    for line, row in enumerate(rows, 1):
        if len(row) != 2 or not row[0].strip():
            raise ValueError(f"--data {path}: row {line} is {','.join(row)!r}; each row must be `file,labels` with "
                             "labels separated by ';' (quote a file name that holds a comma)")
        names = [n.strip() for n in row[1].split(";") if n.strip()]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"--data {path}: row {line} ({row[0]}) names {'no label' if not names else 'a label twice'}"
                             "; give each image its distinct labels separated by ';'")
        files.append((csv_path.parent / row[0].strip()))
        names_per_row.append(names)
    counts = sorted({len(n) for n in names_per_row})
    if len(counts) > 1:
        raise ValueError(f"--data {path}: rows name {counts[0]} to {counts[-1]} labels; every image must have the same "
                         "number of labels (the margin loss's (B, K) form; see docs/own-images.md)")
    classes = tuple(sorted({n for row in names_per_row for n in row}))
    if len(classes) < 2:
        raise ValueError(f"--data {path}: the CSV names {len(classes)} class ({', '.join(classes)}); training needs "
                         "at least two")
    index = {n: j for j, n in enumerate(classes)}
    labels = np.asarray([[index[n] for n in row] for row in names_per_row], dtype=np.int64)
    if counts[0] == 1:
        labels = labels[:, 0]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ValueError(f"--data {path}: {len(missing)} file{'s' if len(missing) > 1 else ''} it names do not exist "
                         f"(first: {missing[0]}); file names are relative to the CSV's folder")
    return FileSource(files, labels, classes, {"train": np.arange(len(files)), "val": None, "test": None}, "csv")


def read_headers(source: FileSource, size: tuple[int, int] | None, channels: int | None, where: Any
                 ) -> tuple[tuple[int, int, int], dict[int, str]]:
    """The decoded shape (C, H, W) all files will have, and the files Pillow cannot even open (index -> reason).

    Without size, every readable file must have the same size; without channels, 1 when every file is
    grey, else 3."""
    sizes: dict[tuple[int, int], int] = {}
    colour, bad = False, {}
    for i, p in enumerate(source.files):
        try:
            hw, c = header(p)
        except (OSError, ValueError, SyntaxError) as exc:
            bad[i] = " ".join(str(exc).split()) or type(exc).__name__
            continue
        sizes.setdefault(hw, i)
        colour |= c == 3
    if not sizes:
        raise ValueError(f"--data {where}: none of its {len(source.files)} image files can be read "
                         f"(first: {source.files[0]}: {bad.get(0, '?')})")
    if size is None and len(sizes) > 1:
        (a, i), (b, k) = list(sizes.items())[:2]
        raise ValueError(f"--data {where}: the images have {len(sizes)} different sizes ({source.files[i]} is "
                         f"{a[0]}x{a[1]}, {source.files[k]} is {b[0]}x{b[1]}); pass --image-size H W to resize them all")
    h, w = size if size is not None else next(iter(sizes))
    return (channels or (3 if colour else 1), h, w), bad
