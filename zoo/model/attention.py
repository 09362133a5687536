"""The attention contract: a module mapping ``(batch, seq, d_model)`` to the same, causally, and its helpers.

Besides the training forward ``attn(x)``, an attention may support KV-cached generation
(``supports_cache = True``): ``attn(x, cache=..., positions=..., mask=...)`` appends this call's
keys and values to a ``LayerCache`` and attends over everything cached. It may also report its
largest pre-softmax logit (``record_max_logit``), which the trainer logs per layer.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import ConfigError
from .cache import LayerCache
from .init import Init
from .strategy import MakeNorm


class Attention(nn.Module):
    """Base class of attention plugins.

    Built per layer as ``cls(cfg, layer, make_norm, qkv_norm=(...), qkv_norm_width="head",
    options=...)``: ``qkv_norm`` and ``qkv_norm_width`` come from the block's norm strategy, and the
    attention applies them with the two helpers here: ``add_qkv_norms`` makes the norms (call it after
    making the projections) and ``normalize_qkv`` applies them, after the projection and before any
    rotary embedding. ``Options`` is an optional dataclass filled from ``attention.options``; the
    instance is ``self.options``.

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
        if set(qkv_norm) - {"q", "k", "v"} or qkv_norm_width not in ("head", "full"):
            raise ConfigError(f"QKV norms apply to 'q', 'k', 'v', per 'head' or at 'full' width; got "
                              f"{tuple(qkv_norm)} / {qkv_norm_width!r}")
        self.layer = layer
        self.options = options
        self.qkv_norm, self.qkv_norm_width = tuple(qkv_norm), qkv_norm_width
        self.make_norm = make_norm
        self.record_max_logit = False
        self.last_max_logit: Optional[Tensor] = None

    def add_qkv_norms(self, head_dim: Union[int, tuple[int, int, int]], widths: tuple[int, int, int]) -> None:
        """Make ``q_norm``, ``k_norm`` and ``v_norm`` (None for a projection the strategy leaves alone):
        ``make_norm(head_dim)``, one gain shared by the heads (``head_dim`` one size, or the q, k and v head
        sizes where they differ), or ``make_norm(width)`` over the whole projection at full width (``widths``
        of q, k, v)."""
        heads = (head_dim,) * 3 if isinstance(head_dim, int) else tuple(head_dim)
        dims = widths if self.qkv_norm_width == "full" else heads
        for name, dim in zip("qkv", dims):
            setattr(self, f"{name}_norm", self.make_norm(dim) if name in self.qkv_norm else None)

    def normalize_qkv(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The strategy's Q/K/V norms on ``(batch, seq, heads, head_dim)`` projections: per head, or at
        full width over all heads of a projection."""
        full = self.qkv_norm_width == "full"
        out = []
        for t, norm in ((q, self.q_norm), (k, self.k_norm), (v, self.v_norm)):
            out.append(t if norm is None else norm(t.flatten(-2)).view_as(t) if full else norm(t))
        return out[0], out[1], out[2]

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None, positions: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def init_weights(self, init: Init) -> None:  # pragma: no cover - abstract
        """Initialize every weight with ``init(weight, role)``, roles "q", "k", "v", "o"."""
        raise NotImplementedError

    def cache_values_per_token(self) -> int:  # pragma: no cover - abstract
        """How many values one token adds to this layer's cache (``zoo info`` and ``zoo.stats`` sum them); an
        attention with ``supports_cache`` implements it."""
        raise NotImplementedError(f"{type(self).__name__} supports the cache but does not say its size: "
                                  "implement cache_values_per_token()")


def allowed_keys(mask: Optional[Tensor], T: int, S: int, device: torch.device,
                 window: Optional[int] = None) -> Optional[Tensor]:
    """Which of ``S`` keys each of ``T`` queries sees, ``(B, 1, T, S)`` bool (``(T, S)`` without a mask), or
    None for plain causal attention: the generation ``mask`` (or causal aligned to the last key when cached
    without one), narrowed to a sliding ``window`` of keys where one is set (query t sits at slot S - T + t)."""
    if mask is None and S != T:
        mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None]
    if mask is not None:
        allowed = mask[:, None]
        if window is not None:
            i = torch.arange(S - T, S, device=device)[:, None]
            allowed = allowed & (torch.arange(S, device=device)[None, :] > i - window)
        return allowed
    if window is not None and window < T:
        i = torch.arange(T, device=device)
        return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    return None


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
