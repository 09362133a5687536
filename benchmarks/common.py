"""What every benchmark shares: the machine's matmul peak, measured in the same run, and
round-robin timing, so a change in the machine's speed during a run hits every contender alike."""
from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import torch


def sync(device: str = "cpu") -> None:
    """Wait for queued GPU work, so that wall time measures it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


PEAK_SHAPES = ((2048, 2048, 2048), (4096, 512, 1536), (4096, 1536, 512), (2048, 4096, 1024))  # (m, k, n)


def matmul_peaks(dtype: torch.dtype, repeats: int = 5, device: str = "cpu") -> dict[str, float]:
    """FLOP/s of the fastest of a few large matmuls in ``dtype`` (best of ``repeats`` each), per library
    that can run them: torch's ``mm``, and for fp32 on CPU also oneDNN (``zoo.kernels.gemm.cpu_matmul_libraries``),
    which on some CPUs is twice MKL's speed. Several shapes, including a transformer layer's, so that no
    model GEMM can beat the "peak" merely by having a friendlier shape than one square probe."""
    from zoo.kernels.gemm import cpu_matmul_libraries, matmul_t

    shapes: tuple[tuple[int, int, int], ...] = PEAK_SHAPES
    libraries: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {"aten": lambda a, bt: a @ bt.t()}
    if device == "cpu" and dtype != torch.float32:
        shapes, repeats = ((512, 512, 512),), 2  # a bf16 matmul without bf16 units runs at a few GFLOP/s
    elif device != "cpu":
        shapes, repeats = ((8192, 8192, 8192),), 10
    else:
        libraries = {lib: functools.partial(matmul_t, library=lib) for lib in cpu_matmul_libraries()}
    best = dict.fromkeys(libraries, 0.0)
    for m, k, n in shapes:
        a, bt = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
        for lib, mm in libraries.items():
            mm(a, bt)
            sync(device)
            for _ in range(repeats):
                t = time.perf_counter()
                mm(a, bt)
                sync(device)
                best[lib] = max(best[lib], 2 * m * k * n / (time.perf_counter() - t))
    return best


def matmul_peak(dtype: torch.dtype, repeats: int = 5, device: str = "cpu") -> float:
    """The practical matmul peak: the best of ``matmul_peaks`` over libraries."""
    return max(matmul_peaks(dtype, repeats, device).values())


def round_robin_samples(fns: dict[str, Callable[[], Any]], repeats: int, warmups: int = 1,
                        device: str = "cpu", self_timed: bool = False) -> dict[str, list[float]]:
    """Seconds of every timed call. Each round calls each function once, in turn, and every other round
    reverses the order, so that no contender always runs in the wake of the same other one. With
    ``self_timed`` each function returns its own seconds (e.g. measured in another process)."""
    for _ in range(warmups):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t = time.perf_counter()
            got = fns[name]()
            sync(device)
            times[name].append(float(got) if self_timed else time.perf_counter() - t)
    return times


def round_robin(fns: dict[str, Callable[[], Any]], repeats: int, warmups: int = 1, device: str = "cpu") -> dict[str, float]:
    """Median seconds of each function, timed by ``round_robin_samples``."""
    return {name: statistics.median(ts) for name, ts in round_robin_samples(fns, repeats, warmups, device).items()}


def paired_ratio(slow: list[float], fast: list[float]) -> dict[str, float]:
    """``slow / fast`` round by round (the two ran back to back, so a drift in the machine's speed
    cancels): the median and the quartiles over rounds."""
    ratios = sorted(s / f for s, f in zip(slow, fast))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}
