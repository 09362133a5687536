"""Two installs of the zoo, training-step time side by side: a paired A/B of a change.

Each install (a Python interpreter whose environment has it, e.g. a venv of the commit before a change
and one of the commit after) runs every model in a process of its own: the same seed, config and batch,
fused AdamW as ``zoo train`` uses, freed memory retained as ``zoo train`` does on CPU. The parent steps
the processes round-robin, a turn of a few steps each per round, and reports for every model the
median over rounds of ``new / old`` (each turn's median step) with its quartiles, and both first-step
losses, which must be equal for a change that keeps behaviour.

    python benchmarks/ab_versions.py --old /path/to/old-venv/bin/python            # new: this Python
    python benchmarks/ab_versions.py --old OLD --new NEW --models tiny-dense-hybridnorm --rounds 21
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import paired_ratio

# the study's shapes, and the ~30M dense model of the MFU measurement (train_step.py's MFU_MODEL)
MODELS = {
    "tiny-dense-hybridnorm": ("tiny-dense-hybridnorm", [], 8, 256),
    "tiny-moe-hybridnorm": ("tiny-moe-hybridnorm", [], 8, 256),
    "mfu-dense-31m": ("tiny-dense-prenorm", ["d_model=512", "n_layers=8", "n_heads=8", "vocab_size=8192",
                                             "max_seq_len=512", "ffn.hidden_size=1536"], 4, 512),
}

WORKER = r'''
import json, statistics, sys, time
import torch
try:
    from zoo.train.malloc import retain_freed_memory
except ImportError:  # the zoo before the layout by concern
    from zoo.malloc import retain_freed_memory
retain_freed_memory()
import zoo
name, overrides, batch, seq = json.loads(sys.argv[1])
torch.manual_seed(0)
model = zoo.build(name, overrides).train()
vocab = model.cfg.vocab_size
tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
x, y = tokens[:, :-1], tokens[:, 1:]
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

def step():
    out = model(x, targets=y)
    loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    zoo.moe.after_optimizer_step(model)
    return out.loss

first = float(step().detach())
print(json.dumps({"first_loss": first, "version": zoo.__version__}), flush=True)
for line in sys.stdin:
    n = int(line)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(json.dumps({"median": statistics.median(times)}), flush=True)
'''


class Worker:
    """One model in one install, in a process of its own, stepped on request."""

    def __init__(self, python: str, spec: tuple[str, list[str], int, int]):
        self.process = subprocess.Popen([python, "-c", WORKER, json.dumps(spec)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd="/")
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"a worker exited (code {self.process.wait()}); see its error above")
        return json.loads(line)

    def steps(self, n: int) -> float:
        self.process.stdin.write(f"{n}\n")
        self.process.stdin.flush()
        return self._read()["median"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def run(old: str, new: str, models: list[str], rounds: int, turn: int) -> list[dict[str, Any]]:
    rows = []
    for key in models:
        workers = {"old": Worker(old, MODELS[key]), "new": Worker(new, MODELS[key])}
        try:
            for w in workers.values():
                w.steps(turn)  # warm up
            times: dict[str, list[float]] = {"old": [], "new": []}
            for r in range(rounds):
                for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    times[side].append(workers[side].steps(turn))
        finally:
            for w in workers.values():
                w.close()
        ratio = paired_ratio(times["new"], times["old"])  # new / old: above 1 is slower
        row = {"model": key, "old_ms": 1e3 * statistics.median(times["old"]), "new_ms": 1e3 * statistics.median(times["new"]),
               "new_over_old": ratio, "first_loss_old": workers["old"].hello["first_loss"],
               "first_loss_new": workers["new"].hello["first_loss"]}
        rows.append(row)
        print(f"{key:22s} old {row['old_ms']:8.1f} ms  new {row['new_ms']:8.1f} ms  new/old {ratio['median']:.3f} "
              f"(quartiles {ratio['q1']:.3f}-{ratio['q3']:.3f})  first loss old {row['first_loss_old']!r} "
              f"new {row['first_loss_new']!r}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the Python of the install before the change")
    parser.add_argument("--new", default=sys.executable, help="the Python of the install after it (default: this one)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=15, help="rounds of turns (default 15)")
    parser.add_argument("--turn", type=int, default=3, help="steps per turn (default 3)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ab_versions.json")
    args = parser.parse_args(argv)
    rows = run(args.old, args.new, args.models, args.rounds, args.turn)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"old": args.old, "new": args.new, "rounds": args.rounds, "turn": args.turn,
                                    "rows": rows}, indent=2) + "\n")
    same = all(r["first_loss_old"] == r["first_loss_new"] for r in rows)
    print(f"first-step losses {'identical' if same else 'DIFFER'}; results in {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
