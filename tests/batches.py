"""Random model inputs shared by the backend tests (imported by name: pytest puts tests/ on sys.path)."""

import numpy as np

from capsspec import CapsNetConfig


def random_batch(config: CapsNetConfig, batch: int, dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images uniform in [0, 1) of the config's shape and integer labels of its classes, from one seed."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(batch, *config.input_shape)).astype(dtype)
    y = rng.integers(0, config.num_classes, size=batch)
    return x, y
