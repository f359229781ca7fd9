"""Forward + backward of the paper model at batch 32, float32: the NumPy reference vs PyTorch on the CPU.

Both run in this one process, on the same inputs and parameters, so the ratio is fair to the
machine at hand. It prints the median of several timed runs after a warm-up, and the ratio
reference / torch (the reference's target is at most 2). A benchmark, not a test: it asserts
nothing about speed.

    python benchmarks/reference_vs_torch.py [--batch-size 32] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import capsspec
from capsspec import CapsNetConfig, init_params


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, BLAS thread pools, lazy imports
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()

    config = CapsNetConfig()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.batch_size, *config.input_shape)).astype(np.float32)
    y = rng.integers(0, config.num_classes, size=args.batch_size)
    params = init_params(config, 0, "float32")

    ref = capsspec.get_backend("numpy")
    t_ref = median_seconds(lambda: ref.value_and_grad(params, x, y, config), args.repeats)
    print(f"reference (numpy {np.__version__}): {t_ref * 1e3:8.1f} ms per forward+backward, batch {args.batch_size}")

    try:
        tb = capsspec.get_backend("torch", device="cpu")
    except (ValueError, capsspec.BackendUnavailable) as exc:
        print(f"torch backend unavailable, no ratio: {exc}")
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tp, tx, ty = tb.params_from_numpy(params, config), tb.asarray(x), tb.asarray(y)
    t_torch = median_seconds(lambda: tb.value_and_grad(tp, tx, ty, config), args.repeats)
    print(f"torch {torch.__version__} (CPU, {torch.get_num_threads()} threads): {t_torch * 1e3:8.1f} ms per forward+backward")
    print(f"ratio reference / torch: {t_ref / t_torch:.2f}  (target: <= 2)")


if __name__ == "__main__":
    main()
