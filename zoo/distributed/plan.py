"""`zoo plan`: what each parallel layout needs per rank, before anyone rents the GPUs.

Per rank, for every layout of ``gpus`` ranks (DDP, FSDP2, HSDP, expert parallel):

- parameters (fp32 master weights), gradients (fp32) and AdamW's two moments (fp32): the model's
  parameters divided as the layout divides them (zoo/distributed/layout.py);
- gathered weights: FSDP2 holds one block unsharded while it runs and prefetches the next, in the
  compute dtype;
- activations: the bytes the forward saves for backward, counted by running the model on ``meta``
  (no memory, no compute) under ``torch.autograd.graph.saved_tensors_hooks`` at the micro-batch and
  sequence asked for. On ``meta`` the plain paths run (zoo/kernels' references, the loop expert
  backend), which save at least what the fused ones do; attention is counted as a flash kernel
  keeps it (q, k, v, output and logsumexp). With activation checkpointing a checkpointed block keeps its input, and the
  block being recomputed holds its own activations once more.

A layout fits when the sum stays under the GPU's memory less ``headroom`` (the CUDA context, the
allocator's fragmentation, temporary buffers). Communication buffers are not counted.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..builder import empty_model
from ..config import ModelConfig
from ..errors import ZooError
from .activation import ac_interval
from .layout import Layout

GB = 1e9
BYTES = {"fp32": 4, "bf16": 2}


def parse_bytes(text: str) -> float:
    """``80GB``, ``80G``, ``141 GiB`` or a plain number of bytes."""
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    try:
        return float(number) * units[unit]
    except (ValueError, KeyError):
        raise ZooError(f"cannot read {text!r} as a size; write it like 80GB, 141GiB or 8e10") from None


@dataclass
class Activations:
    """Bytes saved for backward by one micro-batch: in each block, and outside the blocks."""

    per_block: list[int]
    outside: int
    block_input: int

    def total(self, ac: str) -> int:
        every = ac_interval(ac)
        if not every:
            return sum(self.per_block) + self.outside
        kept = sum(self.block_input if i % every == 0 else b for i, b in enumerate(self.per_block))
        return kept + max(self.per_block) + self.outside


class _FlashLike(torch.autograd.Function):
    """What a flash SDPA kernel (CUDA's, and torch's on CPU) keeps for backward: q, k, v, the output and a
    per-row fp32 logsumexp, never the (seq x seq) scores that SDPA's math path on ``meta`` would save."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # pragma: no cover - never run, shapes only
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FlashAttentionOnMeta(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        if func is F.scaled_dot_product_attention:
            return _FlashLike.apply(*args[:3])
        return func(*args, **(kwargs or {}))


def measure_activations(cfg: ModelConfig, micro_batch: int, seq_len: int, dtype: torch.dtype) -> Activations:
    """Bytes the forward saves for backward, counted on ``meta``: each saved tensor's storage once,
    weights (counted as parameters) excluded."""
    model = empty_model(cfg).to(dtype)
    weights = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    per_block = [0] * len(model.blocks)
    where = {"block": None, "outside": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) in weights or isinstance(base, nn.Parameter) or id(base) in seen:
            return t
        seen.add(id(base))
        keep.append(base)  # ids stay unique while the forward runs
        n = base.untyped_storage().nbytes()
        if where["block"] is None:
            where["outside"] += n
        else:
            per_block[where["block"]] += n
        return t

    keep: list[torch.Tensor] = []
    hooks = []
    for i, block in enumerate(model.blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__("block", i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: where.__setitem__("block", None)))
    idx = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    try:
        with _FlashAttentionOnMeta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx, idx)
    finally:
        for h in hooks:
            h.remove()
    block_input = micro_batch * seq_len * cfg.d_model * torch.finfo(dtype).bits // 8
    return Activations(per_block, where["outside"], block_input)


@dataclass
class PlanRow:
    """One layout's bytes per rank and whether it fits; ``why`` says what does not."""

    layout: str
    dp_replicate: int
    dp_shard: int
    ep: int
    fsdp: bool
    params: int
    grads: int
    optimizer: int
    gathered: int
    activations: int
    total: int
    fits: bool
    why: str = ""


@dataclass
class Plan:
    name: str
    gpus: int
    gpu_memory: float
    usable: float
    micro_batch: int
    seq_len: int
    precision: str
    ac: str
    total_params: int
    expert_params: int
    largest_block_params: int
    rows: list[PlanRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fitting(self) -> list[PlanRow]:
        return [r for r in self.rows if r.fits]


def candidate_layouts(gpus: int, num_experts: Optional[int], ep: Optional[int]) -> list[Layout]:
    """DDP, FSDP2 over all, HSDP for each shard size that divides ``gpus``, and for MoE each expert-parallel
    degree dividing both ``gpus`` and the experts (only ``ep`` when given)."""
    layouts = [Layout.of(gpus)] if gpus > 1 else [Layout(world=1)]
    layouts.append(Layout.of(gpus, dp_shard=gpus))
    for shard in range(2, gpus):
        if gpus % shard == 0:
            layouts.append(Layout.of(gpus, dp_shard=shard, dp_replicate=gpus // shard))
    if num_experts:
        degrees = [ep] if ep else [e for e in range(2, gpus + 1) if gpus % e == 0 and num_experts % e == 0]
        for e in degrees:
            if gpus % e or num_experts % e:
                raise ZooError(f"--ep {e} must divide both --gpus {gpus} and the number of experts ({num_experts})")
            layouts.append(Layout.of(gpus, ep=e))
    if ep and not num_experts:
        raise ZooError(f"--ep {ep}: expert parallelism needs an MoE variant; this model is dense")
    return layouts


def plan(cfg: ModelConfig, name: str, *, gpus: int, gpu_memory: float, micro_batch: int, seq_len: int,
         precision: str = "bf16", ac: str = "none", ep: Optional[int] = None, headroom: float = 0.1) -> Plan:
    """Per-rank bytes of every candidate layout of ``gpus`` ranks training ``cfg``."""
    if gpus < 1 or micro_batch < 1 or seq_len < 1:
        raise ZooError("--gpus, --micro-batch and --seq must be at least 1")
    if precision not in BYTES:
        raise ZooError(f"--precision {precision!r}: choose from {', '.join(BYTES)}")
    ac_interval(ac)
    model = empty_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    largest_block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    compute = BYTES[precision]
    acts = measure_activations(cfg, micro_batch, seq_len, torch.bfloat16 if precision == "bf16" else torch.float32)
    activations = acts.total(ac)
    usable = gpu_memory * (1 - headroom)
    out = Plan(name, gpus, gpu_memory, usable, micro_batch, seq_len, precision, ac, total, experts, largest_block)
    for lay in candidate_layouts(gpus, cfg.moe.num_experts if cfg.is_moe else None, ep):
        split = lay.dp_shard * lay.ep if lay.fsdp else 1
        local = math.ceil((total - experts) / split) + math.ceil(experts / split)
        gathered = 2 * largest_block * compute if lay.fsdp else (total * compute if precision == "bf16" else 0)
        params, grads, optim = 4 * local, 4 * local, 8 * local
        need = params + grads + optim + gathered + activations
        row = PlanRow(lay.describe(), lay.dp_replicate, lay.dp_shard, lay.ep, lay.fsdp, params, grads, optim,
                      gathered, activations, need, need <= usable)
        if not row.fits:
            row.why = (f"needs {need / GB:.1f} GB per rank (weights {params / GB:.1f} + gradients {grads / GB:.1f} + "
                       f"AdamW {optim / GB:.1f} + gathered/compute copies {gathered / GB:.1f} + activations "
                       f"{activations / GB:.1f}), more than the {usable / GB:.1f} GB usable of {gpu_memory / GB:.0f} GB")
            if ac == "none" and acts.total("full") < activations:
                row.why += f"; --ac full would save {(activations - acts.total('full')) / GB:.1f} GB of activations"
        out.rows.append(row)
    return out


def format_plan(p: Plan) -> str:
    """The plan as a table, then which layouts fit and why the others do not."""
    head = (f"{p.name}: {p.total_params / 1e9:.2f}B parameters ({p.expert_params / 1e9:.2f}B in experts), "
            f"{p.gpus} GPUs x {p.gpu_memory / GB:.0f} GB ({p.usable / GB:.1f} GB usable), micro-batch {p.micro_batch} x "
            f"{p.seq_len} tokens, {p.precision}, --ac {p.ac}\n")
    lines = [head, f"{'layout':<72} {'weights':>8} {'grads':>8} {'AdamW':>8} {'gathered':>9} {'activ.':>8} "
                   f"{'total':>8}  fits", "-" * 136]
    for r in p.rows:
        lines.append(f"{r.layout:<72} {r.params / GB:>7.1f}G {r.grads / GB:>7.1f}G {r.optimizer / GB:>7.1f}G "
                     f"{r.gathered / GB:>8.1f}G {r.activations / GB:>7.1f}G {r.total / GB:>7.1f}G  {'yes' if r.fits else 'no'}")
    lines.append("")
    for r in p.rows:
        if not r.fits:
            lines.append(f"{r.layout}: does not fit: {r.why}")
    fitting = p.fitting()
    lines.append(f"fits: {fitting[0].layout}" if fitting else "no layout fits: use more GPUs, --ac full, a smaller "
                 "--micro-batch (with --grad-accum for the same global batch) or a shorter --seq")
    return "\n".join(lines)
