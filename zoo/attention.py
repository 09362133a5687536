"""The attention contract: a module mapping ``(batch, seq, d_model)`` to the same, causally."""
from __future__ import annotations

from typing import Any, ClassVar, Optional

from torch import Tensor, nn

from .config import ModelConfig
from .init import Init
from .strategy import MakeNorm


class Attention(nn.Module):
    """Base class of attention plugins.

    Built per layer as ``cls(cfg, layer, make_norm, qkv_norm=(...), qkv_norm_width="head",
    options=...)``: ``qkv_norm`` and ``qkv_norm_width`` come from the block's norm strategy, and
    the attention must normalize those projections with ``make_norm``. ``Options`` is an optional
    dataclass filled from ``attention.options``.
    """

    Options: ClassVar[Optional[type]] = None

    def __init__(self, cfg: ModelConfig, layer: int, make_norm: MakeNorm, *, qkv_norm: tuple[str, ...] = (),
                 qkv_norm_width: str = "head", options: Any = None):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def init_weights(self, init: Init) -> None:  # pragma: no cover - abstract
        """Initialize every weight with ``init(weight, role)``, roles "q", "k", "v", "o"."""
        raise NotImplementedError
