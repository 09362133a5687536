"""The attention contract: a module mapping ``(batch, seq, d_model)`` to the same, causally.

Besides the training forward ``attn(x)``, an attention may support KV-cached generation
(``supports_cache = True``): ``attn(x, cache=..., positions=..., mask=...)`` appends this call's
keys and values to a ``LayerCache`` and attends over everything cached. It may also report its
largest pre-softmax logit (``record_max_logit``), which the trainer logs per layer.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .errors import ZooError
from .init import Init
from .strategy import MakeNorm


class LayerCache:
    """One layer's cached keys and values, grown in place along ``dim`` up to ``capacity`` entries.

    The attention decides what it stores (``mha``: keys and values after the Q/K/V norms and RoPE,
    ``(batch, kv_heads, seq, head_dim)``); the buffers are allocated on the first ``update``, so they
    take the device and dtype of the tensors given.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.dim = -2

    def update(self, k: Tensor, v: Tensor, dim: int = -2) -> tuple[Tensor, Tensor]:
        """Append ``k`` and ``v`` (same length along ``dim``); return everything cached so far."""
        n = k.shape[dim]
        if self.k is None:
            self.dim = dim % k.dim()
            self.k, self.v = (t.new_empty(t.shape[:self.dim] + (max(self.capacity, n),) + t.shape[self.dim + 1:])
                              for t in (k, v))
        end = self.length + n
        if end > self.k.shape[self.dim]:
            raise ZooError(f"KV cache overflow: {end} entries, capacity {self.k.shape[self.dim]}")
        self.k.narrow(self.dim, self.length, n).copy_(k)
        self.v.narrow(self.dim, self.length, n).copy_(v)
        self.length = end
        return self.k.narrow(self.dim, 0, end), self.v.narrow(self.dim, 0, end)


class KVCache:
    """The caches of every layer of a model for one batch of sequences (``cache.layers[l]``)."""

    def __init__(self, n_layers: int, capacity: int):
        self.layers = [LayerCache(capacity) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


class Attention(nn.Module):
    """Base class of attention plugins.

    Built per layer as ``cls(cfg, layer, make_norm, qkv_norm=(...), qkv_norm_width="head",
    options=...)``: ``qkv_norm`` and ``qkv_norm_width`` come from the block's norm strategy, and
    the attention must normalize those projections with ``make_norm``. ``Options`` is an optional
    dataclass filled from ``attention.options``.

    ``forward(x)`` is the training path: causal, no cache, no mask. A plugin that sets
    ``supports_cache = True`` also takes ``forward(x, cache=LayerCache, positions=(B, T) long,
    mask=(B, T, S) bool)``: RoPE (or any position encoding) at ``positions``, this call's keys and
    values appended with ``cache.update(k, v)`` (S = cached length after the update), and query t
    attending to key s only where ``mask[b, t, s]`` (causality and padding are in the mask; a
    sliding window is the plugin's to add, counting slots: query t sits at slot ``S - T + t``).
    When ``record_max_logit`` is set, the forward stores ``last_max_logit``: a 0-d tensor, the
    largest pre-softmax ``q.k / sqrt(d)`` over batch, heads and allowed positions, under no_grad.
    """

    Options: ClassVar[Optional[type]] = None
    supports_cache: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig, layer: int, make_norm: MakeNorm, *, qkv_norm: tuple[str, ...] = (),
                 qkv_norm_width: str = "head", options: Any = None):
        super().__init__()
        self.layer = layer
        self.record_max_logit = False
        self.last_max_logit: Optional[Tensor] = None

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None, positions: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def init_weights(self, init: Init) -> None:  # pragma: no cover - abstract
        """Initialize every weight with ``init(weight, role)``, roles "q", "k", "v", "o"."""
        raise NotImplementedError


def max_logit(q: Tensor, k: Tensor, allowed: Optional[Tensor], scale: float, budget: int = 1 << 24, *,
              causal: bool = False, block: int = 64) -> Tensor:
    """The largest ``scale * q.k`` where ``allowed``: q ``(B, H, T, d)``, k ``(B, H, S, d)`` (heads already
    matched), ``allowed`` broadcastable to ``(B, H, T, S)`` bool or None for all. ``causal=True`` (with
    ``allowed=None``) lets query t see keys up to ``S - T + t``; the queries then go in blocks of ``block``,
    each multiplied only with the keys it can see and masked only on its diagonal, about half the work
    of a full mask at ``T = S``. Chunks the queries so that at most ``budget`` scores exist at once; a
    helper for plugins that record ``last_max_logit``."""
    with torch.no_grad():
        B, H, T, _ = q.shape
        S = k.shape[-2]
        step = max(1, budget // max(1, B * H * S))
        if causal:
            step = min(step, block)
        kt = k.transpose(-1, -2)
        best = torch.full((), float("-inf"), device=q.device)
        for start in range(0, T, step):
            stop = min(T, start + step)
            keys = S - T + stop if causal else S
            scores = (q[:, :, start:stop] @ kt[..., :keys]).float()
            if causal:  # the last n keys are the block's own positions: key c is seen by query r iff c <= r
                n = stop - start
                scores[..., keys - n:].masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1),
                                                    float("-inf"))
            elif allowed is not None:
                scores.masked_fill_(~allowed[..., start:stop, :], float("-inf"))
            best = torch.maximum(best, scores.amax())
        return best * scale
