"""Side-by-side comparison: train each variant on the same data, seed and token budget, then
report a table (terminal, Markdown, JSON) and PNG plots of loss against tokens and wall time.

Each variant trains in its own process (``python -m zoo train``), one after another, so its
tokens/s and peak memory are its own.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from ..api import get_config, list_models, stats
from ..errors import ZooError
from ..registry import REGISTRY
from ..text import print_table as text_table
from ..train.trainer import DIVERGED_EXIT, TrainConfig
from .records import training_steps

COLUMNS = ("variant", "total_params", "active_params", "flops_per_token", "tokens_per_s", "peak_mem_mb",
           "train_loss", "val_loss", "diverged")


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_command(name: str, tc: TrainConfig, out: Path, overrides: list[str]) -> list[str]:
    """The ``zoo train`` command line that trains ``name`` with ``tc`` into ``out``."""
    cmd = [sys.executable, "-m", "zoo", "train", name, "--out", str(out), "--steps", str(tc.steps), "--batch-size",
           str(tc.batch_size), "--seq-len", str(tc.seq_len), "--lr", str(tc.lr), "--seed", str(tc.seed), "--data", tc.data,
           "--tokenizer", tc.tokenizer, "--eval-every", str(tc.eval_every), "--eval-batches", str(tc.eval_batches), "--checkpoint-every", str(tc.checkpoint_every),
           "--warmup", str(tc.warmup_steps)]
    if tc.compile:
        cmd.append("--compile")
    if tc.decay_norm_and_bias:
        cmd.append("--decay-norm-and-bias")
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def read_run(name: str, out: Path, returncode: int, where: str = "see its error above") -> dict[str, Any]:
    """A finished run's metrics and summary; exit 3 (divergence) is a result, other failures raise."""
    diverged = returncode == DIVERGED_EXIT
    if returncode not in (0, DIVERGED_EXIT):
        raise ZooError(f"training {name} failed (exit {returncode}); {where}")
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"metrics": _read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else [],
            "summary": summary, "diverged": diverged}


def default_names() -> list[str]:
    """What ``zoo compare`` trains when given no names: the variants whose ``Variant.extra`` has ``compare``
    (for the built-ins, the tiny dense and MoE HybridNorm and Pre-Norm)."""
    return [name for name in list_models() if REGISTRY.get("variant", name).extra.get("compare")]


def run_variant(name: str, tc: TrainConfig, out: Path, overrides: list[str]) -> dict[str, Any]:
    proc = subprocess.run(train_command(name, tc, out, overrides), stdout=subprocess.DEVNULL)  # progress and errors on our stderr
    return read_run(name, out, proc.returncode)


def compare(names: Optional[list[str]] = None, tc: Optional[TrainConfig] = None, out_dir: str = "runs/compare",
            overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Train every variant alike and write ``report.md``, ``report.json`` and the plots to ``out_dir``."""
    names = list(names or default_names())
    tc = tc or TrainConfig(steps=150, eval_every=50)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        get_config(name, overrides)  # fail fast on a bad name or override
    rows, curves = [], {}
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] training {name} for {tc.steps} steps ({tc.steps * tc.batch_size * tc.seq_len:,} tokens)",
              file=sys.stderr, flush=True)
        run = run_variant(name, tc, out / name, overrides or [])
        st = stats(name, overrides, seq_len=tc.seq_len)
        m = run["metrics"]
        train_losses = [r["loss"] for r in training_steps(m)]
        vals = [r["val_loss"] for r in m if "val_loss" in r]
        rows.append({
            "variant": name, "total_params": st.total_params, "active_params": st.active_params,
            "flops_per_token": st.flops_per_token, "tokens_per_s": run["summary"].get("tokens_per_s"),
            "peak_mem_mb": run["summary"].get("peak_rss_mb"),
            "train_loss": sum(train_losses[-10:]) / len(train_losses[-10:]) if train_losses else None,
            "val_loss": vals[-1] if vals else None, "diverged": run["diverged"],
        })
        curves[name] = m
    report = {"train": asdict(tc), "overrides": overrides or [], "rows": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_table(rows, tc))
    plot(curves, out)
    return report


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("total_params", "active_params", "flops_per_token"):
        return f"{value / 1e6:.2f}M"
    if isinstance(value, float):
        return f"{value:,.0f}" if key in ("tokens_per_s", "peak_mem_mb") else f"{value:.4f}"
    return "yes" if value is True else "no" if value is False else str(value)


def markdown_table(rows: list[dict[str, Any]], tc: TrainConfig) -> str:
    head = (f"Trained on `{tc.data}` for {tc.steps} steps x {tc.batch_size} x {tc.seq_len} tokens, seed {tc.seed}, "
            f"lr {tc.lr:g} (warmup {tc.warmup_steps}, cosine). train_loss: mean of the last 10 steps; "
            "val_loss: the last evaluation; loss in nats per byte.\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    return head + "\n".join(lines) + "\n\n![loss vs tokens](loss_vs_tokens.png)\n![loss vs wall time](loss_vs_time.png)\n"


def print_table(rows: list[dict[str, Any]]) -> None:
    text_table([{c: _fmt(c, r[c]) for c in COLUMNS} for r in rows], list(COLUMNS))


def plot(curves: dict[str, list[dict[str, Any]]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_key, fname, label in (("tokens", "loss_vs_tokens.png", "tokens"), ("wall", "loss_vs_time.png", "wall time (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, m in curves.items():
            steps = training_steps(m)
            if steps:
                line, = ax.plot([r[x_key] for r in steps], [r["loss"] for r in steps], label=f"{name} (train)", alpha=0.8)
                vals = [r for r in steps if "val_loss" in r]
                ax.plot([r[x_key] for r in vals], [r["val_loss"] for r in vals], "o--", color=line.get_color(),
                        label=f"{name} (val)")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/byte)")
        ax.set_title(f"loss vs {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
