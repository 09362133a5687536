"""Prepared check for a CUDA machine: MegaBlocks vs torch grouped_mm (and the loop reference) on
the zoo's MoE layer in bf16, parity and timing, at a tiny and an OLMoE-1B-7B-shaped layer.

Build MegaBlocks there first (its wheel pins torch 2.7; build against the installed torch):
    pip download --no-deps --no-binary :all: megablocks==0.10.0 grouped_gemm==0.3.0 stanford-stk==0.7.1 -d sdists
    pip install --no-deps --no-build-isolation sdists/*
then:  python benchmarks/gpu_megablocks.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

import zoo
from zoo.builder import build_ffn
from zoo.moe import MoEFFN
from zoo.moe.experts import megablocks_gmm

SHAPES = {"tiny": (8, 2, 128, 256, 4096), "olmoe-1b-7b": (64, 8, 2048, 1024, 8192)}  # E, k, H, F, tokens


def layer(E: int, k: int, H: int, F: int, backend: str) -> MoEFFN:
    cfg = zoo.get_config("tiny-moe-prenorm", {"d_model": H, "n_heads": 16, "moe": {
        "num_experts": E, "top_k": k, "hidden_size": F, "backend": backend}})
    m = build_ffn(cfg, 0)
    m.init_weights(zoo.Init.from_config(cfg))
    return m.cuda().bfloat16()


def cuda_ms(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    assert megablocks_gmm() is not None, "megablocks / grouped_gemm not importable: see this file's docstring"
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for name, (E, k, H, F, T) in SHAPES.items():
        torch.manual_seed(0)
        layers = {b: layer(E, k, H, F, b) for b in ("megablocks", "grouped_mm", "loop")}
        for m in layers.values():
            m.load_state_dict(layers["loop"].state_dict())
        x = torch.randn(1, T, H, device="cuda", dtype=torch.bfloat16)
        outs, grads = {}, {}
        for b, m in layers.items():
            xx = x.clone().requires_grad_(True)
            y, _ = m(xx)
            y.float().square().mean().backward()
            outs[b], grads[b] = y.float(), xx.grad.float()
        row = {"shape": name, "E": E, "k": k, "H": H, "F": F, "tokens": T}
        for b in ("megablocks", "grouped_mm"):
            row[f"{b}_max_abs_out_diff_vs_loop"] = (outs[b] - outs["loop"]).abs().max().item()
            row[f"{b}_max_abs_grad_diff_vs_loop"] = (grads[b] - grads["loop"]).abs().max().item()
            m = layers[b]
            xx = x.clone().requires_grad_(True)
            row[f"{b}_fwd_ms"] = cuda_ms(lambda: m(xx))
            row[f"{b}_fwd_bwd_ms"] = cuda_ms(lambda: m(xx)[0].float().square().mean().backward())
            flops = 3 * 2 * T * k * 3 * H * F
            row[f"{b}_fwd_bwd_tflops"] = flops / row[f"{b}_fwd_bwd_ms"] / 1e9
        row["megablocks_speedup_vs_grouped_mm"] = row["grouped_mm_fwd_bwd_ms"] / row["megablocks_fwd_bwd_ms"]
        results["runs"].append(row)
        print(json.dumps(row, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
