"""What a rank holds, measured from the storage of its tensors: weights, gradients, optimizer state."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors`` (a DTensor's local part), each storage once: FSDP2's
    gradients, for example, are views of one buffer."""
    storages: dict[int, int] = {}
    for t in tensors:
        s = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def rank_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's ``params``, ``grads``, ``optimizer`` state and ``expert_params`` (those under ``.experts.``)."""
    params = dict(model.named_parameters())
    return {
        "params": storage_bytes(params.values()),
        "grads": storage_bytes(p.grad for p in params.values() if p.grad is not None),
        "optimizer": storage_bytes(v for s in opt.state.values() for v in s.values()
                                   if isinstance(v, torch.Tensor) and v.dim() > 0),
        "expert_params": storage_bytes(p for n, p in params.items() if ".experts." in n),
    }


def allocation_peak(run: Callable[[], Any]) -> tuple[Any, int]:
    """``run()``'s result and the most bytes it held allocated at once through torch's CPU allocator, net
    of what it freed (torch.profiler's memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    live = peak = 0
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return result, peak
