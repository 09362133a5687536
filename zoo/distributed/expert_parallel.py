"""Expert parallelism: each rank of an ``ep`` group holds ``E / ep`` experts of every MoE layer.

A layer's tokens go to the ranks that hold their experts and come back, as torchtitan and Megatron
dispatch them:

1. sort the (token, expert) assignments by expert, as on one process (zoo/moe/dispatch.py);
2. exchange the counts (one ``all_to_all_single`` of E integers), so each rank knows how many rows
   every other rank sends to each of its experts;
3. send the rows (``all_to_all_single`` with those split sizes, differentiable), regroup them by
   local expert and run the local experts on the layer's expert backend (loop, grouped_mm, fused or
   megablocks: the same code as on one process);
4. send the outputs back the same way and sum them per token with the gate weights.

The expert weights stay ``experts.mlp.{w1,v1,w2}`` of global shape ``(E*F, H)``: each is a DTensor
sharded by rows (whole experts) over the ep mesh, so checkpoints and ``zoo export`` see one tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..kernels.moe_glu import gate_and_sum
from ..moe.dispatch import sort_by_expert
from ..moe.experts import GLU, Experts, ExpertWeights, resolve_backend
from ..moe.router import Routing


class ParallelExperts(Experts):
    """A layer's experts split over the ranks of ``mesh`` (1-D): same ``mlp`` weights, same backends,
    same ``init_weights`` (zoo.distributed's init runs it on the gathered weights)."""

    def __init__(self, experts: Experts, mesh: DeviceMesh):
        nn.Module.__init__(self)  # takes over ``experts``' weights rather than making new ones
        self.backend, self.mlp = experts.backend, experts.mlp
        self.group, self.size = mesh.get_group(), mesh.size()
        for name in ("w1", "v1", "w2"):
            w = getattr(self.mlp, name)
            rows = w.shape[0] // self.size
            local = torch.empty(rows, *w.shape[1:], dtype=w.dtype, device=w.device)
            setattr(self.mlp, name, nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False)))

    def local_views(self) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's experts as ``(E / ep, F, H)`` tensors."""
        mlp: ExpertWeights = self.mlp
        shape = (mlp.num_experts // self.size, mlp.ffn, mlp.hidden)
        return tuple(w.to_local().view(shape) if isinstance(w, DTensor) else w.view(shape)  # type: ignore[return-value]
                     for w in (mlp.w1, mlp.v1, mlp.w2))

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        E, ep = self.mlp.num_experts, self.size
        local_E = E // ep
        d = sort_by_expert(routing, E)
        counts = d.counts_E
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(ep, local_E)  # rows that each rank sends to each of this rank's experts
        send_sizes = counts.view(ep, local_E).sum(1).tolist()
        recv_sizes = received.sum(1).tolist()
        rows = exchange(x.index_select(0, d.token_N), recv_sizes, send_sizes, self.group)
        order = by_local_expert(received)
        y_local = self._run_local(rows.index_select(0, order), received.sum(0))
        y_rows = torch.zeros_like(y_local).index_copy(0, order, y_local)
        y_N = exchange(y_rows, send_sizes, recv_sizes, self.group)
        return gate_and_sum(x, d.token_N, d.weight_N, y_N)

    def _run_local(self, rows: Tensor, counts: Tensor) -> Tensor:
        """The local experts' GLU of ``rows`` sorted by local expert (``counts`` each), ungated."""
        w1, v1, w2 = (w.to(rows.dtype) for w in self.local_views())  # weights FSDP does not cast (see fsdp.py)
        n = rows.shape[0]
        if n == 0:  # no rank sent this one a token; its experts still get (zero) gradients
            return rows + 0 * (w1.sum() + v1.sum() + w2.sum())
        backend = resolve_backend(self.backend, rows, self.mlp.hidden, self.mlp.ffn, n / w1.shape[0])
        index = torch.arange(n, device=rows.device)
        return GLU[backend](rows, index, torch.ones(n, dtype=rows.dtype, device=rows.device), counts, w1, v1, w2)


def exchange(rows: Tensor, recv_sizes: list[int], send_sizes: list[int], group: dist.ProcessGroup) -> Tensor:
    """``all_to_all_single`` of rows with split sizes, differentiable (its backward sends the gradients back)."""
    out = all_to_all_single_autograd(rows, recv_sizes, send_sizes, group)
    return torch.ops._c10d_functional.wait_tensor(out) if hasattr(out, "elem") else out


def by_local_expert(received: Tensor) -> Tensor:
    """The permutation that takes rows grouped by (source rank, local expert), as ``all_to_all`` delivers
    them, to rows grouped by (local expert, source rank); ``received`` is (ep, local experts)."""
    ep, local_E = received.shape
    starts = (received.reshape(-1).cumsum(0) - received.reshape(-1)).view(ep, local_E)
    pieces = [torch.arange(int(starts[s, e]), int(starts[s, e] + received[s, e]), device=received.device)
              for e in range(local_E) for s in range(ep)]
    return torch.cat(pieces) if pieces else received.new_zeros(0)


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> int:
    """Replace every MoE layer's ``experts`` by ``ParallelExperts`` over ``mesh``; returns how many."""
    count = 0
    for module in list(model.modules()):
        experts = getattr(module, "experts", None)
        if isinstance(experts, Experts) and not isinstance(experts, ParallelExperts):
            module.experts = ParallelExperts(experts, mesh)
            count += 1
    return count
