"""The one switch between the fast paths and their references, and the list of every kernel.

``ZOO_KERNELS=reference`` (or ``with zoo.kernels.reference():``) puts every op of ``zoo.kernels`` on its
plain PyTorch reference; ``fast`` (the default) lets each op take its fast path where that applies.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError

ENV = "ZOO_KERNELS"
MODES = ("fast", "reference")
_chosen: ContextVar[Optional[str]] = ContextVar("zoo_kernels", default=None)


@functools.lru_cache(maxsize=None)
def _check(value: str, where: str) -> str:
    mode = value.strip().lower() or "fast"
    if mode not in MODES:
        raise ConfigError(f"{where}={value!r}: use {' or '.join(MODES)}")
    return mode


def mode() -> str:
    """``fast`` or ``reference``: the innermost ``use()`` context, else ``$ZOO_KERNELS``, else ``fast``."""
    chosen = _chosen.get()
    return chosen if chosen is not None else _check(os.environ.get(ENV, ""), ENV)


def fast() -> bool:
    """Whether ops may take their fast paths now."""
    return mode() == "fast"


@contextmanager
def use(choice: str) -> Iterator[None]:
    """Run the block with the kernels in mode ``choice`` (``fast`` or ``reference``), then restore."""
    token = _chosen.set(_check(choice, "zoo.kernels.use"))
    try:
        yield
    finally:
        _chosen.reset(token)


def reference() -> Any:
    """``with zoo.kernels.reference():`` the block runs on plain PyTorch alone (no custom autograd.Function)."""
    return use("reference")


@dataclass(frozen=True)
class Kernel:
    """A fast path and the reference it must match. ``example(dtype)`` gives inputs that exercise the fast
    path (tensors that need gradients have ``requires_grad``), so that one test checks every kernel."""

    name: str
    fast: Callable[..., Any]
    reference: Callable[..., Any]
    example: Callable[[torch.dtype], tuple[Any, ...]]
    dtypes: tuple[torch.dtype, ...] = field(default=(torch.float32, torch.bfloat16))


KERNELS: dict[str, Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    if kernel.name in KERNELS:
        raise ValueError(f"kernel {kernel.name!r} is registered twice")
    KERNELS[kernel.name] = kernel
    return kernel
