"""The transformer: token embedding -> blocks -> optional final norm -> LM head.

A block is its norm strategy wiring an attention module and an FFN: ``strategy(x, attn, ffn)``.
Which strategy, attention, norm layer and FFN are used comes in ``Components``, resolved from the
config by zoo/builder.py; the model itself knows none of them by name.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..kernels.cross_entropy import cross_entropy
from ..kernels.linear import Linear, linear
from .attention import Attention
from .cache import KVCache, LayerCache
from .generate import GenerationError, generate
from .init import Init
from .strategy import MakeNorm, NormStrategy

_OVERWRITING = (nn.Linear.reset_parameters, nn.Embedding.reset_parameters)  # they write every value anew


@dataclass(frozen=True)
class InitStep:
    """One step of a model's initialization: ``run()`` writes ``module``'s weights. ``overwrites``: every value
    of the module's own parameters is written (none read); ``whole``: ``run()`` is ``init(module.weight,
    role)`` alone, given as (init, role), so that a sharded weight can be drawn without gathering it;
    ``through``: ``run()`` is ``module.init_weights(through)``, whose calls of ``through`` can be replayed one
    weight at a time."""

    module: nn.Module
    run: Callable[[], None]
    overwrites: bool = False
    whole: Optional[tuple[Init, str]] = None
    through: Optional[Init] = None


@dataclass(frozen=True)
class Components:
    """The classes a config names, with their options checked: what the model is built from."""

    strategy: type[NormStrategy]
    strategy_options: Any
    attention: type[Attention]
    attention_options: Any
    make_norm: MakeNorm
    make_ffn: Callable[[int], nn.Module]  # layer -> the dense or MoE FFN of that layer


@dataclass
class ModelOutput:
    """What a forward returns. ``loss`` is the LM loss only; add ``aux_loss`` (MoE) yourself."""

    logits: Tensor
    loss: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None
    router_stats: list[dict[str, Any]] = field(default_factory=list)


class Block(nn.Module):
    """One layer: ``strategy(x, attn, ffn)``; MoE aux outputs are gathered as the FFN runs.

    With a cache, positions or a mask (generation), the attention is wrapped in a closure that
    passes them on, so a strategy still calls ``attn(h)`` and needs to know nothing of caching. An FFN
    with ``takes_token_ids`` (MoE, for its router's context) is given the model's token ids the same way.
    """

    def __init__(self, strategy: NormStrategy, attn: nn.Module, ffn: nn.Module):
        super().__init__()
        self.strategy, self.attn, self.ffn = strategy, attn, ffn

    def forward(self, x: Tensor, cache: Optional[LayerCache] = None, positions: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, token_ids: Optional[Tensor] = None) -> tuple[Tensor, list[Any]]:
        aux: list[Any] = []
        pass_ids = token_ids is not None and getattr(self.ffn, "takes_token_ids", False)

        def ffn(h: Tensor) -> Tensor:
            out = self.ffn(h, token_ids) if pass_ids else self.ffn(h)
            if isinstance(out, tuple):
                out, extra = out
                aux.append(extra)
            return out

        if cache is None and positions is None and mask is None:
            return self.strategy(x, self.attn, ffn), aux

        def attn(h: Tensor) -> Tensor:
            return self.attn(h, cache=cache, positions=positions, mask=mask)

        return self.strategy(x, attn, ffn), aux


class ZooModel(nn.Module):
    """A decoder-only LM: ``forward(idx, targets=None)``; ``variant`` is the name it was built or saved as."""

    def __init__(self, cfg: ModelConfig, parts: Components, variant: Optional[str] = None):
        super().__init__()
        self.cfg, self.variant = cfg, variant
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        blocks = []
        for layer in range(cfg.n_layers):
            strategy = parts.strategy(cfg, layer, parts.make_norm, parts.strategy_options)
            attn = parts.attention(cfg, layer, parts.make_norm, qkv_norm=tuple(strategy.qkv_norm),
                                   qkv_norm_width=strategy.qkv_norm_width, options=parts.attention_options)
            blocks.append(Block(strategy, attn, parts.make_ffn(layer)))
        self.blocks = nn.ModuleList(blocks)
        use_embed_norm = cfg.embed_norm if cfg.embed_norm is not None else parts.strategy.embed_norm
        use_final_norm = cfg.final_norm if cfg.final_norm is not None else parts.strategy.final_norm
        self.embed_norm = parts.make_norm(cfg.d_model) if use_embed_norm else None
        self.final_norm = parts.make_norm(cfg.d_model) if use_final_norm else None
        self.head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize every weight: linears and embeddings by PyTorch's defaults, then norms by their own
        ``reset_parameters``, then by role."""
        for step in self.init_steps():
            step.run()

    def init_steps(self) -> list["InitStep"]:
        """The initialization in order: each step writes only its module's weights and buffers. zoo.distributed
        runs them one at a time on sharded weights, drawing the random numbers a single process would."""
        linear = (nn.Linear, nn.Embedding)  # PyTorch's defaults first, as construction drew them
        steps = [InitStep(m, m.reset_parameters, overwrites=type(m).reset_parameters in _OVERWRITING)
                 for m in self.modules() if isinstance(m, linear)]
        steps += [InitStep(m, m.reset_parameters) for m in self.modules()
                  if not isinstance(m, (*linear, ZooModel)) and hasattr(m, "reset_parameters")]
        base = Init.from_config(self.cfg)
        steps.append(InitStep(self.embed, lambda: base(self.embed.weight, "embed"), whole=(base, "embed")))
        if self.head is not None:
            steps.append(InitStep(self.head, lambda: base(self.head.weight, "head"), whole=(base, "head")))
        for block in self.blocks:
            init = block.strategy.init_scheme(base)
            for part in (block.attn, block.ffn):
                if not hasattr(part, "init_weights"):
                    raise ConfigError(f"{type(part).__name__} has no init_weights(init); see docs/plugins.md")
                steps.append(InitStep(part, functools.partial(part.init_weights, init), through=init))
        return steps

    def forward(self, idx: Tensor, targets: Optional[Tensor] = None, *, cache: Optional[KVCache] = None,
                positions: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> ModelOutput:
        """``idx`` (batch, seq) token ids; ``targets`` the next-token ids, -100 where ignored.

        Generation passes a ``KVCache`` (``new_cache``), each token's RoPE ``positions`` (batch, seq)
        and a bool ``mask`` (batch, seq, cached + seq) of the keys each query may see; see zoo/model/generate.py.
        """
        x = self.embed(idx)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        aux: list[Any] = []
        for i, block in enumerate(self.blocks):
            if cache is None and positions is None and mask is None:
                x, block_aux = block(x, token_ids=idx)
            else:
                x, block_aux = block(x, cache.layers[i] if cache is not None else None, positions, mask, idx)
            aux.extend(block_aux)
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = linear(x, self.lm_head_weight)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        aux_loss = None
        stats: list[dict[str, Any]] = []
        for a in aux:
            aux_loss = a.loss if aux_loss is None else aux_loss + a.loss
            stats.append(a.stats)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, router_stats=stats)

    def new_cache(self, capacity: int) -> KVCache:
        """An empty KV cache for up to ``capacity`` tokens per row; raises if an attention cannot cache."""
        for block in self.blocks:
            if not getattr(block.attn, "supports_cache", False):
                raise GenerationError(f"attention {self.cfg.attention.type!r} ({type(block.attn).__name__}) does not "
                                      "support KV-cached generation (supports_cache is False); see docs/plugins.md")
        return KVCache(len(self.blocks), capacity)

    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, seed: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                 eos_id: Optional[int] = None) -> Tensor:
        """Prompt plus up to ``max_new_tokens`` new tokens per row, with a KV cache (zoo.model.generate)."""
        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                        attention_mask=attention_mask, eos_id=eos_id)
