"""Compact run records: what the study keeps of each training run, small enough to commit.

A record holds the run's settings, how it ended, its final numbers, the per-layer diagnostics the
report draws (FFN gradient norms early and late, the residual-stream RMS at the end, the largest
attention logit per layer) and its loss curves subsampled. The report reads records only, so a folder
of records rebuilds the report byte for byte on any machine, and a study that stopped continues from
them without retraining what they hold. Floats keep 6 significant digits.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional

from ..errors import ZooError
from ..files import strict_json, write_text

FORMAT = 1
CURVE_POINTS = 60
STUDY_FILE = "study.json"
RUNS_DIR = "runs"


def _round(x: Any) -> Optional[float]:
    """A finite float to 6 significant digits, else None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None


def _rounded(values: list[Any]) -> list[Optional[float]]:
    return [_round(v) for v in values]


def training_steps(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step records of a metrics.jsonl (not events)."""
    return [r for r in metrics if "loss" in r and "event" not in r]


def window_mean(steps: list[dict[str, Any]], key: str, start: float, stop: float) -> list[float]:
    """Per-layer mean of ``key`` over the steps in the fraction [start, stop) of the run (at least one step)."""
    steps = [r for r in steps if r.get(key)]
    if not steps:
        return []
    first = int(start * len(steps))
    window = steps[first:max(first + 1, int(stop * len(steps)))]
    n = len(window[0][key])
    out = []
    for i in range(n):
        finite = [r[key][i] for r in window if r[key][i] is not None and math.isfinite(r[key][i])]
        out.append(statistics.fmean(finite) if finite else math.nan)
    return out


def _subsample(n: int, points: int) -> list[int]:
    if n <= points:
        return list(range(n))
    return sorted({round(i * (n - 1) / (points - 1)) for i in range(points)})


def compact(run: dict[str, Any], metrics: list[dict[str, Any]], summary: dict[str, Any], diverged: bool,
            seconds: float, threads: int) -> dict[str, Any]:
    """The record of one finished run: ``run`` (its identity and settings) and what its metrics say."""
    steps = training_steps(metrics)
    vals = [r for r in steps if "val_loss" in r]
    losses = [r["loss"] for r in steps]
    nonfinite = any(not math.isfinite(v) for v in losses + [r["val_loss"] for r in vals])
    failed = diverged or nonfinite
    tail = losses[-10:]
    per_layer_logit = [max(col) for col in zip(*(r["max_attn_logit"] for r in steps if r.get("max_attn_logit")))]
    idx = _subsample(len(steps), CURVE_POINTS)
    return {
        "format": FORMAT,
        "run": run,
        "ended": {"diverged": diverged, "nonfinite": nonfinite, "steps": len(steps), "seconds": _round(seconds),
                  "threads": threads, "tokens_per_s": _round(summary.get("tokens_per_s"))},
        "final": {"val_loss": None if failed or not vals else _round(vals[-1]["val_loss"]),
                  "train_loss": None if failed or not tail else _round(statistics.fmean(tail))},
        "layers": {"ffn_grad_first": _rounded(window_mean(steps, "ffn_grad_norms", 0.0, 0.2)),
                   "ffn_grad_last": _rounded(window_mean(steps, "ffn_grad_norms", 0.8, 1.0)),
                   "residual_rms": _rounded(steps[-1].get("residual_rms") or []) if steps else [],
                   "max_attn_logit": _rounded(per_layer_logit)},
        "curve": {"tokens": [steps[i]["tokens"] for i in idx], "loss": _rounded([losses[i] for i in idx]),
                  "max_attn_logit": _rounded([max(steps[i]["max_attn_logit"]) if steps[i].get("max_attn_logit")
                                              else None for i in idx])},
        "val": {"tokens": [r["tokens"] for r in vals], "loss": _rounded([r["val_loss"] for r in vals])},
    }


def _write(path: Path, data: dict[str, Any]) -> None:
    write_text(path, strict_json(data, indent=1, sort_keys=True) + "\n")


def record_path(folder: Path, key: str) -> Path:
    return folder / RUNS_DIR / f"{key}.json"


def write_record(folder: Path, key: str, record: dict[str, Any]) -> None:
    _write(record_path(folder, key), record)


def read_record(folder: Path, key: str) -> Optional[dict[str, Any]]:
    """The record of run ``key`` in ``folder``, or None if there is none (or it is of another format)."""
    path = record_path(folder, key)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ZooError(f"{path}: not a study record ({e}); delete it to retrain that run") from None
    return record if record.get("format") == FORMAT else None


def read_study(folder: Path) -> Optional[dict[str, Any]]:
    path = folder / STUDY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_study(folder: Path, data: dict[str, Any]) -> None:
    _write(folder / STUDY_FILE, data)
