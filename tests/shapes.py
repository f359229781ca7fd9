"""Small image data sets made on the spot, for the tests and for trying `capsspec train --data`.

    python tests/shapes.py OUT [--per-class N] [--size S] [--seed K]

writes OUT/circle/, OUT/square/, OUT/triangle/: N RGB PNGs each (default 100, 32x32), one shape of a
random colour, size and position on a dark, slightly noisy background. The functions below make
the same folder, a 16x16 two-class grey folder (bars), arrays for an .npz, and a CSV of several labels
per image, all from a seed, with Pillow and NumPy only.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def draw_shape(rng: np.random.Generator, shape: str, size: int = 32, mode: str = "RGB",
               image: Image.Image | None = None) -> Image.Image:
    """One shape of a random colour, size and position (drawn onto image when given)."""
    if image is None:
        noise = rng.integers(0, 40, size=(size, size, 3), dtype=np.uint8)
        image = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(image)
    r = int(rng.integers(size // 6, size // 3 + 1))
    cy, cx = (int(v) for v in rng.integers(r, size - r, size=2))
    colour = tuple(int(v) for v in rng.integers(120, 256, size=3))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image if mode == "RGB" else image.convert(mode)


def shapes_folder(out: str | Path, per_class: int = 100, size: int = 32, seed: int = 0,
                  classes: tuple[str, ...] = SHAPES, mode: str = "RGB") -> Path:
    """OUT/<shape>/<k>.png for each shape: per_class images each."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for shape in classes:
        (out / shape).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            draw_shape(rng, shape, size, mode).save(out / shape / f"{k:04d}.png")
    return out


def two_class_folder(out: str | Path, per_class: int = 60, seed: int = 1) -> Path:
    """16x16 grey images in two classes: a horizontal or a vertical bar at a random place."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for name in ("horizontal", "vertical"):
        (out / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            a = rng.integers(0, 50, size=(16, 16), dtype=np.uint8)
            at, start, length = int(rng.integers(2, 14)), int(rng.integers(0, 6)), int(rng.integers(8, 11))
            if name == "horizontal":
                a[at - 1:at + 1, start:start + length] = 230
            else:
                a[start:start + length, at - 1:at + 1] = 230
            Image.fromarray(a, "L").save(out / name / f"{k:04d}.png")
    return out


def shapes_arrays(n: int, size: int = 32, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """n RGB shapes as (n, size, size, 3) uint8 (NHWC) and their labels (indices into SHAPES)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), size=n)
    images = np.stack([np.asarray(draw_shape(rng, SHAPES[j], size)) for j in labels])
    return images, labels.astype(np.int64)


def multi_label_csv(out: str | Path, n: int = 150, size: int = 32, seed: int = 3) -> Path:
    """OUT/labels.csv naming two different shapes per image, drawn side by side in OUT/images/."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        pair = rng.choice(len(SHAPES), size=2, replace=False)
        canvas = Image.fromarray(rng.integers(0, 40, size=(size, 2 * size, 3), dtype=np.uint8), "RGB")
        for half, j in enumerate(pair):
            canvas.paste(draw_shape(rng, SHAPES[j], size), (half * size, 0))
        name = f"images/{k:04d}.png"
        canvas.resize((size, size), Image.Resampling.BILINEAR).save(out / name)
        rows.append((name, ";".join(SHAPES[j] for j in pair)))
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "labels"])
        w.writerows(rows)
    return out / "labels.csv"


def main() -> None:
    p = argparse.ArgumentParser(description="Write a demo folder of coloured shapes, one subfolder per class.")
    p.add_argument("out")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(shapes_folder(a.out, a.per_class, a.size, a.seed))


if __name__ == "__main__":
    main()
