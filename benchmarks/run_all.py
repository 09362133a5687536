"""Every benchmark in one command, then the performance goals checked against what this run measured.

    python benchmarks/run_all.py                 # 3-10 minutes on 2 cores (the faster on AVX-512); JSON in benchmarks/results/
    python benchmarks/run_all.py --quick         # small sizes, one repeat: checks that everything runs

Each benchmark runs in its own process (so one's memory and threads do not colour the next) and
writes its JSON; the summary reads those files back and prints each goal with PASS or FAIL.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def goals(train: dict[str, Any], io: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """(goal, measured, how it is read, met) for each acceptance figure of the performance issue."""
    out = []
    need = {"olmoe": 1.2, "mixtral": 1.0, "llama": 1.0}
    for row in train.get("vs_hf", []):
        target = need[row["model"]]
        out.append((f"{row['model']} {row['dtype']} training step vs HF >= {target}x", row["speedup_vs_hf"], "x",
                    row["speedup_vs_hf"] >= target))
        if row["dtype"] == "fp32":
            out.append((f"{row['model']} fp32 first-step loss |zoo - HF| <= 1e-4", row["first_step_loss_diff"], "",
                        row["first_step_loss_diff"] <= 1e-4))
    for row in train.get("mfu", []):
        if row["dtype"] == "fp32":
            out.append((f"~30M dense fp32 training-step MFU >= 65% (seq {row['seq']}, {row.get('mode', 'eager')}, "
                        f"{row.get('allocator', 'default')} allocator)",
                        100 * row["mfu"], "%",
                        row["mfu"] >= 0.65))
    for key, label, limit in (("load_vs_read", "zoo.load / reading the file's bytes <= 1.5", 1.5),
                              ("load_vs_torch_load", "zoo.load / torch.load < 1", 1.0),
                              ("pull_vs_copy", "pull from zoo serve / file copy <= 2", 2.0)):
        if key in io.get("ratios", {}):
            value = io["ratios"][key]
            out.append((label, value, "x", value <= limit if limit != 1.0 else value < limit))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat (for tests)")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON results")
    parser.add_argument("--compile", action="store_true", help="also measure the MFU model under torch.compile")
    parser.add_argument("--summary-only", action="store_true", help="run nothing: check the goals against the JSON "
                        "already in --out (e.g. after rerunning one benchmark by hand)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick_train = ["--repeats", "1", "--batch", "1", "--seq", "32", "--mfu-batch", "1", "--mfu-seq", "64"]
    runs = [
        ("train_step.py", ["--json", str(out / "train_step.json")] + (quick_train if args.quick else [])
         + (["--compile"] if args.compile else [])),
        ("checkpoint_io.py", ["--out", str(out / "checkpoint_io.json")] + (["--quick"] if args.quick else [])),
    ]
    for script, extra in [] if args.summary_only else runs:
        print(f"\n=== {script} {' '.join(extra)}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / script), *extra])
        if proc.returncode != 0:
            print(f"{script} failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
    train = json.loads((out / "train_step.json").read_text())
    io = json.loads((out / "checkpoint_io.json").read_text())
    rows = goals(train, io)
    print("\n=== goals (" + ("from the JSON in " + str(out) if args.summary_only else "measured in this run") + ")")
    for label, value, unit, met in rows:
        print(f"{'PASS' if met else 'FAIL'}  {label}: {value:.3g}{unit}")
    (out / "summary.json").write_text(json.dumps([{"goal": g, "measured": v, "unit": u, "met": m} for g, v, u, m in rows],
                                                 indent=2))
    print(f"\n{sum(m for *_, m in rows)} of {len(rows)} goals met; JSON in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
