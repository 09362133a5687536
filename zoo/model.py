"""The shared model builder: token embedding -> blocks -> optional final norm -> LM head.

A block is its norm strategy wiring an attention module and an FFN: ``strategy(x, attn, ffn)``.
Which strategy, norm layer and attention are used comes from the config, resolved through the
plugin registry; nothing here knows any particular one.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, resolve_options
from .errors import ConfigError
from .ffn import SwiGLU
from .init import Init
from .registry import REGISTRY
from .strategy import MakeNorm, NormStrategy


@dataclass
class ModelOutput:
    """What a forward returns. ``loss`` is the LM loss only; add ``aux_loss`` (MoE) yourself."""

    logits: Tensor
    loss: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None
    router_stats: list[dict[str, Any]] = field(default_factory=list)


def norm_factory(cfg: ModelConfig) -> MakeNorm:
    """``make_norm(dim)`` for the configured norm layer, eps and options."""
    layer = REGISTRY.get("norm layer", cfg.norm_layer)
    return functools.partial(layer, eps=cfg.norm_eps, **dict(cfg.norm_layer_options))


def build_ffn(cfg: ModelConfig, layer: int) -> nn.Module:
    if cfg.ffn.type == "dense":
        return SwiGLU(cfg.d_model, cfg.ffn.hidden_size)
    from .moe import MoEFFN  # the MoE layer is only imported by configs that use it
    return MoEFFN(cfg, layer)


class Block(nn.Module):
    """One layer: ``strategy(x, attn, ffn)``; MoE aux outputs are gathered as the FFN runs."""

    def __init__(self, strategy: NormStrategy, attn: nn.Module, ffn: nn.Module):
        super().__init__()
        self.strategy, self.attn, self.ffn = strategy, attn, ffn

    def forward(self, x: Tensor) -> tuple[Tensor, list[Any]]:
        aux: list[Any] = []

        def ffn(h: Tensor) -> Tensor:
            out = self.ffn(h)
            if isinstance(out, tuple):
                out, extra = out
                aux.append(extra)
            return out

        return self.strategy(x, self.attn, ffn), aux


class ZooModel(nn.Module):
    """A decoder-only LM built from a ``ModelConfig``; ``forward(idx, targets=None)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        strategy_cls = REGISTRY.get("norm strategy", cfg.norm_strategy)
        attn_cls = REGISTRY.get("attention", cfg.attention.type)
        strategy_opts = resolve_options(strategy_cls.Options, cfg.norm_options, "norm_options", f"norm strategy {cfg.norm_strategy!r}")
        attn_opts = resolve_options(attn_cls.Options, cfg.attention.options, "attention.options", f"attention {cfg.attention.type!r}")
        make_norm = norm_factory(cfg)

        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        blocks = []
        for layer in range(cfg.n_layers):
            strategy = strategy_cls(cfg, layer, make_norm, strategy_opts)
            attn = attn_cls(cfg, layer, make_norm, qkv_norm=tuple(strategy.qkv_norm),
                            qkv_norm_width=strategy.qkv_norm_width, options=attn_opts)
            blocks.append(Block(strategy, attn, build_ffn(cfg, layer)))
        self.blocks = nn.ModuleList(blocks)
        use_embed_norm = cfg.embed_norm if cfg.embed_norm is not None else strategy_cls.embed_norm
        use_final_norm = cfg.final_norm if cfg.final_norm is not None else strategy_cls.final_norm
        self.embed_norm = make_norm(cfg.d_model) if use_embed_norm else None
        self.final_norm = make_norm(cfg.d_model) if use_final_norm else None
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize every weight: norms by their own ``reset_parameters``, the rest by role."""
        for m in self.modules():
            if not isinstance(m, (nn.Linear, nn.Embedding, ZooModel)) and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        base = Init.from_config(self.cfg)
        base(self.embed.weight, "embed")
        if self.head is not None:
            base(self.head.weight, "head")
        for block in self.blocks:
            init = block.strategy.init_scheme(base)
            for part in (block.attn, block.ffn):
                if not hasattr(part, "init_weights"):
                    raise ConfigError(f"{type(part).__name__} has no init_weights(init); see docs/plugins.md")
                part.init_weights(init)

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None) -> ModelOutput:
        """``idx`` (batch, seq) token ids; ``targets`` the next-token ids, -100 where ignored."""
        x = self.embed(idx)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        aux: list[Any] = []
        for block in self.blocks:
            x, block_aux = block(x)
            aux.extend(block_aux)
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = F.linear(x, self.lm_head_weight)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        aux_loss = None
        stats: list[dict[str, Any]] = []
        for a in aux:
            aux_loss = a.loss if aux_loss is None else aux_loss + a.loss
            stats.append(a.stats)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, router_stats=stats)
