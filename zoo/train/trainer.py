"""The trainer: AdamW, warmup then cosine, clipping, MoE aux losses, metrics, checkpoints, exact resume.

Data order is a function of (seed, step) (zoo/train/data.py), and the optimizer and RNG states are
checkpointed, so ``resume=True`` continues the loss curve as if the run had never stopped. Under
``torchrun`` each rank takes its slice of the same global batch and gradients are averaged across
ranks, so N processes follow the one-process curve. The parallel layout (DDP, FSDP2, HSDP, expert
parallel; zoo/distributed/) wraps the plain model from outside; ``--grad-accum`` splits each rank's part
of the batch into micro-batches.
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm import tqdm

from ..api import get_config
from ..builder import model_stats
from ..checkpoint import load, save
from ..config import ConfigSource, ModelConfig, config_differences
from ..distributed import checkpoint as dcp_checkpoint
from ..distributed.grads import clip_grad_norm
from ..distributed.layout import Layout, device_for_rank
from ..distributed.parallelize import parallelize
from ..distributed.world import barrier, mean_over_ranks, rank_and_world, sum_over_ranks
from ..errors import ZooError
from ..files import (
    CHECKPOINT_DIR,
    CONFIG_NAME,
    MANIFEST_NAME,
    TRAINER_STATE_NAME,
    WEIGHTS_NAME,
    atomic_folder,
    recover_folder,
    remove_stale_temps,
    strict_json,
    write_json,
    write_text,
)
from ..moe import after_optimizer_step
from .data import Corpus, load_corpus
from .malloc import retain_freed_memory
from .metrics import BlockProbe, blowup_layer, ffn_grad_norms, matmul_peak
from .optim import lr_at, make_optimizer
from .state import RunState, check_manifest, load_trainer_state, save_trainer_state, write_manifest

DIVERGED_EXIT = 3  # `zoo train` exit status when a run diverged
TRAIN_CONFIG_NAME = "train.json"


class RankLostError(ZooError):
    """Another rank stopped answering: the message names this rank and the step."""


def lost_rank(error: RuntimeError) -> bool:
    """Whether a collective failed because a peer did not answer (gloo and NCCL word it so)."""
    text = str(error).lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed by peer", "connection reset by peer",
                                   "broken pipe"))


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
    decay_norm_and_bias: bool = False     # weight decay on norm gains and biases too (the HybridNorm code's setting)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    seed: int = 0
    precision: Optional[str] = None       # fp32 | bf16 | fp64; None: bf16 on CUDA, fp32 on CPU (slow bf16 matmuls)
    grad_accum: int = 1                   # micro-batches per step on each rank
    dp_shard: int = 0                     # FSDP2 ranks (0 with dp_replicate = ep = 1: DDP); see zoo/distributed/layout.py
    dp_replicate: int = 1                 # HSDP: replicas of the sharded model
    ep: int = 1                           # expert parallel: ranks that split each MoE layer's experts
    ac: str = "none"                      # activation checkpointing: none | full | every:N
    dist_timeout: float = 600.0           # seconds a collective may wait for a rank before the run fails
    divergence_factor: float = 3.0        # loss above factor x its running mean (after warmup) is divergence
    data: str = "stdlib"
    tokenizer: str = "byte"               # or "bpe:VOCAB" (zoo/train/data.py): a BPE trained on the train split, cached
    compile: bool = False                 # torch.compile the training forward (inductor); the first steps compile

    @classmethod
    def of_run(cls, out_dir: Union[str, Path]) -> "TrainConfig":
        """The settings a run folder was started with (``train.json``); fields added since keep their defaults."""
        path = Path(out_dir) / TRAIN_CONFIG_NAME
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ZooError(f"{path}: cannot read the run's settings ({e}); is {out_dir} a run folder of zoo train?") from None
        known = {f.name for f in fields(cls)}
        if saved.get("autocast_bf16") is not None and saved.get("precision") is None:  # runs of zoo 0.2
            saved["precision"] = "bf16" if saved["autocast_bf16"] else "fp32"
        return cls(**{k: v for k, v in saved.items() if k in known})

    def check(self) -> None:
        """Refuse settings no run can use, naming the option (one line, before anything is built)."""
        at_least_one = {"--steps": self.steps, "--batch-size": self.batch_size, "--seq-len": self.seq_len,
                        "--eval-every": self.eval_every, "--eval-batches": self.eval_batches,
                        "--checkpoint-every": self.checkpoint_every, "--grad-accum": self.grad_accum}
        for flag, value in at_least_one.items():
            if value < 1:
                raise ZooError(f"{flag} must be at least 1, not {value}")
        if self.warmup_steps < 0:
            raise ZooError(f"--warmup must be 0 or more, not {self.warmup_steps}")
        positive = {"--lr": self.lr, "grad_clip": self.grad_clip, "--dist-timeout": self.dist_timeout}
        for flag, value in positive.items():
            if not math.isfinite(value) or value <= 0:
                raise ZooError(f"{flag} must be a positive number, not {value}")
        for name, value in (("min_lr_ratio", self.min_lr_ratio), ("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 <= value <= 1:
                raise ZooError(f"{name} must be between 0 and 1, not {value}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ZooError(f"weight_decay must be 0 or more, not {self.weight_decay}")

    def layout(self, world: int) -> Layout:
        return Layout.of(world, self.dp_shard, self.dp_replicate, self.ep)


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    final_train_loss: float
    final_val_loss: Optional[float]
    tokens_per_s: float
    metrics: Path


class Trainer:
    """One run: ``setup`` in the constructor, then ``run()`` calls ``step``, ``evaluate``, ``checkpoint``
    and ``log`` until ``tc.steps``. ``variant`` names the run's model in its checkpoints."""

    def __init__(self, model_source: Union[str, ModelConfig], overrides: ConfigSource = None,
                 tc: Optional[TrainConfig] = None, *, out_dir: Union[str, Path] = "runs/train", resume: bool = False,
                 progress: bool = True, corpus: Optional[Corpus] = None, variant: Optional[str] = None):
        self.tc = tc = tc or TrainConfig()
        tc.check()
        self.out = Path(out_dir)
        self.rank, self.world = rank_and_world()
        self.variant = variant if variant is not None else model_source if isinstance(model_source, str) else None
        if tc.grad_accum < 1 or tc.batch_size % (self.world * tc.grad_accum):
            raise ZooError(f"the global batch ({tc.batch_size}) must be divisible by the number of processes ({self.world}) "
                           f"x --grad-accum ({tc.grad_accum})")
        self.layout = tc.layout(self.world)
        self.cfg = cfg = get_config(model_source, overrides)
        if tc.seq_len > cfg.max_seq_len:
            raise ZooError(f"seq_len {tc.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        self.corpus = corpus or load_corpus(tc.data, tokenizer=tc.tokenizer, progress=progress and self.rank == 0)
        if self.corpus.vocab_size > cfg.vocab_size:
            raise ZooError(f"the tokenizer ({self.corpus.tokenizer_spec}) has {self.corpus.vocab_size} tokens but the "
                           f"model's vocab_size is {cfg.vocab_size}; add --set vocab_size={self.corpus.vocab_size} (or more)")
        self.device = device_for_rank()
        if self.device.type == "cpu":
            retain_freed_memory()
        self.precision = tc.precision or ("bf16" if self.device.type == "cuda" else "fp32")
        torch.manual_seed(tc.seed)
        self.parallel = parallelize(cfg, self.layout, device=self.device, precision=self.precision, ac=tc.ac,
                                    variant=self.variant)
        self.model = self.parallel.model
        self.opt = make_optimizer(self.model, tc)
        self.state = RunState()
        folder = self.out / CHECKPOINT_DIR
        self.weights, self.trainer_state = folder / WEIGHTS_NAME, folder / TRAINER_STATE_NAME
        self.sharded = folder / dcp_checkpoint.SHARDED_DIR
        self.metrics_path = self.out / "metrics.jsonl"
        self.last_loss: float = float("nan")
        self.val_loss: Optional[float] = None
        if resume:
            self._resume()
        elif self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics_path.write_text("")
            write_text(self.out / CONFIG_NAME, cfg.to_yaml())
            write_json(self.out / TRAIN_CONFIG_NAME, asdict(tc))
        if self.rank == 0:  # tokenizer_for(checkpoint) finds it beside the weights
            for where in (self.out, folder):
                self.corpus.save_tokenizer(where)
        self.forward = self.wrap(self.parallel.forward)
        self.autocast = self.precision == "bf16" and not self.layout.fsdp  # FSDP2 casts by its own policy
        self.train_flops = model_stats(cfg, tc.seq_len).train_flops_per_token
        self.peak = matmul_peak() if self.device.type == "cpu" else None

    def _resume(self) -> None:
        if self.rank == 0:  # a kill during the last checkpoint's swap (zoo/files.py atomic_folder), or another write
            recover_folder(self.weights.parent)
            remove_stale_temps(self.out)
        barrier()
        if self.layout.fsdp:
            self.state = RunState.of(dcp_checkpoint.load(self.sharded, self.model, self.opt, self.rank))
        elif not self.trainer_state.exists():
            raise ZooError(f"--resume: no checkpoint in {self.trainer_state.parent}; start without --resume")
        else:
            step = check_manifest(self.weights.parent, (self.weights.name, self.trainer_state.name))
            if step is None:
                warnings.warn(f"{self.weights.parent} has no {MANIFEST_NAME} (an older zoo wrote it): its files "
                              "are resumed without a check that they belong together", stacklevel=2)
            saved = load(self.weights, device=self.device)
            differs = config_differences(saved.cfg, self.cfg)
            if differs:
                raise ZooError(f"--resume: the checkpoint in {self.weights.parent} is of another model than this "
                               f"command builds: {', '.join(differs)}; resume with the run's own config (`zoo train "
                               f"{self.out} --resume`, without --set)")
            self.model.load_state_dict(saved.state_dict())
            self.state = load_trainer_state(self.trainer_state, self.opt)
            if step is not None and self.state.step != step:
                raise ZooError(f"--resume: {self.trainer_state} holds step {self.state.step}, but the checkpoint's "
                               f"{MANIFEST_NAME} records step {step}; put back the folder as it was saved")
        if self.rank == 0 and self.metrics_path.exists():  # drop lines logged after the checkpoint
            lines = [ln for ln in self.metrics_path.read_text().splitlines()
                     if json.loads(ln).get("step", -1) < self.state.step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in lines))
            self._restore_last_losses([json.loads(ln) for ln in lines])

    def _restore_last_losses(self, records: list[dict[str, Any]]) -> None:
        """The losses a run had reached at its checkpoint, so that resuming a finished run reports them."""
        for record in records:
            if "loss" in record:
                self.last_loss = record["loss"]
            if record.get("val_loss") is not None:
                self.val_loss = record["val_loss"]

    def wrap(self, forward: torch.nn.Module) -> torch.nn.Module:
        """The last wrapper around the parallel model (``zoo.distributed.parallelize``): ``tc.compile``
        compiles it."""
        return torch.compile(forward) if self.tc.compile else forward

    def _gradient_sync(self, sync: bool) -> Any:
        """Skip the gradient reduction of all but a step's last micro-batch."""
        if not self.layout.fsdp:
            return contextlib.nullcontext() if sync or self.world == 1 else self.parallel.forward.no_sync()
        self.model.set_requires_gradient_sync(sync)  # type: ignore[operator]
        return contextlib.nullcontext()

    def step(self, probe: BlockProbe) -> dict[str, Any]:
        """One optimizer step on the next batch; returns its metrics record (raises ``DivergenceError``)."""
        tc, state, model = self.tc, self.state, self.model
        step = state.step
        lr = lr_at(step, tc)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = self.corpus.batch("train", tc.seed, step, tc.batch_size, tc.seq_len,
                                 rows=range(self.rank, tc.batch_size, self.world))
        x, y = x.to(self.device), y.to(self.device)
        t0 = time.perf_counter()
        probe.start()
        self.opt.zero_grad(set_to_none=True)
        lm_sum, aux_sum, accum = 0.0, None, tc.grad_accum
        for k, (xs, ys) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
            with self._gradient_sync(k == accum - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    output = self.forward(xs, ys)
                if k == 0:
                    step_logits = probe.logits()
                loss = output.loss + (output.aux_loss if output.aux_loss is not None else 0.0)
                (loss / accum if accum > 1 else loss).backward()
            lm_sum = lm_sum + output.loss.detach()
            if output.aux_loss is not None:
                aux_sum = output.aux_loss.detach() + (aux_sum if aux_sum is not None else 0.0)
        grad_norm = float(clip_grad_norm(model.parameters(), tc.grad_clip))
        lm_loss = float(mean_over_ranks(lm_sum / accum))
        if not math.isfinite(lm_loss) or not math.isfinite(grad_norm) or (
                step >= tc.warmup_steps and state.loss_ema is not None and lm_loss > tc.divergence_factor * state.loss_ema):
            self._diverged(step, lm_loss, grad_norm)
        self.opt.step()
        after_optimizer_step(model)
        dt = time.perf_counter() - t0
        state.step += 1
        state.tokens += tc.batch_size * tc.seq_len
        state.wall += dt
        state.loss_ema = lm_loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * lm_loss
        self.last_loss = lm_loss
        tps = tc.batch_size * tc.seq_len / dt
        record: dict[str, Any] = {"step": step, "loss": lm_loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens,
                                  "wall": state.wall, "tokens_per_s": tps, "ffn_grad_norms": ffn_grad_norms(model),
                                  **probe.read(step_logits)}
        if aux_sum is not None:
            record["aux_loss"] = float(mean_over_ranks(aux_sum / accum))
            record["router"] = router_record(output.router_stats)
        if self.peak:
            record["mfu"] = self.train_flops * tps / (self.peak * self.world)  # tps counts every rank's tokens
        return record

    def _diverged(self, step: int, lm_loss: float, grad_norm: float) -> None:
        layer = blowup_layer(self.model)
        ema = self.state.loss_ema if self.state.loss_ema is not None else float("nan")
        last_good = self.weights if self.weights.exists() else "none (no checkpoint was written yet)"
        if self.rank == 0:
            self.log({"step": step, "event": "diverged", "loss": lm_loss, "grad_norm": grad_norm, "layer": layer})
        raise DivergenceError(f"training diverged at step {step}: loss {lm_loss:.4g} (running mean {ema:.4g}), gradient "
                              f"norm {grad_norm:.4g}; the largest or non-finite gradient is in {layer}. The last good "
                              f"checkpoint is {last_good}.")

    def evaluate(self) -> float:
        """Mean loss on ``tc.eval_batches`` fixed validation batches: the same ones at every evaluation."""
        tc, model = self.tc, self.model
        model.eval()
        losses = []
        with torch.no_grad():
            for i in range(tc.eval_batches):
                x, y = self.corpus.batch("val", tc.seed, i, tc.batch_size, tc.seq_len,
                                         rows=range(self.rank, tc.batch_size, self.world))
                losses.append(float(mean_over_ranks(model(x.to(self.device), y.to(self.device)).loss)))
        model.train()
        return sum(losses) / len(losses)

    def checkpoint(self) -> None:
        """The weights (``zoo.load`` reads them alone) and, beside them, what resuming needs; under FSDP2
        every rank saves its shards with torch.distributed.checkpoint (``zoo export`` joins them)."""
        if self.layout.fsdp:
            dcp_checkpoint.save(self.sharded, self.model, self.opt, {**asdict(self.state), "variant": self.variant},
                                self.rank)
        elif self.rank == 0:  # weights, trainer state and tokenizer replace the last ones together
            with atomic_folder(self.weights.parent) as folder:
                save(self.model, folder / self.weights.name, variant=self.variant)
                save_trainer_state(folder / self.trainer_state.name, self.opt, self.state)
                self.corpus.save_tokenizer(folder)
                write_manifest(folder, self.state.step)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(strict_json(record) + "\n")

    def run(self, stop_after: Optional[int] = None, progress: bool = True) -> TrainResult:
        """Train to ``tc.steps`` (or for ``stop_after`` steps of this call, for tests of resume)."""
        tc, state = self.tc, self.state
        probe = BlockProbe(self.model)
        bar = None
        if progress and self.rank == 0:
            bar = tqdm(total=tc.steps, initial=state.step, desc=self.variant or "train", unit="step", dynamic_ncols=True)
        done_here = 0
        try:
            while state.step < tc.steps:
                record = self.step(probe)
                if state.step % tc.eval_every == 0 or state.step == tc.steps:
                    self.val_loss = record["val_loss"] = self.evaluate()
                if self.rank == 0:
                    self.log(record)
                if state.step % tc.checkpoint_every == 0 or state.step == tc.steps:
                    self.checkpoint()
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                    **({"val": f"{self.val_loss:.3f}"} if self.val_loss else {}))
                done_here += 1
                if stop_after is not None and done_here >= stop_after:
                    break
        except DivergenceError as e:
            if self.rank == 0:
                self._write_summary({"step": state.step, "message": str(e)})
            raise
        except RuntimeError as e:
            if self.world > 1 and lost_rank(e):
                raise RankLostError(
                    f"rank {self.rank} of {self.world} at step {state.step}: a collective waited longer than --dist-timeout "
                    f"({tc.dist_timeout:g} s) for another rank, which hung, stopped or died ({str(e).splitlines()[0]}); "
                    f"resume from the last checkpoint with --resume") from None
            raise
        finally:
            probe.close()
            if bar:
                bar.close()
        result = TrainResult(self.out, state.step, self.last_loss, self.val_loss, self.tokens_per_s, self.metrics_path)
        if self.rank == 0:
            self._write_summary(None)
        return result

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second of the whole run (``state.tokens`` counts the global batch, every rank's tokens)."""
        return self.state.tokens / max(self.state.wall, 1e-9)

    def _write_summary(self, diverged: Optional[dict[str, Any]]) -> None:
        """``summary.json``: the run's totals, and ``diverged`` (step and message) when it diverged."""
        state = self.state
        write_json(self.out / "summary.json", {
            "steps": state.step, "tokens": state.tokens, "wall": state.wall, "final_train_loss": self.last_loss,
            "final_val_loss": self.val_loss, "tokens_per_s": self.tokens_per_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "diverged": diverged})


def router_record(stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per MoE layer: load statistics (over all ranks with ``lb_scope: global``), assignments dropped and the
    router logits' mean logsumexp over all ranks."""
    if not stats:
        return []
    dropped = sum_over_ranks(torch.tensor([float(s["dropped"]) for s in stats])).tolist()
    lse = mean_over_ranks(torch.stack([s["router_logsumexp"].detach().double() for s in stats])).tolist()
    return [{"load_cv": float(s["load_cv"]), "max_over_mean": float(s["max_over_mean"]), "dropped": int(d),
             "router_logsumexp": l} for s, d, l in zip(stats, dropped, lse)]


def train(model_source: Union[str, ModelConfig], overrides: ConfigSource = None, tc: Optional[TrainConfig] = None, *,
          out_dir: Union[str, Path] = "runs/train", resume: bool = False, progress: bool = True,
          corpus: Optional[Corpus] = None, stop_after: Optional[int] = None, variant: Optional[str] = None) -> TrainResult:
    """Train a variant (by name or config) and write metrics.jsonl and checkpoints to ``out_dir``.

    ``stop_after`` ends this call's work after that many steps (for tests of resume)."""
    trainer = Trainer(model_source, overrides, tc, out_dir=out_dir, resume=resume, progress=progress, corpus=corpus,
                      variant=variant)
    return trainer.run(stop_after, progress)
