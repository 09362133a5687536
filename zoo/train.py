"""The trainer: AdamW, warmup then cosine, clipping, MoE aux losses, metrics, checkpoints, exact resume.

Data order is a function of (seed, step) (zoo.data), the optimizer and RNG states are checkpointed,
so ``resume=True`` continues the loss curve as if the run had never stopped. Under ``torchrun``
each rank takes its slice of the same global batch and gradients are averaged by DDP (gloo on CPU,
NCCL on CUDA), so N processes follow the one-process curve.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .config import ConfigSource, ModelConfig
from .data import Corpus, load_corpus
from .errors import ZooError
from .linear import cpu_matmul_libraries, matmul_t
from .malloc import retain_freed_memory
from .model import ZooModel
from .moe import after_optimizer_step
from .stats import model_stats


DIVERGED_EXIT = 3  # `zoo train` exit status when a run diverged


class DivergenceError(ZooError):
    """Training diverged; the message names the step and the layer whose gradients blew up."""


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    seed: int = 0
    autocast_bf16: Optional[bool] = None  # None: on CUDA only (bf16 matmuls are slow on CPUs without bf16 units)
    divergence_factor: float = 3.0        # loss above factor x its running mean (after warmup) is divergence
    data: str = "stdlib"
    tokenizer: str = "byte"               # or "bpe:VOCAB" (zoo.data): a BPE trained on the train split, cached
    compile: bool = False                 # torch.compile the training forward (inductor); the first steps compile


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices except the embedding; gains, biases and scalars undecayed.

    The fused AdamW kernel (one pass over each tensor) where the parameters' device has it, as
    transformers' Trainer defaults to: on CPU it takes about a quarter of the foreach step's time."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not name.startswith("embed.") else no_decay).append(p)
    fused = all(p.device.type in ("cpu", "cuda") for p in (*decay, *no_decay))
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=tc.lr, betas=(tc.beta1, tc.beta2), **({"fused": True} if fused else {"foreach": True}))


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """FLOP/s of a square CPU matmul, best of a few and, in fp32, of every library torch has for it."""
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG (model init, jitter) alone
    a, b = torch.randn(n, n, dtype=dtype, generator=gen), torch.randn(n, n, dtype=dtype, generator=gen)
    runs = [lambda: a @ b]
    if dtype == torch.float32:
        runs = [functools.partial(matmul_t, a, b, library=lib) for lib in cpu_matmul_libraries()]
    best = float("inf")
    for run in runs:
        run()
        for _ in range(5):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


@dataclass
class RunState:
    step: int = 0
    tokens: int = 0
    wall: float = 0.0
    loss_ema: Optional[float] = None
    best_val: Optional[float] = None


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_train_loss: float
    final_val_loss: Optional[float]
    diverged: bool
    tokens_per_s: float
    metrics: Path
    extra: dict[str, Any] = field(default_factory=dict)


def init_distributed() -> bool:
    """Join the process group that torchrun describes (gloo on CPU, NCCL on CUDA); False if none."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean(value: torch.Tensor) -> torch.Tensor:
    rank, world = _world()
    if world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return value


def save_trainer_state(path: Path, opt: torch.optim.Optimizer, state: RunState) -> None:
    """Optimizer moments and RNG state as safetensors (no pickle); scalars in the metadata."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    scalars: dict[str, Any] = {}
    for i, (p_id, s) in enumerate(opt.state_dict()["state"].items()):
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{p_id}.{k}"] = v.contiguous()
            else:
                scalars[f"opt.{p_id}.{k}"] = v
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"run": json.dumps(asdict(state)), "scalars": json.dumps(scalars)})
    os.replace(tmp, path)


def load_trainer_state(path: Path, opt: torch.optim.Optimizer) -> RunState:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    scalars = json.loads(meta["scalars"])
    sd = opt.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *scalars.items()]:
        if key.startswith("opt."):
            _, p_id, name = key.split(".", 2)
            state.setdefault(int(p_id), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)
    torch.set_rng_state(tensors["rng.torch"])
    return RunState(**json.loads(meta["run"]))


def _ffn_grad_norms(model: ZooModel) -> list[float]:
    return [math.sqrt(sum(float(p.grad.float().square().sum()) for p in b.ffn.parameters() if p.grad is not None))
            for b in model.blocks]


def _blowup_layer(model: ZooModel) -> str:
    """The block (or other part) with the largest or a non-finite gradient norm."""
    worst, where = -1.0, "?"
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        norm = float(p.grad.float().norm())
        if not math.isfinite(norm):
            return name
        if norm > worst:
            worst, where = norm, name
    return where


def _max_attn_logits(values: list[Optional[torch.Tensor]]) -> list[Optional[float]]:
    """Per layer, the largest pre-softmax attention logit of the step (max over ranks); None for an
    attention that does not record it (``Attention.record_max_logit``, zoo/attention.py)."""
    found = [v.detach().float().reshape(()) for v in values if v is not None]
    if not found:
        return [None] * len(values)
    both = torch.stack(found)
    if _world()[1] > 1:
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    got = iter(both.tolist())
    return [next(got) if v is not None else None for v in values]


def evaluate(model: ZooModel, corpus: Corpus, tc: TrainConfig, step: int) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(tc.eval_batches):
            x, y = corpus.batch("val", tc.seed, i, tc.batch_size, tc.seq_len)  # the same batches at every eval
            losses.append(float(model(x, y).loss))
    model.train()
    return sum(losses) / len(losses)


def train(model_source: Union[str, ModelConfig], overrides: ConfigSource = None, tc: Optional[TrainConfig] = None, *,
          out_dir: Union[str, Path] = "runs/train", resume: bool = False, progress: bool = True,
          corpus: Optional[Corpus] = None, stop_after: Optional[int] = None) -> TrainResult:
    """Train a variant (by name or config) and write metrics.jsonl and checkpoints to ``out_dir``.

    ``stop_after`` ends the process's work after that many steps of this call (for tests of resume).
    """
    import zoo

    tc = tc or TrainConfig()
    out = Path(out_dir)
    rank, world = _world()
    if tc.batch_size % world:
        raise ZooError(f"the global batch ({tc.batch_size}) must be divisible by the number of processes ({world})")
    cfg = zoo.get_config(model_source, overrides)
    if tc.seq_len > cfg.max_seq_len:
        raise ZooError(f"seq_len {tc.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    corpus = corpus or load_corpus(tc.data, tokenizer=tc.tokenizer, progress=progress and rank == 0)
    if corpus.vocab_size > cfg.vocab_size:
        raise ZooError(f"the tokenizer ({corpus.tokenizer_spec}) has {corpus.vocab_size} tokens but the model's vocab_size "
                       f"is {cfg.vocab_size}; add --set vocab_size={corpus.vocab_size} (or more)")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        retain_freed_memory()
    torch.manual_seed(tc.seed)
    model = zoo.build(cfg, device=device)
    opt = make_optimizer(model, tc)
    state = RunState()
    ckpt, trainer_state = out / "checkpoint" / "model.safetensors", out / "checkpoint" / "trainer.safetensors"
    metrics_path = out / "metrics.jsonl"
    if resume:
        if not trainer_state.exists():
            raise ZooError(f"--resume: no checkpoint in {out / 'checkpoint'}; start without --resume")
        model.load_state_dict(zoo.load(ckpt, device=device).state_dict())
        state = load_trainer_state(trainer_state, opt)
        if rank == 0 and metrics_path.exists():  # drop lines logged after the checkpoint
            lines = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln).get("step", -1) < state.step]
            metrics_path.write_text("".join(ln + "\n" for ln in lines))
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
        (out / "config.yaml").write_text(cfg.to_yaml())
        (out / "train.json").write_text(json.dumps(asdict(tc), indent=2))
    if rank == 0:  # tokenizer_for(checkpoint) finds it beside the weights
        for folder in (out, out / "checkpoint"):
            corpus.save_tokenizer(folder)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else None
    forward = torch.compile(ddp or model) if tc.compile else (ddp or model)
    autocast = tc.autocast_bf16 if tc.autocast_bf16 is not None else device.type == "cuda"
    train_flops = model_stats(cfg, tc.seq_len).train_flops_per_token
    peak = matmul_peak() if device.type == "cpu" else None
    rms: list[torch.Tensor] = []  # tensors, read after the step: no host sync (or graph break) inside the forward
    hooks = [b.register_forward_hook(lambda m, i, o: rms.append(o[0].detach().float().square().mean().sqrt()))
             for b in model.blocks]
    for b in model.blocks:
        b.attn.record_max_logit = True
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=state.step, desc=str(model_source) if isinstance(model_source, str) else "train",
                   unit="step", dynamic_ncols=True)
    diverged, last_loss, done_here = False, float("nan"), 0
    val_loss: Optional[float] = None
    metrics = open(metrics_path, "a") if rank == 0 else None
    try:
        while state.step < tc.steps:
            step = state.step
            lr = lr_at(step, tc)
            for group in opt.param_groups:
                group["lr"] = lr
            x, y = corpus.batch("train", tc.seed, step, tc.batch_size, tc.seq_len)
            x, y = x[rank::world].to(device), y[rank::world].to(device)
            t0 = time.perf_counter()
            rms.clear()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                output = forward(x, y)
            step_logits = [getattr(b.attn, "last_max_logit", None) for b in model.blocks]
            loss = output.loss + (output.aux_loss if output.aux_loss is not None else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
            lm_loss = float(_mean(output.loss.detach()))
            if not math.isfinite(lm_loss) or not math.isfinite(grad_norm) or (
                    step >= tc.warmup_steps and state.loss_ema is not None and lm_loss > tc.divergence_factor * state.loss_ema):
                diverged = True
                layer = _blowup_layer(model)
                message = (f"training diverged at step {step}: loss {lm_loss:.4g} (running mean "
                           f"{state.loss_ema if state.loss_ema is not None else float('nan'):.4g}), gradient norm {grad_norm:.4g}; "
                           f"the largest or non-finite gradient is in {layer}. The last good checkpoint is "
                           f"{ckpt if ckpt.exists() else 'none (no checkpoint was written yet)'}.")
                if metrics:
                    metrics.write(json.dumps({"step": step, "event": "diverged", "loss": lm_loss, "grad_norm": grad_norm,
                                              "layer": layer}) + "\n")
                raise DivergenceError(message)
            opt.step()
            after_optimizer_step(model)
            dt = time.perf_counter() - t0
            state.step += 1
            state.tokens += tc.batch_size * tc.seq_len
            state.wall += dt
            state.loss_ema = lm_loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * lm_loss
            last_loss = lm_loss
            tps = tc.batch_size * tc.seq_len / dt
            record: dict[str, Any] = {
                "step": step, "loss": lm_loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens,
                "wall": state.wall, "tokens_per_s": tps, "ffn_grad_norms": _ffn_grad_norms(model),
                "residual_rms": [float(r) for r in rms[: len(model.blocks)]],
                "max_attn_logit": _max_attn_logits(step_logits),
            }
            if output.aux_loss is not None:
                record["aux_loss"] = float(output.aux_loss.detach())
                record["router"] = [{"load_cv": float(s["load_cv"]), "max_over_mean": float(s["max_over_mean"]),
                                     "dropped": int(s["dropped"]), "router_logsumexp": float(s["router_logsumexp"])}
                                    for s in output.router_stats]
            if peak:
                record["mfu"] = train_flops * tps * world / peak
            if state.step % tc.eval_every == 0 or state.step == tc.steps:
                val_loss = evaluate(model, corpus, tc, state.step)
                record["val_loss"] = val_loss
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if rank == 0 and (state.step % tc.checkpoint_every == 0 or state.step == tc.steps):
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                zoo.save(model, ckpt, variant=model_source if isinstance(model_source, str) else None)
                save_trainer_state(trainer_state, opt, state)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{lm_loss:.3f}", tok_s=f"{tps:,.0f}", **({"val": f"{val_loss:.3f}"} if val_loss else {}))
            done_here += 1
            if stop_after is not None and done_here >= stop_after:
                break
    finally:
        for h in hooks:
            h.remove()
        if bar:
            bar.close()
        if metrics:
            metrics.close()
    result = TrainResult(out, state.step, last_loss, val_loss, diverged, state.tokens / max(state.wall, 1e-9) * world, metrics_path)
    if rank == 0:
        import resource
        summary = {"steps": state.step, "tokens": state.tokens, "wall": state.wall, "final_train_loss": last_loss,
                   "final_val_loss": val_loss, "diverged": diverged, "tokens_per_s": result.tokens_per_s,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return result
