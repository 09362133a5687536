"""The study's figures (PNG, matplotlib), drawn from run records: loss curves, per-layer FFN gradient
norms, attention logits, one stability heatmap per placement and the diagnostics of stalled runs."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Optional

from .analysis import STALL_MARGIN, Study, diagnostic_depth, verdict

Records = list[dict[str, Any]]


def _pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _mean(series: list[list[Optional[float]]]) -> list[float]:
    """Pointwise mean over runs of equal-length series (shortest length; missing points skipped)."""
    n = min(len(s) for s in series)
    out = []
    for i in range(n):
        finite = [s[i] for s in series if s[i] is not None and math.isfinite(s[i])]  # type: ignore[arg-type]
        out.append(statistics.fmean(finite) if finite else math.nan)
    return out


def _smooth(ys: list[float], window: int = 5) -> list[float]:
    """A trailing mean over ``window`` points: single-step losses are noisy at this batch size."""
    out = []
    for i in range(len(ys)):
        part = [y for y in ys[max(0, i - window + 1):i + 1] if math.isfinite(y)]
        out.append(statistics.fmean(part) if part else math.nan)
    return out


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _save(fig: Any, folder: Path, name: str) -> str:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(folder / name, dpi=100)
    plt.close(fig)
    return f"{folder.name}/{name}"


def _main_figures(study: Study, folder: Path, which: str, pick: Any) -> dict[str, str]:
    """Loss curves, per-layer FFN gradient norms and attention logits of the evaluation seeds;
    ``pick(kind, strategy)`` gives the records (by seed) and the rate."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    sc = study.sc
    kinds = list(sc.kinds)
    groups = {(k, s): pick(k, s) for k in kinds for s in sc.strategies}
    if not any(recs for recs, _ in groups.values()):
        return {}
    written = {}
    title = "shared rate" if which == "shared" else "each at its best rate"

    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.3), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for s in sc.strategies:
            recs, lr = groups[(kind, s)]
            if not recs:
                continue
            runs = [recs[k] for k in sorted(recs)]
            xs = runs[0]["curve"]["tokens"]
            line, = ax.plot(xs, _smooth(_mean([r["curve"]["loss"] for r in runs]))[:len(xs)], alpha=0.85,
                            label=f"{study.name(s)} lr {lr:g} (train)")
            vx = runs[0]["val"]["tokens"]
            if vx:
                ax.plot(vx, _mean([r["val"]["loss"] for r in runs])[:len(vx)], "o--", color=line.get_color(),
                        label=f"{study.name(s)} (val)")
        ax.set(title=f"{kind}, {title}: mean over seeds", xlabel="tokens",
               ylabel="loss (nats/byte; train: mean of 5 points)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.5))
        ax.grid(alpha=0.3)
        _legend(ax)
    written[f"loss_{which}"] = _save(fig, folder, f"loss_{which}.png")
    if which != "best":
        return written

    windows = (("first 20% of steps", "ffn_grad_first"), ("last 20% of steps", "ffn_grad_last"))
    fig, axes = plt.subplots(len(windows), len(kinds), figsize=(6.5 * len(kinds), 3.6 * len(windows)), squeeze=False)
    for row, (when, key) in enumerate(windows):
        for ax, kind in zip(axes[row], kinds):
            for s in sc.strategies:
                recs, _ = groups[(kind, s)]
                per_seed = [recs[k]["layers"][key] for k in sorted(recs) if recs[k]["layers"][key]]
                if per_seed:
                    ys = _mean(per_seed)
                    ax.plot(range(len(ys)), ys, "o-", ms=3, label=study.name(s))
            ax.set(title=f"{kind}: FFN gradient norm per layer, {when}", xlabel="layer", ylabel="‖∇W_FFN‖")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            _legend(ax)
    written["grad_best"] = _save(fig, folder, "grad_best.png")

    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.0), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for s in sc.strategies:
            recs, _ = groups[(kind, s)]
            runs = [recs[k] for k in sorted(recs)]
            if runs:
                xs = runs[0]["curve"]["tokens"]
                ax.plot(xs, _mean([r["curve"]["max_attn_logit"] for r in runs])[:len(xs)], label=study.name(s))
        ax.set(title=f"{kind}: largest attention logit (max over layers)", xlabel="tokens", ylabel="logit")
        ax.grid(alpha=0.3)
        _legend(ax)
    written["logit_best"] = _save(fig, folder, "logit_best.png")
    return written


def _heatmap(study: Study, folder: Path, strategy: str) -> Optional[str]:
    """Depth by peak rate, coloured by final validation loss, each cell marked with its verdict."""
    plt = _pyplot()
    sc = study.sc
    warmups = sc.map_warmups
    cells = {(w, d, lr): study.cell(strategy, d, lr, w) for w in warmups for d in sc.depths for lr in sc.map_lrs}
    if all(c is None for c in cells.values()):
        return None
    top = study.unigram + 0.5
    fig, axes = plt.subplots(1, len(warmups), figsize=(1.3 * len(sc.map_lrs) * len(warmups) + 2.2, 0.55 * len(sc.depths) + 1.6),
                             squeeze=False)
    cmap = plt.get_cmap("viridis_r").copy()
    cmap.set_bad("lightgray")
    image = None
    for ax, w in zip(axes[0], warmups):
        grid = [[math.nan] * len(sc.map_lrs) for _ in sc.depths]
        for i, d in enumerate(sc.depths):
            for j, lr in enumerate(sc.map_lrs):
                r = cells[(w, d, lr)]
                v = verdict(r, study.unigram)
                value = ""
                if v in ("trained", "stalled"):
                    grid[i][j] = min(r["final"]["val_loss"], top)  # type: ignore[index]
                    value = f"{r['final']['val_loss']:.2f}\n"  # type: ignore[index]
                text = {"trained": "", "stalled": "stalled", "diverged": "diverged", None: "not run"}[v]
                dark = not math.isnan(grid[i][j]) and grid[i][j] > (1.0 + top) / 2
                ax.text(j, i, f"{value}{text}".strip(), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
        image = ax.imshow(grid, cmap=cmap, vmin=1.0, vmax=top, aspect="auto")
        ax.set_xticks(range(len(sc.map_lrs)), [f"{lr:g}" for lr in sc.map_lrs])
        ax.set_yticks(range(len(sc.depths)), [str(d) for d in sc.depths])
        ax.set(xlabel="peak learning rate", ylabel="layers",
               title=f"{study.name(strategy)}" + (f", warmup {w}" if len(warmups) > 1 else ""))
    fig.colorbar(image, ax=axes[0].tolist(), label=f"final val loss (stalled: ≥ {study.unigram - STALL_MARGIN:.2f})")
    plt.setp(fig, facecolor="white")
    fig.savefig(folder / f"map_{strategy}.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f"{folder.name}/map_{strategy}.png"


def _diagnostics(study: Study, folder: Path, strategy: str, depth: int) -> Optional[str]:
    """The map runs of one placement at one depth: gradient norms, residual RMS and logits per layer."""
    plt = _pyplot()
    sc = study.sc
    w = sc.map_warmups[0]
    runs = [(lr, study.cell(strategy, depth, lr, w)) for lr in sc.map_lrs]
    runs = [(lr, r) for lr, r in runs if r is not None and verdict(r, study.unigram) != "diverged"]
    if not runs:
        return None
    panels = (("ffn_grad_first", "FFN gradient norm, first 20% of steps", True),
              ("residual_rms", "residual-stream RMS at the end", True),
              ("max_attn_logit", "largest attention logit", False))
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.0), squeeze=False)
    style = {"trained": "-", "stalled": "--"}
    colors = plt.get_cmap("plasma")
    for ax, (key, title, log) in zip(axes[0], panels):
        for n, (lr, r) in enumerate(runs):
            ys = r["layers"][key]
            if ys:
                v = verdict(r, study.unigram)
                ax.plot(range(len(ys)), ys, style[v], marker="o", ms=2, color=colors(n / max(1, len(runs))),  # type: ignore[index]
                        label=f"lr {lr:g} ({v})")
        ax.set(title=title, xlabel="layer")
        if log:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.suptitle(f"{study.name(strategy)}, {depth} layers: map runs by peak rate (dashed: stalled)")
    return _save(fig, folder, f"diagnostics_{strategy}.png")


def draw_all(study: Study, folder: Path) -> dict[str, str]:
    """Every figure the report shows; returns ``{key: path relative to the report}``."""
    folder.mkdir(parents=True, exist_ok=True)
    sc = study.sc
    written = _main_figures(study, folder, "shared",
                            lambda k, s: (study.evals(k, s, sc.shared_lr), sc.shared_lr))
    written.update(_main_figures(study, folder, "best", lambda k, s: (study.at_best(k, s), study.best[(k, s)])))
    for s in sc.strategies if sc.depths else ():
        heat = _heatmap(study, folder, s)
        if heat:
            written[f"map_{s}"] = heat
        depth = diagnostic_depth(study, s)
        if depth > 0:
            diag = _diagnostics(study, folder, s, depth)
            if diag:
                written[f"diagnostics_{s}"] = diag
    return written
