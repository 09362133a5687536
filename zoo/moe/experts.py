"""Dropless expert MLPs in MegaBlocks dMoE's layout, behind one interface with four backends.

Weights: ``experts.mlp.w1`` (gate), ``experts.mlp.v1`` (up) and ``experts.mlp.w2`` (down), each
``(E*F, H)``; expert e computes ``(silu(x w1[e]^T) * (x v1[e]^T)) w2[e]`` with w2 untransposed, so
one checkpoint loads on every backend:

- ``megablocks``: MegaBlocks' grouped GEMM (``grouped_gemm.ops.gmm``), CUDA and bf16, imported lazily.
- ``fused``: per-expert matmuls with the gather, gating and scatter fused around them (zoo/kernels/moe_glu.py).
- ``grouped_mm``: ``torch.nn.functional.grouped_mm``, one call per projection for all experts (the same file).
- ``loop``: one matmul chain per expert through autograd, the plain reference.
- ``auto``: megablocks on CUDA where importable. On CPU, fused where an expert's average matmul is
  large (its per-expert Python loop is then negligible and each expert's intermediates stay in
  cache), else grouped_mm where its limits allow: benchmarks/moe_layer.py measures both sides of
  ``FUSED_MIN_MACS``. Elsewhere grouped_mm where its limits allow; else loop.

With ``ZOO_KERNELS=reference`` every backend but an explicitly chosen ``megablocks`` runs ``loop``.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MOE_BACKENDS
from ..errors import ZooError
from ..kernels.gemm import compute_dtype
from ..kernels.moe_glu import expert_glu_reference, fused_glu, gate_and_sum, grouped_glu, grouped_mm_supports
from ..kernels.switch import fast
from ..model import Init
from .dispatch import sort_by_expert
from .router import Routing

BACKENDS = MOE_BACKENDS
MEGABLOCKS_HELP = ("moe.backend='megablocks' needs a CUDA GPU, bf16 compute (bf16 weights, or CUDA autocast to bf16) and "
                   "grouped_gemm (MegaBlocks' grouped GEMM) built against your torch: pip install --no-deps "
                   "--no-build-isolation grouped_gemm==0.3.0 on a CUDA machine (a plain install or the [megablocks] extra "
                   "would replace your torch; see docs/distributed.md). Elsewhere use moe.backend=grouped_mm (any device) "
                   "or auto.")
FUSED_MIN_MACS = 2**26  # multiply-adds of an average expert's gate matmul, (assignments / E) * H * F


@functools.lru_cache(maxsize=1)
def megablocks_gmm() -> Any:
    """MegaBlocks' grouped GEMM op (``grouped_gemm.ops.gmm``), or None where it cannot be imported (any
    CPU-only machine). grouped_gemm alone suffices, and builds where MegaBlocks itself does not (CUDA 13);
    MegaBlocks' own copy is the fallback."""
    try:
        import grouped_gemm  # type: ignore[import-not-found]
        return grouped_gemm.ops.gmm
    except Exception:
        pass
    try:
        from megablocks import grouped_gemm_util as gg  # type: ignore[import-not-found]
        if gg.grouped_gemm_is_available():
            return gg.ops.gmm
    except Exception:
        pass
    return None


def compute_dtype_on(x: Tensor) -> torch.dtype:
    """The dtype the experts' GEMMs run in: autocast's where it is on for ``x``'s device, else ``x``'s."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


def resolve_backend(name: str, x: Tensor, hidden: int, ffn: int, rows_per_expert: float = 0.0) -> str:
    """The backend that runs: ``name`` unless it is ``auto`` or cannot run here (see the module docstring)."""
    if x.is_meta:
        return "loop"  # counted at perfect balance; grouped_mm's meta kernel wants bf16
    bf16 = compute_dtype_on(x) == torch.bfloat16
    if name == "megablocks":
        if not x.is_cuda or not bf16 or megablocks_gmm() is None:
            raise ZooError(MEGABLOCKS_HELP)
        return name
    if not fast():
        return "loop"
    if name == "auto" and x.is_cuda and bf16 and megablocks_gmm() is not None:
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


def megablocks_glu(x_TH: Tensor, token_N: Tensor, weight_N: Tensor, counts_E: Tensor, w1_EFH: Tensor, v1_EFH: Tensor,
                   w2_EFH: Tensor) -> Tensor:
    """MegaBlocks' grouped GEMM (dMoE's ``mlp_impl='grouped'`` GLU path); batch sizes on the host.

    grouped_gemm takes one dtype for both operands (bf16): activations and weights are cast to the
    compute dtype (autocast's, or the activations'), and the top-k outputs are summed in fp32."""
    gmm = megablocks_gmm()
    sizes = counts_E.cpu()
    dtype = compute_dtype_on(x_TH)
    x_NH = x_TH[token_N].to(dtype)
    w1, v1, w2 = (w.to(dtype) for w in (w1_EFH, v1_EFH, w2_EFH))
    with torch.autocast("cuda", enabled=False) if x_TH.is_cuda else contextlib.nullcontext():
        h = F.silu(gmm(x_NH, w1, sizes, trans_b=True)) * gmm(x_NH, v1, sizes, trans_b=True)
        return gate_and_sum(x_TH, token_N, weight_N, gmm(h, w2, sizes))


GLU = {"loop": expert_glu_reference, "grouped_mm": grouped_glu, "fused": fused_glu, "megablocks": megablocks_glu}


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

    # torch.compile leaves the experts eager: the dispatch's shapes depend on the routing, and grouped_mm's fake
    # kernel takes bf16 only (zoo.testing's compile check found the fp32 model failing to compile)
    @torch.compiler.disable
    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """``x``: (T, H) tokens; returns (T, H), the gate-weighted sum of each token's experts."""
        E = self.mlp.num_experts
        backend = resolve_backend(self.backend, x, self.mlp.hidden, self.mlp.ffn, routing.expert.numel() / E)
        d = sort_by_expert(routing, E)
        return GLU[backend](x, d.token_N, d.weight_N, d.counts_E, *self.mlp.views())
