"""Scaled-dot-product attention: SDPA, or causal attention on each CPU's fastest GEMM.

The reference is ``F.scaled_dot_product_attention``. On CPU it runs a flash kernel whose fp32 GEMMs
are MKL's, which on some CPUs run at half oneDNN's speed (zoo/kernels/gemm.py). Where fp32 GEMMs go
to oneDNN, the fast causal path does the same for attention over more than one block of ``BLOCK``
queries: per (sequence, head), each block is multiplied only with the keys it can see, the softmax
is explicit, and its probabilities are kept for the backward (up to ``SAVED_BYTES`` per call).
Shorter sequences stay on SDPA, where the per-head calls cost more than they save, and so do longer
ones past ``SAVED_BYTES``, whose memory then does not grow with the sequence squared.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .gemm import compute_dtype, onednn_matmul_t, uses_onednn
from .switch import Kernel, fast, register

BLOCK = 256
SAVED_BYTES = 256 << 20


@functools.lru_cache(maxsize=None)
def _above_diagonal(n: int, device: torch.device) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)


def _blocks(T: int) -> list[tuple[int, int]]:
    return [(s, min(s + BLOCK, T)) for s in range(0, T, BLOCK)]


class _CausalAttention(torch.autograd.Function):
    """q ``(B, H, T, d)``, k and v ``(B, H_kv, T, d)`` with ``H_kv`` dividing ``H``, fp32 on CPU. They are
    copied to contiguous ``(B, H, T, d)`` first: oneDNN takes a GEMM's second operand only as a contiguous
    matrix or its transpose (any other strides run at about 1 GFLOP/s)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        B, H, T, d = q.shape
        group = H // k.shape[1]
        qs = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        torch.mul(q, scale, out=qs)
        k, v = k.contiguous(), v.contiguous()
        out = torch.empty_like(qs)
        keep = any(ctx.needs_input_grad)
        probs: list[Tensor] = []
        blocks = [(s, e, _above_diagonal(e - s, q.device)) for s, e in _blocks(T)]
        qf, kf, vf, of = (t.view(-1, T, d).unbind(0) for t in (qs, k, v, out))  # one (T, d) matrix per head
        for i, (qh, oh) in enumerate(zip(qf, of)):
            kh, vh = kf[i // group], vf[i // group]
            for s, e, mask in blocks:
                scores = onednn_matmul_t(qh[s:e], kh[:e])
                scores[:, s:].masked_fill_(mask, float("-inf"))
                p = torch.softmax(scores, -1)
                oh[s:e].copy_(onednn_matmul_t(p, vh[:e].t()))
                if keep:
                    probs.append(p)
        ctx.probs, ctx.scale, ctx.group = probs, scale, group
        ctx.save_for_backward(qs, k, v, out)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Optional[Tensor], ...]:
        qs, k, v, out = ctx.saved_tensors
        probs, group = ctx.probs, ctx.group
        if probs is None:
            raise RuntimeError("causal_attention's backward ran twice (retain_graph=True): its saved probabilities "
                               "are freed after the first; set ZOO_CPU_MATMUL=aten for SDPA's kernel")
        ctx.probs = None  # not held until the graph itself goes
        B, H, T, d = qs.shape
        dout = dout.contiguous()
        delta = (dout * out).sum(-1, keepdim=True)
        dout_t, qs_t = dout.transpose(-1, -2).contiguous(), qs.transpose(-1, -2).contiguous()
        dq = torch.empty_like(qs)
        dk_t = k.new_empty(B, k.shape[1], d, T)
        dv_t = v.new_empty(B, v.shape[1], d, T)
        blocks = _blocks(T)
        n = len(blocks)
        heads = zip(*(t.view(-1, *t.shape[2:]).unbind(0) for t in (dout, dout_t, qs_t, delta, dq)))
        kf, vf, dkf, dvf = (t.view(-1, *t.shape[2:]).unbind(0) for t in (k, v, dk_t, dv_t))
        for i, (doh, doh_t, qh_t, dlh, dqh) in enumerate(heads):
            kh, vh, dkh, dvh = kf[i // group], vf[i // group], dkf[i // group], dvf[i // group]
            for j in reversed(range(n)):  # the last block sees every key: it writes, the rest add
                s, e = blocks[j]
                p = probs[i * n + j]
                dv = onednn_matmul_t(doh_t[:, s:e].contiguous(), p.t())
                ds = onednn_matmul_t(doh[s:e], vh[:e]).sub_(dlh[s:e]).mul_(p)
                dqh[s:e].copy_(onednn_matmul_t(ds, kh[:e].t()))
                dk = onednn_matmul_t(qh_t[:, s:e].contiguous(), ds.t())
                if i % group == 0 and j == n - 1:
                    dvh.copy_(dv)
                    dkh.copy_(dk)
                else:
                    dvh[:, :e].add_(dv)
                    dkh[:, :e].add_(dk)
        dq.mul_(ctx.scale)
        return dq, dk_t.transpose(-1, -2), dv_t.transpose(-1, -2), None


def _on_onednn(q: Tensor, k: Tensor, v: Tensor) -> bool:
    B, H, T, _ = q.shape
    return (T > BLOCK and uses_onednn(q, k, v) and not torch.is_autocast_enabled("cpu")
            and k.shape[-2] == T and H % k.shape[1] == 0 and v.shape[-1] == q.shape[-1]
            and (not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
                 or B * H * sum((e - s) * e for s, e in _blocks(T)) * q.element_size() <= SAVED_BYTES))


def causal_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def onednn_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    return _CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """``softmax(scale * q k^T + causal mask) v`` for q ``(B, H, T, d)`` and k, v ``(B, H_kv, T, d)``
    (GQA when ``H_kv < H``), ``scale`` defaulting to ``d ** -0.5``: on oneDNN GEMMs where fp32 GEMMs go
    there (fp32 CPU) and the saved probabilities fit ``SAVED_BYTES``, else SDPA's ``is_causal``."""
    if fast() and _on_onednn(q, k, v):
        return onednn_causal_attention(q, k, v, scale)
    return causal_attention_reference(q, k, v, scale)


def attention(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """Attention of q ``(B, H, T, d)`` over k ``(B, H_kv, S, d)`` and v ``(B, H_kv, S, d_v)`` (GQA when
    ``H_kv < H``) at ``scale`` (default ``d ** -0.5``): causal when ``allowed`` is None, else query t sees
    key s where ``allowed[..., t, s]``. On CPUs without units for the inputs' reduced precision, the fast
    path computes in fp32 on the upcast operands; the output has the inputs' dtype."""
    dtype = q.dtype
    if fast():
        cdt = compute_dtype(q)
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    if allowed is None:
        y = causal_attention(q, k, v, scale)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return y.to(dtype)


def _example(dtype: torch.dtype) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, BLOCK + 37, 16, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, BLOCK + 37, 16, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    return q, k, v


register(Kernel("causal_attention", onednn_causal_attention, causal_attention_reference, _example,
                dtypes=(torch.float32,)))
