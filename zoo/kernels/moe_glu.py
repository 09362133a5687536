"""The experts' GLU, ``(silu(x w1[e]^T) * (x v1[e]^T)) w2[e]`` gated and summed back per token, on CPU
fast paths beside the plain per-expert loop that is their reference.

Every op takes the tokens ``x_TH``, the assignments sorted by expert (``token_N``, gate ``weight_N``),
the assignments per expert ``counts_E`` and the weights ``(E, F, H)`` (MegaBlocks dMoE's slabs viewed
per expert), and returns ``(T, H)``: each token's gate-weighted sum over its experts.

- ``grouped``: ``torch.nn.functional.grouped_mm`` with int32 offsets, one call per projection for all
  experts, and a hand-written backward; any device.
- ``fused``: per-expert matmuls with the gather, gating and scatter fused around them and a hand-written
  backward; each expert's intermediates stay in cache between the matmul and its epilogue.

Both run their GEMMs in ``compute_dtype`` (fp32 for bf16 on CPUs without bf16 units).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .gemm import compute_dtype, matmul_t
from .switch import Kernel, register


def expert_glu_reference(x_TH: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Union[Tensor, Sequence[int]],
                         w1_EFH: Tensor, v1_EFH: Tensor, w2_EFH: Tensor) -> Tensor:
    """One matmul chain per non-empty expert, through autograd."""
    return gate_and_sum(x_TH, token_N, weight_N, expert_rows(x_TH[token_N], counts_E, w1_EFH, v1_EFH, w2_EFH))


def gate_and_sum(x_TH: Tensor, token_N: Tensor, weight_N: Tensor, y_NH: Tensor) -> Tensor:
    """Each token's gate-weighted sum of its experts' output rows ``y_NH``: ``(T, H)``, like ``x_TH``.

    The sum runs in fp32 at least (bf16 rows are summed in fp32 and rounded once, as MegaBlocks does)."""
    acc = torch.promote_types(y_NH.dtype, torch.float32)
    y = y_NH.to(acc) * weight_N.unsqueeze(-1).to(acc)
    return torch.zeros(x_TH.shape, dtype=acc, device=x_TH.device).index_add_(0, token_N, y).to(x_TH.dtype)


def expert_rows(x_NH: Tensor, counts_E: Union[Tensor, Sequence[int]], w1_EFH: Tensor, v1_EFH: Tensor,
                w2_EFH: Tensor) -> Tensor:
    """The GLU of rows already sorted by expert (``counts_E`` rows each), one matmul chain per expert."""
    sizes = counts_E.tolist() if isinstance(counts_E, Tensor) else list(counts_E)
    outs, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            xe = x_NH[start:start + n]
            outs.append((F.silu(xe @ w1_EFH[e].t()) * (xe @ v1_EFH[e].t())) @ w2_EFH[e])
            start += n
    return torch.cat(outs) if outs else x_NH.new_zeros(0, w2_EFH.shape[-1])


def grouped_mm_supports(dtype: torch.dtype, *dims: int) -> bool:
    """torch's grouped_mm takes fp32/bf16/fp16 with every stride a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    item = torch.finfo(dtype).bits // 8
    return all(d * item % 16 == 0 for d in dims)


class _GroupedGLU(torch.autograd.Function):
    """The ``grouped_mm`` backend whole: gather, expert GLU, gating and scatter, with one grouped GEMM
    per projection for all experts and a hand-written backward.

    Over autograd's composition it saves the gate weight multiplying the ``(N, H)`` output (it scales
    the ``(N, F)`` hidden instead: the down projection is linear), the ``index_put`` backward of the
    gather (an ``index_add_`` scatter instead), and contiguity copies of expanded gradients. GEMMs run
    in ``compute_dtype`` (fp32 for bf16 on CPUs without bf16 units), as in ``fused``.
    """

    @staticmethod
    def forward(ctx: Any, x_TH: Tensor, token_N: Tensor, weight_N: Tensor, offs: Tensor,
                w1_EFH: Tensor, v1_EFH: Tensor, w2_EFH: Tensor) -> Tensor:
        cdt = compute_dtype(x_TH)
        w1, v1, w2 = (w.to(cdt) for w in (w1_EFH, v1_EFH, w2_EFH))
        x_NH = x_TH.index_select(0, token_N).to(cdt)
        gate = F.grouped_mm(x_NH, w1.transpose(1, 2), offs=offs)
        up = F.grouped_mm(x_NH, v1.transpose(1, 2), offs=offs)
        act = F.silu(gate)
        hw = (act * up).mul_(weight_N.unsqueeze(1).to(cdt))
        out = torch.zeros(x_TH.shape, dtype=cdt, device=x_TH.device)
        out.index_add_(0, token_N, F.grouped_mm(hw, w2, offs=offs))
        ctx.save_for_backward(x_NH, token_N, weight_N, offs, gate, up, act, w1, v1, w2)
        ctx.dtypes = x_TH.dtype, w1_EFH.dtype
        return out.to(x_TH.dtype)

    @staticmethod
    def backward(ctx: Any, dout_TH: Tensor) -> tuple[Optional[Tensor], ...]:
        x_NH, token_N, weight_N, offs, gate, up, act, w1, v1, w2 = ctx.saved_tensors
        cdt = gate.dtype
        w_N1 = weight_N.unsqueeze(1).to(cdt)
        h = act * up
        dy_NH = dout_TH.index_select(0, token_N).to(cdt)
        dhw = F.grouped_mm(dy_NH, w2.transpose(1, 2), offs=offs)
        dw2 = F.grouped_mm((h * w_N1).t(), dy_NH, offs=offs)
        dweight_N = (dhw * h).sum(1).to(weight_N.dtype)
        dh = dhw.mul_(w_N1)
        d_up = dh * act
        d_gate = torch.ops.aten.silu_backward(dh.mul_(up), gate)
        dx_NH = F.grouped_mm(d_gate, w1, offs=offs).add_(F.grouped_mm(d_up, v1, offs=offs))
        dw1 = F.grouped_mm(d_gate.t(), x_NH, offs=offs)
        dv1 = F.grouped_mm(d_up.t(), x_NH, offs=offs)
        dx_TH = torch.zeros(dout_TH.shape, dtype=cdt, device=dout_TH.device).index_add_(0, token_N, dx_NH)
        xdt, wdt = ctx.dtypes
        return dx_TH.to(xdt), None, dweight_N, None, dw1.to(wdt), dv1.to(wdt), dw2.to(wdt)

def grouped_glu(x_TH: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w1_EFH: Tensor, v1_EFH: Tensor,
                w2_EFH: Tensor) -> Tensor:
    return _GroupedGLU.apply(x_TH, token_N, weight_N, counts_E.cumsum(0, dtype=torch.int32), w1_EFH, v1_EFH, w2_EFH)


class _FusedGLU(torch.autograd.Function):
    """Per-expert GLU with its gather, gating and scatter fused around each expert's matmuls.

    The matmuls are the same as a grouped GEMM's, but each expert's intermediates (a few hundred
    rows) stay in cache between the matmul and its elementwise epilogue, and the backward is
    written out by hand from saved gate/up activations. On a CPU without native reduced-precision
    matrix units the GEMMs run in fp32 on upcast operands (exact products, fp32 accumulation, as
    bf16 hardware computes them), with inputs, outputs, weights and gradients in the model dtype.
    """

    @staticmethod
    def forward(ctx: Any, x_TH: Tensor, token_N: Tensor, weight_N: Tensor, counts: list[int],
                w1_EFH: Tensor, v1_EFH: Tensor, w2_EFH: Tensor) -> Tensor:
        cdt = compute_dtype(x_TH)
        N, F_ = token_N.numel(), w1_EFH.shape[1]
        out_TH = torch.zeros(x_TH.shape, dtype=cdt, device=x_TH.device)
        gate_NF = torch.empty(N, F_, dtype=cdt, device=x_TH.device)
        up_NF = torch.empty(N, F_, dtype=cdt, device=x_TH.device)
        act_NF = torch.empty(N, F_, dtype=cdt, device=x_TH.device)  # silu(gate), saved for the backward
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                tok = token_N[rows]
                x_nH = x_TH.index_select(0, tok).to(cdt)
                gate = matmul_t(x_nH, w1_EFH[e].to(cdt), out=gate_NF[rows])
                up = matmul_t(x_nH, v1_EFH[e].to(cdt), out=up_NF[rows])
                act = torch.ops.aten.silu.out(gate, out=act_NF[rows])
                h = act * up
                h.mul_(weight_N[rows].unsqueeze(1).to(cdt))
                out_TH.index_add_(0, tok, matmul_t(h, w2_EFH[e].to(cdt).t()))
                start += n
        ctx.save_for_backward(x_TH, token_N, weight_N, gate_NF, up_NF, act_NF, w1_EFH, v1_EFH, w2_EFH)
        ctx.counts = counts
        return out_TH.to(x_TH.dtype)

    @staticmethod
    def backward(ctx: Any, dout_TH: Tensor) -> tuple[Optional[Tensor], ...]:
        x_TH, token_N, weight_N, gate_NF, up_NF, act_NF, w1_EFH, v1_EFH, w2_EFH = ctx.saved_tensors
        cdt = gate_NF.dtype
        dx_TH = torch.zeros(x_TH.shape, dtype=cdt, device=x_TH.device)
        dw1, dv1, dw2 = (torch.zeros(w.shape, dtype=cdt, device=w.device) for w in (w1_EFH, v1_EFH, w2_EFH))
        dweight_N = torch.zeros_like(weight_N)
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                continue
            rows = slice(start, start + n)
            tok = token_N[rows]
            gate, up, act = gate_NF[rows], up_NF[rows], act_NF[rows]
            x_nH = x_TH.index_select(0, tok).to(cdt)
            dy_nH = dout_TH.index_select(0, tok).to(cdt)
            w_n1 = weight_N[rows].unsqueeze(1).to(cdt)
            dh = matmul_t(dy_nH, w2_EFH[e].to(cdt))  # gradient of the gated hidden h * w
            act_up = act * up
            dweight_N[rows] = (dh * act_up).sum(1).to(weight_N.dtype)
            matmul_t(act_up.mul_(w_n1).t(), dy_nH.t(), out=dw2[e])
            dh.mul_(w_n1)
            d_up = dh * act
            d_gate = torch.ops.aten.silu_backward(dh.mul_(up), gate)
            matmul_t(d_gate.t(), x_nH.t(), out=dw1[e])
            matmul_t(d_up.t(), x_nH.t(), out=dv1[e])
            dx_nH = matmul_t(d_gate, w1_EFH[e].to(cdt).t()).add_(matmul_t(d_up, v1_EFH[e].to(cdt).t()))
            dx_TH.index_add_(0, tok, dx_nH)
            start += n
        dt = x_TH.dtype
        return dx_TH.to(dt), None, dweight_N, None, dw1.to(dt), dv1.to(dt), dw2.to(dt)


def fused_glu(x_TH: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w1_EFH: Tensor, v1_EFH: Tensor,
              w2_EFH: Tensor) -> Tensor:
    return _FusedGLU.apply(x_TH, token_N, weight_N, counts_E.tolist(), w1_EFH, v1_EFH, w2_EFH)


def _example(dtype: torch.dtype) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(0)
    T, H, E, F_, k = 24, 32, 4, 16, 2
    x = torch.randn(T, H, generator=gen).to(dtype).requires_grad_()
    expert = torch.randint(0, E, (T * k,), generator=gen)
    expert[:4] = 3  # no expert empty, one expert busier
    order = torch.argsort(expert, stable=True)
    token = torch.arange(T).repeat_interleave(k)[order]
    weight = torch.rand(T * k, generator=gen)[order].to(dtype).requires_grad_()
    w1, v1, w2 = ((torch.randn(E, F_, H, generator=gen) / 6).to(dtype).requires_grad_() for _ in range(3))
    return x, token, weight, torch.bincount(expert, minlength=E), w1, v1, w2


register(Kernel("moe_grouped_glu", grouped_glu, expert_glu_reference, _example))
register(Kernel("moe_fused_glu", fused_glu, expert_glu_reference, _example))
