"""Activation checkpointing per block: ``none``, ``full`` (every block) or ``every:N`` (blocks 0, N, 2N...).

A checkpointed block keeps only its input for backward and runs its forward again there
(``torch.utils.checkpoint``, non-reentrant, with the RNG state restored so jitter repeats exactly).
The model is untouched but for the blocks' ``forward``, which the wrapper replaces on the instance.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ZooError

AC_HELP = "none, full (every block) or every:N (every N-th block, starting with the first)"


def ac_interval(spec: str) -> int:
    """0 for ``none``, 1 for ``full``, N for ``every:N``; a ZooError for anything else."""
    if spec == "none":
        return 0
    if spec == "full":
        return 1
    head, _, n = spec.partition(":")
    if head == "every" and n.isdigit() and int(n) >= 1:
        return int(n)
    raise ZooError(f"--ac {spec!r}: expected {AC_HELP}")


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(blocks: nn.ModuleList, spec: str) -> int:
    """Checkpoint the blocks that ``spec`` names; returns how many."""
    every = ac_interval(spec)
    if not every:
        return 0
    chosen = [b for i, b in enumerate(blocks) if i % every == 0]
    for block in chosen:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(chosen)
