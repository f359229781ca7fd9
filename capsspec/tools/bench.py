"""`capsspec bench`: training and inference speed of any backend, through the protocol.

It times train_step and predict of a model (the paper's by default) on random images, and a
dense matmul on the same backend in the same run (through the spec's decoder op with one
square layer, so no backend needs extra code), then reports images per second, seconds per
60k-image epoch, peak memory, and achieved FLOP/s as a fraction of that matmul's rate.
Results print as a table and, with --json, as one JSON object per run for comparison over time.
An inference-only backend (Backend.trains False, e.g. onnxruntime) gets its inference timed and
its training figures reported as not measured (None in the JSON, with a note), never invented.

Under torchrun (`torchrun --nproc-per-node N -m capsspec bench --backend torch ...`) it times the
distributed training step instead (capsspec.training.distributed): --batch-size is the global batch, each
process trains its slice and the gradients are all-reduced; rank 0 reports the step time (the
slowest process's median), the images per second of the whole job and per process, so that a run
on N processes compares with a one-process run of the same global batch.
A benchmark only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from ..config import (MAX_ROUTING_ITERATIONS, AdamConfig, CapsNetConfig, available_memory_bytes, check_affordable,
                      forward_flops)
from ..model import init_params
from ..registry import get_backend
from ..training.host_memory import freed_memory_policy
from ..version import __version__
from .args import OneLineParser, UsageError, check_out_file, int_in

__all__ = ["model_flops", "machine_info", "run_benchmark", "run_distributed_benchmark", "main", "build_parser"]

# The flags that set what check_affordable weighs, for its one-line refusals.
BENCH_FLAGS = {"batch_size": "--batch-size", "routing_iterations": "--routing-iterations"}

EPOCH_IMAGES = 60_000


def model_flops(config: CapsNetConfig) -> dict[str, float]:
    """Multiply-adds counted as 2 FLOPs, per image: forward, and training (forward + backward ~ 3x)."""
    forward = forward_flops(config)
    return {"forward": forward, "train": 3 * forward}


def _time_training(backend: Any, holder: dict, x: Any, y: Any, config: CapsNetConfig, adam: AdamConfig,
                   warmup: int, steps: int, say: Callable[[str], None], warming: str, timing: str) -> float:
    """Median seconds of one train_step after `warmup` steps; holder carries params, state and the
    last metrics from step to step (train_step consumes what it is given)."""
    def train_once() -> None:
        holder["params"], holder["state"], holder["metrics"] = backend.train_step(
            holder["params"], holder["state"], x, y, config, adam)

    say(f"warming up {warming}")
    for _ in range(warmup):
        train_once()
    backend.synchronize()
    say(f"timing {timing}")
    seconds = _median_time(train_once, steps, backend.synchronize)
    float(backend.to_numpy(holder["metrics"].total))  # the step really finished
    return seconds


def _median_time(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()  # held until sync() returns: a backend may wait only for results still alive (jax)
        sync()
        del out
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _matmul_rate(backend, n: int, dtype: str, repeats: int) -> float:
    """FLOP/s of an n x n by n x n product on this backend (the spec's decoder op, one layer)."""
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal((n, n)).astype(dtype))
    w = backend.asarray((rng.standard_normal((n, n)) / np.sqrt(n)).astype(dtype))
    b = backend.asarray(np.zeros(n, dtype))
    run = lambda: backend.decoder(x, [w], [b])  # noqa: E731
    run()
    backend.synchronize()
    return 2 * n ** 3 / _median_time(run, repeats, backend.synchronize)


def _peak_memory(backend) -> dict[str, Any]:
    dev = getattr(backend, "peak_memory_bytes", None)
    value = dev() if callable(dev) else None
    if value is not None:
        return {"peak_memory_bytes": int(value), "peak_memory_kind": "device"}
    # ru_maxrss is in KiB on Linux: the whole process's peak resident memory.
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "process RSS (host)"}


def run_benchmark(backend_name: str, *, device: str | None = None, config: CapsNetConfig | None = None,
                  batch_size: int = 128, dtype: str = "float32", steps: int = 5, warmup: int = 2,
                  matmul_size: int = 2048, progress=None, **backend_options: Any) -> dict[str, Any]:
    """Time one backend; return a dict of figures (see module docstring)."""
    config = config or CapsNetConfig()
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"batch_size and steps must be >= 1 and warmup >= 0, got {batch_size}, {steps}, {warmup}")
    backend = get_backend(backend_name, device=device, **backend_options)
    if dtype not in backend.dtypes:
        raise ValueError(f"backend {backend_name!r} supports dtypes {backend.dtypes}, not {dtype!r}")
    say = progress or (lambda msg: None)
    rng = np.random.default_rng(0)
    x_np = rng.uniform(size=(batch_size, *config.input_shape)).astype(dtype)
    y_np = rng.integers(0, config.num_classes, size=batch_size)
    params = backend.params_from_numpy(init_params(config, 0, dtype), config)
    x, y = backend.asarray(x_np), backend.asarray(y_np)
    if not backend.trains:
        return _inference_only(backend, params, x, config, batch_size, dtype, steps, say)
    state = backend.adam_init(params)
    adam = AdamConfig()

    holder = {"params": params, "state": state}
    t_train = _time_training(backend, holder, x, y, config, adam, warmup, steps, say,
                             f"{backend.name} ({warmup} training steps)", f"{steps} training steps at batch {batch_size}")
    infer = lambda: backend.predict(holder["params"], x, config)  # noqa: E731
    infer()
    backend.synchronize()
    say(f"timing {steps} inference batches")
    t_infer = _median_time(infer, steps, backend.synchronize)
    say(f"timing a {matmul_size}x{matmul_size} matmul")
    mm_rate = _matmul_rate(backend, matmul_size, dtype, max(3, steps))

    flops = model_flops(config)
    train_ips = batch_size / t_train
    train_rate = flops["train"] * train_ips
    return {
        **_run_info(backend, config, batch_size, dtype),
        "train_step_seconds": t_train,
        "train_images_per_second": train_ips,
        "epoch_seconds_60k": EPOCH_IMAGES / train_ips,
        "inference_images_per_second": batch_size / t_infer,
        "train_gflops_per_image": flops["train"] / 1e9,
        "achieved_tflops": train_rate / 1e12,
        "matmul_tflops": mm_rate / 1e12,
        "fraction_of_matmul_rate": train_rate / mm_rate,
        **_peak_memory(backend),
        "settings": {"steps": steps, "warmup": warmup, "matmul_size": matmul_size,
                     "freed_host_memory": freed_memory_policy(),
                     "backend_options": {k: str(v) for k, v in backend_options.items()}},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_distributed_benchmark(where: Any, *, device: str | None = None, config: CapsNetConfig | None = None,
                              batch_size: int = 128, dtype: str = "float32", steps: int = 5, warmup: int = 2,
                              progress=None, **backend_options: Any) -> dict[str, Any]:
    """Time the data-parallel training step of torch on this process of a torchrun launch (`where`,
    a capsspec.training.distributed.Launch); every process returns the same figures (see module docstring)."""
    from ..training.distributed import plan_device, setup, shard

    config = config or CapsNetConfig()
    if batch_size < where.world_size or steps < 1 or warmup < 0:
        raise ValueError(f"batch_size must be at least the {where.world_size} processes (it is the global batch), "
                         f"steps >= 1 and warmup >= 0; got {batch_size}, {steps}, {warmup}")
    name, device = plan_device("torch", device, where)
    backend = get_backend(name, device=device, **backend_options)
    if dtype not in backend.dtypes:
        raise ValueError(f"backend {name!r} supports dtypes {backend.dtypes}, not {dtype!r}")
    say = progress if progress is not None and where.rank == 0 else (lambda msg: None)
    dist = setup(backend, where)
    try:
        rng = np.random.default_rng(0)  # the same global batch on every process; each takes its slice
        x_np = rng.uniform(size=(batch_size, *config.input_shape)).astype(dtype)
        y_np = rng.integers(0, config.num_classes, size=batch_size)
        lo, hi = dist.shard(batch_size)
        x, y = backend.asarray(x_np[lo:hi]), backend.asarray(y_np[lo:hi])
        holder = {"params": backend.params_from_numpy(init_params(config, 0, dtype), config)}
        holder["state"] = backend.adam_init(holder["params"])
        dist.attach(backend, holder["params"], holder["state"])
        backend.set_batch_share(holder["state"], hi - lo, batch_size)
        adam = AdamConfig()
        t_own = _time_training(backend, holder, x, y, config, adam, warmup, steps, say,
                               f"{backend.name} on {dist.describe()} ({warmup} training steps)",
                               f"{steps} distributed training steps at global batch {batch_size}")
        # Every process's median, each in its own slot of the sum: the slowest one sets the pace.
        times = dist.sum([t_own if r == dist.rank else 0.0 for r in range(dist.world_size)])
        group = dist.group_backend
    finally:
        dist.close()
    t_step = max(times)
    total = batch_size / t_step
    flops = model_flops(config)
    return {
        **_run_info(backend, config, batch_size, dtype),
        "world_size": where.world_size, "process_group": group,
        "batch_per_process": [b - a for a, b in (shard(batch_size, r, where.world_size)
                                                 for r in range(where.world_size))],
        "note": "distributed run: the data-parallel training step only; inference and the dense-matmul rate are "
                "not measured",
        "train_step_seconds": t_step, "train_step_seconds_per_process": times,
        "train_images_per_second": total, "train_images_per_second_per_process": total / where.world_size,
        "epoch_seconds_60k": EPOCH_IMAGES / total,
        "inference_images_per_second": None, "train_gflops_per_image": flops["train"] / 1e9,
        "achieved_tflops": flops["train"] * total / 1e12, "matmul_tflops": None, "fraction_of_matmul_rate": None,
        **_peak_memory(backend), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _run_info(backend, config: CapsNetConfig, batch_size: int, dtype: str) -> dict[str, Any]:
    """What was measured and where: the fields every result starts with, trained or not, so that
    a --json line from another machine or another day can be compared with this one."""
    avail = backend.availability()
    return {"backend": backend.name, "backend_version": avail.version, "device": avail.device,
            "host": platform.node(), "cpu_count": os.cpu_count(), "dtype": dtype, "batch_size": batch_size,
            "routing_iterations": config.routing_iterations, "use_decoder": config.use_decoder,
            "paper_config": config == CapsNetConfig(), "config": config.to_dict(), "machine": machine_info()}


def machine_info() -> dict[str, Any]:
    """The machine and the software a benchmark ran on: CPU model, cores (and those this process may
    use), memory, OS, and the versions of Python, NumPy and capsspec."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:  # Linux: the marketing name, not just "x86_64"
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "memory_bytes": _total_memory_bytes(), "os": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "capsspec": __version__}


def _total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _inference_only(backend, params, x, config, batch_size, dtype, steps, say) -> dict[str, Any]:
    """An inference-only backend (trains = False): predict is timed; training and the matmul
    (which goes through the spec's decoder op) are not measured, and the result says so."""
    infer = lambda: backend.predict(params, x, config)  # noqa: E731
    infer()
    backend.synchronize()
    say(f"timing {steps} inference batches")
    t_infer = _median_time(infer, steps, backend.synchronize)
    flops = model_flops(config)
    ips = batch_size / t_infer
    return {**_run_info(backend, config, batch_size, dtype),
            "note": "inference-only backend: training and the dense-matmul rate are not measured",
            "train_step_seconds": None, "train_images_per_second": None, "epoch_seconds_60k": None,
            "inference_images_per_second": ips, "inference_gflops_achieved": flops["forward"] * ips / 1e9,
            "train_gflops_per_image": None, "achieved_tflops": None, "matmul_tflops": None,
            "fraction_of_matmul_rate": None, **_peak_memory(backend), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _format(r: dict[str, Any]) -> str:
    mem = r["peak_memory_bytes"] / 2**20
    if r.get("world_size", 1) > 1:
        return (f"{r['backend']} {r['backend_version']} on {r['device']} and {r['world_size'] - 1} more process(es) "
                f"({r['process_group']}; {r['dtype']}, global batch {r['batch_size']} = "
                f"{' + '.join(map(str, r['batch_per_process']))}, {r['routing_iterations']} routing iterations"
                f"{', decoder' if r['use_decoder'] else ''})\n"
                f"  training:   {r['train_images_per_second']:10.1f} images/s in all, "
                f"{r['train_images_per_second_per_process']:.1f} per process   "
                f"{r['epoch_seconds_60k']:10.1f} s per 60k epoch ({r['train_step_seconds']:.3f} s per step)\n"
                f"  inference:  not measured in a distributed run\n"
                f"  peak memory: {mem:9.1f} MiB on rank 0 ({r['peak_memory_kind']})")
    if r.get("train_images_per_second") is None:
        return (f"{r['backend']} {r['backend_version']} on {r['device']} ({r['dtype']}, batch {r['batch_size']}, "
                f"{r['routing_iterations']} routing iterations{', decoder' if r['use_decoder'] else ''})\n"
                f"  training:   not measured ({r.get('note', 'inference-only backend')})\n"
                f"  inference:  {r['inference_images_per_second']:10.1f} images/s "
                f"({r['inference_gflops_achieved']:.2f} GFLOP/s)\n"
                f"  peak memory: {mem:9.1f} MiB ({r['peak_memory_kind']})")
    return (
        f"{r['backend']} {r['backend_version']} on {r['device']} ({r['dtype']}, batch {r['batch_size']}, "
        f"{r['routing_iterations']} routing iterations{', decoder' if r['use_decoder'] else ''})\n"
        f"  training:   {r['train_images_per_second']:10.1f} images/s   {r['epoch_seconds_60k']:10.1f} s per 60k epoch\n"
        f"  inference:  {r['inference_images_per_second']:10.1f} images/s\n"
        f"  compute:    {r['achieved_tflops'] * 1e3:10.2f} GFLOP/s achieved, dense matmul {r['matmul_tflops'] * 1e3:.2f} "
        f"GFLOP/s -> {100 * r['fraction_of_matmul_rate']:.1f}% of it\n"
        f"  peak memory: {mem:9.1f} MiB ({r['peak_memory_kind']})\n"
        f"  freed host memory: {r['settings']['freed_host_memory']}"
    )


def _without_backend_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--backend":
            skip = True
        elif not a.startswith("--backend="):
            out.append(a)
    return out


def build_parser() -> argparse.ArgumentParser:
    """bench's flags; errors are one line (capsspec.tools.args), abbreviations refused."""
    p = OneLineParser(prog="capsspec bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", action="append", help="backend to time (repeatable; default: every available one)")
    p.add_argument("--device", default=None, help="device for the backend, e.g. cpu or cuda")
    p.add_argument("--batch-size", type=int_in(1), default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--steps", type=int_in(1), default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int_in(0), default=2)
    p.add_argument("--routing-iterations", type=int_in(1, MAX_ROUTING_ITERATIONS), default=3)
    p.add_argument("--no-decoder", action="store_true")
    p.add_argument("--matmul-size", type=int_in(1, 1 << 15), default=2048)
    p.add_argument("--fast", action="store_true", help="ask the backend for its fast path (backends that have one)")
    p.add_argument("--json", metavar="FILE", help="append one JSON object per backend to FILE ('-' for stdout)")
    return p


def _check_args(args: argparse.Namespace) -> CapsNetConfig:
    """Everything about the command line that can be checked before the benchmark runs (UsageError if not)."""
    if args.json not in (None, "-"):
        check_out_file(args.json, "--json")
    config = CapsNetConfig(routing_iterations=args.routing_iterations, use_decoder=not args.no_decoder)
    check_affordable(config, args.batch_size, dtype=args.dtype, flags=BENCH_FLAGS)
    if args.matmul_size ** 2 * 3 * 8 > available_memory_bytes():
        raise UsageError(f"--matmul-size {args.matmul_size} needs more memory than this machine has free")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a one-line usage error (2), or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        config = _check_args(args)
    except ValueError as exc:
        print(f"capsspec bench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    from ..training.distributed import launch
    from ..training.host_memory import reuse_freed_memory
    from ..registry import available_backends

    reuse_freed_memory()  # as every command that trains does (host_memory.py); the JSON records it

    where = launch()
    if where is not None:  # one of several processes started by torchrun: the distributed step
        return _distributed_main(args, where, config)
    names = args.backend or available_backends()
    if len(names) > 1:
        # One process per backend: host peak memory (ru_maxrss) only ever grows within a process,
        # and frameworks keep their thread pools and caches; separate runs keep figures honest.
        import subprocess

        rest = _without_backend_flags(list(sys.argv[1:] if argv is None else argv))
        status = 0
        for name in names:
            r = subprocess.run([sys.executable, "-m", "capsspec.tools.bench", "--backend", name, *rest])
            status = status or r.returncode
        return status
    status = 0
    for name in names:
        options = {"fast": True} if args.fast else {}
        try:
            r = run_benchmark(name, device=args.device, config=config, batch_size=args.batch_size, dtype=args.dtype,
                              steps=args.steps, warmup=args.warmup, matmul_size=args.matmul_size,
                              progress=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True), **options)
        except (ValueError, RuntimeError) as exc:
            print(f"capsspec bench: {name}: {exc}", file=sys.stderr)
            status = 2
            continue
        status = _report(r, args.json) or status
    return status


def _distributed_main(args: argparse.Namespace, where: Any, config: CapsNetConfig) -> int:
    if args.backend not in (None, ["torch"]):
        print(f"capsspec bench: under torchrun only --backend torch can be timed (torch.distributed), got "
              f"{', '.join(args.backend)}", file=sys.stderr)
        return 2
    try:
        r = run_distributed_benchmark(where, device=args.device, config=config, batch_size=args.batch_size,
                                      dtype=args.dtype, steps=args.steps, warmup=args.warmup,
                                      progress=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True),
                                      **({"fast": True} if args.fast else {}))
    except (ValueError, RuntimeError) as exc:
        print(f"capsspec bench: rank {where.rank}: {exc}", file=sys.stderr)
        return 2
    if where.rank == 0:
        return _report(r, args.json)
    return 0


def _report(r: dict[str, Any], json_to: str | None) -> int:
    """The run's table, and with --json its JSON object (see _write_json); returns the status."""
    print(_format(r), flush=True)
    return _write_json(json_to, r)


def _write_json(target: str | None, r: dict[str, Any]) -> int:
    """Append one result to --json (checked before the run). Should the machine refuse now (disk full),
    the result goes to stdout instead, so the benchmark's figures are never lost; returns the status."""
    line = json.dumps(r)
    if target == "-":
        print(line)
    elif target:
        try:
            with open(target, "a") as f:
                f.write(line + "\n")
        except OSError as exc:
            print(f"capsspec bench: error: cannot append to --json {target} ({exc.strerror or exc}); the result "
                  f"follows on stdout", file=sys.stderr)
            print(line, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
