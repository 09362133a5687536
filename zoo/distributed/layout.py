"""A parallel layout: how the ranks of a run split the work, and the DeviceMeshes that carry it.

Every rank reads its own part of each global batch (data parallel over all ranks). The weights are
either replicated (``ddp``: DDP averages the gradients) or, in the ``fsdp`` layout, sharded by FSDP2
over ``dp_shard`` ranks and replicated over ``dp_replicate`` groups of them (HSDP); with ``ep`` > 1
each MoE layer's experts are split over ``ep`` ranks (expert parallel), and the rest of the model is
sharded over ``dp_shard x ep`` ranks, as torchtitan lays it out. ``world = dp_replicate x dp_shard x ep``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..errors import ZooError


@dataclass(frozen=True)
class Layout:
    """``dp_replicate`` x ``dp_shard`` x ``ep`` ranks; ``fsdp`` False is DDP (or one process)."""

    world: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1
    fsdp: bool = False

    @classmethod
    def of(cls, world: int, dp_shard: int = 0, dp_replicate: int = 1, ep: int = 1) -> "Layout":
        """The layout that ``--dp-shard`` / ``--dp-replicate`` / ``--ep`` ask for on ``world`` ranks.

        All three at their defaults (0, 1, 1) is DDP. ``dp_shard`` 0 (or -1) with the others set takes
        the ranks the others leave."""
        for flag, value in (("--dp-replicate", dp_replicate), ("--ep", ep)):
            if value < 1:
                raise ZooError(f"{flag} must be at least 1, not {value}")
        if dp_shard in (0, -1) and dp_replicate == 1 and ep == 1:
            return cls(world=world, dp_replicate=world, fsdp=False)
        if world == 1 and (dp_replicate > 1 or ep > 1 or dp_shard > 1):
            raise ZooError(f"this is one process, but --dp-shard/--dp-replicate/--ep ask for {max(dp_shard, 1) * dp_replicate * ep}"
                           " ranks; start it with torchrun --nproc_per_node N -m zoo train ... (docs/distributed.md)")
        if dp_shard in (0, -1):
            if world % (dp_replicate * ep):
                raise ZooError(f"{world} ranks cannot be split into --dp-replicate {dp_replicate} x --ep {ep} groups")
            dp_shard = world // (dp_replicate * ep)
        if dp_shard < 1 or dp_replicate * dp_shard * ep != world:
            raise ZooError(f"--dp-replicate {dp_replicate} x --dp-shard {dp_shard} x --ep {ep} = "
                           f"{dp_replicate * dp_shard * ep} ranks, but torchrun started {world}; the product must equal "
                           "the number of processes (--nproc_per_node x --nnodes)")
        return cls(world=world, dp_replicate=dp_replicate, dp_shard=dp_shard, ep=ep, fsdp=True)

    def check_model(self, num_experts: Optional[int]) -> None:
        """Refuse an ``ep`` the model cannot be split by."""
        if self.ep > 1 and num_experts is None:
            raise ZooError(f"--ep {self.ep}: expert parallelism needs an MoE variant; this model is dense")
        if self.ep > 1 and num_experts % self.ep:
            raise ZooError(f"--ep {self.ep} must divide the number of experts ({num_experts})")

    def describe(self) -> str:
        if not self.fsdp:
            return "one process" if self.world == 1 else f"DDP over {self.world} ranks"
        parts = [f"FSDP2 over {self.dp_shard * self.ep} ranks"]
        if self.dp_replicate > 1:
            parts.append(f"replicated {self.dp_replicate}x (HSDP)")
        if self.ep > 1:
            parts.append(f"experts split over {self.ep} ranks and sharded over {self.dp_shard * self.dp_replicate}")
        return ", ".join(parts)


@dataclass
class Meshes:
    """The DeviceMeshes of an ``fsdp`` layout.

    ``root``: (dp_replicate, dp_shard, ep). ``dense``: (dp_replicate, dp_shard x ep), over which every
    weight but the experts' is sharded. ``experts``: (dp_replicate, dp_shard), over which each rank's
    experts are sharded. ``ep``: the ranks whose experts together make a whole layer."""

    layout: Layout
    device_type: str

    @cached_property
    def root(self) -> DeviceMesh:
        lay = self.layout
        return init_device_mesh(self.device_type, (lay.dp_replicate, lay.dp_shard, lay.ep),
                                mesh_dim_names=("dp_replicate", "dp_shard", "ep"))

    @cached_property
    def dense(self) -> DeviceMesh:
        lay = self.layout
        if lay.ep == 1:
            return self.root["dp_shard"] if lay.dp_replicate == 1 else self.root["dp_replicate", "dp_shard"]
        return init_device_mesh(self.device_type, (lay.dp_replicate, lay.dp_shard * lay.ep),
                                mesh_dim_names=("dp_replicate", "dp_shard_ep"))[
            "dp_shard_ep" if lay.dp_replicate == 1 else ("dp_replicate", "dp_shard_ep")]

    @cached_property
    def experts(self) -> DeviceMesh:
        return self.root["dp_shard"] if self.layout.dp_replicate == 1 else self.root["dp_replicate", "dp_shard"]

    @cached_property
    def ep(self) -> DeviceMesh:
        return self.root["ep"]


def device_for_rank() -> torch.device:
    """This rank's device: its GPU under torchrun where there are GPUs (LOCAL_RANK), else the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
