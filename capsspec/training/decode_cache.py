"""Image files decoded once: Pillow decodes, resizes and converts them into a cached uint8 array.

A folder of image files (capsspec.training.image_folders) is decoded the first time it is used
and never again: the pixels go into one (N, C, H, W) uint8 .npy file that later runs open as a
memory map, so a data set larger than memory trains without being read whole, and a second run
starts in the time it takes to stat the files.

Where: $CAPSSPEC_IMAGE_CACHE if set, else $XDG_CACHE_HOME/capsspec/images, else
~/.cache/capsspec/images (the MNIST cache's conventions, capsspec.training.mnist), one folder per
key. The key is a SHA-256 of CACHE_VERSION, every file's absolute path, size and modification
time (ns) in order, the requested size (--image-size) and channels (--channels): change, add,
remove or touch a file, or ask for another size, and the images are decoded again (into a new
folder; old ones stay until removed by hand, and `rm -r` of the cache folder is always safe).

How: Pillow opens each file; `channels` 1 converts to Pillow's "L" (ITU-R 601-2 luma), 3 to "RGB"
(an alpha channel is dropped); a size other than the file's is reached with RESIZE_FILTER
(Pillow's bilinear filter, which widens its support when shrinking, so it also anti-aliases).
A file that cannot be decoded (not an image, truncated) is recorded by name and reason, its row
left zero; the caller decides whether that stops the run (the default) or is skipped.

Writes go through capsspec.training.atomic_files: images.npy is written to a temporary file and
renamed, then meta.json (the marker of a complete entry) the same way. A killed decode leaves
no entry; its temporary file is removed by a later decode once it is ten minutes old (a fresh
one may be another process's, still writing). Nothing here touches the user's files (they are
opened read-only) or imports a framework.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np

from .atomic_files import atomic_path, atomic_write_text, stale_temporaries

__all__ = ["CACHE_VERSION", "RESIZE_FILTER", "Decoded", "cache_root", "cache_key", "cached", "decode_images",
           "read_image", "header", "image_extensions"]

CACHE_VERSION = 1
RESIZE_FILTER = "BILINEAR"  # Pillow's Image.Resampling member used for every resize
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass(frozen=True)
class Decoded:
    """A decode's result: images (N, C, H, W) uint8 (a read-only memory map), bad files (index -> reason),
    and how it came (seconds spent, whether from the cache, where)."""

    images: np.ndarray
    bad: dict[int, str]
    seconds: float
    cached: bool
    folder: Path


def cache_root() -> Path:
    """$CAPSSPEC_IMAGE_CACHE, else $XDG_CACHE_HOME/capsspec/images, else ~/.cache/capsspec/images."""
    env = os.environ.get("CAPSSPEC_IMAGE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "capsspec" / "images"


def image_extensions() -> frozenset[str]:
    """The file name endings Pillow can read here (".png", ".jpg", ...), lower case."""
    from PIL import Image

    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def cache_key(paths: Sequence[Path], size: tuple[int, int] | None, channels: int | None) -> str:
    """The SHA-256 naming the cache entry of these files decoded at this size and channel count."""
    h = hashlib.sha256(f"capsspec-images v{CACHE_VERSION} size={size} channels={channels}\n".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def read_image(path: str | os.PathLike, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """One file as (C, H, W) uint8: converted to `channels` (1 or 3) and, if size (H, W) is given, resized.

    Raises OSError (Pillow's UnidentifiedImageError is one) for a file Pillow cannot decode whole.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # a truncated file fails here, not later
        im = im.convert("L" if channels == 1 else "RGB")
        if size is not None and (im.height, im.width) != tuple(size):
            im = im.resize((size[1], size[0]), getattr(Image.Resampling, RESIZE_FILTER))
        a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))


def header(path: Path) -> tuple[tuple[int, int], int]:
    """((H, W), channels the file would give unconverted: 1 for grey modes, else 3) from its header alone."""
    from PIL import Image

    with Image.open(path) as im:
        return (im.height, im.width), 1 if im.mode in _GREY_MODES else 3


def _bar(progress: TextIO | None, total: int) -> Any:
    # Only on a terminal: in a log, the line that follows the decode ("decoded in ...") says it all.
    if progress is None or not bool(getattr(progress, "isatty", lambda: False)()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="decoding images", unit="img", file=progress, leave=False, dynamic_ncols=True,
                mininterval=0.2)


def _open_entry(folder: Path, n: int) -> Decoded | None:
    """The complete cache entry in folder, or None (none, or one that does not hold n images)."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        images = np.load(folder / "images.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if images.shape[0] != n or meta.get("version") != CACHE_VERSION:
        return None
    return Decoded(images, {int(k): v for k, v in meta.get("bad", {}).items()}, 0.0, True, folder)


def cached(key: str, n: int) -> Decoded | None:
    """The complete cache entry of key holding n images, or None."""
    return _open_entry(cache_root() / key[:40], n)


def decode_images(paths: Sequence[Path], shape: tuple[int, int, int], *, size: tuple[int, int] | None,
                  channels: int | None, bad: dict[int, str] | None = None, progress: TextIO | None = sys.stderr,
                  key: str | None = None) -> Decoded:
    """The files decoded to `shape` (C, H, W), from the cache when it holds them, else decoded into it.

    bad: files already known to be unreadable (from their headers): not opened again, rows left zero.
    key: cache_key(paths, size, channels) when the caller has it.
    """
    key = key or cache_key(paths, size, channels)
    folder = cache_root() / key[:40]
    found = _open_entry(folder, len(paths))
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    for tmp in stale_temporaries(folder / "images.npy"):  # left by a killed decode ...
        try:  # ... not one another process (a torchrun rank) is writing now: that one's file is fresh
            if time.time() - tmp.stat().st_mtime > 600:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass
    bad = dict(bad or {})
    t0 = time.perf_counter()
    bar = _bar(progress, len(paths))
    try:
        with atomic_path(folder / "images.npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *shape))
            for i, p in enumerate(paths):
                if i not in bad:
                    try:
                        a = read_image(p, shape[0], shape[1:])
                        out[i] = a
                    except (OSError, ValueError, SyntaxError) as exc:  # Pillow raises all three for broken files
                        bad[i] = _reason(exc)
                if bar is not None:
                    bar.update(1)
            out.flush()
            del out
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    atomic_write_text(folder / "meta.json", json.dumps({"version": CACHE_VERSION, "count": len(paths),
                                                        "shape": list(shape), "seconds": seconds,
                                                        "bad": {str(k): v for k, v in sorted(bad.items())}}) + "\n")
    entry = _open_entry(folder, len(paths))
    assert entry is not None  # just written
    return Decoded(entry.images, entry.bad, seconds, False, folder)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "truncated" in text.lower():
        return f"truncated ({text})"
    return text
