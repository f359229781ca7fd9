"""MultiMNIST: two MNIST digits of different classes, shifted and overlaid, generated on the fly.

The paper's second experiment (and its official generator) builds each example so:

* every 28x28 MNIST digit is padded by 4 pixels to 36x36 and shifted by an integer (dy, dx),
  each uniform in [-4, 4] (positive dy moves it down, positive dx right; the padding is as
  wide as the largest shift, so no stroke is ever cut);
* it is overlaid on another digit, of a *different class* and from the *same split*, shifted
  the same way with shifts of its own;
* the composite is the pixel-wise sum, clipped at the maximum value (255 in the 8-bit images,
  so 1.0 after scaling to [0, 1]).

The paper writes 1,000 pairs per digit to disk (60 million training images). Here nothing is
stored: example `index` of a split is a pure function of (seed, split, index), so a training
run draws a fresh stream of pairs, any epoch or step can be regenerated exactly (a resumed run
sees the very batches the uninterrupted run saw), and a test set of any size is the first N
indices of the test generator. How an index becomes a pair:

* base digit: the indices run in rounds of N (the split's size); round r = index // N takes
  the digits in the order of a permutation drawn from SeedSequence((seed, split, 1, r)), so in
  every round each digit is the base of exactly one pair (N * 1000 indices give the paper's
  1,000 pairs per digit);
* partner digit and the four shifts: from a counter-based hash (splitmix64's finaliser) of
  (key, index, draw), where the key comes from SeedSequence((seed, split)): the partner is
  uniform over the split's digits of the other nine classes (as the official generator's
  "random image with a different label"), each shift uniform over the 2 * 4 + 1 values.

Whole batches are made with NumPy array operations (one gather for the digits, one scatter to
place each of the two layers); no Python loop runs per example or per pixel.

Splits: training pairs use only the training digits left after the validation hold-out,
validation pairs only the held-out validation digits, test pairs only MNIST's test set (the
hold-out is train.split_data's, so it is the one an MNIST run with the same seed uses). The
test pairs come from TEST_SEED whatever the run's seed, so every run is measured on the same
test pairs.

Overlap. The paper reports that the two digits' bounding boxes overlap by 80% on average. The
box that gives that figure is each digit's 28x28 MNIST frame after its shift: two frames
shifted by (dy1, dx1) and (dy2, dx2) share (28 - |dy1 - dy2|) * (28 - |dx1 - dx2|) of their 784
pixels, and with independent uniform shifts in [-4, 4] the mean of that fraction is
(1 - E|d| / 28)^2 with E|d| = 240 / 81 for the difference d of two such shifts: 0.7996.
`frame_overlap` computes it per pair. (The tight boxes around the ink overlap less: see
`bounding_box_overlap` and docs/multimnist.md.)

What this module must never do: import a framework, draw from a global random state, or let a
validation pair use a training digit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = ["PAD", "MAX_SHIFT", "SIZE", "TEST_SEED", "SPLITS", "MultiMnistBatch", "DigitPool", "PairGenerator",
           "PairImages", "MultiMnistData", "multimnist_data", "bounding_boxes", "bounding_box_overlap", "frame_overlap", "MEAN_FRAME_OVERLAP",
           "DEFAULT_IMAGES_PER_EPOCH", "DEFAULT_TEST_PAIRS", "test_generator"]

PAD = 4  # pixels added on each side of a 28x28 digit: a 36x36 canvas
MAX_SHIFT = 4  # each axis shifted by an integer in [-MAX_SHIFT, MAX_SHIFT]
SIZE = 28 + 2 * PAD
TEST_SEED = 0  # the test pairs are the same for every run
SPLITS = {"train": 0, "validation": 1, "test": 2}  # part of every key, so the splits' streams differ
# An epoch of the training stream: as many pairs as MNIST has training images. The paper's 60
# million pairs are 1,000 such epochs; a GPU run uses far fewer (docs/multimnist.md).
DEFAULT_IMAGES_PER_EPOCH = 60_000
DEFAULT_TEST_PAIRS = 10_000  # each test digit the base of one pair

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_DRAWS = 5  # per index: partner, then dy and dx of the base, then dy and dx of the partner


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic): a bijection that scrambles every bit."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _uniform_ints(bits: np.ndarray, n: np.ndarray | int) -> np.ndarray:
    """Integers uniform in [0, n) from 64 random bits each (53 of them; the bias is below 2**-40 for n < 2**13)."""
    u = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    return np.minimum(np.floor(u * n).astype(np.int64), np.asarray(n, dtype=np.int64) - 1)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class MultiMnistBatch(NamedTuple):
    """A batch of pairs. images (B, 1, 36, 36) and targets (B, 2, 1, 36, 36) floats in [0, 1]; labels int64 (B, 2),
    the two classes (always different), in the order of targets; sources int64 (B, 2): each digit's index in the
    MNIST file it came from (training file for the training and validation splits, test file for test);
    shifts int64 (B, 2, 2): (dy, dx) of each digit."""

    images: np.ndarray
    labels: np.ndarray
    targets: np.ndarray
    sources: np.ndarray
    shifts: np.ndarray


@dataclass(frozen=True)
class DigitPool:
    """The digits one split draws from: 8-bit images (N, 28, 28), labels (N,), and each one's index in its MNIST file."""

    images: np.ndarray
    labels: np.ndarray
    sources: np.ndarray

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != np.uint8 or self.images.shape[1:] != (28, 28):
            raise ValueError(f"images must be uint8 (N, 28, 28), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (n,) or self.sources.shape != (n,):
            raise ValueError(f"labels and sources must have one entry per image ({n}), got {self.labels.shape} and "
                             f"{self.sources.shape}")
        if n and (self.labels.min() < 0 or self.labels.max() > 9):
            raise ValueError(f"labels must be digits 0..9, got values in [{self.labels.min()}, {self.labels.max()}]")
        if np.unique(self.labels).size < 2:
            raise ValueError(f"a pool needs digits of at least two classes to make pairs of different classes; it has "
                             f"{n} digits of classes {sorted(set(self.labels.tolist()))}")

    @classmethod
    def from_floats(cls, images: np.ndarray, labels: np.ndarray, sources: np.ndarray | None = None) -> "DigitPool":
        """A pool from MNIST as capsspec.training.mnist loads it (float (N, 1, 28, 28) = bytes / 255): the bytes are recovered."""
        images = np.asarray(images)
        if images.ndim == 4 and images.shape[1] == 1:
            images = images[:, 0]
        raw = np.rint(np.asarray(images, dtype=np.float64) * 255.0)
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise ValueError("images must lie in [0, 1]")
        n = images.shape[0]
        return cls(raw.astype(np.uint8), np.asarray(labels, dtype=np.int64),
                   np.arange(n, dtype=np.int64) if sources is None else np.asarray(sources, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.images.shape[0])


class PairGenerator:
    """Pairs of one split: example `index` is a function of (seed, split, index) only (see the module docstring)."""

    def __init__(self, pool: DigitPool, seed: int, split: str, *, max_shift: int = MAX_SHIFT, pad: int = PAD) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        self.pool, self.split = pool, split
        self.seed = _check_int("seed", seed, 0)
        self.pad = _check_int("pad", pad, 0)
        self.max_shift = _check_int("max_shift", max_shift, 0)
        if self.max_shift > self.pad:
            raise ValueError(f"max_shift={max_shift} is more than pad={pad}: strokes would be cut off the canvas")
        self.size = 28 + 2 * self.pad
        state = np.random.SeedSequence([self.seed, SPLITS[split]]).generate_state(2, dtype=np.uint64)
        self._key = state[0]
        self._key2 = np.uint64((int(state[1]) * int(_GOLDEN)) % 2**64)  # multiplied here: NumPy warns on scalar wrap
        labels = pool.labels
        self._by_class = np.argsort(labels, kind="stable")  # the pool's digits grouped by class
        self._counts = np.bincount(labels, minlength=10).astype(np.int64)
        self._starts = np.cumsum(self._counts) - self._counts
        self._rounds: dict[int, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"PairGenerator({self.split}, seed={self.seed}, {len(self.pool)} digits)"

    # ------------------------------------------------------------------ the draws
    def _round(self, r: int) -> np.ndarray:
        perm = self._rounds.get(r)
        if perm is None:
            if len(self._rounds) > 4:  # a batch spans one or two rounds; keep a few
                self._rounds.clear()
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLITS[self.split], 1, r]))
            perm = self._rounds[r] = rng.permutation(len(self.pool))
        return perm

    def _indices(self, index: Any) -> np.ndarray:
        idx = np.asarray(index)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise ValueError(f"index must be a 1-d array of ints, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.size and idx.min() < 0:
            raise ValueError(f"index must be non-negative, got {idx.min()}")
        return idx

    def digits(self, index: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pool positions (B, 2), labels (B, 2), shifts (B, 2, 2)) of the pairs `index`, without drawing images."""
        idx = self._indices(index)
        n = len(self.pool)
        rounds, within = np.divmod(idx, n)
        base = np.empty(idx.size, dtype=np.int64)
        for r in np.unique(rounds):
            sel = rounds == r
            base[sel] = self._round(int(r))[within[sel]]
        counter = idx.astype(np.uint64)[:, None] * np.uint64(_DRAWS) + np.arange(_DRAWS, dtype=np.uint64)[None, :]
        bits = _mix(_mix(counter ^ self._key) + self._key2)
        base_class = self.pool.labels[base]
        # The partner: uniform over the digits of the other classes. Position r among them skips the
        # block of the base's class in the class-grouped order.
        others = n - self._counts[base_class]
        r = _uniform_ints(bits[:, 0], others)
        r = r + self._counts[base_class] * (r >= self._starts[base_class])
        partner = self._by_class[r]
        shifts = _uniform_ints(bits[:, 1:], 2 * self.max_shift + 1).reshape(-1, 2, 2) - self.max_shift
        positions = np.stack([base, partner], axis=1)
        return positions, self.pool.labels[positions], shifts

    def labels(self, index: Any) -> np.ndarray:
        """The (B, 2) labels of the pairs `index` (cheap: no image is drawn)."""
        return self.digits(index)[1]

    def batch(self, index: Any, dtype: str | np.dtype = "float32") -> MultiMnistBatch:
        """The pairs `index` (a 1-d array of non-negative ints): composites, labels, the two shifted digits."""
        positions, labels, shifts = self.digits(index)
        b, s = positions.shape[0], self.size
        layers = np.zeros((b, 2, s, s), dtype=np.uint8)
        rows = (self.pad + shifts[:, :, 0])[:, :, None] + np.arange(28)[None, None, :]  # (B, 2, 28)
        cols = (self.pad + shifts[:, :, 1])[:, :, None] + np.arange(28)[None, None, :]
        layers[np.arange(b)[:, None, None, None], np.arange(2)[None, :, None, None], rows[:, :, :, None],
               cols[:, :, None, :]] = self.pool.images[positions]
        summed = layers[:, 0].astype(np.uint16) + layers[:, 1]
        composite = np.minimum(summed, 255).astype(np.uint8)
        images = (composite.astype(np.dtype(dtype)) / np.dtype(dtype).type(255.0))[:, None]
        targets = (layers.astype(np.dtype(dtype)) / np.dtype(dtype).type(255.0))[:, :, None]
        return MultiMnistBatch(images=images, labels=labels, targets=targets,
                               sources=self.pool.sources[positions], shifts=shifts)


class PairImages:
    """The composites of pairs start, start+1, ..., start+n-1 of a generator, indexable like an (n, 1, S, S) array.

    Made on demand (nothing is stored), so a 10-million-pair test set costs no memory; slicing
    and integer-array indexing return NumPy arrays of `dtype`.
    """

    def __init__(self, generator: PairGenerator, n: int, start: int = 0, dtype: str = "float32") -> None:
        self.generator, self.n, self.start, self.dtype = generator, _check_int("n", n, 0), int(start), np.dtype(dtype)
        s = generator.size
        self.shape = (self.n, 1, s, s)
        self.ndim = 4

    def __len__(self) -> int:
        return self.n

    def _positions(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(self.n)[key]
        key = np.asarray(key)
        if key.ndim == 0:
            raise ValueError("index a PairImages with a slice or a 1-d array of ints")
        if key.size and (key.min() < -self.n or key.max() >= self.n):
            raise IndexError(f"index out of range for {self.n} pairs")
        return np.where(key < 0, key + self.n, key)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.batch(key).images

    def batch(self, key: Any) -> MultiMnistBatch:
        return self.generator.batch(self._positions(key) + self.start, self.dtype)


@dataclass
class MultiMnistData:
    """What the trainer needs of MultiMNIST, in the shape of train.Splits (images are PairImages, labels (N, 2)),
    plus `training_batch`: the training stream is fresh each epoch (pair (epoch - 1) * images_per_epoch + i)."""

    train: PairGenerator
    validation: PairGenerator
    test: PairGenerator
    images_per_epoch: int
    val_pairs: int
    test_pairs: int
    dtype: str = "float32"
    name: str = "multimnist"

    def __post_init__(self) -> None:
        self.train_x = PairImages(self.train, self.images_per_epoch, 0, self.dtype)  # epoch 1's pairs
        self.train_y = self.train.labels(np.arange(self.images_per_epoch))
        self.val_x = PairImages(self.validation, self.val_pairs, 0, self.dtype)
        self.val_y = self.validation.labels(np.arange(self.val_pairs))
        self.test_x = PairImages(self.test, self.test_pairs, 0, self.dtype)
        self.test_y = self.test.labels(np.arange(self.test_pairs))

    def training_batch(self, epoch: int, positions: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images, labels (B, 2), targets (B, 2, 1, S, S)) of pairs `positions` of epoch `epoch` (1-based)."""
        b = self.train.batch((epoch - 1) * self.images_per_epoch + np.asarray(positions, dtype=np.int64), dtype)
        return b.images, b.labels, b.targets

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "canvas": self.train.size, "pad": self.train.pad, "max_shift": self.train.max_shift,
                "images_per_epoch": self.images_per_epoch, "train_digits": len(self.train.pool),
                "validation_digits": len(self.validation.pool) if self.val_pairs else 0,
                "validation_pairs": self.val_pairs,
                "test_digits": len(self.test.pool), "test_pairs": self.test_pairs, "seed": self.train.seed,
                "test_seed": self.test.seed}

    def fingerprint(self) -> str:
        """A hash of the generators' definition and of their digits: a resumed run must generate the same pairs."""
        h = hashlib.sha256(repr(sorted(self.describe().items())).encode())
        for g in (self.train, self.validation, self.test):
            h.update(g.pool.sources.tobytes())
            h.update(g.pool.labels.tobytes())
            h.update(np.ascontiguousarray(g.pool.images[::97, ::7, ::7]).tobytes())
        return h.hexdigest()


def multimnist_data(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                    test_labels: np.ndarray, settings: Any, *, images_per_epoch: int | None = None,
                    test_pairs: int | None = None) -> MultiMnistData:
    """MultiMNIST for a run from MNIST as capsspec.training.mnist loads it and the run's TrainSettings.

    images_per_epoch: default settings.images_per_epoch, else DEFAULT_IMAGES_PER_EPOCH.
    The digits are split as an MNIST run with these settings splits them (train.split_data:
    settings.val_size held out by the seed, then settings.train_subset); validation pairs (one
    per held-out digit) use only held-out digits. test_pairs (default settings.test_subset, else
    DEFAULT_TEST_PAIRS) test pairs are drawn from all 10,000 test digits with TEST_SEED.
    """
    from .splits import split_data

    n_train, n_test = train_images.shape[0], test_images.shape[0]
    # split_data applied to the indices themselves gives the indices of each split: one definition of the split.
    idx = split_data(np.arange(n_train), train_labels, np.arange(n_test), test_labels,
                     type(settings).from_dict({**settings.to_dict(), "test_subset": None}))

    def pool(images: np.ndarray, labels: np.ndarray, which: np.ndarray) -> DigitPool:
        return DigitPool.from_floats(images[which], labels[which], which)

    train = PairGenerator(pool(train_images, train_labels, idx.train_x), settings.seed, "train")
    validation_pool = pool(train_images, train_labels, idx.val_x) if idx.val_x.size else None
    test = test_generator(test_images, test_labels)
    ipe = images_per_epoch if images_per_epoch is not None else getattr(settings, "images_per_epoch", None)
    if images_per_epoch is not None and getattr(settings, "images_per_epoch", None) not in (None, images_per_epoch):
        raise ValueError(f"images_per_epoch={images_per_epoch} differs from settings.images_per_epoch="
                         f"{settings.images_per_epoch}")
    ipe = DEFAULT_IMAGES_PER_EPOCH if ipe is None else ipe
    n_test_pairs = test_pairs if test_pairs is not None else (settings.test_subset or DEFAULT_TEST_PAIRS)
    validation = PairGenerator(validation_pool, settings.seed, "validation") if validation_pool is not None else \
        PairGenerator(train.pool, settings.seed, "validation")  # no hold-out: an empty validation set below
    return MultiMnistData(train=train, validation=validation, test=test, images_per_epoch=_check_int(
        "images_per_epoch", ipe, 1), val_pairs=int(idx.val_x.size), test_pairs=_check_int("test_pairs", n_test_pairs, 1),
        dtype=settings.dtype)


def test_generator(test_images: np.ndarray, test_labels: np.ndarray) -> PairGenerator:
    """The test pairs every run is measured on: all of MNIST's test digits, TEST_SEED."""
    return PairGenerator(DigitPool.from_floats(test_images, test_labels), TEST_SEED, "test")


# ===================================================================================== statistics
def _mean_frame_overlap(max_shift: int = MAX_SHIFT, digit: int = 28) -> float:
    """E[(1 - |d_y| / 28)(1 - |d_x| / 28)] for d the difference of two independent uniform shifts (exact)."""
    k = 2 * max_shift + 1
    d = np.subtract.outer(np.arange(k), np.arange(k)).ravel()  # the k*k equally likely differences
    return float(np.mean(1 - np.abs(d) / digit) ** 2)


MEAN_FRAME_OVERLAP = _mean_frame_overlap()  # 0.7996: the paper's "80% overlap"


def frame_overlap(shifts: np.ndarray, digit: int = 28) -> np.ndarray:
    """The fraction of a digit's 28x28 frame that the other digit's frame covers, per pair: shifts (B, 2, 2) -> (B,)."""
    s = np.asarray(shifts)
    if s.ndim != 3 or s.shape[1:] != (2, 2):
        raise ValueError(f"shifts must be (B, 2, 2) (pair, digit, (dy, dx)), got {s.shape}")
    d = np.abs(s[:, 0] - s[:, 1])
    return np.prod(np.clip(digit - d, 0, None), axis=1) / float(digit * digit)


def bounding_boxes(images: np.ndarray) -> np.ndarray:
    """(top, left, bottom, right) of the non-zero pixels of each image (..., H, W), bottom/right exclusive; int64
    (..., 4); an empty image gives (0, 0, 0, 0)."""
    a = np.asarray(images) > 0
    rows, cols = a.any(axis=-1), a.any(axis=-2)
    h, w = a.shape[-2], a.shape[-1]
    top = np.argmax(rows, axis=-1)
    bottom = h - np.argmax(rows[..., ::-1], axis=-1)
    left = np.argmax(cols, axis=-1)
    right = w - np.argmax(cols[..., ::-1], axis=-1)
    box = np.stack([top, left, bottom, right], axis=-1).astype(np.int64)
    return np.where(rows.any(axis=-1)[..., None], box, 0)


def bounding_box_overlap(targets: np.ndarray, *, relative_to: str = "smaller") -> np.ndarray:
    """The overlap of the two digits' bounding boxes, per pair: targets (B, 2, [1,] H, W) -> (B,) in [0, 1].

    These are the tight boxes around each digit's ink (not the frames of `frame_overlap`).
    relative_to="smaller": intersection area / the smaller box's area. "union": intersection / union (IoU). "mean": intersection / the mean of the two areas.
    """
    t = np.asarray(targets)
    if t.ndim == 5:
        t = t[:, :, 0]
    if t.ndim != 4 or t.shape[1] != 2:
        raise ValueError(f"targets must be (B, 2, H, W) or (B, 2, 1, H, W), got {np.asarray(targets).shape}")
    box = bounding_boxes(t)
    area = (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])
    ih = np.clip(np.minimum(box[:, 0, 2], box[:, 1, 2]) - np.maximum(box[:, 0, 0], box[:, 1, 0]), 0, None)
    iw = np.clip(np.minimum(box[:, 0, 3], box[:, 1, 3]) - np.maximum(box[:, 0, 1], box[:, 1, 1]), 0, None)
    inter = ih * iw
    if relative_to == "smaller":
        denom = area.min(axis=1)
    elif relative_to == "union":
        denom = area.sum(axis=1) - inter
    elif relative_to == "mean":
        denom = area.mean(axis=1)
    else:
        raise ValueError(f"relative_to must be 'smaller', 'union' or 'mean', got {relative_to!r}")
    return inter / np.maximum(denom, 1)
