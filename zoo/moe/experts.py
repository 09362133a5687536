"""Dropless expert MLPs in MegaBlocks dMoE's layout, behind one interface with three backends.

Weights: ``experts.mlp.w1`` (gate), ``experts.mlp.v1`` (up) and ``experts.mlp.w2`` (down), each
``(E*F, H)``; expert e computes ``(silu(x w1[e]^T) * (x v1[e]^T)) w2[e]`` with w2 untransposed, so
one checkpoint loads on every backend:

- ``megablocks``: MegaBlocks' grouped GEMM (``grouped_gemm.ops.gmm``), CUDA and bf16, imported lazily.
- ``fused``: per-expert matmuls with the gather, gating and scatter fused around them and a
  hand-written backward; any device.
- ``grouped_mm``: ``torch.nn.functional.grouped_mm`` with int32 offsets, one call per projection for
  all experts, and a hand-written backward; any device.
- ``loop``: one matmul per expert through autograd, the plain reference.
- ``auto``: megablocks on CUDA where importable. On CPU, fused where an expert's average matmul is
  large (its per-expert Python loop is then negligible and each expert's intermediates stay in
  cache), else grouped_mm where its limits allow: benchmarks/moe_layer.py measures both sides of
  ``FUSED_MIN_MACS``. Elsewhere grouped_mm where its limits allow; else loop.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MOE_BACKENDS
from ..errors import ZooError
from ..init import Init
from ..linear import compute_dtype, matmul_t
from .router import Routing

BACKENDS = MOE_BACKENDS
MEGABLOCKS_HELP = ("moe.backend='megablocks' needs a CUDA GPU, bf16 weights and the megablocks and grouped_gemm packages, "
                   "built against your torch: pip install --no-build-isolation 'hybridnorm-zoo[megablocks]' on a CUDA "
                   "machine. Elsewhere use moe.backend=grouped_mm (any device) or auto.")


@functools.lru_cache(maxsize=1)
def megablocks_gmm() -> Any:
    """MegaBlocks' grouped GEMM op, or None where it cannot be imported (any CPU-only machine)."""
    try:
        from megablocks import grouped_gemm_util as gg  # type: ignore[import-not-found]
        if gg.grouped_gemm_is_available():
            return gg.ops.gmm
    except Exception:
        pass
    try:
        import grouped_gemm  # type: ignore[import-not-found]
        return grouped_gemm.ops.gmm
    except Exception:
        return None


def grouped_mm_supports(dtype: torch.dtype, *dims: int) -> bool:
    """torch's grouped_mm takes fp32/bf16/fp16 with every stride a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    item = torch.finfo(dtype).bits // 8
    return all(d * item % 16 == 0 for d in dims)


FUSED_MIN_MACS = 2**26  # multiply-adds of an average expert's gate matmul, (assignments / E) * H * F


def resolve_backend(name: str, x: Tensor, hidden: int, ffn: int, rows_per_expert: float = 0.0) -> str:
    """The backend that runs: ``name`` unless it is ``auto`` or cannot run here (see the module docstring)."""
    if x.is_meta:
        return "loop"  # counted at perfect balance; grouped_mm's meta kernel wants bf16
    if name == "megablocks":
        if not x.is_cuda or x.dtype != torch.bfloat16 or megablocks_gmm() is None:
            raise ZooError(MEGABLOCKS_HELP)
        return name
    if name == "auto" and x.is_cuda and x.dtype == torch.bfloat16 and megablocks_gmm() is not None:
        return "megablocks"
    grouped_ok = grouped_mm_supports(compute_dtype(x), hidden, ffn)
    if name == "auto" and x.device.type == "cpu":
        return "grouped_mm" if grouped_ok and rows_per_expert * hidden * ffn < FUSED_MIN_MACS else "fused"
    if name == "fused":
        return "fused"
    if name in ("auto", "grouped_mm"):
        if grouped_ok:
            return "grouped_mm"
        if name == "grouped_mm":
            _warn_fallback(str(x.dtype), hidden, ffn)
    return "loop"


@functools.lru_cache(maxsize=None)
def _warn_fallback(dtype: str, hidden: int, ffn: int) -> None:
    warnings.warn(f"grouped_mm cannot take {dtype} with hidden {hidden} / expert hidden {ffn} (it needs fp32/bf16/fp16 "
                  "and 16-byte strides); using the loop backend", stacklevel=4)


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


def grouped_glu_dispatch(x_TH: Tensor, routing: Routing, w1_EFH: Tensor, v1_EFH: Tensor, w2_EFH: Tensor) -> Tensor:
    """The ``grouped_mm`` backend whole: sort assignments by expert, then ``_GroupedGLU``."""
    order = torch.argsort(routing.expert, stable=True)
    offs = torch.bincount(routing.expert, minlength=w1_EFH.shape[0]).cumsum(0, dtype=torch.int32)
    return _GroupedGLU.apply(x_TH, routing.token[order], routing.weight[order], offs, w1_EFH, v1_EFH, w2_EFH)


def loop_glu(x: Tensor, counts: Union[Tensor, Sequence[int]], w1_EFH: Tensor, v1_EFH: Tensor, w2_EFH: Tensor) -> Tensor:
    """The reference: one matmul chain per non-empty expert."""
    sizes = counts.tolist() if isinstance(counts, Tensor) else list(counts)
    outs, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            xe = x[start:start + n]
            outs.append((F.silu(xe @ w1_EFH[e].t()) * (xe @ v1_EFH[e].t())) @ w2_EFH[e])
            start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w2_EFH.shape[-1])


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


def fused_glu_dispatch(x_TH: Tensor, routing: Routing, w1_EFH: Tensor, v1_EFH: Tensor, w2_EFH: Tensor) -> Tensor:
    """The ``fused`` backend, whole: sort assignments by expert, then ``_FusedGLU``."""
    order = torch.argsort(routing.expert, stable=True)
    counts = torch.bincount(routing.expert, minlength=w1_EFH.shape[0]).tolist()
    return _FusedGLU.apply(x_TH, routing.token[order], routing.weight[order], counts, w1_EFH, v1_EFH, w2_EFH)


def megablocks_glu(x: Tensor, counts: Tensor, w1_EFH: Tensor, v1_EFH: Tensor, w2_EFH: Tensor) -> Tensor:
    """MegaBlocks' grouped GEMM (dMoE's ``mlp_impl='grouped'`` GLU path); batch sizes on the host."""
    gmm = megablocks_gmm()
    sizes = counts.cpu()
    h = F.silu(gmm(x, w1_EFH, sizes, trans_b=True)) * gmm(x, v1_EFH, sizes, trans_b=True)
    return gmm(h, w2_EFH, sizes)


GLU_BACKENDS = {"loop": loop_glu, "megablocks": megablocks_glu}  # (sorted rows, counts) -> rows
DISPATCH = {"fused": fused_glu_dispatch, "grouped_mm": grouped_glu_dispatch}  # (tokens, routing) -> tokens


class ExpertWeights(nn.Module):
    """``w1``, ``v1``, ``w2``: the ``(E*F, H)`` slabs of MegaBlocks dMoE's GLU."""

    def __init__(self, num_experts: int, hidden: int, ffn: int):
        super().__init__()
        self.num_experts, self.hidden, self.ffn = num_experts, hidden, ffn
        self.w1 = nn.Parameter(torch.empty(num_experts * ffn, hidden))
        self.v1 = nn.Parameter(torch.empty(num_experts * ffn, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts * ffn, hidden))

    def views(self) -> tuple[Tensor, Tensor, Tensor]:
        shape = (self.num_experts, self.ffn, self.hidden)
        return self.w1.view(shape), self.v1.view(shape), self.w2.view(shape)


class Experts(nn.Module):
    """Sort assignments by expert, run the experts' GLU on a backend, weight and scatter back."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ZooError(f"unknown moe.backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.backend = backend
        self.mlp = ExpertWeights(num_experts, hidden, ffn)

    def init_weights(self, init: Init) -> None:
        w1, v1, w2 = self.mlp.views()
        for e in range(self.mlp.num_experts):  # per expert, so fan-based inits see one expert's shape
            init(w1[e], "ffn_in")
            init(v1[e], "ffn_in")
            init(w2[e], "ffn_out")

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """``x``: (T, H) tokens; returns (T, H), the gate-weighted sum of each token's experts."""
        E = self.mlp.num_experts
        backend = resolve_backend(self.backend, x, self.mlp.hidden, self.mlp.ffn, routing.expert.numel() / E)
        if backend in DISPATCH:
            return DISPATCH[backend](x, routing, *self.mlp.views())
        if x.is_meta:  # FLOP counting: perfect balance
            n = routing.expert.numel()
            counts: Any = [n // E + (e < n % E) for e in range(E)]
            order = torch.empty(n, dtype=torch.long, device=x.device)
        else:
            order = torch.argsort(routing.expert, stable=True)
            counts = torch.bincount(routing.expert, minlength=E)
        token = routing.token[order]
        y = GLU_BACKENDS[backend](x[token], counts, *self.mlp.views())
        y = y * routing.weight[order].unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y)
