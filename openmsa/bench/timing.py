"""Timing helpers: CUDA events after warmup on GPUs, perf_counter on CPUs; median of runs."""

from __future__ import annotations

import statistics
import time

import torch


def time_fn(fn, *, warmup: int = 3, runs: int = 10, device=None) -> dict:
    """Median / min / coefficient of variation of ``fn()`` in milliseconds."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(times)
    cv = statistics.pstdev(times) / statistics.mean(times) if len(times) > 1 else 0.0
    return {"median_ms": med, "min_ms": min(times), "cv": cv, "runs": runs}
