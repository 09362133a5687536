"""The study's write-up, from its config and run records alone: the shared-rate and best-rate tables
with paired differences, the rate selection, the stability map, the diagnostics of stalled runs, how
the setup differs from the paper, and what the numbers say about the paper's claim.

The same records give the same bytes (numbers are formatted from rounded record values, and nothing
reads a clock or the data), which is what lets ``zoo study --report-only`` rebuild a committed report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..api import get_config, stats
from .analysis import (
    STALL_MARGIN,
    Study,
    compare_verdicts,
    diagnostic_depth,
    failed,
    highest_trained,
    over_seeds,
    paired,
    verdict,
)
from .plots import draw_all
from .study import selection_records, study_model

VERDICT_MARK = {"trained": "", "stalled": " (stalled)", "diverged": "diverged", None: "·"}


def _name(study: Study, strategy: str) -> str:
    """A placement's label as Markdown text (HybridNorm\\* keeps its star out of emphasis)."""
    return study.name(strategy).replace("*", "\\*")


def _f(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _lr(lr: Optional[float]) -> str:
    return "-" if lr is None else f"{lr:g}"


def _table(study: Study, rows: list[tuple[str, str, Optional[float], dict[int, dict[str, Any]]]],
           with_lr: bool) -> list[str]:
    head = "| model | norm |" + (" lr |" if with_lr else "") + " val (mean ± std) | val per seed | train | diverged " \
           "| logit | rms | spread |"
    if not any(recs for *_, recs in rows):
        return ["No evaluation run is recorded yet.", ""]
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for kind, strategy, lr, recs in rows:
        if not recs:
            continue
        t = over_seeds([recs[s] for s in sorted(recs)])
        lines.append(f"| {kind} | {_name(study, strategy)} |" + (f" {_lr(lr)} |" if with_lr else "")
                     + f" {_f(t['val'])} ± {_f(t['val_std'])} | {', '.join(_f(v) for v in t['vals'])} | "
                     f"{_f(t['train'])} | {t['diverged']}/{len(recs)} | {_f(t['logit'], 1)} | {_f(t['rms'], 2)} | "
                     f"{_f(t['spread'], 2)} |")
    return lines + [""]


def _paired_lines(study: Study, kind: str, pick: Any) -> list[str]:
    """``pick(kind, strategy)``: the records by seed to compare."""
    sc = study.sc
    base = sc.strategies[0]
    lines = []
    for s in sc.strategies[1:]:
        d = paired(pick(kind, s), pick(kind, base))
        if d is not None:
            lines.append(f"- {_name(study, s)}: {d['mean']:+.4f} ± {d['std']:.4f} nats/byte, better in {d['better']} of "
                         f"{d['n']} seeds")
    if not lines:
        return []
    return [f"Paired against {_name(study, base)} ({kind}, same seed; negative = lower loss than {_name(study, base)}):", "",
            *lines, ""]


def _sorted_rows(study: Study, lr_of: Any) -> list[tuple[str, str, Optional[float], dict[int, dict[str, Any]]]]:
    rows = []
    for kind in study.sc.kinds:
        kind_rows = []
        for s in study.sc.strategies:
            lr = lr_of(kind, s)
            recs = study.evals(kind, s, lr) if lr is not None else {}
            mean = over_seeds([recs[k] for k in sorted(recs)])["val"] if recs else None
            kind_rows.append((mean if mean is not None else float("inf"), (kind, s, lr, recs)))
        rows += [row for _, row in sorted(kind_rows, key=lambda item: item[0])]
    return rows


def baseline_model(study: Study, kind: str) -> tuple[Any, Any]:
    """The config and stats of the model the baseline placement trains as, for the setup table and the caveat."""
    config = get_config(study_model(kind, study.sc.strategies[0])[0])
    return config, stats(config, seq_len=study.sc.main.seq_len)


def differences(study: Study) -> list[str]:
    """The setup beside the paper's, row by row (the paper's side from its released configs)."""
    sc, m = study.sc, study.sc.main
    (dense, ds), (moe, ms) = baseline_model(study, "dense"), baseline_model(study, "moe")
    tokens = m.steps * m.batch_size * m.seq_len
    depths = ", ".join(map(str, sc.depths))
    rows = [
        ("Model (dense)", f"{dense.n_layers} layers, d_model {dense.d_model}, {ds.total_params / 1e6:.2f}M parameters",
         "16 layers, d_model 2048, about 1.2B parameters"),
        ("Model (MoE)", f"{moe.n_layers} layers, {moe.moe.num_experts} experts top-{moe.moe.top_k}, "
         f"{ms.total_params / 1e6:.2f}M total / {ms.active_params / 1e6:.2f}M active",
         "16 layers, 64 experts top-8, about 6.9B total / 1.3B active"),
        ("Depth", f"{dense.n_layers} layers" + (f"; the stability map {depths} at d_model "
                                                f"{dict(o.split('=') for o in sc.map_width).get('d_model', '?')}"
                                                if sc.depths else ""), "at most 16 layers"),
        ("Tokens per run", f"{tokens:,} ({m.steps} steps)", "1T (dense), 500B (MoE)"),
        ("Tokenizer", f"{m.tokenizer} ({dense.vocab_size} tokens)", "dolma2 (100,278) / GPT-NeoX (50,280)"),
        ("Batch", f"{m.batch_size} x {m.seq_len} = {m.batch_size * m.seq_len:,} tokens",
         "1024 x 4096 = 4.19M tokens"),
        ("Warmup", f"{m.warmup_steps} steps = {m.warmup_steps * m.batch_size * m.seq_len:,} tokens "
         f"({100 * m.warmup_steps / m.steps:.1f}% of the run)", "2000 / 2500 steps = 8.4B / 10.5B tokens (under 1%)"),
        ("Peak learning rate", f"shared {_lr(sc.shared_lr)}; per placement the best of {', '.join(map(_lr, sc.lrs))}",
         "3e-4 (dense), 4e-4 (MoE), one rate for every placement"),
        ("Schedule", f"cosine to {m.min_lr_ratio:g} x peak at the end of the run",
         "cosine to 0.1 x peak over 1T (dense, annealed) / 5T tokens (MoE, not annealed)"),
        ("Weight decay", f"{m.weight_decay:g}" + (", norm gains and biases too" if m.decay_norm_and_bias else
                                                   ", matrices only") + "; embedding not decayed",
         "0.1, norm gains and biases too; embedding not decayed (dense), decayed (MoE)"),
        ("Precision", m.precision or "the trainer's default (fp32 on CPU, bf16 on CUDA)", "bf16 autocast, norms in fp32"),
        ("Data", f"`{m.data}` ({study.data['train_tokens']:,} training tokens)",
         "OLMo-mix-1124 (dense), OLMoE-mix-0924 (MoE)"),
        ("Seeds", f"rate chosen on seed {sc.selection_seed}, reported on {', '.join(map(str, sc.seeds))}",
         "one run each"),
    ]
    rows = [row for row in rows if not (row[0] == "Model (MoE)" and "moe" not in sc.kinds)
            and not (row[0] == "Model (dense)" and "dense" not in sc.kinds)]
    return ["| | this study | the paper |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows], ""]


def _selection(study: Study) -> list[str]:
    sc = study.sc
    lines = ["| model | norm | " + " | ".join(_lr(lr) for lr in sc.lrs) + " | best |",
             "|" + "---|" * (len(sc.lrs) + 3)]
    edges = []
    for kind in sc.kinds:
        for s in sc.strategies:
            sel = selection_records(sc, study.records, kind, s)
            best = study.best[(kind, s)]
            cells = []
            for lr in sc.lrs:
                r = sel.get(lr)
                text = "·" if r is None else ("diverged" if failed(r) else _f(r["final"]["val_loss"]))
                cells.append(f"**{text}**" if lr == best else text)
            edge = best is not None and len(sc.lrs) > 1 and best in (min(sc.lrs), max(sc.lrs))
            if edge:
                edges.append(f"{_name(study, s)} ({kind}) at {_lr(best)}")
            lines.append(f"| {kind} | {_name(study, s)} | " + " | ".join(cells) + f" | {_lr(best)}{' (edge)' if edge else ''} |")
    lines.append("")
    if edges:
        lines += ["A best rate at the edge of the grid may not be the best rate: " + "; ".join(edges) +
                  ". Widen `--lrs` to settle it.", ""]
    return lines


def _map_tables(study: Study) -> list[str]:
    sc = study.sc
    lines = []
    for w in sc.map_warmups:
        for s in sc.strategies:
            lines += [f"**{_name(study, s)}**, warmup {w} steps (final validation loss; `stalled` within {STALL_MARGIN:g} "
                      "of the unigram entropy or above it):", "",
                      "| layers | " + " | ".join(f"lr {_lr(lr)}" for lr in sc.map_lrs) + " |",
                      "|" + "---|" * (len(sc.map_lrs) + 1)]
            for depth in sc.depths:
                cells = []
                for lr in sc.map_lrs:
                    r = study.cell(s, depth, lr, w)
                    v = verdict(r, study.unigram)
                    cells.append(VERDICT_MARK[v] if v in (None, "diverged") else
                                 f"{_f(r['final']['val_loss'], 3)}{VERDICT_MARK[v]}")  # type: ignore[index]
                lines.append(f"| {depth} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def _map_summary(study: Study) -> list[str]:
    sc = study.sc
    lines = []
    for w in sc.map_warmups:
        lines += [f"Highest peak rate that trained, by depth (warmup {w}; `none`: no rate of the grid did):", "",
                  "| norm | " + " | ".join(f"{d} layers" for d in sc.depths) + " |", "|" + "---|" * (len(sc.depths) + 1)]
        for s in sc.strategies:
            cells = []
            for d in sc.depths:
                cell = [study.cell(s, d, lr, w) for lr in sc.map_lrs]
                best = highest_trained(study, s, d, w)
                cells.append("·" if any(c is None for c in cell) else (_lr(best) if best is not None else "none"))
            lines.append(f"| {_name(study, s)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _diagnostics(study: Study, plots: dict[str, str]) -> list[str]:
    sc = study.sc
    lines = []
    for s in sc.strategies:
        key = f"diagnostics_{s}"
        if key not in plots:
            continue
        depth = diagnostic_depth(study, s)
        cells = [study.cell(s, depth, lr, sc.map_warmups[0]) for lr in sc.map_lrs]
        by = compare_verdicts([c for c in cells if c is not None], study.unigram)
        lines += [f"**{_name(study, s)}** at {depth} layers:", ""]
        for v, n in by.items():
            lines.append(f"- {v} ({n['runs']:.0f} run{'s' * (n['runs'] != 1)}): FFN gradient-norm spread over layers in the first 20% of "
                         f"steps {_f(n['spread_first'], 2)} (log10 of largest/smallest), last-layer residual RMS "
                         f"{_f(n['rms_last_layer'], 2)}, largest attention logit {_f(n['logit'], 1)}")
        lines += ["", f"![{key}]({plots[key]})", ""]
    return lines


def _claim(study: Study) -> list[str]:
    """What the numbers say about the paper's claim, sentence by sentence from the tables."""
    sc = study.sc
    base = sc.strategies[0]
    claimed = [s for s in sc.strategies[1:] if study.claims.get(s) == "lower loss"]
    lines = ["The paper (Zhuo et al. 2025) reports, at 1.2B dense and 1B-active / 7B MoE on up to 1T tokens, "
             f"{' and '.join(_name(study, s) for s in claimed) or 'its placements'} below {_name(study, base)} in training and "
             f"validation loss, with more even per-layer gradient norms, in models of at most 16 layers.", ""]
    for s in claimed:
        for kind in sc.kinds:
            parts = []
            for what, pick in (("at the shared rate", lambda k, x: study.evals(k, x, sc.shared_lr)),
                               ("each at its best rate", study.at_best)):
                d = paired(pick(kind, s), pick(kind, base))
                if d is None:
                    continue
                if d["mean"] < 0 and d["better"] == d["n"]:
                    word = "agrees"
                elif d["mean"] > 0 and d["better"] == 0:
                    word = "disagrees"
                else:
                    word = "is inconclusive"
                parts.append(f"{what} {word} ({d['mean']:+.4f} ± {d['std']:.4f}, lower in {d['better']} of "
                             f"{d['n']} seeds)")
            if parts:
                lines.append(f"- {_name(study, s)} vs {_name(study, base)}, {kind}: " + "; ".join(parts) + ".")
            mine, theirs = study.at_best(kind, s), study.at_best(kind, base)
            if mine and theirs:
                a = over_seeds([mine[k] for k in sorted(mine)])["spread"]
                b = over_seeds([theirs[k] for k in sorted(theirs)])["spread"]
                if a is not None and b is not None:
                    lines.append(f"- Per-layer FFN gradient norms, {kind}, at the best rates: spread {a:.2f} for "
                                 f"{_name(study, s)} against {b:.2f} for {_name(study, base)} (log10 of largest/smallest "
                                 f"in the last 20% of steps), {'more' if a < b else 'less'} even, which "
                                 f"{'agrees' if a < b else 'disagrees'} with the paper's figure.")
    w = sc.map_warmups[0]
    complete = [d for d in sc.depths if all(study.cell(s, d, lr, w) is not None
                                            for s in sc.strategies for lr in sc.map_lrs)]
    for s in sc.strategies[1:]:
        narrower = [d for d in complete
                    if (hb := highest_trained(study, base, d, w)) is not None
                    and ((hs := highest_trained(study, s, d, w)) is None or hs < hb)]
        wider = [d for d in complete
                 if (hs := highest_trained(study, s, d, w)) is not None
                 and ((hb := highest_trained(study, base, d, w)) is None or hs > hb)]
        if narrower or wider:
            text = f"- Stability map, {_name(study, s)} vs {_name(study, base)}: "
            text += "; ".join(p for p in (
                f"a lower highest trainable rate at {', '.join(map(str, narrower))} layers" if narrower else "",
                f"a higher one at {', '.join(map(str, wider))} layers" if wider else "") if p) + "."
            lines.append(text)
    m = sc.main
    params = baseline_model(study, "dense")[1].total_params
    lines += ["", f"Scale caveat: these are models of {params / 1e6:.1f}M parameters trained on "
              f"{m.steps * m.batch_size * m.seq_len:,} {m.tokenizer} tokens of `{m.data}` in {m.steps} steps, against "
              "the paper's billions of parameters and up to a trillion tokens. A sign that differs from the paper's "
              "says the claim does not carry down to this scale and budget; it does not say the paper is wrong at "
              "its own.", ""]
    return lines


def markdown(study: Study, plots: dict[str, str], report: str, records: str) -> str:
    """The report; ``report`` and ``records`` are how it names itself and its records in its commands."""
    sc, m = study.sc, study.sc.main
    where = f"--report {report}" + (f" --records {records}" if records else "")
    recorded = sum(run.key in study.records for run in study.planned)
    lines = [
        "# The HybridNorm study at CPU scale",
        "",
        f"Generated by `zoo study` from its run records (`{records or Path(report).stem}/runs/`, one JSON file per "
        "run); every number below comes from them. Rebuild this file from the records with "
        f"`zoo study {where} --report-only`; continue the study, on this machine or another, with "
        f"`zoo study {where} --jobs 2` (a run with a record is not trained again).",
        "",
        f"Runs recorded: {recorded} of {len(study.planned)}"
        + ("" if recorded == len(study.planned) else " (the rest are still to train; tables show `·` for them)")
        + f". Training took {study.hours():.1f} core-hours, {study.hours() / 2:.1f} hours on 2 cores.",
        "",
        f"Loss is in nats per byte. `val` is the final evaluation on {m.eval_batches} fixed validation batches, "
        "`train` the mean of the last 10 steps. `logit` is the largest pre-softmax attention logit seen during "
        "training (max over layers, mean over seeds); `rms` the last block's output RMS at the final step; "
        "`spread` is log10 of the largest over the smallest per-layer FFN gradient norm in the last 20% of steps "
        "(0 = equal across layers; the paper's figure in one number). A diverged run (the trainer's divergence "
        "stop or a non-finite loss) has no loss.",
        "",
        "## Setup, and how it differs from the paper",
        "",
        *differences(study),
        f"The unigram entropy of the training split is {study.unigram:.4f} nats per byte: a model that learned "
        f"byte frequencies and nothing else ends there. A run whose final validation loss is within {STALL_MARGIN:g} "
        "of it (or above) has **stalled**.",
        "",
        f"## All placements at the shared rate ({_lr(sc.shared_lr)})",
        "",
        f"Seeds {', '.join(map(str, sc.seeds))}; {m.steps * m.batch_size * m.seq_len:,} tokens a run.",
        "",
        *_table(study, _sorted_rows(study, lambda k, s: sc.shared_lr), with_lr=False),
    ]
    for kind in sc.kinds:
        lines += _paired_lines(study, kind, lambda k, s: study.evals(k, s, sc.shared_lr))
    lines += [f"![loss_shared]({plots['loss_shared']})", ""] if "loss_shared" in plots else []
    lines += ["## Choosing each placement's rate", "",
              f"Final validation loss on the selection seed ({sc.selection_seed}) at each peak rate; the lowest "
              "(bold) is the placement's best rate. The evaluation seeds play no part in the choice.", "",
              *_selection(study),
              "## Each placement at its own best rate", "",
              f"Seeds {', '.join(map(str, sc.seeds))}, each placement and kind at the rate chosen above.", "",
              *_table(study, _sorted_rows(study, lambda k, s: study.best[(k, s)]), with_lr=True)]
    for kind in sc.kinds:
        lines += _paired_lines(study, kind, study.at_best)
    for key in ("loss_best", "grad_best", "logit_best"):
        lines += [f"![{key}]({plots[key]})", ""] if key in plots else []
    if sc.depths:
        mw = " ".join(sc.map_width)
        lines += ["## Stability map: depth by peak learning rate", "",
                  f"Dense models at `{mw}` and each depth, {sc.map.steps} steps ({sc.map.steps * sc.map.batch_size * sc.map.seq_len:,} "
                  f"tokens), seed {sc.map_seed}, one run per cell.", "",
                  *_map_summary(study)]
        for s in sc.strategies:
            lines += [f"![map_{s}]({plots[f'map_{s}']})", ""] if f"map_{s}" in plots else []
        lines += _map_tables(study)
        diag = _diagnostics(study, plots)
        if diag:
            lines += ["## Diagnostics: what a stalled run looks like", "",
                      "For each placement with a stalled cell, its map runs at one depth (the shallowest with both "
                      "stalled and trained runs, else the deepest stall), one line per rate: per-layer FFN gradient "
                      "norms in the first 20% of steps (as the paper's figure), the residual-stream RMS per layer at "
                      "the end, and the largest attention logit per layer.", "", *diag]
    lines += ["## What this says about the paper's claim", "", *_claim(study)]
    return "\n".join(lines)


def card_results(study: Study, report: str) -> dict[str, dict[str, Any]]:
    """Each placement's best-rate numbers, in the keys model cards read."""
    sc, m = study.sc, study.sc.main
    out = {}
    for kind in sc.kinds:
        for s in sc.strategies:
            recs = study.at_best(kind, s)
            lr = study.best[(kind, s)]
            variant, overrides = study_model(kind, s)
            if not recs or overrides:
                continue
            t = over_seeds([recs[k] for k in sorted(recs)])
            if t["val"] is None:
                continue
            recipe = (f"`zoo study`: {m.steps} steps x {m.batch_size} x {m.seq_len} byte tokens of `{m.data}`, AdamW "
                      f"peak lr {_lr(lr)} (the best of {', '.join(map(_lr, sc.lrs))} on seed {sc.selection_seed}; "
                      f"warmup {m.warmup_steps}, cosine), seeds {', '.join(map(str, sorted(recs)))}; see {report}")
            out[variant] = {"val_loss": round(t["val"], 4), "val_loss_std": round(t["val_std"], 4),
                            "val_loss_per_seed": [None if v is None else round(v, 4) for v in t["vals"]],
                            "train_loss": None if t["train"] is None else round(t["train"], 4),
                            "diverged_seeds": t["diverged"], "tokens": m.steps * m.batch_size * m.seq_len,
                            "lr": lr, "dataset": "python-stdlib", "recipe": recipe}
    return out


def write_card_results(results: dict[str, dict[str, Any]], cards_dir: Path) -> list[Path]:
    """Merge into ``cards_dir/results/NAME.json``, keeping keys other tools wrote (e.g. ``eval``)."""
    written = []
    for name, values in results.items():
        path = cards_dir / "results" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**existing, **values}, indent=2) + "\n")
        written.append(path)
    return written


def write_report(study: Study, report: Path, cards_dir: Optional[Path], shown_as: str,
                 records_shown: str = "") -> list[Path]:
    """Write ``report`` (Markdown) with its plots in the folder of the same stem beside it, and the cards'
    results; ``shown_as`` and ``records_shown`` (empty: the report's folder) are how the report names itself
    and its records in its commands."""
    report.parent.mkdir(parents=True, exist_ok=True)
    plots = draw_all(study, report.parent / report.stem)
    report.write_text(markdown(study, plots, shown_as, records_shown) + "\n")
    if cards_dir is None:
        return []
    return write_card_results(card_results(study, shown_as), cards_dir)
