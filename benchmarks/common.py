"""What every benchmark shares: the machine's matmul peak, measured in the same run, and
round-robin timing, so a change in the machine's speed during a run hits every contender alike."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def sync(device: str = "cpu") -> None:
    """Wait for queued GPU work, so that wall time measures it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """FLOP/s of a large square matmul in ``dtype`` (the fastest of ``repeats``): the practical peak."""
    if device == "cpu" and dtype != torch.float32:
        n, repeats = 512, 2  # a bf16 matmul without bf16 units runs at a few GFLOP/s
    elif device != "cpu":
        n, repeats = 8192, 10
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def round_robin(fns: dict[str, Callable[[], Any]], repeats: int, warmups: int = 1, device: str = "cpu") -> dict[str, float]:
    """Median seconds of each function; every round calls each function once, in turn."""
    for _ in range(warmups):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}
