"""Random model inputs shared by the backend tests (imported by name: pytest puts tests/ on sys.path)."""

import numpy as np

from capsspec import CapsNetConfig


def random_batch(config: CapsNetConfig, batch: int, dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images uniform in [0, 1) of the config's shape and integer labels of its classes, from one seed."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(batch, *config.input_shape)).astype(dtype)
    y = rng.integers(0, config.num_classes, size=batch)
    return x, y


# A small model of every part (decoder included) whose steps take milliseconds: the backend tests'
# common config.
SMALL = CapsNetConfig(
    input_height=12, input_width=12, conv1_channels=8, conv1_kernel=3, primary_types=3, primary_dim=4,
    primary_kernel=3, primary_stride=2, num_classes=4, class_dim=5, decoder_widths=(12, 10),
)
