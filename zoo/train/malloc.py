"""Keep freed CPU memory in the process for reuse, as a GPU caching allocator does.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves large blocks with
``mmap`` and hands them back to the OS when freed (and trims the heap's top likewise), so every
training step faults the same pages in again (benchmarks/train_step.py times the MFU model with and
without it). ``retain_freed_memory`` raises both thresholds, so freed blocks stay in the heap and the
next step reuses them. The cost is that the process keeps its peak memory instead of returning it. ``zoo train`` calls it on CPU;
``ZOO_RETAIN_FREED_MEMORY=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

ENV = "ZOO_RETAIN_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameter numbers
_LIMIT = 1 << 30  # blocks up to 1 GiB come from the heap; older glibc caps the mmap threshold at 32 MiB
_FALLBACK_MMAP = 32 << 20


def retain_enabled() -> bool:
    """Whether ``$ZOO_RETAIN_FREED_MEMORY`` leaves retention on (anything but 0/false/no/off)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds so freed tensors stay in the process for reuse; whether it
    was applied (False on other C libraries, or where ``$ZOO_RETAIN_FREED_MEMORY`` is 0). Process-wide
    and not undone: for an application's start (the trainer, a benchmark worker), not for a library call."""
    if not retain_enabled():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, _LIMIT) or mallopt(_M_MMAP_THRESHOLD, _FALLBACK_MMAP)):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, _LIMIT))
