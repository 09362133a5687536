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


PEAK_SHAPES = ((2048, 2048, 2048), (4096, 512, 1536), (4096, 1536, 512), (2048, 4096, 1024))  # (m, k, n)


def matmul_peak(dtype: torch.dtype, repeats: int = 5, device: str = "cpu") -> float:
    """FLOP/s of the fastest of a few large matmuls in ``dtype`` (best of ``repeats`` each): the
    practical peak. Several shapes, including a transformer layer's, so that no model GEMM can beat
    the "peak" merely by having a friendlier shape than one square probe."""
    shapes: tuple[tuple[int, int, int], ...] = PEAK_SHAPES
    if device == "cpu" and dtype != torch.float32:
        shapes, repeats = ((512, 512, 512),), 2  # a bf16 matmul without bf16 units runs at a few GFLOP/s
    elif device != "cpu":
        shapes, repeats = ((8192, 8192, 8192),), 10
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        sync(device)
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t))
    return best


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
