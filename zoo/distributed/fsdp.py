"""FSDP2 (``fully_shard``) per block, then the root, with the run's precision.

``bf16`` computes in bf16 (the weights gathered for a block are cast) while the sharded fp32 weights
stay the optimizer's master copy and gradients are reduced in fp32, as the HybridNorm paper trained.
Under expert parallelism each MoE layer's experts get their own FSDP unit over the ranks that hold
the same experts; their gradients are divided by the whole data-parallel world, like every other's.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..errors import ZooError
from .expert_parallel import ParallelExperts
from .layout import Meshes

PRECISIONS = ("fp32", "bf16", "fp64")  # fp64: weights and compute in float64, for exactness checks


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    if precision in ("fp32", "fp64"):
        return MixedPrecisionPolicy()
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise ZooError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")


def apply_fsdp(model: nn.Module, meshes: Meshes, precision: str) -> set[nn.Parameter]:
    """Shard every block (and each MoE layer's experts apart) and then the root over ``meshes``.

    Where each expert lives on one rank only (``--ep`` equal to the ranks it leaves), the experts stay
    out of FSDP: their gradients need no reduction, only the division by the world size, which
    ``divide_gradients`` adds once the weights are allocated. Returns those weights."""
    mp = mixed_precision(precision)
    world = float(meshes.layout.world)
    alone: set[nn.Parameter] = set()
    for block in model.blocks:  # type: ignore[attr-defined]
        for module in block.modules():
            if not isinstance(module, ParallelExperts):
                continue
            if meshes.experts.size() > 1:
                fully_shard(module, mesh=meshes.experts, mp_policy=mp)
                module.set_gradient_divide_factor(world)  # type: ignore[attr-defined]
                if meshes.device_type == "cpu":  # gloo has no PREMUL_SUM: sum, then divide
                    module.set_force_sum_reduction_for_comms(True)  # type: ignore[attr-defined]
            else:
                alone.update(module.parameters())
        fully_shard(block, mesh=meshes.dense, mp_policy=mp, ignored_params=alone or None)
    fully_shard(model, mesh=meshes.dense, mp_policy=mp, ignored_params=alone or None)
    return alone


def divide_gradients(model: nn.Module, names: set[str], factor: float) -> None:
    """Divide the gradients of the parameters ``names`` by ``factor`` as they are computed."""
    for name, p in model.named_parameters():
        if name in names:
            p.register_hook(lambda g: g / factor)
