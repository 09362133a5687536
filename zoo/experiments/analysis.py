"""The study's numbers, from its records alone: means over seeds, paired differences against the
baseline, the stability map's verdicts and what separates a stalled run from a trained one. ``Study``
indexes the records the way the report and the plots read them."""
from __future__ import annotations

import math
import statistics
from typing import Any, Optional

from .study import StudyConfig, best_lrs, claims, eval_runs, map_runs, placements, plan

STALL_MARGIN = 0.1  # nats: a final validation loss this close to the unigram entropy has learned frequencies only


def failed(record: dict[str, Any]) -> bool:
    """Diverged: the trainer's divergence stop or a non-finite loss."""
    return bool(record["ended"]["diverged"] or record["ended"]["nonfinite"])


def grad_spread(record: dict[str, Any], window: str = "ffn_grad_last") -> Optional[float]:
    """log10 of the largest over the smallest per-layer FFN gradient norm (0: equal), in the last 20% of
    steps or, with ``window="ffn_grad_first"``, the first 20%."""
    norms = [g for g in record["layers"][window] if g is not None]
    return math.log10(max(norms) / min(norms)) if norms and min(norms) > 0 else None


def numbers(record: dict[str, Any]) -> dict[str, Optional[float]]:
    """One run in the report's columns."""
    rms = record["layers"]["residual_rms"]
    logits = [v for v in record["layers"]["max_attn_logit"] if v is not None]
    return {"val": record["final"]["val_loss"], "train": record["final"]["train_loss"],
            "logit": max(logits) if logits else None, "rms": rms[-1] if rms else None, "spread": grad_spread(record)}


def mean_std(values: list[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def over_seeds(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over the seeds of one (kind, placement, rate)."""
    rows = [numbers(r) for r in records]
    out: dict[str, Any] = {"seeds": [r["run"]["seed"] for r in records], "vals": [n["val"] for n in rows],
                           "diverged": sum(failed(r) for r in records)}
    for key in ("val", "train", "logit", "rms", "spread"):
        out[key], out[f"{key}_std"] = mean_std([n[key] for n in rows])
    return out


def paired(records: dict[int, dict[str, Any]], baseline: dict[int, dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Validation loss minus the baseline's at the same seed: mean, std, and the seeds where it is lower."""
    diffs = [records[s]["final"]["val_loss"] - baseline[s]["final"]["val_loss"] for s in sorted(records)
             if s in baseline and records[s]["final"]["val_loss"] is not None
             and baseline[s]["final"]["val_loss"] is not None]
    if not diffs:
        return None
    return {"mean": statistics.fmean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "better": sum(d < 0 for d in diffs), "n": len(diffs)}


def verdict(record: Optional[dict[str, Any]], unigram: float) -> Optional[str]:
    """``trained``, ``stalled`` (within STALL_MARGIN of the unigram entropy, or above it), ``diverged``;
    None while the run has no record."""
    if record is None:
        return None
    if failed(record) or record["final"]["val_loss"] is None:
        return "diverged"
    return "stalled" if record["final"]["val_loss"] >= unigram - STALL_MARGIN else "trained"


def compare_verdicts(records: list[dict[str, Any]], unigram: float) -> dict[str, dict[str, Optional[float]]]:
    """Mean diagnostics of the stalled and the trained runs among ``records`` (e.g. one depth's map cells)."""
    out = {}
    for v in ("trained", "stalled"):
        group = [r for r in records if verdict(r, unigram) == v]
        if group:
            out[v] = {"runs": float(len(group)),
                      "spread_first": mean_std([grad_spread(r, "ffn_grad_first") for r in group])[0],
                      "rms_last_layer": mean_std([r["layers"]["residual_rms"][-1] for r in group
                                                  if r["layers"]["residual_rms"]])[0],
                      "logit": mean_std([numbers(r)["logit"] for r in group])[0]}
    return out


class Study:
    """The config, the data facts and the records of one study, indexed the way the report reads them."""

    def __init__(self, sc: StudyConfig, data: dict[str, Any], records: dict[str, dict[str, Any]]) -> None:
        self.sc, self.data, self.records = sc, data, records
        self.best = best_lrs(sc, records)
        self.planned = plan(sc, records)
        self.unigram = float(data["unigram_entropy"])
        self.labels, self.claims = placements(), claims()
        self.cells = {(run.strategy, run.depth, run.tc.lr, run.tc.warmup_steps): run.key for run in map_runs(sc)}

    def name(self, strategy: str) -> str:
        """A placement's name in the report: its variants' ``label``, else its registry name."""
        return self.labels.get(strategy, strategy)

    def evals(self, kind: str, strategy: str, lr: Optional[float]) -> dict[int, dict[str, Any]]:
        """The evaluation seeds' records of one (kind, placement) at ``lr``, by seed."""
        runs = eval_runs(self.sc, lambda k, s: lr if (k, s) == (kind, strategy) else None)
        return {run.seed: self.records[run.key] for run in runs if run.key in self.records}

    def at_best(self, kind: str, strategy: str) -> dict[int, dict[str, Any]]:
        lr = self.best[(kind, strategy)]
        return self.evals(kind, strategy, lr) if lr is not None else {}

    def cell(self, strategy: str, depth: int, lr: float, warmup: int) -> Optional[dict[str, Any]]:
        """The record of one map cell (None while it has none)."""
        key = self.cells.get((strategy, depth, lr, warmup))
        return self.records.get(key) if key else None

    def hours(self) -> float:
        """Core-hours the recorded runs took: each run's wall time times its threads."""
        return sum((r["ended"]["seconds"] or 0) * r["ended"]["threads"] for r in self.records.values()) / 3600


def highest_trained(study: Study, strategy: str, depth: int, warmup: int) -> Optional[float]:
    """The highest rate of the map at which ``strategy`` trained at ``depth`` (None: none did, or a cell of
    the row is still to train)."""
    if any(study.cell(strategy, depth, lr, warmup) is None for lr in study.sc.map_lrs):
        return None
    ok = [lr for lr in study.sc.map_lrs if verdict(study.cell(strategy, depth, lr, warmup), study.unigram) == "trained"]
    return max(ok) if ok else None


def diagnostic_depth(study: Study, strategy: str) -> int:
    """The depth whose map cells show both a stalled and a trained run (the shallowest such), else the
    deepest with a stall; the diagnostics compare runs there."""
    sc = study.sc
    w = sc.map_warmups[0]
    stalled_at = []
    for d in sc.depths:
        verdicts = {verdict(study.cell(strategy, d, lr, w), study.unigram) for lr in sc.map_lrs}
        if "stalled" in verdicts and "trained" in verdicts:
            return d
        if "stalled" in verdicts:
            stalled_at.append(d)
    return stalled_at[-1] if stalled_at else -1
