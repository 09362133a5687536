"""The HybridNorm study at CPU scale: norm placements side by side, dense and MoE, over seeds,
plus a depth stress test, written up as Markdown with plots.

Every run is a ``zoo train`` subprocess (the same command ``zoo compare`` uses) in its own folder
under ``out``; a finished run (``run.json`` present) is not trained again, so an interrupted study
continues where it stopped. ``jobs`` runs trainings side by side, each on ``cores // jobs``
threads. The report holds means and standard deviations over seeds, the per-layer FFN gradient
norms (as the paper's figure), the largest attention logits and the residual-stream RMS.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from ..api import get_config, list_models
from ..registry import REGISTRY
from ..train.trainer import TrainConfig
from .compare import read_run, train_command


def placements() -> dict[str, str]:
    """The placements registered variants offer the study, ``{norm strategy: label}`` in study order: those
    whose ``Variant.extra`` has a ``study`` position (plugins/variants.py sets them for the built-ins)."""
    found: dict[str, tuple[int, str]] = {}
    for name in list_models():
        extra = REGISTRY.get("variant", name).extra
        if "study" in extra:
            strategy = get_config(name).norm_strategy
            found.setdefault(strategy, (int(extra["study"]), str(extra.get("label", strategy))))
    return {s: label for s, (_, label) in sorted(found.items(), key=lambda item: item[1][0])}


def label(strategy: str) -> str:
    """A placement's name in reports: its variants' ``label``, else the strategy's registry name."""
    return placements().get(strategy, strategy)
DEPTH_SHAPE = ("n_layers=24", "d_model=64", "n_heads=2", "ffn.hidden_size=256")


@dataclass
class StudyConfig:
    """What the study trains. ``main`` is the tiny dense/MoE grid; ``depth`` the deep, narrow stress test."""

    strategies: tuple[str, ...] = field(default_factory=lambda: tuple(placements()))  # the first is the baseline
    kinds: tuple[str, ...] = ("dense", "moe")
    seeds: tuple[int, ...] = (0, 1, 2)
    main: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, eval_every=50, checkpoint_every=200))
    depth_seeds: tuple[int, ...] = (0, 1)
    depth_lrs: tuple[float, ...] = (1e-2,)  # each a group of its own; ``depth.lr`` is replaced by each
    depth_shape: tuple[str, ...] = DEPTH_SHAPE
    depth: Optional[TrainConfig] = field(default_factory=lambda: TrainConfig(steps=150, lr=1e-2, eval_every=50,
                                                                             checkpoint_every=150))


@dataclass
class Run:
    group: str            # "main", or "depth-lrLR" for the depth test at peak learning rate LR
    kind: str             # "dense" or "moe"
    strategy: str
    seed: int
    tc: TrainConfig
    overrides: tuple[str, ...] = ()

    @property
    def variant(self) -> str:
        return f"tiny-{self.kind}-{self.strategy}"

    @property
    def folder(self) -> str:
        return f"{self.group}/{self.kind}-{self.strategy}-s{self.seed}"


def depth_group(lr: float) -> str:
    return f"depth-lr{lr:g}"


def plan(sc: StudyConfig) -> list[Run]:
    runs = [Run("main", kind, s, seed, replace(sc.main, seed=seed))
            for seed in sc.seeds for kind in sc.kinds for s in sc.strategies]
    if sc.depth is not None:
        runs += [Run(depth_group(lr), "dense", s, seed, replace(sc.depth, seed=seed, lr=lr), tuple(sc.depth_shape))
                 for lr in sc.depth_lrs for seed in sc.depth_seeds for s in sc.strategies]
    return runs


def _execute(run: Run, out: Path, threads: int, quiet: bool) -> dict[str, Any]:
    folder = out / run.folder
    marker = folder / "run.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        recorded = asdict(TrainConfig(**done.get("train", {})))  # fields added since keep their defaults
        if recorded == asdict(run.tc) and done.get("overrides") == list(run.overrides):
            return read_run(run.variant, folder, done["returncode"])
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # a retrain stopped halfway must not leave the old run's marker on new metrics
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = folder / "train.log"
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(train_command(run.variant, run.tc, folder, list(run.overrides)), env=env,
                              stdout=subprocess.DEVNULL, stderr=err if quiet else None)
    result = read_run(run.variant, folder, proc.returncode, f"its log is {log}")
    marker.write_text(json.dumps({"returncode": proc.returncode, "train": asdict(run.tc), "overrides": list(run.overrides),
                                  "seconds": time.perf_counter() - t0, "threads": threads}, indent=2))
    return result


def run_study(sc: StudyConfig, out: Path, jobs: int = 1) -> list[tuple[Run, dict[str, Any]]]:
    """Train every run of the plan (skipping finished ones) and return each with its metrics."""
    runs = plan(sc)
    for run in runs:
        get_config(run.variant, list(run.overrides))  # fail fast on a bad strategy or shape
    threads = max(1, (os.cpu_count() or 1) // jobs)
    total = len(runs)
    results: dict[int, dict[str, Any]] = {}

    def one(i: int) -> None:
        run = runs[i]
        print(f"[{i + 1}/{total}] {run.group}: {run.variant} seed {run.seed} ({run.tc.steps} steps, lr {run.tc.lr:g})",
              file=sys.stderr, flush=True)
        results[i] = _execute(run, out, threads, quiet=jobs > 1)

    if jobs > 1:
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, range(total)))
    else:
        for i in range(total):
            one(i)
    return [(runs[i], results[i]) for i in range(total)]


def _steps(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in metrics if "loss" in r and "event" not in r]


def summarize(run: Run, result: dict[str, Any]) -> dict[str, Any]:
    """One run's numbers: final train/val loss, divergence, largest attention logit, last-layer RMS."""
    steps = _steps(result["metrics"])
    vals = [r["val_loss"] for r in steps if "val_loss" in r]
    last = steps[-1] if steps else {}
    tail = [r["loss"] for r in steps[-10:]]
    logits = [max(r["max_attn_logit"]) for r in steps if r.get("max_attn_logit")]
    late = layer_grad_norms(result["metrics"], 0.8, 1.0)
    return {
        "group": run.group, "kind": run.kind, "strategy": run.strategy, "seed": run.seed, "variant": run.variant,
        "steps": len(steps), "diverged": result["diverged"],
        "train_loss": sum(tail) / len(tail) if tail and not result["diverged"] else None,
        "val_loss": vals[-1] if vals and not result["diverged"] else None,
        "max_attn_logit": max(logits) if logits else None,
        "final_residual_rms": last.get("residual_rms", [None])[-1] if last.get("residual_rms") else None,
        "grad_spread": max(late) / min(late) if late and min(late) > 0 else None,
        "tokens_per_s": result["summary"].get("tokens_per_s"),
    }


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each (group, kind, strategy)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["group"], r["kind"], r["strategy"]), []).append(r)
    table = []
    for (group, kind, strategy), rs in groups.items():
        val, val_sd = _mean_std([r["val_loss"] for r in rs])
        tr, tr_sd = _mean_std([r["train_loss"] for r in rs])
        logit, _ = _mean_std([r["max_attn_logit"] for r in rs])
        rms, _ = _mean_std([r["final_residual_rms"] for r in rs])
        spread, _ = _mean_std([math.log10(r["grad_spread"]) for r in rs if r["grad_spread"]])
        table.append({"group": group, "kind": kind, "strategy": strategy, "variant": rs[0]["variant"],
                      "seeds": [r["seed"] for r in rs], "val_loss": val, "val_loss_std": val_sd, "train_loss": tr,
                      "train_loss_std": tr_sd, "diverged": sum(r["diverged"] for r in rs),
                      "max_attn_logit": logit, "final_residual_rms": rms,
                      "grad_spread_log10": spread,
                      "val_losses": [r["val_loss"] for r in rs]})
    return table


def layer_grad_norms(metrics: list[dict[str, Any]], start: float = 0.0, stop: float = 1.0) -> list[float]:
    """Per-layer FFN gradient norm averaged over the steps in the fraction [start, stop) of the run."""
    steps = [r for r in _steps(metrics) if r.get("ffn_grad_norms")]
    if not steps:
        return []
    window = steps[int(start * len(steps)):max(int(start * len(steps)) + 1, int(stop * len(steps)))]
    n = len(window[0]["ffn_grad_norms"])
    return [statistics.fmean(r["ffn_grad_norms"][i] for r in window if math.isfinite(r["ffn_grad_norms"][i]))
            for i in range(n)]
