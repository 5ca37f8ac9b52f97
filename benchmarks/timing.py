"""Timing for the benchmarks: medians after a warm-up, synchronised on CUDA."""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
