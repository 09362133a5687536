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

EPILOG = """examples:
  zoo list 'tiny-*'                          tiny variants with their parameter counts
  zoo info olmo2-1b-hybridnorm               config, total/active params, FLOPs per token
  zoo info tiny-dense-prenorm --set n_layers=8 --set norm_strategy=mixln
  zoo plugins --json                         what each plugin registered, and any that failed
  zoo card tiny-moe-hybridnorm               the model card (YAML front matter + Markdown)
  zoo card --check                           are model_cards/ up to date with the configs?

Plugins load from the 'zoo' entry-point group; ZOO_PLUGINS / ZOO_DISABLE_PLUGINS take
comma-separated patterns of plugin names to allow / block (ZOO_DISABLE_PLUGINS=broken-plugin).
JSON output keys are documented in docs/cli.md."""


def human(n: float) -> str:
    """1178637312 -> '1.18B'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in columns))


def cmd_list(args: argparse.Namespace) -> int:
    import zoo
    rows = []
    for name in zoo.list_models(args.pattern):
        cfg = zoo.get_config(name)
        st = zoo.stats(cfg, flops=False)
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


def cmd_info(args: argparse.Namespace) -> int:
    import zoo
    cfg = zoo.get_config(args.name, args.set or None)
    st = zoo.stats(cfg, seq_len=args.seq_len)
    if args.json:
        print(json.dumps({"name": args.name, "config": cfg.to_dict(), **st.to_dict()}, indent=2))
        return 0
    print(f"# {args.name}\n{cfg.to_yaml()}")
    print(f"parameters: {st.total_params:,} total ({human(st.total_params)}), {st.active_params:,} active ({human(st.active_params)})")
    print(f"FLOPs per token at seq {st.seq_len}: {st.flops_per_token:,} forward ({human(st.flops_per_token)}), "
          f"{human(st.train_flops_per_token)} per training step")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import REGISTRY
    records = [r.to_dict() for r in REGISTRY.plugins()]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for r in records:
        status = "" if r["status"] == "ok" else f"  [{r['status']}{': ' + r['error'] if r['error'] else ''}]"
        print(f"{r['name']}  ({r['source']}){status}")
        for kind, names in r["registered"].items():
            print(f"    {kind}: {', '.join(names)}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    import zoo
    from .cards import check_cards, load_results, render_card
    cards_dir = Path(args.dir)
    names = zoo.list_models() if args.all or args.check else [args.name] if args.name else []
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="A zoo of decoder-only transformers, dense and MoE, "
                                     "with pluggable norm placements (HybridNorm and peers), attention and routers.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("list", cmd_list, "List variants: name, norm strategy, dense/moe, total and active parameters.")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern over names, e.g. 'tiny-moe-*' (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    p = add("info", cmd_info, "Show a variant's resolved config, parameters (total/active) and FLOPs per token.")
    p.add_argument("name", help="variant name (see `zoo list`)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, repeatable: --set moe.num_experts=16")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: the config's max_seq_len)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("card", cmd_card, "Render model cards (HF-style README with YAML front matter) from configs and measured results.")
    p.add_argument("name", nargs="?", help="variant name; prints its card")
    p.add_argument("--all", action="store_true", help="every variant")
    p.add_argument("--write", action="store_true", help="write DIR/NAME.md instead of printing")
    p.add_argument("--check", action="store_true", help="fail (exit 1) if any card in DIR differs from a fresh render")
    p.add_argument("--dir", default="model_cards", help="cards folder; results are read from DIR/results/NAME.json (default: model_cards)")

    p = add("plugins", cmd_plugins, "List plugins: name, where each came from, what it registered, and failures.")
    p.add_argument("--json", action="store_true", help="print JSON")
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
