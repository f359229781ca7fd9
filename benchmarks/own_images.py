"""How fast your own images get ready: the first decode (images/s) and a cached second start-up, printed.

    PYTHONPATH=. python benchmarks/own_images.py [--per-class N] [--size S]

Writes a folder of RGB shapes (tests/shapes.py) into a temporary folder, with a cache of its own,
then times capsspec.training.image_data.open_images + image_splits three ways: the first run
(listing, headers, decoding into the cache), a second run (a cache hit: listing and stat only),
and, for scale, reading every image of a training epoch through the splits' memory-mapped views.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=2000)
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args()
    from shapes import shapes_folder

    from capsspec.training.image_data import image_splits, open_images
    from capsspec.training.settings import TrainSettings

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CAPSSPEC_IMAGE_CACHE"] = str(Path(tmp) / "cache")
        folder = shapes_folder(Path(tmp) / "shapes", a.per_class, a.size)
        n = 3 * a.per_class
        settings = TrainSettings(dataset="images", data=str(folder), val_size=n // 10)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            splits = image_splits(open_images(folder, progress=None), settings)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for start in range(0, len(splits.train_x), 128):
            splits.train_x[start:start + 128]
        epoch = time.perf_counter() - t0
    print(f"{n} RGB PNGs of {a.size}x{a.size} (cpu count {os.cpu_count()}, load {os.getloadavg()[0]:.1f})")
    print(f"first run (list, headers, decode into the cache): {times[0]:.2f} s = {n / times[0]:.0f} images/s")
    print(f"second run (cache hit): {times[1]:.3f} s to the splits")
    print(f"reading a training epoch ({len(splits.train_x)} images) from the memory map: {epoch:.3f} s")


if __name__ == "__main__":
    main()
