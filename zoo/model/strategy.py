"""The norm-strategy contract: one block's wiring of norms and residuals, built per layer."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

from torch import Tensor, nn

from ..config import ModelConfig
from .init import Init

MakeNorm = Callable[[int], nn.Module]
Sublayer = Callable[[Tensor], Tensor]


class NormStrategy(nn.Module):
    """Say where the norms sit in a block and where each residual is taken.

    Subclasses name their norms in ``norms`` (the base makes each with ``make_norm(d_model)``, in that
    order) and implement ``forward(x, attn, ffn)``. Pre-Norm, for instance, is::

        class PreNorm(NormStrategy):
            norms = ("attn_norm", "ffn_norm")

            def forward(self, x, attn, ffn):
                x = x + attn(self.attn_norm(x))
                return x + ffn(self.ffn_norm(x))

    A strategy whose norms differ by layer overrides ``norm_names()`` (it can read ``self.layer``).
    Class attributes (``qkv_norm`` and ``qkv_norm_width`` may be overridden per layer by an
    instance in ``__init__``; ``final_norm`` and ``embed_norm`` are model-wide, read from the class):
      norms           the norm modules of every layer, made by the base
      qkv_norm        which of "q", "k", "v" the attention normalizes (HybridNorm: all three)
      qkv_norm_width  "head" (one gain of head size shared by the heads) or "full" (OLMo-2 width)
      final_norm      whether the model normalizes before the LM head (config may override)
      embed_norm      whether the model normalizes the embeddings (config may override)
      Options         a dataclass of the strategy's settings, filled from ``norm_options``
    """

    norms: ClassVar[tuple[str, ...]] = ()
    qkv_norm: ClassVar[tuple[str, ...]] = ()
    qkv_norm_width: ClassVar[str] = "head"
    final_norm: ClassVar[bool] = True
    embed_norm: ClassVar[bool] = False
    Options: ClassVar[Optional[type]] = None

    def __init__(self, cfg: ModelConfig, layer: int, make_norm: MakeNorm, options: Any = None):
        super().__init__()
        self.layer = layer
        self.options = options
        for name in self.norm_names():
            setattr(self, name, make_norm(cfg.d_model))

    def norm_names(self) -> tuple[str, ...]:
        """The norms this layer uses, made by ``__init__``: ``norms``, unless a subclass varies them by layer."""
        return self.norms

    def forward(self, x: Tensor, attn: Sublayer, ffn: Sublayer) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, attn, ffn)")

    def init_scheme(self, init: Init) -> Init:
        """Return the weight init for this block's attention and FFN; the default keeps the model's."""
        return init
