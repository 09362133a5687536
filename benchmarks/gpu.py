"""The prepared check for one CUDA machine, in one run: expert-backend parity, then bf16 training-step speed.

1. Parity: every expert backend (loop, grouped_mm, fused, megablocks) against a float32 reference
   (float64 in --cpu mode) on a routing that leaves experts empty: the output and the gradients of
   the tokens and of all three expert weights, by relative error. A backend off by more than the
   tolerance fails the run (exit status 1).
2. Speed: training steps (AdamW, bf16 under FSDP2 at world size 1) of ladder-550m-dense-hybridnorm,
   and of ladder-550m-moe-hybridnorm with the megablocks and the grouped_mm expert backends: tokens/s,
   MFU against a bf16 matmul peak measured here, peak memory.

Results: OUT/gpu.json. `--cpu` runs the same code on tiny variants (fp32, gloo), with a reference
`gmm` standing in for grouped_gemm's, so that its paths run before a GPU does (tests/test_benchmarks.py).

A GPU machine without network access installs from a folder prepared where there is network:
    python benchmarks/gpu.py --prepare ../gpu-wheels            # sdists and wheels, beside the checkout
    python benchmarks/gpu.py --wheels ../gpu-wheels --out results/gpu   # on the GPU machine
`--wheels` installs grouped_gemm with --no-index --no-deps --no-build-isolation (built against the
installed torch; a resolving install would replace torch) and the zoo's own requirements, then runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from common import matmul_peak, sync

GROUPED_GEMM = "grouped_gemm==0.3.0"
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def zoo_requirements() -> list[str]:
    """The installed zoo's own requirements, less torch (the GPU machine has its own) and the extras."""
    requirements = [r.split(";")[0].strip() for r in metadata.requires("hybridnorm-zoo") or [] if "extra ==" not in r]
    return [r for r in requirements if not r.startswith("torch")]


def prepare(folder: Path) -> None:
    """Download grouped_gemm's sdist and wheels of the zoo's requirements into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    requirements = zoo_requirements()
    pip = [sys.executable, "-m", "pip", "download", "-d", str(folder)]
    subprocess.run([*pip, "--no-deps", "--no-binary", ":all:", GROUPED_GEMM], check=True)
    subprocess.run([*pip, "--only-binary", ":all:", *requirements], check=True)
    print(f"prepared {folder}; copy it beside the checkout on the GPU machine and run --wheels {folder}")


def install(folder: Path) -> None:
    """Install from ``folder`` only: grouped_gemm built against the installed torch, then the zoo's requirements."""
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder)]
    subprocess.run([*base, "--no-deps", "--no-build-isolation", GROUPED_GEMM], check=True)
    subprocess.run([*base, "--no-deps", "--no-build-isolation", "-e", str(Path(__file__).resolve().parents[1])], check=True)
    subprocess.run([*base, *zoo_requirements()], check=True)


def reference_gmm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """grouped_gemm.ops.gmm's contract in plain PyTorch: rows of ``a`` in groups of ``batch_sizes``, group e
    times ``b[e]`` (transposed with ``trans_b``)."""
    out, start = [], 0
    for e, n in enumerate(batch_sizes.tolist()):
        w = b[e].t() if trans_b else b[e]
        out.append(a[start:start + n] @ w)
        start += n
    return torch.cat(out)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def parity(device: torch.device, dtype: torch.dtype, reference: torch.dtype,
           backends: dict[str, Callable[..., torch.Tensor]]) -> dict[str, Any]:
    """Each backend's output and gradients against ``expert_glu_reference`` in ``reference`` dtype."""
    from zoo.kernels.moe_glu import expert_glu_reference
    gen = torch.Generator().manual_seed(0)
    E, H, F, T, k = 8, 256, 512, 512, 2
    x = torch.randn(T, H, generator=gen)
    ws = [torch.randn(E, F, H, generator=gen) * 0.05 for _ in range(3)]
    expert = torch.randint(0, E - 2, (T * k,), generator=gen)  # the last two experts get no tokens
    token = torch.arange(T).repeat_interleave(k)
    order = torch.argsort(expert, stable=True)
    token_N, expert_N = token[order], expert[order]
    weight_N = torch.rand(T * k, generator=gen)
    counts = torch.bincount(expert_N, minlength=E)

    def run(glu: Callable[..., torch.Tensor], dt: torch.dtype) -> list[torch.Tensor]:
        leaves = [t.to(device, dt).clone().requires_grad_() for t in (x, *ws)]
        out = glu(leaves[0], token_N.to(device), weight_N.to(device, dt), counts.to(device), *leaves[1:])
        out.float().square().sum().backward()
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    want = run(expert_glu_reference, reference)
    names = ["out", "grad_x", "grad_w1", "grad_v1", "grad_w2"]
    result: dict[str, Any] = {"dtype": str(dtype), "reference": str(reference), "tolerance": TOLERANCE[dtype],
                              "empty_experts": int((counts == 0).sum()), "backends": {}, "failed": []}
    for name, glu in backends.items():
        errors = dict(zip(names, (relative_error(g, w) for g, w in zip(run(glu, dtype), want))))
        result["backends"][name] = errors
        if not all(e <= TOLERANCE[dtype] for e in errors.values()):
            result["failed"].append(name)
    return result


def train_speed(name: str, overrides: list[str], device: torch.device, precision: str, steps: int, micro_batch: int,
                seq: int, peak: float) -> dict[str, Any]:
    """Tokens/s, MFU and peak memory of AdamW training steps under FSDP2 at world size 1."""
    from zoo.api import get_config
    from zoo.builder import model_stats
    from zoo.distributed.layout import Layout
    from zoo.distributed.parallelize import parallelize
    from zoo.train.optim import make_optimizer
    from zoo.train.trainer import TrainConfig
    cfg = get_config(name, overrides or None)
    torch.manual_seed(0)
    model = parallelize(cfg, Layout.of(1, dp_shard=1), device=device, precision=precision).model
    opt = make_optimizer(model, TrainConfig())
    idx = torch.randint(0, cfg.vocab_size, (micro_batch, seq + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 2):
        sync(str(device))
        t = time.perf_counter()
        out = model(idx[:, :-1], idx[:, 1:])
        (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(str(device))
        if step >= 2:  # the first steps allocate and warm up
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    tokens_per_s = micro_batch * seq / step_s
    flops = model_stats(cfg, seq).train_flops_per_token
    row = {"variant": name, "overrides": overrides, "precision": precision, "micro_batch": micro_batch, "seq": seq,
           "steps_timed": len(times), "step_s": step_s, "tokens_per_s": tokens_per_s, "mfu": flops * tokens_per_s / peak,
           "loss": float(out.loss.detach())}
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del model, opt
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu.json")
    parser.add_argument("--cpu", action="store_true", help="tiny variants on the CPU (fp32, gloo, a reference gmm)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per run (default 10)")
    parser.add_argument("--prepare", type=Path, metavar="DIR", help="download what --wheels installs, then stop")
    parser.add_argument("--wheels", type=Path, metavar="DIR", help="install from DIR (no network) before running")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return 0
    if args.out is None:
        parser.error("--out DIR is required (or --prepare DIR)")
    if args.wheels:
        install(args.wheels)
    from zoo.moe import experts
    if args.cpu:
        device, dtype, reference, precision = torch.device("cpu"), torch.float32, torch.float64, "fp32"
        gmm: Any = reference_gmm
    else:
        if not torch.cuda.is_available():
            print("gpu.py: no CUDA GPU here; use --cpu", file=sys.stderr)
            return 2
        device, dtype, reference, precision = torch.device("cuda"), torch.bfloat16, torch.float32, "bf16"
        gmm = experts.megablocks_gmm()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    started = time.perf_counter()
    glus = {name: fn for name, fn in experts.GLU.items() if name != "megablocks"}
    if gmm is not None:
        glus["megablocks"] = lambda *a: _with_gmm(gmm, experts, *a)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "megablocks_gmm": gmm is not None}
    if device.type == "cuda":
        glus.pop("fused", None)  # a CPU fast path
    result["parity"] = parity(device, dtype, reference, glus)
    print(json.dumps(result["parity"], indent=2))
    peak = matmul_peak(torch.bfloat16 if device.type == "cuda" else torch.float32, device=str(device))
    result["matmul_peak_tflops"] = peak / 1e12
    if args.cpu:
        runs = [("tiny-dense-hybridnorm", []), ("tiny-moe-hybridnorm", ["moe.backend=grouped_mm"]),
                ("tiny-moe-hybridnorm", ["moe.backend=loop"])]
        micro_batch, seq = 2, 64
    else:
        moe = ["megablocks"] if gmm is not None else []
        runs = [("ladder-550m-dense-hybridnorm", [])] + [("ladder-550m-moe-hybridnorm", [f"moe.backend={b}"])
                                                          for b in (*moe, "grouped_mm")]
        micro_batch, seq = 4, 2048
    result["train"] = []
    for name, overrides in runs:
        row = train_speed(name, overrides, device, precision, args.steps, micro_batch, seq, peak)
        print(json.dumps(row))
        result["train"].append(row)
    result["wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()
    if result["parity"]["failed"]:
        print(f"gpu.py: parity FAILED for {', '.join(result['parity']['failed'])}", file=sys.stderr)
        return 1
    return 0


def _with_gmm(gmm: Any, experts: Any, *args: Any) -> torch.Tensor:
    """The megablocks backend with ``gmm`` as its grouped GEMM (the real one on CUDA, the reference on CPU)."""
    saved = experts.megablocks_gmm
    experts.megablocks_gmm = lambda: gmm
    try:
        return experts.megablocks_glu(*args)
    finally:
        experts.megablocks_gmm = saved


if __name__ == "__main__":
    sys.exit(main())
