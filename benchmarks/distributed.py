"""Scale-out on this machine: tokens/s and per-rank memory at 1, 2 and 4 gloo ranks, for a tiny dense
variant (FSDP2 over N ranks) and a tiny MoE variant (expert parallel over N ranks), the same global
batch everywhere (strong scaling), and the share of each MoE step spent in the all-to-all exchange.

    python benchmarks/distributed.py [--steps 6] [--out benchmarks/results/distributed.json]

Each layout runs under torchrun (``--worker`` is that process's side). On a 2-core machine 4 ranks
oversubscribe the cores: the figures say what the code costs here, not what a cluster gives.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

RUNS = [("tiny-dense-hybridnorm", "dp_shard"), ("tiny-moe-hybridnorm", "ep")]
WORLDS = (1, 2, 4)


def worker(name: str, split: str, steps: int, batch: int, seq: int, out: Path) -> None:
    """One rank's side: train ``steps`` steps of ``name`` on its part of the batch; rank 0 writes the record."""
    from zoo.api import get_config
    from zoo.distributed import expert_parallel
    from zoo.distributed.layout import Layout
    from zoo.distributed.memory import rank_bytes
    from zoo.distributed.parallelize import parallelize
    from zoo.distributed.world import close_process_group, init_distributed, rank_and_world
    from zoo.train.optim import make_optimizer
    from zoo.train.trainer import TrainConfig

    init_distributed()
    rank, world = rank_and_world()
    layout = Layout.of(world, **({split: world} if world > 1 else {}))
    spent = {"a2a": 0.0}
    exchange = expert_parallel.exchange

    def timed_exchange(*args: Any) -> torch.Tensor:
        t = time.perf_counter()
        try:
            return exchange(*args)
        finally:
            spent["a2a"] += time.perf_counter() - t

    expert_parallel.exchange = timed_exchange
    torch.manual_seed(0)
    model = parallelize(get_config(name), layout, device=torch.device("cpu")).model
    opt = make_optimizer(model, TrainConfig())
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (batch, seq + 1), generator=gen)[rank::world]
    times, a2a = [], []
    for step in range(steps + 1):
        spent["a2a"] = 0.0
        if world > 1:
            dist.barrier()
        t = time.perf_counter()
        output = model(idx[:, :-1], idx[:, 1:])
        (output.loss + (output.aux_loss if output.aux_loss is not None else 0)).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if step:  # the first step allocates
            times.append(time.perf_counter() - t)
            a2a.append(spent["a2a"])
    memory = rank_bytes(model, opt)
    record = {"variant": name, "ranks": world, "layout": layout.describe(), "step_s": sorted(times)[len(times) // 2],
              "a2a_share": sum(a2a) / sum(times), "rank_bytes": memory,
              "state_mb": (memory["params"] + memory["grads"] + memory["optimizer"]) / 2**20}
    record["tokens_per_s"] = batch * seq / record["step_s"]
    gathered = [None] * world if world > 1 else [record]
    if world > 1:
        dist.all_gather_object(gathered, record)
    if rank == 0:
        record["state_mb_max_rank"] = max(r["state_mb"] for r in gathered)
        out.write_text(json.dumps(record))
    close_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distributed.json")
    parser.add_argument("--worker", nargs=3, metavar=("NAME", "SPLIT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, split, out = args.worker
        worker(name, split, args.steps, args.batch, args.seq, Path(out))
        return
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, split in RUNS:
            for world in WORLDS:
                out = Path(tmp) / f"{name}-{world}.json"
                me = [str(Path(__file__).resolve()), "--steps", str(args.steps), "--batch", str(args.batch), "--seq",
                      str(args.seq), "--worker", name, split, str(out)]
                cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), *me]
                       if world > 1 else [sys.executable, *me])
                r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if r.returncode:
                    sys.exit(f"{name} at {world} rank(s) failed:\n{r.stderr[-3000:]}")
                rows.append(json.loads(out.read_text()))
                print(f"{name:<24} {world} rank(s): {rows[-1]['tokens_per_s']:>9,.0f} tokens/s, "
                      f"{rows[-1]['state_mb_max_rank']:>7.1f} MB weights+grads+AdamW on the largest rank, "
                      f"all-to-all {100 * rows[-1]['a2a_share']:.1f}% of the step ({rows[-1]['layout']})")
    for row in rows:
        base = next(r for r in rows if r["variant"] == row["variant"] and r["ranks"] == 1)
        row["tokens_per_s_vs_1_rank"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["state_vs_1_rank"] = row["state_mb_max_rank"] / base["state_mb_max_rank"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
                                    "global_batch": [args.batch, args.seq], "steps": args.steps, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
