"""Training-step benchmark: zoo models against HF transformers models with identical configs and
weights (a Llama-, an OLMoE- and a Mixtral-shaped model, each built in transformers with a seeded
init and imported with ``zoo convert``), forward + backward + AdamW step, in fp32 and bf16; and the
model FLOP utilisation of a ~30M-parameter dense zoo model at sequence 512. The matmul peaks the
utilisations refer to are measured in the same run. The zoo and HF models each run in a process of
their own (see ``Contender``), and their steps are timed round-robin, back to back; on CPU both processes
retain freed memory as ``zoo train`` does (``--allocator default`` for the C library's setting), and the
MFU model is timed both ways.

    python benchmarks/train_step.py                        # everything, writes benchmarks/results/train_step.json
    python benchmarks/train_step.py --models llama --dtypes fp32 --repeats 3
    python benchmarks/train_step.py --device cuda --dtypes bf16   # CUDA: auto = MegaBlocks in bf16 where it is built
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from common import matmul_peak, matmul_peaks, paired_ratio, round_robin_samples, sync

import zoo
from zoo.checkpoint import checkpoint_config
from zoo.interop.hf import from_hf
from zoo.kernels.gemm import cpu_has_native, cpu_matmul
from zoo.moe import after_optimizer_step
from zoo.train.malloc import retain_freed_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, vocab_size=4096,
             max_position_embeddings=1024, bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {  # name: (transformers config class, its arguments)
    "llama": ("LlamaConfig", {**SMALL, "intermediate_size": 704, "num_key_value_heads": 2}),
    "olmoe": ("OlmoeConfig", {**SMALL, "intermediate_size": 128, "num_experts": 64, "num_experts_per_tok": 8}),
    "mixtral": ("MixtralConfig", {**SMALL, "intermediate_size": 512, "num_local_experts": 8, "num_experts_per_tok": 2}),
}
MFU_MODEL = dict(d_model=512, n_layers=8, n_heads=8, vocab_size=8192, max_seq_len=512, tie_embeddings=True,
                 ffn={"type": "dense", "hidden_size": 1536})


def prepare(name: str, seed: int, workdir: Path) -> tuple[Path, Path]:
    """The same randomly initialised model saved by transformers and imported into the zoo: (HF folder,
    zoo checkpoint)."""
    import transformers

    cls_name, kwargs = MODELS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    hf.save_pretrained(workdir / name)
    return workdir / name, from_hf(workdir / name, workdir / f"{name}-zoo")


def load(lib: str, name: str, workdir: Path, device: str, moe_backend: str) -> tuple[torch.nn.Module, Callable[..., Any]]:
    """``lib``'s model ("zoo" or "hf") from ``prepare``'s files, in fp32 and training mode, with its loss function."""
    hf_dir, ckpt = workdir / name, workdir / f"{name}-zoo"
    if lib == "hf":
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa", dtype=torch.float32)
        return hf.to(device).train(), hf_loss
    model = zoo.load(ckpt, {"moe": {"backend": moe_backend}} if name != "llama" else None)
    return model.to(device).train(), zoo_loss


def hf_loss(hf: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM loss, LM loss + the model's own router loss) as a transformers training loop computes them."""
    moe = hasattr(hf.config, "router_aux_loss_coef")
    out = hf(input_ids=x, output_router_logits=moe) if moe else hf(input_ids=x)
    lm = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
    return lm, lm + hf.config.router_aux_loss_coef * out.aux_loss if moe else lm


def zoo_loss(model: zoo.ZooModel, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x, y)
    return out.loss, out.loss + out.aux_loss if out.aux_loss is not None else out.loss


def step_fn(model: torch.nn.Module, loss_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
            y: torch.Tensor, compiled: bool = False) -> Callable[[], None]:
    """One training step: zero grads, forward, backward, AdamW, the zoo's router update. AdamW is the fused
    kernel for both libraries, as both trainers default to (zoo.train, transformers' Trainer on torch >= 2.8)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(forward, x, y)[1].backward()
        opt.step()
        after_optimizer_step(model)

    return step


def build_mfu(device: str) -> tuple[torch.nn.Module, Callable[..., Any]]:
    """The ~30M dense zoo model of the MFU measurement, seeded, fp32, in training mode, with its loss function."""
    torch.manual_seed(0)
    return zoo.build("tiny-dense-prenorm", MFU_MODEL, device=device).train(), zoo_loss


def _serve(conn: Connection, make: Callable[[], tuple[torch.nn.Module, Callable[..., Any]]], device: str,
           tokens: torch.Tensor, retain: bool) -> None:
    """A contender's process: with ``retain``, first ``zoo.malloc.retain_freed_memory()`` (as ``zoo train``
    does); then builds ``make()``'s model, and answers ("retained",) (whether that applied), ("loss",),
    ("dtype", name[, compiled]) and ("steps", n) (the seconds of each of n steps) until ("close",),
    replying ("ok", value) or ("error", traceback)."""
    try:
        retained = retain_freed_memory() if retain else False
        model, loss_fn = make()
        x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        step: Optional[Callable[[], None]] = None
        while True:
            cmd, *args = conn.recv()
            if cmd == "close":
                return
            value: Any = None
            if cmd == "retained":
                value = retained
            elif cmd == "loss":
                with torch.no_grad():
                    value = float(loss_fn(model, x, y)[0])
            elif cmd == "dtype":
                model = model.to(DTYPES[args[0]])
                step = step_fn(model, loss_fn, x, y, compiled=bool(args[1:] and args[1]))
            else:
                assert step is not None, "set a dtype first"
                value = []
                for _ in range(args[0]):
                    start = time.perf_counter()
                    step()
                    sync(device)
                    value.append(time.perf_counter() - start)
            conn.send(("ok", value))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


class Contender:
    """One model in a process of its own (``make`` builds it there), its steps called from this one. Two models
    in one process share its heap: one's frees and trims then show up as page faults in the other's steps
    (measured here as several thousand per step moving between the libraries when one of them changed its
    allocations)."""

    def __init__(self, lib: str, make: Callable[[], tuple[torch.nn.Module, Callable[..., Any]]], device: str,
                 tokens: torch.Tensor, retain: bool):
        self.lib = lib
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, make, device, tokens, retain), daemon=True)
        self.process.start()

    def call(self, *cmd: Any) -> Any:
        try:
            self.conn.send(cmd)
            status, value = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=10)
            raise RuntimeError(f"the {self.lib} process exited (code {self.process.exitcode}) before answering "
                               f"{cmd[0]!r}") from None
        if status == "error":
            raise RuntimeError(f"the {self.lib} process failed:\n{value}")
        return value

    def steps(self, n: int) -> float:
        """The median seconds of ``n`` steps run back to back (timed in the contender's process)."""
        return statistics.median(self.call("steps", n))

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(("close",))
        self.process.join(timeout=60)


def compare(names: list[str], dtypes: list[str], repeats: int, batch: int, seq: int, device: str = "cpu",
            moe_backend: str = "auto", block: int = 3, retain: bool = True) -> list[dict[str, Any]]:
    """Each model's zoo and HF training steps, each library in its own process, fresh for each dtype (as a
    training run has one; a process's earlier steps in another dtype leave its heap in a state of their own):
    ``repeats`` rounds in which each takes a turn of ``block`` steps (its sample is their median), the order
    alternating by round. The first-step losses are the fp32 models', from the first pair of processes.
    With ``retain`` both processes keep freed memory (``zoo.malloc``, as ``zoo train`` does on CPU): the
    same process setting for both libraries."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            _, ckpt = prepare(name, 0, Path(tmp))
            cfg, _ = checkpoint_config(ckpt)
            gen = torch.Generator().manual_seed(1)
            tokens = torch.randint(0, MODELS[name][1]["vocab_size"], (batch, seq + 1), generator=gen)
            train_flops = zoo.stats(cfg, seq_len=seq).train_flops_per_token * batch * seq
            params = zoo.stats(cfg, seq_len=seq).total_params
            first: dict[str, float] = {}
            for dname in dtypes:
                with contextlib.ExitStack() as stack:
                    procs = {lib: Contender(lib, functools.partial(load, lib, name, Path(tmp), device, moe_backend),
                                            device, tokens, retain) for lib in ("zoo", "hf")}
                    for proc in procs.values():
                        stack.callback(proc.close)
                    retained = {proc.call("retained") for proc in procs.values()}
                    first = first or {lib: proc.call("loss") for lib, proc in procs.items()}
                    for proc in procs.values():
                        proc.call("dtype", dname)
                    samples = round_robin_samples({lib: functools.partial(proc.steps, block) for lib, proc in procs.items()},
                                                  repeats, self_timed=True)
                    times = {lib: statistics.median(ts) for lib, ts in samples.items()}
                    speedup = paired_ratio(samples["hf"], samples["zoo"])
                    row = {"model": name, "dtype": dname, "batch": batch, "seq": seq, "params": params,
                           "allocator": "retain" if retained == {True} else "default",
                           "first_step_loss": first, "first_step_loss_diff": abs(first["zoo"] - first["hf"]),
                           "zoo_step_ms": times["zoo"] * 1e3, "hf_step_ms": times["hf"] * 1e3,
                           "zoo_tokens_per_s": batch * seq / times["zoo"], "hf_tokens_per_s": batch * seq / times["hf"],
                           "speedup_vs_hf": speedup["median"], "speedup_vs_hf_quartiles": [speedup["q1"], speedup["q3"]],
                           "speedup_of_medians": times["hf"] / times["zoo"],
                           "zoo_gflops": train_flops / times["zoo"] / 1e9, "hf_gflops": train_flops / times["hf"] / 1e9}
                    rows.append(row)
                    print(f"{name:8s} {dname}: zoo {row['zoo_step_ms']:8.1f} ms ({row['zoo_tokens_per_s']:7,.0f} tok/s)  "
                          f"HF {row['hf_step_ms']:8.1f} ms ({row['hf_tokens_per_s']:7,.0f} tok/s)  zoo/HF speed "
                          f"{row['speedup_vs_hf']:.2f}x (quartiles {speedup['q1']:.2f}-{speedup['q3']:.2f})  first-step loss |zoo-HF| {row['first_step_loss_diff']:.1e}", flush=True)
    return rows


def mfu(dtypes: list[str], repeats: int, batch: int, seq: int, compiled: bool = False, device: str = "cpu",
        block: int = 3) -> list[dict[str, Any]]:
    """A training step of the ~30M dense zoo model: achieved FLOP/s (over the measured matmul peaks, in
    ``utilisation``). On CPU it runs as ``zoo train`` runs it, with freed memory retained
    (``zoo.malloc``), and beside it, round-robin in a process of its own, with the C library's defaults."""
    tokens = torch.randint(0, MFU_MODEL["vocab_size"], (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    st = zoo.stats(zoo.get_config("tiny-dense-prenorm", MFU_MODEL), seq_len=seq)
    flops = st.train_flops_per_token * batch * seq
    allocators = ("retain", "default") if device == "cpu" else ("default",)
    rows = []
    for dname in dtypes:
        for mode in ("eager", "compiled") if compiled else ("eager",):
            with contextlib.ExitStack() as stack:
                procs = {alloc: Contender(f"zoo ({alloc} allocator)", functools.partial(build_mfu, device), device,
                                          tokens, retain=alloc == "retain") for alloc in allocators}
                for proc in procs.values():
                    stack.callback(proc.close)
                retained = {alloc: proc.call("retained") for alloc, proc in procs.items()}
                for proc in procs.values():
                    proc.call("dtype", dname, mode == "compiled")
                samples = round_robin_samples({a: functools.partial(proc.steps, block) for a, proc in procs.items()},
                                              repeats, warmups=2 if mode == "compiled" else 1, self_timed=True)
            seconds = {alloc: statistics.median(ts) for alloc, ts in samples.items()}
            main_alloc = "retain" if retained.get("retain") else "default"
            row: dict[str, Any] = {
                "dtype": dname, "mode": mode, "params": st.total_params, "batch": batch, "seq": seq,
                "allocator": main_alloc, "step_ms": seconds[main_alloc] * 1e3,
                "tokens_per_s": batch * seq / seconds[main_alloc], "train_flops_per_token": st.train_flops_per_token,
                "achieved_gflops": flops / seconds[main_alloc] / 1e9}
            if main_alloc == "retain":
                row["default_allocator"] = {"step_ms": seconds["default"] * 1e3,
                                            "achieved_gflops": flops / seconds["default"] / 1e9}
            rows.append(row)
            print(f"MFU model {dname} {mode}: {st.total_params / 1e6:.1f}M params, batch {batch} x seq {seq}: "
                  + "; ".join(f"{alloc} allocator {seconds[alloc] * 1e3:.0f} ms/step, {flops / seconds[alloc] / 1e9:.1f} "
                              f"GFLOP/s" for alloc in seconds), flush=True)
    return rows


def utilisation(results: dict[str, Any]) -> None:
    """MFU fields of every row against the final peaks (the best of the measurements before and after)."""
    peaks = {d: g * 1e9 for d, g in results["matmul_peak_gflops"].items()}
    for row in results["vs_hf"]:
        row["zoo_mfu"], row["hf_mfu"] = row["zoo_gflops"] * 1e9 / peaks[row["dtype"]], row["hf_gflops"] * 1e9 / peaks[row["dtype"]]
        row["zoo_mfu_of_fp32_peak"] = row["zoo_gflops"] * 1e9 / peaks["fp32"]
        print(f"{row['model']:8s} {row['dtype']}: zoo {100 * row['zoo_mfu']:6.1f}%  HF {100 * row['hf_mfu']:6.1f}% of the "
              f"{row['dtype']} peak" + (f" (zoo {100 * row['zoo_mfu_of_fp32_peak']:.1f}% of the fp32 peak)"
                                        if row["dtype"] != "fp32" else ""))
    upcast = results["device"] == "cpu" and not cpu_has_native(torch.bfloat16)
    for row in results.get("mfu", []):
        row["mfu"] = row["achieved_gflops"] * 1e9 / peaks[row["dtype"]]
        row["mfu_of_fp32_peak"] = row["achieved_gflops"] * 1e9 / peaks["fp32"]
        other = row.get("default_allocator")
        if other:
            other["mfu"] = other["achieved_gflops"] * 1e9 / peaks[row["dtype"]]
        why = ": on this CPU the zoo computes bf16 GEMMs in fp32" if upcast else ""
        print(f"MFU ~{row['params'] / 1e6:.0f}M dense {row['dtype']} {row['mode']} ({row['allocator']} allocator): "
              f"{100 * row['mfu']:.1f}% of the {row['dtype']} matmul peak"
              + (f" ({100 * row['mfu_of_fp32_peak']:.1f}% of the fp32 peak{why})" if row["dtype"] != "fp32" else "")
              + (f"; {100 * other['mfu']:.1f}% with the C library's default allocator" if other else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=15, help="rounds (the speedup is the median of the per-round "
                        "ratios, which spread about +-3%% from round to round on a 2-core VM); the MFU model's too")
    parser.add_argument("--block", type=int, default=3, help="steps each library runs per turn in a round (its sample "
                        "is their median): a few steps in a row keep its caches warm, as in a training run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--mfu-batch", type=int, default=4)
    parser.add_argument("--mfu-seq", type=int, default=512)
    parser.add_argument("--no-mfu", action="store_true", help="skip the ~30M-parameter MFU measurement")
    parser.add_argument("--compile", action="store_true", help="also time the MFU model under torch.compile (compiling "
                        "takes minutes on 2 cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peaks and timings synchronize on CUDA)")
    parser.add_argument("--allocator", choices=("retain", "default"), default="retain",
                        help="the CPU allocator setting of both libraries' processes in the comparison with HF: retain "
                        "freed memory as zoo train does (zoo/train/malloc.py), or the C library's default; the MFU model "
                        "is timed with both")
    parser.add_argument("--moe-backend", default="auto", help="the zoo MoE backend (megablocks on a CUDA machine with it built)")
    parser.add_argument("--json", default="benchmarks/results/train_step.json")
    args = parser.parse_args(argv)
    dtypes = sorted({*args.dtypes, "fp32"})
    by_library = {d: matmul_peaks(DTYPES[d], device=args.device) for d in dtypes}
    peaks = {d: max(libs.values()) for d, libs in by_library.items()}
    print(f"matmul peak ({torch.get_num_threads()} threads): " + ", ".join(
        f"{d} {peaks[d] / 1e9:.1f} GFLOP/s (" + ", ".join(f"{lib} {v / 1e9:.0f}" for lib, v in libs.items()) + ")"
        for d, libs in by_library.items()))
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "matmul_peak_gflops": {d: p / 1e9 for d, p in peaks.items()},
                               "matmul_peak_gflops_by_library": {d: {lib: v / 1e9 for lib, v in libs.items()}
                                                                 for d, libs in by_library.items()},
                               "cpu_matmul": cpu_matmul() if args.device == "cpu" else None,
                               "device": args.device, "moe_backend": args.moe_backend,
                               "rounds": args.repeats, "steps_per_turn": args.block,
                               "vs_hf": compare(args.models, args.dtypes, args.repeats, args.batch, args.seq,
                                                args.device, args.moe_backend, args.block, args.allocator == "retain")}
    if not args.no_mfu:
        results["mfu"] = mfu(args.dtypes, args.repeats, args.mfu_batch, args.mfu_seq, args.compile, args.device,
                             args.block)
    after = {d: matmul_peak(DTYPES[d], device=args.device) for d in dtypes}  # the machine's speed drifts: keep the best
    results["matmul_peak_gflops_measured"] = {d: [peaks[d] / 1e9, after[d] / 1e9] for d in dtypes}
    results["matmul_peak_gflops"] = {d: max(peaks[d], after[d]) / 1e9 for d in dtypes}
    print("\nmatmul peak, best of the measurements before and after: "
          + ", ".join(f"{d} {g:.1f} GFLOP/s" for d, g in results["matmul_peak_gflops"].items()))
    utilisation(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
