"""Run under torchrun (2 ranks): ParallelExperts against one process's Experts, in float64, on a batch
routed so that rank 1's experts get no tokens. Exits nonzero on a mismatch."""
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from zoo.distributed.expert_parallel import ParallelExperts
from zoo.distributed.world import close_process_group
from zoo.moe.experts import Experts
from zoo.moe.router import Routing

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
E, H, F, T, k = 4, 8, 16, 6, 2
torch.manual_seed(0)
whole = Experts(E, H, F, "loop").double()
for w in (whole.mlp.w1, whole.mlp.v1, whole.mlp.w2):
    torch.nn.init.normal_(w, std=0.2)
x_all = torch.randn(world, T, H, dtype=torch.float64)
expert = torch.randint(0, E // world, (world, T * k))  # every token to the first rank's experts only
weight = torch.rand(world, T * k, dtype=torch.float64)


def routing(r: int) -> Routing:
    token = torch.arange(T).repeat_interleave(k)
    return Routing(token, expert[r], weight[r], torch.zeros(T, E), torch.zeros(T, E), torch.bincount(expert[r], minlength=E), k)


reference = sum(whole(x_all[r], routing(r)).square().sum() for r in range(world))
reference.backward()

mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
local = Experts(E, H, F, "loop").double()
parallel = ParallelExperts(local, mesh)
rows = E * F // world
with torch.no_grad():
    for name in ("w1", "v1", "w2"):
        getattr(parallel.mlp, name).to_local().copy_(getattr(whole.mlp, name)[rank * rows:(rank + 1) * rows])
y = parallel(x_all[rank], routing(rank))
y.square().sum().backward()
errors = [float((y - whole(x_all[rank], routing(rank))).abs().max())]
for name in ("w1", "v1", "w2"):
    grad = getattr(parallel.mlp, name).grad.to_local()
    errors.append(float((grad - getattr(whole.mlp, name).grad[rank * rows:(rank + 1) * rows]).abs().max()))
print(f"rank {rank}: max errors {errors}", flush=True)
close_process_group()
sys.exit(0 if max(errors) < 1e-12 else 1)
