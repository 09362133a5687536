"""Autoregressive generation with a KV cache: greedy or sampled (temperature, top-k, top-p), batched.

Batched prompts are LEFT-padded with an ``attention_mask`` (1 = real token). Each row's RoPE
positions count from its first real token and its queries never see pad slots, so a padded row
produces the same tokens as its prompt alone. The prompt is run once (prefill), filling the cache;
each new token then costs one forward over a single position. The attention plugins do the
caching (``Attention.supports_cache``, zoo/model/attention.py); this module owns the loop, the
positions, the mask and the sampling.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from ..errors import ZooError


class GenerationError(ZooError):
    """Generation cannot run as asked: a bad sampling setting, prompt, mask, or an attention without a cache."""


def check_sampling(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Refuse settings that have no meaning, with the valid range in the message."""
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise GenerationError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must lie in (0, 1], got {top_p}")


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """One token per row from ``logits`` (batch, vocab): argmax at temperature 0, else a draw from the
    softmax of ``logits / temperature`` restricted to the top ``top_k`` and the smallest set of tokens
    whose probability reaches ``top_p`` (nucleus)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the tokens after the nucleus is full
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _left_padded(mask: Tensor) -> bool:
    return bool((mask[:, 1:] >= mask[:, :-1]).all()) and bool(mask[:, -1].all())


def stream(model: torch.nn.Module, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
           top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
           attention_mask: Optional[Tensor] = None, eos_id: Optional[int] = None) -> Iterator[Tensor]:
    """Yield the next token of every row, ``(batch,)``, as it is chosen; see ``generate``.

    A row that has produced ``eos_id`` yields ``eos_id`` from then on; the stream stops early once
    every row has. The model runs in eval mode without gradients and is put back as it was.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise GenerationError(f"input_ids must be (batch, seq) with seq >= 1, got shape {list(input_ids.shape)}")
    device = next(model.parameters()).device
    idx = input_ids.to(device)
    B, T = idx.shape
    if attention_mask is not None:
        if attention_mask.shape != idx.shape:
            raise GenerationError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(idx.shape)}")
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if not _left_padded(attention_mask):
            raise GenerationError("attention_mask must be LEFT padding (zeros then ones in every row, "
                                  "each row ending in a real token); pad prompts on the left")
    lengths = attention_mask.sum(dim=1) if attention_mask is not None else torch.full((B,), T, device=device)
    longest = int(lengths.max())
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise GenerationError(f"a prompt of {longest} tokens plus max_new_tokens {max_new_tokens} exceeds the model's "
                              f"max_seq_len {model.cfg.max_seq_len}; shorten the prompt or ask for fewer tokens")
    if max_new_tokens == 0:
        return
    cache = model.new_cache(T + max_new_tokens)
    padded = attention_mask is not None and not bool(attention_mask.all())
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if padded:
                valid = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
                valid[:, :T] = attention_mask
                positions = (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)
                eye = torch.eye(T, dtype=torch.bool, device=device)
                mask = (torch.ones(T, T, dtype=torch.bool, device=device).tril() & attention_mask[:, None, :]) | eye
                logits = model(idx, cache=cache, positions=positions, mask=mask).logits[:, -1]
            else:
                logits = model(idx, cache=cache).logits[:, -1]
            for step in range(max_new_tokens):
                token = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    token = token.masked_fill(finished, eos_id)
                    finished |= token == eos_id
                yield token
                if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                    return
                S = T + step + 1
                mask = valid[:, None, :S] if padded else None
                positions = (lengths + step)[:, None]
                logits = model(token[:, None], cache=cache, positions=positions, mask=mask).logits[:, -1]
    finally:
        model.train(was_training)


def generate(model: torch.nn.Module, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             attention_mask: Optional[Tensor] = None, eos_id: Optional[int] = None) -> Tensor:
    """The prompts followed by their new tokens, ``(batch, seq + n_new)`` (``(seq + n_new,)`` for a 1-D prompt).

    ``temperature=0`` is greedy; ``top_k`` / ``top_p`` restrict sampling; ``seed`` makes a draw
    reproducible (the global RNG is used otherwise). ``attention_mask`` (1 = real token) describes
    LEFT-padded prompts of different lengths. Generation stops after ``max_new_tokens`` or once
    every row has produced ``eos_id``; finished rows are filled with ``eos_id``.
    """
    one = input_ids.dim() == 1
    idx = input_ids[None] if one else input_ids
    if attention_mask is not None and one:
        attention_mask = attention_mask[None]
    tokens = list(stream(model, idx, max_new_tokens, temperature, top_k, top_p, seed, attention_mask, eos_id))
    device = next(model.parameters()).device
    out = torch.cat([idx.to(device), *(t[:, None] for t in tokens)], dim=1)
    return out[0] if one else out


__all__ = ["GenerationError", "check_sampling", "generate", "sample_next", "stream"]
