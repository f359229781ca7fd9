"""The data of a run: the training, validation and test split, and the seeded draws of each epoch.

Every random choice derives from (seed, purpose[, epoch]) through numpy.random.SeedSequence:
the validation split from (seed, 1), epoch e's shuffle from (seed, 2, e), its augmentation
shifts from (seed, 3, e) and, for a run with a crop (capsspec.training.presets), its crops' offsets
from (seed, 4, e): one per training image, drawn whole for the epoch (`epoch_crops`). A resumed run re-derives an epoch's generators from these functions
alone (`epoch_draws`), which is what makes it bit-exact.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .augmentation import random_shifts

if TYPE_CHECKING:  # annotations only: settings does not import this module either
    from .settings import TrainSettings

# SeedSequence purposes: one stream per kind of random choice.
_STREAM_VALIDATION, _STREAM_SHUFFLE, _STREAM_AUGMENT, _STREAM_CROP = 1, 2, 3, 4
RNG_SCHEME = ("numpy PCG64 from SeedSequence((seed, stream, epoch)); streams: 1 validation split, 2 shuffle, "
              "3 shifts; 'augment' is the shift generator's state after the epoch's first 'batch' batches")


# ===================================================================================== data
@dataclass(frozen=True)
class Splits:
    """Training, validation and test arrays (images float NCHW in [0, 1], labels int64)."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def data_fingerprint(data: Any) -> str:
    """A hash of the splits' sizes, labels and a sparse sample of pixels: a resumed run must see the same data."""
    if callable(getattr(data, "fingerprint", None)):  # generated data (capsspec.training.multimnist) hashes its definition
        return data.fingerprint()
    h = hashlib.sha256()
    for a in (data.train_y, data.val_y, data.test_y):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    for x in (data.train_x, data.val_x, data.test_x):
        h.update(str(x.shape).encode())
        flat = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
        h.update(np.ascontiguousarray(flat[::97, ::7], dtype=np.float32).tobytes())
    return h.hexdigest()


def describe_data(data: Any) -> dict[str, Any]:
    """What a checkpoint and a run summary record of the data: the data's own description, or MNIST's."""
    return data.describe() if callable(getattr(data, "describe", None)) else {"name": "mnist"}


def split_data(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
               test_labels: np.ndarray, settings: TrainSettings) -> Splits:
    """Hold out settings.val_size training images (chosen by the seed), then take the subsets.

    The validation images are drawn from the whole training set by the seed alone, so they do
    not depend on train_subset; the training subset is a seeded choice among the rest, and the
    test subset is the first test_subset test images (the same for every seed).
    """
    n = train_images.shape[0]
    if train_labels.shape != (n,) or test_labels.shape != (test_images.shape[0],):
        raise ValueError(f"labels must have one entry per image: train {train_images.shape[0]} images vs "
                         f"{train_labels.shape} labels, test {test_images.shape[0]} images vs {test_labels.shape} labels")
    if settings.val_size >= n:
        raise ValueError(f"val_size={settings.val_size} leaves no training images out of {n}")
    perm = np.random.default_rng(np.random.SeedSequence([settings.seed, _STREAM_VALIDATION])).permutation(n)
    val_idx, rest = np.sort(perm[:settings.val_size]), perm[settings.val_size:]
    if settings.train_subset is not None:
        if settings.train_subset > rest.size:
            raise ValueError(f"train_subset={settings.train_subset} is more than the {rest.size} training images left "
                             f"after holding out val_size={settings.val_size}")
        rest = rest[:settings.train_subset]
    train_idx = np.sort(rest)
    n_test = test_images.shape[0] if settings.test_subset is None else settings.test_subset
    if n_test > test_images.shape[0]:
        raise ValueError(f"test_subset={settings.test_subset} is more than the {test_images.shape[0]} test images")
    return Splits(train_x=train_images[train_idx], train_y=train_labels[train_idx].astype(np.int64),
                  val_x=train_images[val_idx], val_y=train_labels[val_idx].astype(np.int64),
                  test_x=test_images[:n_test], test_y=test_labels[:n_test].astype(np.int64))


def epoch_generators(seed: int, epoch: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(shuffle, augmentation) generators of epoch `epoch` (1-based): functions of (seed, epoch) only."""
    return (np.random.default_rng(np.random.SeedSequence([seed, _STREAM_SHUFFLE, epoch])),
            np.random.default_rng(np.random.SeedSequence([seed, _STREAM_AUGMENT, epoch])))


def epoch_draws(settings: TrainSettings, epoch: int, batches_done: int,
                 n_train: int) -> tuple[np.ndarray, np.random.Generator, np.random.Generator]:
    """Epoch `epoch`'s permutation, shuffle generator (as it started) and shift generator, advanced past
    the shifts of its first `batches_done` batches exactly as training them drew."""
    shuffle, shifts = epoch_generators(settings.seed, epoch)
    perm = np.random.default_rng(np.random.SeedSequence([settings.seed, _STREAM_SHUFFLE, epoch])).permutation(n_train)
    if settings.max_shift:
        for b in range(batches_done):
            random_shifts(shifts, min(settings.batch_size, n_train - b * settings.batch_size), settings.max_shift)
    return perm, shuffle, shifts


def epoch_crops(seed: int, epoch: int, n_train: int, room: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(top, left) of every training image's crop in epoch `epoch`, each int64 (n_train,): top uniform in
    [0, room[0]], left in [0, room[1]] (room: the image's size less the crop's), top drawn before left.
    A function of (seed, epoch) alone, indexed by the image's position in the training split: a
    resumed run draws the same crops without replaying anything."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_CROP, epoch]))
    top = rng.integers(0, room[0] + 1, size=n_train, dtype=np.int64)
    return top, rng.integers(0, room[1] + 1, size=n_train, dtype=np.int64)


def rng_record(settings: TrainSettings, epoch: int, batches_done: int, n_train: int) -> dict[str, Any]:
    _, shuffle, shifts = epoch_draws(settings, epoch, batches_done, n_train)
    return {"scheme": RNG_SCHEME, "seed": settings.seed, "epoch": epoch, "batch": batches_done,
            "shuffle": shuffle.bit_generator.state, "augment": shifts.bit_generator.state}
