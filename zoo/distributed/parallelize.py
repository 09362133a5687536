"""The trainer's one door to parallelism: the plain model, built and wrapped for a layout.

``ddp`` (and one process) builds the model as ``zoo.build`` does and wraps it in DDP. ``fsdp``
builds it on ``meta``, splits the experts over ``ep`` ranks, checkpoints activations, shards every
block and the root with FSDP2, then allocates and initializes only each rank's shards. Either way
the model's own code is the single-process code: parallelism wraps it from outside.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..builder import build_model, empty_model
from ..config import ModelConfig
from ..model import ZooModel
from .activation import apply_activation_checkpointing
from .expert_parallel import apply_expert_parallel
from .fsdp import apply_fsdp, divide_gradients, mixed_precision
from .init import init_sharded
from .layout import Layout, Meshes
from .world import ensure_process_group, sum_over_ranks


@dataclass
class Parallel:
    """``model``: the plain model, its weights sharded under ``fsdp``; ``forward``: what to call for a
    training step (DDP's wrapper, or the model)."""

    model: ZooModel
    forward: nn.Module


def parallelize(cfg: ModelConfig, layout: Layout, *, device: torch.device, precision: str = "fp32", ac: str = "none",
                variant: Optional[str] = None) -> Parallel:
    """Build the model of ``cfg`` for ``layout``. The caller seeds torch's generator first: the initial
    weights are those of a single-process ``build_model`` under the same seed, whatever the layout."""
    mixed_precision(precision)  # refuses an unknown precision before anything is built
    dtype = torch.float64 if precision == "fp64" else None
    if not layout.fsdp:
        model = build_model(cfg, device=device, variant=variant, dtype=dtype)
        apply_activation_checkpointing(model.blocks, ac)
        _count_globally(model, layout)
        forward = nn.parallel.DistributedDataParallel(model) if layout.world > 1 else model
        return Parallel(model, forward)
    layout.check_model(cfg.moe.num_experts if cfg.is_moe else None)
    ensure_process_group(device.type)
    meshes = Meshes(layout, device.type)
    model = empty_model(cfg, variant)
    if dtype is not None:
        model.to(dtype)
    if layout.ep > 1:
        apply_expert_parallel(model, meshes.ep)
    apply_activation_checkpointing(model.blocks, ac)
    alone = apply_fsdp(model, meshes, precision)
    alone_names = {name for name, p in model.named_parameters() if p in alone}
    model.to_empty(device=device)  # new parameter objects for those FSDP leaves alone
    divide_gradients(model, alone_names, float(layout.world))
    init_sharded(model)
    _count_globally(model, layout)
    return Parallel(model, model)


def _count_globally(model: nn.Module, layout: Layout) -> None:
    """Give ``lb_scope: global`` MoE layers the sum over all ranks of their expert counts."""
    if layout.world > 1:
        for module in model.modules():
            if getattr(module, "lb_scope", None) == "global":
                module.sum_over_ranks = sum_over_ranks
