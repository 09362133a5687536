"""The ``zoo`` command. Each subcommand is a function ``cmd_<name>(args)``; errors print one line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import ZooError
from .text import human, print_table

EPILOG = """examples:
  zoo compare                                tiny dense and MoE HybridNorm vs Pre-Norm, trained side by side
  zoo study --report docs/results.md --cards model_cards   the HybridNorm study (placements x rates x seeds, a depth map)
  zoo train tiny-moe-hybridnorm --steps 300  train one variant (metrics in runs/NAME/metrics.jsonl)
  zoo list 'tiny-*'                          tiny variants with their parameter counts
  zoo info olmo2-1b-hybridnorm               config, total/active params, FLOPs per token
  zoo info tiny-dense-prenorm --set n_layers=8 --set norm_strategy=mixln
  zoo generate tiny-dense-hybridnorm --pretrained --prompt 'def '   stream a continuation (KV cache)
  zoo plugins --json                         what each plugin registered, and any that failed
  zoo check attention:mla --fast             run the plugin conformance kit on a registered name
  zoo convert --from-hf ./Mixtral-dir --to zoo-mixtral   import a transformers checkpoint (zoo convert --help)
  zoo card tiny-moe-hybridnorm               the model card (YAML front matter + Markdown)
  zoo card --check                           are model_cards/ up to date with the configs?
  zoo eval tiny-dense-hybridnorm --pretrained  loss, perplexity, bits per byte on held-out stdlib source

Plugins load from the 'zoo' entry-point group; ZOO_PLUGINS / ZOO_DISABLE_PLUGINS take
comma-separated patterns of plugin names to allow / block (ZOO_DISABLE_PLUGINS=broken-plugin).
JSON output keys are documented in docs/cli.md."""


def cmd_list(args: argparse.Namespace) -> int:
    import fnmatch

    from .api import get_config, list_models, stats
    from .registry import REGISTRY
    for name, owners in sorted(REGISTRY.conflicting("variant").items()):
        if fnmatch.fnmatchcase(name, args.pattern):
            warnings.warn(f"variant {name!r} is left out: plugins {' and '.join(map(repr, owners))} both register it "
                          f"(see `zoo plugins`; disable one, e.g. ZOO_DISABLE_PLUGINS={owners[-1]})")
    rows = []
    for name in list_models(args.pattern):
        cfg = get_config(name)
        st = stats(cfg, flops=False)
        rows.append({"name": name, "norm_strategy": cfg.norm_strategy, "ffn": cfg.ffn.type,
                     "total_params": st.total_params, "active_params": st.active_params})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no variant matches {args.pattern!r}; try `zoo list`", file=sys.stderr)
        return 1
    else:
        print_table([{**r, "total_params": human(r["total_params"]), "active_params": human(r["active_params"])} for r in rows],
                    ["name", "norm_strategy", "ffn", "total_params", "active_params"])
    return 0


def _list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern over names, e.g. 'tiny-moe-*' (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def cmd_info(args: argparse.Namespace) -> int:
    from .api import get_config, stats
    cfg = get_config(args.name, args.set or None)
    st = stats(cfg, seq_len=args.seq_len)
    if args.json:
        print(json.dumps({"name": args.name, "config": cfg.to_dict(), **st.to_dict()}, indent=2))
        return 0
    print(f"# {args.name}\n{cfg.to_yaml()}")
    print(f"parameters: {st.total_params:,} total ({human(st.total_params)}), {st.active_params:,} active ({human(st.active_params)})")
    print(f"FLOPs per token at seq {st.seq_len}: {st.flops_per_token:,} forward ({human(st.flops_per_token)}), "
          f"{human(st.train_flops_per_token)} per token per training step")
    if st.kv_cache_bytes_per_token is None:
        print(f"KV cache: none (attention {cfg.attention.type!r} does not support cached generation)")
    else:
        print(f"KV cache per token: {st.kv_cache_bytes_per_token:,} bytes at fp32, {st.kv_cache_bytes_per_token_bf16:,} "
              f"at bf16 ({cfg.n_layers} layers of attention {cfg.attention.type!r}, as it reports what it caches)")
    return 0


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="variant name (see `zoo list`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, repeatable: --set moe.num_experts=16")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: the config's max_seq_len)")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import REGISTRY
    records = [r.to_dict() for r in REGISTRY.plugins()]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for r in records:
        status = "" if r["status"] == "ok" else f"  [{r['status']}{': ' + r['error'] if r['error'] else ''}]"
        if r["status"] == "ok" and r["conflicts"]:
            status = f"  [conflict: {len(r['conflicts'])} name{'s' if len(r['conflicts']) > 1 else ''} unusable]"
        print(f"{r['name']}  ({r['source']}){status}")
        for kind, names in r["registered"].items():
            print(f"    {kind}: {', '.join(names)}")
        for conflict in r["conflicts"]:
            print(f"    conflict: {conflict}; unusable until one of them is disabled (ZOO_DISABLE_PLUGINS)")
    return 0


def _plugins_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_check(args: argparse.Namespace) -> int:
    from .testing import CHECKS, FAST, print_outcomes, run_checks

    checks = args.check or (FAST if args.fast else CHECKS)

    def progress(o: Any) -> None:
        if not args.json and sys.stderr.isatty():
            print(f"zoo check: {o.subject} {o.check}: {o.status}", file=sys.stderr)

    outcomes = run_checks(args.names, checks, overrides=args.set or (), progress=progress)
    failed = [o for o in outcomes if o.status == "failed"]
    if args.json:
        print(json.dumps([o.to_dict() for o in outcomes], indent=2))
    else:
        print_outcomes(outcomes)
        passed = sum(o.status == "passed" for o in outcomes)
        print(f"{passed} passed, {len(failed)} failed, {len(outcomes) - passed - len(failed)} not applicable")
    return 1 if failed else 0


def _check_arguments(p: argparse.ArgumentParser) -> None:
    from .testing import CHECKS, SLOW
    p.add_argument("names", nargs="+", metavar="[KIND:]NAME", help="registered names to check; KIND (norm-strategy, "
                   "norm-layer, attention, router, variant) where a name exists in two kinds, e.g. attention:mla")
    p.add_argument("--fast", action="store_true", help=f"skip the checks that start other processes or compile "
                   f"({', '.join(SLOW)})")
    p.add_argument("--check", action="append", choices=CHECKS, metavar="ID", help=f"run only this check, repeatable; "
                   f"the checks: {', '.join(CHECKS)}")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every model the checks "
                   "build, repeatable (e.g. --set moe.top_k=1 for a top-1 router)")
    p.add_argument("--json", action="store_true", help="print a JSON list of outcomes")


def cmd_card(args: argparse.Namespace) -> int:
    from .api import list_models
    from .cards import check_cards, load_results, render_card
    cards_dir = Path(args.dir)
    names = list_models() if args.all or args.check else [args.name] if args.name else []
    if not names:
        print("zoo: error: give a variant NAME, or --all, or --check", file=sys.stderr)
        return 2
    if args.check:
        stale = check_cards(cards_dir, names)
        for name in stale:
            print(f"stale or missing: {cards_dir / (name + '.md')}", file=sys.stderr)
        if stale:
            print(f"zoo: error: {len(stale)} of {len(names)} cards are out of date with their configs; "
                  f"regenerate them with `zoo card --all --write --dir {cards_dir}`", file=sys.stderr)
            return 1
        print(f"all {len(names)} cards in {cards_dir} match their configs")
        return 0
    for name in names:
        text = render_card(name, results=load_results(name, cards_dir))
        if args.write:
            cards_dir.mkdir(parents=True, exist_ok=True)
            (cards_dir / f"{name}.md").write_text(text)
            print(f"wrote {cards_dir / (name + '.md')}")
        else:
            sys.stdout.write(text)
    return 0


def _card_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="variant name; prints its card")
    p.add_argument("--all", action="store_true", help="every variant")
    p.add_argument("--write", action="store_true", help="write DIR/NAME.md instead of printing")
    p.add_argument("--check", action="store_true", help="fail (exit 1) if any card in DIR differs from a fresh render")
    p.add_argument("--dir", default="model_cards", help="cards folder; results are read from DIR/results/NAME.json (default: model_cards)")


def _train_config(args: argparse.Namespace, base: Any = None) -> Any:
    """``base`` (default: the defaults) with the training options given on the command line."""
    from .train.trainer import TrainConfig
    tc = base if base is not None else TrainConfig()
    for key in ("steps", "batch_size", "seq_len", "lr", "seed", "data", "tokenizer", "eval_every", "checkpoint_every", "compile",
                "decay_norm_and_bias", "eval_batches", "precision", "grad_accum", "dp_shard", "dp_replicate", "ep", "ac", "dist_timeout"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(tc, key, value)
    if getattr(args, "warmup", None) is not None:
        tc.warmup_steps = args.warmup
    return tc


def _run_to_train(args: argparse.Namespace) -> tuple[Any, Path, Optional[str]]:
    """What ``zoo train SOURCE`` trains: (variant name or config, run folder, variant name)."""
    from .checkpoint import checkpoint_config
    from .files import CHECKPOINT_DIR
    from .sources import resolve_source
    source = resolve_source(args.source)
    if source.kind == "variant":
        return source.text, Path(args.out or f"runs/{source.text}"), source.text
    run = source.run
    if run is None and source.checkpoint is not None and source.checkpoint.parent.name == CHECKPOINT_DIR:
        run = source.checkpoint.parent.parent  # the checkpoint of a run folder: that run
    if run is None or not args.resume:
        raise ZooError(f"{args.source} is a {'run folder' if run else 'checkpoint'}: zoo train starts a variant NAME, "
                       "or continues a run folder with --resume")
    if args.out is not None and Path(args.out).resolve() != run.resolve():
        raise ZooError(f"--out {args.out} differs from the run folder {run}; a run continues in its own folder")
    return checkpoint_config(source.checkpoint)[0], run, source.variant


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed.world import close_process_group, init_distributed
    from .train.trainer import DIVERGED_EXIT, TRAIN_CONFIG_NAME, DivergenceError, TrainConfig, train
    model, out, variant = _run_to_train(args)
    base = TrainConfig.of_run(out) if args.resume and (out / TRAIN_CONFIG_NAME).exists() else None
    tc = _train_config(args, base)
    joined = init_distributed(tc.dist_timeout)
    finished = False
    try:
        result = train(model, args.set or None, tc, out_dir=out, resume=args.resume, variant=variant)
        finished = True
    except DivergenceError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        return DIVERGED_EXIT
    finally:
        if joined and finished:
            close_process_group()  # waits for every rank: only when none failed
        elif joined:
            import torch.distributed as dist
            dist.destroy_process_group()
    val = f", validation loss {result.final_val_loss:.4f}" if result.final_val_loss is not None else ""
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(f"trained {variant or args.source} for {result.steps} steps: train loss {result.final_train_loss:.4f}{val}, "
          f"{result.tokens_per_s:,.0f} tokens/s; metrics in {result.metrics}, checkpoint in {out}/checkpoint/")
    return 0


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="NAME|RUN", help="a variant name (see `zoo list`), or with --resume the RUN folder "
                   "to continue (or its checkpoint)")
    _add_train_options(p)
    _add_parallel_options(p)
    p.add_argument("--out", default=None, help="run folder (default: runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (or RUN) exactly where it stopped, "
                   "with the settings it was started with; options given here replace them (--steps to go on longer)")


def cmd_compare(args: argparse.Namespace) -> int:
    from .experiments.compare import compare, print_table
    from .train.trainer import TrainConfig
    tc = _train_config(args, TrainConfig(steps=150, eval_every=50))
    report = compare(args.names or None, tc, args.out, args.set)
    print_table(report["rows"])
    print(f"\nreport: {args.out}/report.md, {args.out}/report.json; plots: {args.out}/loss_vs_tokens.png, "
          f"{args.out}/loss_vs_time.png")
    return 0


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="variants (default: those the registered variants mark for comparison, for "
                   "the built-ins tiny dense and MoE HybridNorm and their Pre-Norm baselines)")
    _add_train_options(p)
    p.add_argument("--out", default="runs/compare", help="report folder (default: runs/compare)")


def cmd_study(args: argparse.Namespace) -> int:
    from .experiments.analysis import Study
    from .experiments.records import read_study
    from .experiments.report import write_report
    from .experiments.study import StudyConfig, configure, data_facts, recorded, run_study
    report = Path(args.report) if args.report else Path(args.out) / "results.md"
    records_dir = Path(args.records) if args.records else report.parent / report.stem
    saved = read_study(records_dir)
    sc = configure(StudyConfig.from_json(saved["config"]) if saved else StudyConfig(),
                   strategies=args.strategies, kinds=args.kinds, lrs=args.lrs, seeds=args.seeds,
                   depths=[] if args.no_map else args.depths, map_lrs=args.map_lrs, warmups=args.warmups,
                   shared_lr=args.shared_lr, selection_seed=args.selection_seed, map_seed=args.map_seed,
                   steps=args.steps, map_steps=args.map_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                   data=args.data, decay_norm_and_bias=False if args.no_decay_norm_and_bias else None)
    sc.check()
    if args.jobs < 1:
        raise ZooError(f"--jobs must be at least 1, not {args.jobs}")
    shown = args.report or str(report)
    if args.report_only:
        if saved is None:
            raise ZooError(f"{records_dir}: no study records here ({records_dir / 'study.json'} is missing); run "
                           f"`zoo study --report {shown}` first, or name the records with --records")
        records = recorded(sc, records_dir)
        data = saved.get("data") or data_facts(sc.main)
    else:
        records = run_study(sc, Path(args.out), records_dir, jobs=args.jobs)
        data = read_study(records_dir)["data"]  # type: ignore[index]
    study = Study(sc, data, records)
    cards = write_report(study, report, Path(args.cards) if args.cards else None, shown, args.records or "")
    print(f"{len(records)} of {len(study.planned)} runs recorded in {records_dir}; report: {report} (plots in "
          f"{report.parent / report.stem}/)" + (f"; card results: {len(cards)} files in {args.cards}/results/ (render "
                                                 "with `zoo card --all --write`)" if args.cards else ""))
    return 0


def _study_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the placements (tables 1-3)")
    g.add_argument("--strategies", nargs="+", metavar="NAME", help="norm strategies, the first the baseline of the "
                   "paired differences (default: those the registered variants offer the study, for the built-ins "
                   "prenorm postnorm mixln hybridnorm hybridnorm-star); each trains as tiny-KIND-NAME, or, for a "
                   "strategy without tiny variants (an installed plugin's), as the baseline's with norm_strategy=NAME")
    g.add_argument("--kinds", nargs="+", choices=["dense", "moe"], help="model kinds (default: dense moe)")
    g.add_argument("--lrs", nargs="+", type=float, metavar="LR", help="peak learning rates to choose each "
                   "placement's best from (default: 1e-3 2e-3 3e-3 6e-3 1e-2 2e-2)")
    g.add_argument("--shared-lr", type=float, default=None, metavar="LR", help="the one rate every placement also "
                   "trains at (default: 3e-3)")
    g.add_argument("--selection-seed", type=int, default=None, metavar="S", help="the seed the best rate is chosen "
                   "on (default: 0); it is never an evaluation seed")
    g.add_argument("--seeds", nargs="+", type=int, metavar="S", help="evaluation seeds, at the shared rate and at "
                   "each best rate (default: 1 2 3)")
    g.add_argument("--steps", type=int, default=None, help="steps per run (default: 500, about 1M tokens)")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 8)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 256)")
    g.add_argument("--data", default=None, help="data spec, as for zoo train (default: stdlib)")
    g.add_argument("--no-decay-norm-and-bias", action="store_true", help="leave norm gains and biases undecayed "
                   "(default: decayed, as the HybridNorm code trains)")
    g = p.add_argument_group("the stability map (dense, depth by peak rate)")
    g.add_argument("--depths", nargs="+", type=int, metavar="L", help="layers (default: 4 8 16 24 32)")
    g.add_argument("--map-lrs", nargs="+", type=float, metavar="LR", help="peak rates (default: 1e-3 3e-3 1e-2 3e-2)")
    g.add_argument("--warmups", nargs="+", type=int, metavar="STEPS", help="warmup lengths, a third axis "
                   "(default: the map's own, 20 steps)")
    g.add_argument("--map-steps", type=int, default=None, help="steps per map run (default: 150)")
    g.add_argument("--map-seed", type=int, default=None, metavar="S", help="the map's seed (default: 0)")
    g.add_argument("--no-map", action="store_true", help="leave the stability map out")
    g = p.add_argument_group("where things go")
    g.add_argument("--jobs", type=int, default=1, help="trainings side by side, each on cores/JOBS threads (default: 1)")
    g.add_argument("--out", default="runs/study", help="run folders, one per run, with full metrics and logs "
                   "(default: runs/study)")
    g.add_argument("--report", default=None, help="Markdown report; plots and run records go to the folder of the "
                   "same stem beside it (default: OUT/results.md; the zoo's own is docs/results.md)")
    g.add_argument("--records", default=None, metavar="DIR", help="run records and study.json (default: the report's "
                   "folder, e.g. docs/results/); a run recorded here with the same settings is not trained again, so "
                   "a study continues from them on any machine")
    g.add_argument("--report-only", action="store_true", help="rebuild the report (and --cards) from the records "
                   "without training; the grid is the records' own unless options change it")
    g.add_argument("--cards", metavar="DIR", default=None, help="write each placement's best-rate numbers to "
                   "DIR/results/NAME.json (the zoo's own: model_cards)")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override, repeatable")
    p.add_argument("--data", default=None, metavar="SPEC", help="'stdlib' (default: this Python's standard library "
                   "source), a text file, a folder of text files, or hf:PATH_OR_ID[#CONFIG][:SPLIT][@COLUMN] (an HF "
                   "dataset: a save_to_disk folder, a folder or file of jsonl/parquet/csv, or a hub id; needs datasets)")
    p.add_argument("--tokenizer", default=None, metavar="SPEC", help="'byte' (default) or 'bpe:VOCAB', a byte-level "
                   "BPE trained on the train split (cached; needs tokenizers and --set vocab_size>=VOCAB)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (global batch)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (linear warmup, cosine decay to 10%%)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps")
    p.add_argument("--eval-every", type=int, default=None, help="validation loss every N steps")
    p.add_argument("--eval-batches", type=int, default=None, metavar="N", help="fixed validation batches per "
                   "evaluation (default: 4)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (and at the end)")
    p.add_argument("--seed", type=int, default=None, help="seed of the init and of the data order")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the training forward "
                   "(inductor; the first steps take longer while it compiles)")
    p.add_argument("--decay-norm-and-bias", action="store_true", default=None, help="weight decay on norm gains and "
                   "biases too, as the HybridNorm code trains (default: matrices only)")


def _add_parallel_options(p: argparse.ArgumentParser) -> None:
    from .distributed.activation import AC_HELP
    from .distributed.fsdp import PRECISIONS
    g = p.add_argument_group("scale-out (start with torchrun; see docs/distributed.md and `zoo plan`)")
    g.add_argument("--dp-shard", type=int, default=None, metavar="N", help="shard weights, gradients and optimizer "
                   "state over N ranks with FSDP2 (-1: the ranks --dp-replicate and --ep leave). Without --dp-shard, "
                   "--dp-replicate and --ep, several processes run DDP")
    g.add_argument("--dp-replicate", type=int, default=None, metavar="M", help="HSDP: M replicas, each sharded over "
                   "--dp-shard ranks")
    g.add_argument("--ep", type=int, default=None, metavar="E", help="expert parallel (MoE): split each layer's experts "
                   "over E ranks; tokens travel to their experts by all-to-all")
    g.add_argument("--grad-accum", type=int, default=None, metavar="K", help="micro-batches per step: each rank runs "
                   "its part of --batch-size in K pieces")
    g.add_argument("--precision", choices=PRECISIONS, default=None, help="bf16: bf16 compute, fp32 master weights and "
                   "gradient reductions (default on CUDA); fp32 (default on CPU); fp64 for exactness checks")
    g.add_argument("--ac", default=None, metavar="MODE", help=f"activation checkpointing per block: {AC_HELP}")
    g.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS", help="fail the run when a rank does "
                   "not answer a collective for this long (default 600)")


def cmd_plan(args: argparse.Namespace) -> int:
    from .api import get_config
    from .distributed.plan import format_plan, parse_bytes, plan
    cfg = get_config(args.name, args.set or None)
    seq = args.seq if args.seq is not None else cfg.max_seq_len
    result = plan(cfg, args.name, gpus=args.gpus, gpu_memory=parse_bytes(args.gpu_memory), micro_batch=args.micro_batch,
                  seq_len=seq, precision=args.precision, ac=args.ac, ep=args.ep, headroom=args.headroom)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="variant name (see `zoo list`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="model config override, repeatable")
    p.add_argument("--gpus", type=int, default=8, help="ranks in all (default 8)")
    p.add_argument("--gpu-memory", default="80GB", metavar="SIZE", help="memory of one GPU (default 80GB)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per micro-batch (default 1)")
    p.add_argument("--ep", type=int, default=None, help="consider only this expert-parallel degree (MoE)")
    p.add_argument("--ac", default="none", metavar="MODE", help="activation checkpointing: none, full or every:N")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="compute precision (default bf16)")
    p.add_argument("--headroom", type=float, default=0.1, help="share of GPU memory kept free for the CUDA context, "
                   "fragmentation and temporary buffers (default 0.1)")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_export(args: argparse.Namespace) -> int:
    from .distributed.checkpoint import export
    target = export(args.run, args.out)
    print(f"wrote {target}; load it with zoo.load({str(target)!r})")
    return 0


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="the run folder of a zoo train run with --dp-shard/--dp-replicate/--ep")
    p.add_argument("--out", default=None, metavar="FILE", help="where to write the safetensors checkpoint (default: "
                   "RUN/checkpoint/model.safetensors, which zoo.load(RUN) reads)")


def cmd_convert(args: argparse.Namespace) -> int:
    from .interop import hf as convert
    from .sources import resolve_source
    dtype = convert.DTYPE_NAMES[args.dtype] if args.dtype else None
    if args.from_hf:
        if args.set or args.pretrained:
            raise ZooError("--set and --pretrained apply to --to-hf only; an import takes its config and weights "
                           "from the HF folder")
        ckpt = convert.from_hf(args.from_hf, args.to, dtype=dtype)
        print(f"wrote {ckpt} and {Path(args.to) / 'config.yaml'}; load it with zoo.load({str(ckpt)!r})")
        return 0
    source = resolve_source(args.to_hf, pretrained=args.pretrained)
    out = convert.to_hf(source, args.to, overrides=args.set or None, dtype=dtype)
    hf_class = json.loads((out / "config.json").read_text())["architectures"][0]
    fresh = "" if source.trained else f" (freshly initialized weights: {args.to_hf!r} is a variant name)"
    print(f"wrote {out / 'config.json'} and the weights as {hf_class}{fresh}; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _convert_arguments(p: argparse.ArgumentParser) -> None:
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="PATH_OR_REPO", help="an HF model folder (config.json + *.safetensors), "
                           "or a Hub repository id (downloaded with huggingface_hub; needs network access)")
    direction.add_argument("--to-hf", metavar="NAME|CHECKPOINT|RUN", help=f"the zoo model to export: {MODEL_FORMS} "
                           "(a NAME is exported freshly initialized, seed 0)")
    p.add_argument("--pretrained", action="store_true", help="with --to-hf NAME: export its published weights (zoo pull)")
    p.add_argument("--to", required=True, metavar="DIR", help="output folder: the zoo checkpoint + config.yaml, or the "
                   "HF config.json + model.safetensors")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (default: keep the source's dtype)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for --to-hf, repeatable: "
                   "--set moe.router_options.renormalize=true")


def cmd_publish(args: argparse.Namespace) -> int:
    from .publishing import publish
    results = None
    if args.results:
        try:
            results = json.loads(Path(args.results).read_text())
        except (OSError, ValueError) as e:
            raise ZooError(f"--results {args.results}: cannot read it as JSON ({e})") from None
    folder = publish(args.source, args.to, index=args.index, name=args.name, seed=args.seed, results=results,
                     pretrained=args.pretrained)
    files = sorted(p.name for p in folder.iterdir())
    print(f"published zoo/{folder.name} to {folder} ({', '.join(files)})"
          + (f"; recorded its digests (sha256, BLAKE3) in {args.index}" if args.index else ""))
    return 0


def _publish_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p, "published freshly initialized, which its card says")
    p.add_argument("--to", required=True, metavar="DIR", help="the folder of repositories; writes DIR/NAME/")
    p.add_argument("--index", metavar="FILE", help="also record the commit and each file's sha256 and BLAKE3 in this zoo index "
                   "JSON (created if missing); the zoo's own is plugins/hub/index.json")
    p.add_argument("--name", default=None, help="publish a checkpoint under this variant name (default: its header's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization when publishing a NAME (default: 0)")
    p.add_argument("--results", metavar="FILE", default=None, help="a checkpoint's measured results for its card "
                   "(a model_cards/results/NAME.json, as `zoo study --cards` and `zoo eval --write-card` write it)")


def cmd_serve(args: argparse.Namespace) -> int:
    from .hub import serve
    try:
        serve(args.dir, args.port, quiet=args.quiet, idle_timeout=args.idle_timeout,
              max_connections=args.max_connections)
    except KeyboardInterrupt:
        print("zoo: serve stopped", file=sys.stderr)
    return 0


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="a folder written by `zoo publish NAME --to DIR`")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default: 8765; 0 takes any free one)")
    p.add_argument("--quiet", action="store_true", help="do not log each request to stderr")
    p.add_argument("--idle-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="close a connection that sends nothing for this long (default: 30)")
    p.add_argument("--max-connections", type=int, default=512, metavar="N",
                   help="connections served at once, one thread each; more are answered 503 with Retry-After "
                   "(default: 512)")


def cmd_pull(args: argparse.Namespace) -> int:
    from .hub import pull
    print(pull(args.name, endpoint=args.endpoint, revision=args.revision, index=args.index))
    return 0


def _pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="variant name, e.g. tiny-dense-hybridnorm")
    p.add_argument("--endpoint", metavar="URL", default=None, help="hub URL (default: $ZOO_ENDPOINT, else the zoo's "
                   "embedded hub, which needs no network)")
    p.add_argument("--revision", metavar="REV", default=None, help="branch or commit id (default: the commit the zoo's "
                   "index pins, else main)")
    p.add_argument("--index", metavar="FILE", default=None, help="zoo index to verify against (default: the shipped one; "
                   "variants it lacks are verified against the served checksums.sha256)")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .model.generate import check_sampling, stream
    from .sources import load_source, resolve_source
    from .train.tokenizer import tokenizer_for
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    source = resolve_source(args.source, pretrained=args.pretrained)
    model = load_source(source, args.set or None, seed=args.seed if args.seed is not None else 0)
    if not source.trained:
        print(f"zoo: note: {args.source} is freshly initialized (untrained), so expect noise; pass --pretrained for "
              "its published weights, or a checkpoint path", file=sys.stderr)
    tok_source = source.checkpoint
    if torch.cuda.is_available():
        model = model.cuda()
    tok = tokenizer_for(tok_source, model.cfg.vocab_size)
    ids = tok.encode(args.prompt) or [tok.eos_id]
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    new: list[int] = []
    shown = ""
    for token in stream(model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, eos_id=tok.eos_id):
        if int(token[0]) == tok.eos_id:
            break
        new.append(int(token[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    text = tok.decode(new)
    sys.stdout.write(text[len(shown):] + "\n")
    return 0


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p, "freshly initialized, seeded by --seed")
    _set_argument(p)
    p.add_argument("--prompt", required=True, help="the text to continue (empty: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); above 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens whose "
                   "probability reaches P, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (and of a fresh variant's init)")


def cmd_eval(args: argparse.Namespace) -> int:
    from .sources import load_source, resolve_source
    from .train.data import load_corpus
    from .train.evaluate import evaluate, write_card_results
    from .train.tokenizer import tokenizer_for
    corpus = load_corpus(args.data)
    source = resolve_source(args.source, pretrained=args.pretrained)
    model = load_source(source, args.set or None, device="cuda" if _cuda() else None)
    weights = source.describe()
    if not source.trained:
        print(f"zoo: note: {args.source} is freshly initialized (untrained); pass --pretrained for its published "
              "weights, or a checkpoint path", file=sys.stderr)
    card_name = None
    if args.write_card is not None:
        card_name = source.variant
        if not card_name:
            raise ZooError(f"--write-card: {args.source} does not record its variant name, so there is no card to write to")
    result = evaluate(model, corpus, seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                      progress=sys.stderr.isatty(), tokenizer=tokenizer_for(source.checkpoint, model.cfg.vocab_size))
    report = {"model": args.source, "variant": source.variant, "weights": weights, **result.to_dict()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"model          {args.source}\n"
              f"weights        {weights}\n"
              f"data           {result.data}, {result.split} split\n"
              f"loss           {result.loss:.4f} nats/token\n"
              f"perplexity     {result.perplexity:.2f}\n"
              f"bits per byte  {result.bits_per_byte:.4f}\n"
              f"tokens         {result.tokens:,} in {result.windows:,} windows of at most {result.seq_len}\n"
              f"seconds        {result.seconds:.1f} ({result.tokens_per_s:,.0f} tokens/s)")
    if card_name is not None:
        path = write_card_results(card_name, result, args.write_card, weights)
        print(f"wrote {path}; render the card with `zoo card {card_name} --write --dir {args.write_card}`", file=sys.stderr)
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p, "freshly initialized, seed 0")
    _set_argument(p)
    p.add_argument("--data", default="stdlib", help="a data spec as for zoo train: 'stdlib' (default: this Python's "
                   "standard library source), a text file, a folder, or hf:...; its validation split is evaluated")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the split "
                   "(default: all of it)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--write-card", nargs="?", const="model_cards", default=None, metavar="DIR",
                   help="merge the results as \"eval\" into DIR/results/NAME.json (default DIR: model_cards); then "
                   "render the card with `zoo card NAME --write`")


MODEL_FORMS = ("a variant NAME, its published weights with --pretrained, a zoo CHECKPOINT (model.safetensors, "
               "its .index.json, or a folder holding one) or a RUN folder of zoo train")


def _model_arguments(p: argparse.ArgumentParser, fresh: str) -> None:
    """The model argument every command takes, resolved by zoo/sources.py."""
    p.add_argument("source", metavar="NAME|CHECKPOINT|RUN", help=f"{MODEL_FORMS}; a NAME alone is {fresh}")
    p.add_argument("--pretrained", action="store_true", help="take the variant NAME's published weights (zoo pull)")


def _set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, repeatable: with a NAME any "
                   "key (--set norm_strategy=mixln tries a placement without registering a variant); with weights, "
                   "run-time keys only (--set moe.backend=loop), as the weights fix the rest")


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


COMMANDS: list[tuple[str, Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str]] = [
    ("list", cmd_list, _list_arguments,
     "List variants: name, norm strategy, dense/moe, total and active parameters."),
    ("info", cmd_info, _info_arguments,
     "Show a variant's resolved config, parameters (total/active) and FLOPs per token."),
    ("train", cmd_train, _train_arguments,
     "Train a variant: AdamW, warmup + cosine, clipping, MoE aux losses; metrics.jsonl and checkpoints."),
    ("plan", cmd_plan, _plan_arguments,
     "Per-rank memory of each parallel layout (DDP, FSDP2, HSDP, expert parallel) for a variant on N GPUs: "
            "weights, gradients, AdamW state, gathered weights and activations, which layouts fit and why not."),
    ("export", cmd_export, _export_arguments,
     "Join the sharded (torch.distributed.checkpoint) checkpoint of a run into one safetensors checkpoint for "
            "zoo.load, cards and publish."),
    ("compare", cmd_compare, _compare_arguments,
     "Train variants on the same data, seed and token budget; table, Markdown, JSON and plots."),
    ("card", cmd_card, _card_arguments,
     "Render model cards (HF-style README with YAML front matter) from configs and measured results."),
    ("convert", cmd_convert, _convert_arguments,
     "Convert between Hugging Face transformers and the zoo: import Llama, Mistral, "
            "Mixtral, Qwen2-MoE, OLMoE, Qwen3(-MoE), OLMo-2 and FlexOlmo checkpoints, or export the variants that "
            "have a transformers equivalent (HybridNorm and other placements transformers lacks are refused)."),
    ("publish", cmd_publish, _publish_arguments,
     "Write an HF-Hub-style repository folder DIR/NAME (model card as README.md, "
            "config.yaml, model.safetensors, checksums.sha256) for a variant (untrained weights) or a checkpoint."),
    ("serve", cmd_serve, _serve_arguments,
     "Serve a folder of published variants on 127.0.0.1 with the HF Hub resolve protocol "
            "(for `zoo pull --endpoint URL`, ZOO_ENDPOINT or huggingface_hub); runs until Ctrl-C."),
    ("pull", cmd_pull, _pull_arguments,
     "Download a published variant into huggingface_hub's cache (HF_HOME, "
            "HF_HUB_OFFLINE honoured), verify each file (BLAKE3 where the zoo's index records it, else sha256), and "
            "print the snapshot folder."),
    ("study", cmd_study, _study_arguments,
     "The HybridNorm study at CPU scale: Pre-Norm, Post-Norm, Mix-LN, HybridNorm and "
            "HybridNorm* (or any norm strategy), dense and MoE, at a shared learning rate and each at its own best "
            "(chosen on a selection seed, reported on others), plus a depth-by-learning-rate stability map; keeps a "
            "compact record per run, and writes a Markdown report with plots and, with --cards, the model cards' "
            "results. --report-only rebuilds the report from the records."),
    ("generate", cmd_generate, _generate_arguments,
     "Generate text from a variant or checkpoint with a KV cache, streaming tokens "
            "as they come: greedy by default, or sampled with --temperature, --top-k, --top-p."),
    ("eval", cmd_eval, _eval_arguments,
     "Evaluate a variant or checkpoint on held-out text: loss (nats/token), perplexity and bits "
            "per byte over the whole validation split, every token predicted once (deterministic)."),
    ("plugins", cmd_plugins, _plugins_arguments,
     "List plugins: name, where each came from, what it registered, and failures."),
    ("check", cmd_check, _check_arguments,
     "Run the plugin conformance kit (zoo.testing) on registered names: options, meta-device init, forward and "
            "backward, gradients, fp32/bf16, determinism, KV cache, save/load in a fresh process, torch.compile, "
            "2-rank DDP and FSDP2. Exit 1 if any check fails."),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="A zoo of decoder-only transformers, dense and MoE, "
                                     "with pluggable norm placements (HybridNorm and peers), attention and routers.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, func, arguments, text in COMMANDS:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        arguments(p)
    return parser


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Optional[str] = None) -> None:
    print(f"zoo: warning: {message}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except ZooError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `zoo list | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
