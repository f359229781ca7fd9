"""Shared test settings and fixtures: Hypothesis profiles (CI is derandomised and bounded), and
small stand-in MNIST files for the command-line tests."""

import hashlib
import os
import signal
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from capsspec.training import mnist as data

# TensorFlow 2.21's oneDNN kernels corrupt the heap in rank-4 matmuls (capsspec.backends.tensorflow says
# more); the backend turns them off before TensorFlow's first import, and so do the tests, some of which
# import tensorflow themselves (user_models_keras.py).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

settings.register_profile(
    "ci", derandomize=True, max_examples=25, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("full", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("CAPSSPEC_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def idx_bytes(arr: np.ndarray) -> bytes:
    """An array as a raw IDX file of unsigned bytes (MNIST's format)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.tobytes()


@pytest.fixture
def mnist_dir(tmp_path, monkeypatch):
    """A folder of small stand-in MNIST files (40 training images, 12 test), with the data module's
    hashes and dims pointed at them."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, (40,), dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, (12,), dtype=np.uint8)}
    d = tmp_path / "mnist"
    d.mkdir()
    for name, a in arrays.items():
        raw = idx_bytes(a)
        (d / name).write_bytes(raw)
        monkeypatch.setitem(data.MNIST_FILES, name, hashlib.sha256(raw).hexdigest())
        monkeypatch.setitem(data._EXPECTED_DIMS, name, a.shape)
    return d


@pytest.fixture(autouse=True)
def _sigint_handled_as_in_a_terminal():
    """Python's own SIGINT handler during each test, as in a terminal. A shell that starts the suite
    in the background (`cmd &` without job control) hands it SIGINT ignored, and the trainer rightly
    leaves an ignored signal ignored, so the interrupt tests would see no interrupt."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
