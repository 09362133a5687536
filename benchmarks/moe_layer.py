"""MoE layer benchmark: the zoo's MoE FFN (auto, fused, grouped_mm and loop backends) side by side with HF
transformers' OLMoE and Mixtral sparse MoE blocks (same weights, same shapes, HF's default experts
implementation), and a dense SwiGLU FFN of the same active FLOPs. Everything is measured in this
run, including the matmul peak that the MFU fractions refer to.

    python benchmarks/moe_layer.py                       # all shapes, fp32 and bf16
    python benchmarks/moe_layer.py --shapes olmoe --dtypes fp32 --repeats 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

import torch
from common import matmul_peak

import zoo
from zoo.builder import build_ffn
from zoo.model import SwiGLU
from zoo.moe import MoEFFN

SHAPES = {  # name: (E, k, H, F, tokens, renormalize, HF family)
    "olmoe": (64, 8, 512, 256, 4096, False, "olmoe"),
    "mixtral": (8, 2, 512, 1024, 4096, True, "mixtral"),
    "tiny": (8, 2, 128, 256, 512, False, "olmoe"),
    "olmoe-step": (64, 8, 256, 128, 1024, False, "olmoe"),  # the MoE layers of benchmarks/train_step.py
    "mixtral-step": (8, 2, 256, 512, 1024, True, "mixtral"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


WARMUPS = 1


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall seconds of ``fn`` after ``WARMUPS`` warm-up calls."""
    for _ in range(WARMUPS):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hf_block(family: str, E: int, k: int, H: int, F: int, renormalize: bool) -> torch.nn.Module:
    """HF's sparse MoE block with the experts implementation HF picks by default."""
    from transformers import MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    if family == "olmoe":
        cfg = OlmoeConfig(hidden_size=H, intermediate_size=F, num_experts=E, num_experts_per_tok=k, norm_topk_prob=renormalize,
                          num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
        model_cls, block_cls = OlmoeForCausalLM, OlmoeSparseMoeBlock
    else:
        cfg = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, vocab_size=64)
        model_cls, block_cls = MixtralForCausalLM, MixtralSparseMoeBlock
    cfg._experts_implementation = model_cls(cfg).config._experts_implementation  # what HF resolves by default
    return block_cls(cfg)


def copy_to_hf(layer: MoEFFN, block: torch.nn.Module) -> None:
    """MegaBlocks layout -> HF v5 fused experts: gate_up (E, 2F, H) = [w1; v1], down (E, H, F) = w2^T."""
    w1, v1, w2 = layer.experts.mlp.views()
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.layer.weight)
        block.experts.gate_up_proj.copy_(torch.cat([w1, v1], dim=1))
        block.experts.down_proj.copy_(w2.transpose(1, 2))


def zoo_layer(E: int, k: int, H: int, F: int, renormalize: bool, backend: str) -> MoEFFN:
    cfg = zoo.get_config("tiny-moe-prenorm", {"d_model": H, "n_heads": 4, "moe": {
        "num_experts": E, "top_k": k, "hidden_size": F, "backend": backend, "router_options": {"renormalize": renormalize}}})
    layer = build_ffn(cfg, 0)
    layer.init_weights(zoo.Init.from_config(cfg))
    return layer


def step_fns(module: torch.nn.Module, x: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward, forward+backward) of ``module`` on ``x``."""
    def out() -> torch.Tensor:
        y = module(x)
        return y[0] if isinstance(y, tuple) else y

    def fwd() -> None:
        with torch.no_grad():
            out()

    def fwd_bwd() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        out().float().square().mean().backward()

    return fwd, fwd_bwd


def measure_all(modules: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int,
                fwd_too: bool = True) -> dict[str, tuple[float, float]]:
    """Median (forward, forward+backward) seconds per module, timed round-robin: each round runs
    every module once, so a change in the machine's speed during the run hits all of them alike."""
    fns = {name: step_fns(m, x) for name, m in modules.items()}
    for _ in range(WARMUPS):
        for fwd, fwd_bwd in fns.values():
            fwd_bwd()
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, (fwd, fwd_bwd) in fns.items():
            for fn, bucket in ((fwd, times[name][0]), (fwd_bwd, times[name][1])):
                if fn is fwd and not fwd_too:
                    continue
                t = time.perf_counter()
                fn()
                bucket.append(time.perf_counter() - t)
    return {name: (statistics.median(f) if f else float("nan"), statistics.median(fb)) for name, (f, fb) in times.items()}


def run(shapes: list[str], dtypes: list[str], repeats: int, backends: dict[str, list[str]], fwd_too: bool = True,
        dense_too: bool = True) -> dict[str, Any]:
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "runs": []}
    for dname in dtypes:
        dtype = DTYPES[dname]
        peak = matmul_peak(dtype)
        results[f"matmul_peak_{dname}_gflops"] = peak / 1e9
        print(f"\n== {dname}: matmul peak {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
        for shape in shapes:
            E, k, H, F, T, renorm, family = SHAPES[shape]
            torch.manual_seed(0)
            x = torch.randn(1, T, H, dtype=dtype, requires_grad=True)
            flops_fwd = 2 * T * k * 3 * H * F
            zoo_layers = {f"zoo_{b}": zoo_layer(E, k, H, F, renorm, b).to(dtype) for b in backends[dname]}
            first = next(iter(zoo_layers.values()))
            for layer in zoo_layers.values():
                layer.load_state_dict(first.state_dict())
            hf = hf_block(family, E, k, H, F, renorm).to(dtype)
            copy_to_hf(first, hf)
            dense = SwiGLU(H, k * F).to(dtype)
            with torch.no_grad():
                ref = hf(x).float()
                diffs = {n: (m(x)[0].float() - ref).abs().max().item() for n, m in zoo_layers.items()}
            row: dict[str, Any] = {"shape": shape, "dtype": dname, "E": E, "k": k, "H": H, "F": F, "tokens": T,
                                   "hf_impl": hf.experts.config._experts_implementation, "max_abs_diff_vs_hf": diffs}
            modules = {**zoo_layers, "hf": hf, **({"dense_swiglu": dense} if dense_too else {})}
            for name, (f, fb) in measure_all(modules, x, repeats, fwd_too).items():
                row[name] = {"fwd_ms": f * 1e3, "fwd_bwd_ms": fb * 1e3,
                             "fwd_bwd_mfu": 3 * flops_fwd / fb / peak, "fwd_mfu": flops_fwd / f / peak}
                if dname != "fp32":
                    row[name]["fwd_bwd_mfu_of_fp32_peak"] = 3 * flops_fwd / fb / results["matmul_peak_fp32_gflops"] / 1e9 \
                        if "matmul_peak_fp32_gflops" in results else None
            for name in zoo_layers:
                row[f"{name}_speedup_fwd_bwd_vs_hf"] = row["hf"]["fwd_bwd_ms"] / row[name]["fwd_bwd_ms"]
                row[f"{name}_speedup_fwd_vs_hf"] = row["hf"]["fwd_ms"] / row[name]["fwd_ms"]
            results["runs"].append(row)
            print(f"-- {shape} E={E} k={k} H={H} F={F} T={T} (HF experts impl: {row['hf_impl']}; "
                  f"max |zoo-hf| {', '.join(f'{n}: {d:.1e}' for n, d in diffs.items())})")
            for name in modules:
                r = row[name]
                print(f"   {name:15s} fwd {r['fwd_ms']:9.1f} ms  fwd+bwd {r['fwd_bwd_ms']:9.1f} ms  "
                      f"({100 * r['fwd_bwd_mfu']:5.0f}% of the {dname} peak)")
            for name in zoo_layers:
                print(f"   {name} vs HF: {row[f'{name}_speedup_fwd_bwd_vs_hf']:.2f}x fwd+bwd, "
                      f"{row[f'{name}_speedup_fwd_vs_hf']:.2f}x fwd")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--backends", nargs="+", default=["auto", "fused", "grouped_mm", "loop"],
                        help="zoo MoE backends to time in fp32 (auto picks grouped_mm or fused on CPU by expert size)")
    parser.add_argument("--bf16-backends", nargs="+", default=["auto"],
                        help="zoo backends to time in bf16 (grouped_mm and loop run native bf16 matmuls, which take "
                             "minutes on CPUs without bf16 units)")
    parser.add_argument("--json", default="benchmarks/results/moe_layer.json", help="where to write the JSON results")
    parser.add_argument("--warmups", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--fwd-bwd-only", action="store_true", help="skip the forward-only timings")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense SwiGLU peer")
    args = parser.parse_args()
    global WARMUPS
    WARMUPS = args.warmups
    results = run(args.shapes, args.dtypes, args.repeats, {"fp32": args.backends, "bf16": args.bf16_backends},
                  fwd_too=not args.fwd_bwd_only, dense_too=not args.no_dense)
    from pathlib import Path
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
