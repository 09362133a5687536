"""The KV cache of generation: per layer, keys and values grown in place up to a capacity."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..errors import ZooError


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
