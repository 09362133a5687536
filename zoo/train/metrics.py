"""What the trainer measures per step beyond the loss: per-block residual RMS and largest attention
logit, per-layer FFN gradient norms, where a gradient blew up, and the matmul peak behind ``mfu``."""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Optional

import torch

from ..distributed.grads import grad_norm
from ..distributed.world import max_over_ranks
from ..kernels.gemm import cpu_matmul_libraries, matmul_t
from ..model import ZooModel


class BlockProbe:
    """Records each block's output RMS and each attention's largest pre-softmax logit as a step runs.

    The values stay tensors until ``read()`` after the step, so the forward has no host sync (or
    torch.compile graph break). ``close()`` removes its hooks."""

    def __init__(self, model: ZooModel):
        self.model = model
        self.rms: list[torch.Tensor] = []
        self.hooks = [b.register_forward_hook(self._record_rms) for b in model.blocks]
        for b in model.blocks:
            b.attn.record_max_logit = True

    def _record_rms(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self.rms.append(output[0].detach().float().square().mean().sqrt())

    def start(self) -> None:
        self.rms.clear()

    def logits(self) -> list[Optional[torch.Tensor]]:
        """This step's largest logit per layer (None where the attention does not record it); take them
        right after the forward, before anything else runs the model."""
        return [getattr(b.attn, "last_max_logit", None) for b in self.model.blocks]

    def read(self, logits: list[Optional[torch.Tensor]]) -> dict[str, list[Any]]:
        return {"residual_rms": [float(r) for r in self.rms[: len(self.model.blocks)]],
                "max_attn_logit": max_attn_logits(logits)}

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def max_attn_logits(values: list[Optional[torch.Tensor]]) -> list[Optional[float]]:
    """Per layer, the largest pre-softmax attention logit of the step (max over ranks); None for an
    attention that does not record it (``Attention.record_max_logit``)."""
    found = [v.detach().float().reshape(()) for v in values if v is not None]
    if not found:
        return [None] * len(values)
    got = iter(max_over_ranks(torch.stack(found)).tolist())
    return [next(got) if v is not None else None for v in values]


def ffn_grad_norms(model: ZooModel) -> list[float]:
    """The gradient norm of each block's FFN (the HybridNorm paper's per-layer figure), whole where sharded."""
    return [math.sqrt(sum(float(grad_norm(p.grad)) ** 2 for p in b.ffn.parameters() if p.grad is not None))
            for b in model.blocks]


def blowup_layer(model: ZooModel) -> str:
    """The parameter with a non-finite gradient norm, else the one with the largest."""
    worst, where = -1.0, "?"
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        norm = float(grad_norm(p.grad))
        if not math.isfinite(norm):
            return name
        if norm > worst:
            worst, where = norm, name
    return where


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """FLOP/s of a square CPU matmul, best of a few and, in fp32, of every library torch has for it."""
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG (model init, jitter) alone
    a, b = torch.randn(n, n, dtype=dtype, generator=gen), torch.randn(n, n, dtype=dtype, generator=gen)
    runs = [lambda: a @ b]
    if dtype == torch.float32:
        runs = [functools.partial(matmul_t, a, b, library=lib) for lib in cpu_matmul_libraries()]
    best = float("inf")
    for run in runs:
        run()
        for _ in range(5):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
