"""The processes behind the kit's isolated checks: ``python -m zoo.testing.worker MODE SPEC``.

``save_load`` runs in one fresh interpreter: it loads each checkpoint the parent saved and writes the
logits it gets. ``ddp`` and ``fsdp`` run under torchrun on 2 ranks (gloo): each rank takes half of a
fixed batch through the model built for that layout, and rank 0 compares the gradients with a single
process on the whole batch. SPEC is a JSON file: the subjects, the runtime plugins to register (module
names) and the folder to work in; results go to ``FOLDER/MODE.json``.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..builder import build_model
from ..checkpoint import load
from ..distributed.layout import Layout
from ..distributed.parallelize import parallelize
from ..registry import REGISTRY
from .checks import config, tokens
from .subjects import Subject

PAIRS = 2  # rows per rank


def _register(spec: dict[str, Any]) -> None:
    for name, module in spec["runtime_plugins"]:
        REGISTRY.register_plugin(importlib.import_module(module), name)


def _subjects(spec: dict[str, Any]) -> list[tuple[Any, str]]:
    return [(Subject(s["kind"], s["name"], tuple(s["overrides"])), model) for s in spec["subjects"]
            for model in s["models"]]


def save_load(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    results = {}
    for key in spec["checkpoints"]:
        try:
            model = load(folder / f"{key}.safetensors").eval()
            idx = load_file(folder / f"{key}.input.safetensors")["idx"]
            with torch.no_grad():
                save_file({"logits": model(idx).logits.contiguous()}, folder / f"{key}.child.safetensors")
            results[key] = {"status": "passed", "message": ""}
        except Exception as e:
            results[key] = {"status": "failed", "message": f"zoo.load in a fresh process: {type(e).__name__}: {e}"}
    return results


def distributed(spec: dict[str, Any], folder: Path, mode: str) -> dict[str, Any]:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for subject, model in _subjects(spec):
        key = f"{subject.id}/{model}"
        try:
            cfg = config(subject, model)
            if cfg.is_moe and not REGISTRY.get("router", cfg.moe.router).causal:
                results[key] = {"status": "not applicable", "message": f"router {cfg.moe.router!r} is not causal: "
                                "a rank's routes depend on its own micro-batch, so no layout equals one process"}
                continue
            idx = tokens(cfg, (PAIRS * world, 17))
            torch.manual_seed(0)
            layout = Layout.of(world, dp_shard=world if mode == "fsdp" else 0)
            par = parallelize(cfg, layout, device=torch.device("cpu"), precision="fp64")
            par.model.eval()
            mine = idx[rank::world]
            par.forward(mine[:, :-1], mine[:, 1:]).loss.backward()
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                     for n, p in par.model.named_parameters() if p.grad is not None}
            if rank == 0:  # one process, built as zoo.build does
                torch.manual_seed(0)
                ref = build_model(cfg, dtype=torch.float64).eval()
                ordered = torch.cat([idx[r::world] for r in range(world)])
                ref(ordered[:, :-1], ordered[:, 1:]).loss.backward()
                want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
                missing = sorted(set(want) ^ set(grads))
                worst = max(((float((grads[n] - want[n]).abs().max()) / (1.0 + float(want[n].abs().max())), n)
                             for n in want if n in grads), default=(0.0, ""))
                if missing:
                    results[key] = {"status": "failed", "message": f"under {mode} on {world} ranks, gradients of "
                                    f"{', '.join(missing[:4])} exist in one of {mode} and one process only"}
                elif worst[0] > 1e-7:
                    results[key] = {"status": "failed", "message": f"under {mode} on {world} ranks the gradient of "
                                    f"{worst[1]} differs from one process on the whole batch (relative {worst[0]:.3g})"}
                else:
                    results[key] = {"status": "passed", "message": ""}
        except Exception as e:
            results[key] = {"status": "failed", "message": f"under {mode} on rank {rank}: {type(e).__name__}: {e}"}
        par = grads = None  # freed after destroy_process_group, a DDP model can hang its rank in its destructor
        dist.barrier()
    dist.destroy_process_group()
    return results if rank == 0 else {}


def main(argv: list[str]) -> int:
    mode, spec_path = argv
    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["folder"])
    try:
        _register(spec)
        if mode == "save_load":
            torch.set_num_threads(spec["threads"])
            results = save_load(spec, folder)
        else:
            results = distributed(spec, folder, mode)
    except Exception:
        traceback.print_exc()
        return 1
    if results:
        (folder / f"{mode}.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the results are on disk; gloo's threads need no orderly interpreter shutdown
