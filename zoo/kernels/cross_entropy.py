"""The LM loss: mean next-token cross-entropy, with fewer passes over the logits on CPU.

``F.cross_entropy(logits.float(), ...)`` upcasts bf16 logits in a copy, saves log-probabilities,
and its backward fills a zero tensor, scatters the targets into it, runs log-softmax's backward
and casts the result back: memory-bound passes over a (tokens x vocab) tensor, which on a CPU
cost a few percent of a small model's step. ``cross_entropy`` reads the logits once in their own
dtype, saves fp32 probabilities, and its backward writes the gradient in one pass, in the logits'
dtype. The reference, and the path elsewhere (CUDA, where bandwidth is plentiful), is ``F.cross_entropy``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .switch import Kernel, fast, register


class _CrossEntropy(torch.autograd.Function):
    """Mean of ``-log softmax(logits)[target]`` over rows whose target is not ``ignore_index``, in fp32."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        probs = torch.softmax(logits, -1, dtype=torch.float32)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)[:, None]
        picked = probs.gather(1, safe)[:, 0]
        logp = picked.log()
        small = picked < torch.finfo(torch.float32).tiny  # underflowed: the exact log-probability for those rows
        if bool(small.any()):
            rows = small.nonzero()[:, 0]
            exact = logits[rows].float()
            logp[rows] = exact.gather(1, safe[rows])[:, 0] - torch.logsumexp(exact, -1)
        count = valid.sum()
        ctx.save_for_backward(probs, safe, valid, picked, count)
        ctx.dtype = logits.dtype
        return -torch.where(valid, logp, 0.0).sum() / count

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None]:
        probs, safe, valid, picked, count = ctx.saved_tensors
        scale = (grad / count) * valid  # per row; 0 where the target is ignored
        d = torch.empty(probs.shape, dtype=ctx.dtype, device=probs.device)
        torch.mul(probs, scale[:, None], out=d)
        d.scatter_(1, safe, ((picked - 1) * scale).to(ctx.dtype)[:, None])  # the targets' (p - 1), rounded once
        return d, None, None


def cross_entropy_reference(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """In fp32 at least (fp64 logits stay fp64)."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, ignore_index=ignore_index)


def fused_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    return _CrossEntropy.apply(logits, targets, ignore_index)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """``F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)`` for ``(N, V)`` logits and
    ``(N,)`` targets: the same value, computed in fp32 (fp64 for fp64 logits), and gradient, in the logits' dtype."""
    if (fast() and logits.device.type == "cpu" and logits.dim() == 2 and logits.dtype != torch.float64
            and not torch.compiler.is_compiling()):
        return fused_cross_entropy(logits, targets, ignore_index)
    return cross_entropy_reference(logits, targets, ignore_index)


def _example(dtype: torch.dtype) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(40, 96, generator=gen)).to(dtype).requires_grad_()
    targets = torch.randint(0, 96, (40,), generator=gen)
    targets[::7] = -100
    return logits, targets


register(Kernel("cross_entropy", fused_cross_entropy, cross_entropy_reference, _example))
