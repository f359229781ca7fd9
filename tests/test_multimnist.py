"""The MultiMNIST generator (capsspec.training.multimnist): the paper's construction, its statistics, determinism and
the separation of the splits. Small stand-in digits keep these tests fast; one test reads real MNIST."""

from __future__ import annotations

import numpy as np
import pytest

from capsspec.training.multimnist import (MAX_SHIFT, MEAN_FRAME_OVERLAP, PAD, DigitPool, PairGenerator, PairImages,
                                 bounding_box_overlap, frame_overlap, multimnist_data)
from capsspec.training.settings import TrainSettings


def stand_in_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n 8-bit 28x28 'digits': random strokes in the central 20x20 (as MNIST's), every pixel value possible."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 4:24, 4:24] = rng.integers(0, 256, (n, 20, 20)) * (rng.random((n, 20, 20)) < 0.3)
    return images, rng.integers(0, 10, n)


def generator(n: int = 300, seed: int = 0, split: str = "train") -> PairGenerator:
    images, labels = stand_in_digits(n)
    return PairGenerator(DigitPool(images, labels, np.arange(n) + 1000), seed, split)


def test_classes_always_differ_and_shapes_dtypes_ranges():
    b = generator().batch(np.arange(2000), "float32")
    assert b.images.shape == (2000, 1, 36, 36) and b.targets.shape == (2000, 2, 1, 36, 36)
    assert b.labels.shape == (2000, 2) and b.labels.dtype == np.int64
    assert np.all(b.labels[:, 0] != b.labels[:, 1])
    assert b.images.dtype == np.float32 and b.targets.dtype == np.float32
    assert b.images.min() >= 0 and b.images.max() <= 1 and b.targets.min() >= 0 and b.targets.max() <= 1
    assert generator().batch(np.arange(3), "float64").images.dtype == np.float64


def test_a_seed_and_index_always_give_the_same_pair_and_other_indices_others():
    a = generator(seed=5).batch(np.array([7, 123, 4000]))
    b = generator(seed=5).batch(np.array([4000, 7]))  # another generator, another batch around the same indices
    np.testing.assert_array_equal(a.images[[2, 0]], b.images)
    np.testing.assert_array_equal(a.targets[[2, 0]], b.targets)
    np.testing.assert_array_equal(a.labels[[2, 0]], b.labels)
    many = generator(seed=5).batch(np.arange(500)).images.reshape(500, -1)
    assert np.unique(many, axis=0).shape[0] == 500  # no two indices give the same image
    other_seed = generator(seed=6).batch(np.array([7, 123, 4000])).images
    assert not np.array_equal(a.images, other_seed)
    other_split = generator(seed=5, split="validation").batch(np.array([7, 123, 4000])).images
    assert not np.array_equal(a.images, other_split)


def test_targets_are_the_pool_digits_padded_and_shifted_and_the_image_is_their_clipped_sum():
    g = generator()
    b = g.batch(np.arange(400), "float64")
    raw = np.rint(b.targets * 255).astype(np.int64)
    for i in range(400):
        for k in range(2):
            dy, dx = b.shifts[i, k]
            placed = np.zeros((36, 36), dtype=np.int64)
            placed[PAD + dy:PAD + dy + 28, PAD + dx:PAD + dx + 28] = g.pool.images[g.pool.sources == b.sources[i, k]][0]
            np.testing.assert_array_equal(raw[i, k, 0], placed)
            assert g.pool.labels[g.pool.sources == b.sources[i, k]][0] == b.labels[i, k]
    # The sum, clipped at the maximum value, exactly in the 8-bit values the paper's generator uses.
    np.testing.assert_array_equal(np.rint(b.images[:, 0] * 255), np.minimum(raw[:, 0, 0] + raw[:, 1, 0], 255))
    assert np.any(raw[:, 0, 0] + raw[:, 1, 0] > 255)  # the clipping was exercised
    np.testing.assert_allclose(b.images[:, 0], np.minimum(b.targets[:, 0, 0] + b.targets[:, 1, 0], 1.0), atol=1e-12)


def test_shifts_are_uniform_in_minus_4_to_4_on_each_axis():
    s = generator().batch(np.arange(9000)).shifts
    assert s.min() == -MAX_SHIFT and s.max() == MAX_SHIFT == 4
    counts = np.array([np.sum(s == v) for v in range(-4, 5)])
    # 36,000 draws over 9 values: 4,000 expected each, standard deviation about 60; 5 sigma.
    assert np.all(np.abs(counts - 4000) < 300), counts


def test_partners_are_uniform_over_the_other_classes():
    g = generator(n=300)
    pos, labels, _ = g.digits(np.arange(30000))
    for c in range(10):
        sel = labels[:, 0] == c
        partner_classes = np.bincount(labels[sel, 1], minlength=10)
        assert partner_classes[c] == 0
        # Each other digit equally likely: the partner's class in proportion to that class's share of the others.
        others = np.bincount(g.pool.labels, minlength=10).astype(float)
        others[c] = 0
        expected = sel.sum() * others / others.sum()
        assert np.all(np.abs(partner_classes - expected) < 5 * np.sqrt(expected) + 1), (c, partner_classes, expected)


def test_each_round_of_n_indices_uses_every_digit_once_as_the_base():
    g = generator(n=300)
    pos, _, _ = g.digits(np.arange(600))
    assert sorted(pos[:300, 0]) == list(range(300)) and sorted(pos[300:, 0]) == list(range(300))
    assert not np.array_equal(pos[:300, 0], pos[300:, 0])  # a new order each round


def test_mean_frame_overlap_is_the_papers_80_percent():
    # The paper: the two digits' bounding boxes overlap by 80% on average. With each digit's box its
    # 28x28 frame, the exact mean for shifts uniform in [-4, 4] is (1 - (240/81)/28)^2 = 0.7996.
    assert abs(MEAN_FRAME_OVERLAP - (1 - 240 / 81 / 28) ** 2) < 1e-12 and abs(MEAN_FRAME_OVERLAP - 0.80) < 0.001
    overlap = frame_overlap(generator().digits(np.arange(20000))[2])
    assert overlap.min() >= (20 / 28) ** 2 - 1e-12 and overlap.max() <= 1
    # Band: the per-pair overlap has a standard deviation of about 0.09, so the mean of 20,000 pairs is within
    # 0.002 of 0.7996 (3 sigma); 0.01 leaves room yet fails for shifts of up to 3 (0.847) or 5 (0.757).
    assert abs(overlap.mean() - 0.80) < 0.01, overlap.mean()


def test_frame_and_ink_box_overlaps_on_hand_built_pairs():
    shifts = np.array([[[0, 0], [0, 0]], [[-4, -4], [4, 4]], [[2, 0], [-1, 0]]])
    np.testing.assert_allclose(frame_overlap(shifts), [1.0, 20 * 20 / 784, 25 * 28 / 784])
    t = np.zeros((2, 2, 1, 36, 36))
    t[0, 0, 0, 0:10, 0:10] = 1  # 10x10 box
    t[0, 1, 0, 5:10, 5:25] = 1  # 5x20 box: intersection 5x5 = 25
    t[1, 0, 0, 0:4, 0:4] = 1
    t[1, 1, 0, 20:24, 20:24] = 1  # disjoint
    np.testing.assert_allclose(bounding_box_overlap(t, relative_to="smaller"), [25 / 100, 0])
    np.testing.assert_allclose(bounding_box_overlap(t, relative_to="union"), [25 / 175, 0])


def test_splits_never_mix_digits(monkeypatch):
    n_train, n_test = 700, 200
    images, labels = stand_in_digits(n_train, seed=1)
    test_images, test_labels = stand_in_digits(n_test, seed=2)
    floats = lambda a: (a.astype(np.float32) / 255)[:, None]  # noqa: E731 (as capsspec.training.mnist loads MNIST)
    s = TrainSettings(val_size=150, seed=3, train_subset=400)
    d = multimnist_data(floats(images), labels, floats(test_images), test_labels, s, images_per_epoch=1000,
                        test_pairs=500)
    from capsspec.training.splits import split_data
    ref = split_data(np.arange(n_train), labels, np.arange(n_test), test_labels, s)  # an MNIST run's split
    val_digits, train_digits = set(ref.val_x.tolist()), set(ref.train_x.tolist())
    assert len(val_digits) == 150 and len(train_digits) == 400 and not val_digits & train_digits
    tr = d.train.batch(np.arange(3000)).sources  # three epochs' worth
    va = d.val_x.batch(slice(None)).sources
    te = d.test_x.batch(slice(None)).sources
    assert set(tr.ravel().tolist()) <= train_digits and set(va.ravel().tolist()) <= val_digits
    assert set(va[:, 0].tolist()) == val_digits  # each held-out digit the base of one validation pair
    assert set(te.ravel().tolist()) <= set(range(n_test)) and d.test_y.shape == (500, 2)
    # The pools hold the right pixels: a pair's target is the digit of its source index in the MNIST file.
    b = d.val_x.batch(np.array([0]))
    dy, dx = b.shifts[0, 0]
    np.testing.assert_array_equal(np.rint(b.targets[0, 0, 0, PAD + dy:PAD + dy + 28, PAD + dx:PAD + dx + 28] * 255),
                                  images[b.sources[0, 0]])
    # Epochs of the training stream differ; the test pairs do not depend on the run's seed.
    e1, e2 = d.training_batch(1, np.arange(8), "float32"), d.training_batch(2, np.arange(8), "float32")
    assert not np.array_equal(e1[0], e2[0]) and np.array_equal(e1[0], d.train_x[:8])
    d2 = multimnist_data(floats(images), labels, floats(test_images), test_labels,
                         TrainSettings(val_size=150, seed=4, train_subset=400), images_per_epoch=1000, test_pairs=500)
    np.testing.assert_array_equal(d.test_x[:50], d2.test_x[:50])
    assert d.fingerprint() != d2.fingerprint()


def test_bad_arguments_are_refused():
    images, labels = stand_in_digits(20)
    with pytest.raises(ValueError, match="two classes"):
        DigitPool(images, np.zeros(20, dtype=np.int64), np.arange(20))
    pool = DigitPool(images, labels, np.arange(20))
    with pytest.raises(ValueError, match="split"):
        PairGenerator(pool, 0, "dev")
    with pytest.raises(ValueError, match="max_shift"):
        PairGenerator(pool, 0, "train", max_shift=5)
    with pytest.raises(ValueError, match="non-negative"):
        PairGenerator(pool, 0, "train").batch(np.array([-1]))
    with pytest.raises(IndexError):
        PairImages(PairGenerator(pool, 0, "train"), 10)[np.array([10])]


@pytest.mark.mnist
def test_real_mnist_pairs_overlap_as_the_paper_says():
    from capsspec.training.mnist import load_mnist

    from capsspec.training.multimnist import test_generator

    m = load_mnist()
    b = test_generator(m.test_images, m.test_labels).batch(np.arange(5000))
    assert abs(frame_overlap(b.shifts).mean() - 0.80) < 0.01
    ink = bounding_box_overlap(b.targets, relative_to="smaller").mean()
    assert 0.6 < ink < 0.8, ink  # the tight ink boxes overlap less than the frames (docs/multimnist.md)


# ===================================================================================== evaluation
class _Lengths:
    """A stand-in backend whose forward returns given capsule lengths: the image's first pixel picks the row."""

    def __init__(self, lengths):
        self.lengths = np.asarray(lengths, dtype=np.float64)

    def asarray(self, x):
        return x

    def to_numpy(self, x):
        return x

    def forward(self, params, x, config):
        from types import SimpleNamespace
        return SimpleNamespace(lengths=self.lengths[x[:, 0, 0, 0].astype(int)])


def test_evaluation_takes_the_two_longest_capsules_and_needs_both_right():
    from capsspec.config import CapsNetConfig
    from capsspec.training.evaluate import accuracy, evaluate_multi, top_k

    lengths = np.full((5, 10), 0.1)
    lengths[0, [3, 7]] = [0.9, 0.8]  # labels (7, 3): right, order does not matter
    lengths[1, [3, 7, 2]] = [0.9, 0.5, 0.6]  # labels (3, 7): only 3 right (2 beats 7)
    lengths[2, [0, 1]] = [0.95, 0.9]  # labels (5, 6): both wrong
    lengths[3, :] = 0.5  # all tied: classes 0 and 1 (ties go to the lower index); labels (1, 0): right
    lengths[4, [9, 8]] = [0.99, 0.98]  # labels (9, 8): right
    labels = np.array([[7, 3], [3, 7], [5, 6], [1, 0], [9, 8]])
    np.testing.assert_array_equal(top_k(lengths, 2), [[3, 7], [3, 2], [0, 1], [0, 1], [9, 8]])
    images = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 36, 36), np.float32)
    e = evaluate_multi(_Lengths(lengths), None, images, labels, CapsNetConfig(input_height=36, input_width=36),
                       batch_size=2)
    assert e.count == 5 and e.accuracy == pytest.approx(3 / 5) and e.one_right == pytest.approx(4 / 5)
    assert e.to_dict()["error_percent"] == pytest.approx(40.0)
    # Class 3 appears twice, found twice; 7 twice, found once; 5 and 6 once, never; 2 and 4 never appear.
    assert e.per_class_count == [1, 1, 0, 2, 0, 1, 1, 2, 1, 1]
    assert e.per_class_recall[3] == 1.0 and e.per_class_recall[7] == 0.5 and e.per_class_recall[5] == 0.0
    assert np.isnan(e.per_class_recall[2]) and "error 40.00%" in e.format()
    assert accuracy(np.array([[1, 2]]), np.array([[2, 1]])) == 1.0 and accuracy(np.array([[1, 2]]),
                                                                                  np.array([[1, 3]])) == 0.0
