"""The trainer: AdamW, warmup then cosine, clipping, MoE aux losses, metrics, checkpoints, exact resume.

Data order is a function of (seed, step) (zoo/train/data.py), and the optimizer and RNG states are
checkpointed, so ``resume=True`` continues the loss curve as if the run had never stopped. Under
``torchrun`` each rank takes its slice of the same global batch and gradients are averaged across
ranks, so N processes follow the one-process curve. ``Trainer.wrap`` is the seam where a parallel
layout wraps the plain model.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm import tqdm

from ..api import get_config
from ..builder import build_model, model_stats
from ..checkpoint import load, save
from ..config import ConfigSource, ModelConfig
from ..errors import ZooError
from ..files import CHECKPOINT_DIR, CONFIG_NAME, TRAINER_STATE_NAME, WEIGHTS_NAME, write_json, write_text
from ..moe import after_optimizer_step
from .data import Corpus, load_corpus
from .malloc import retain_freed_memory
from .metrics import BlockProbe, blowup_layer, ffn_grad_norms, matmul_peak
from .optim import lr_at, make_optimizer
from .state import RunState, load_trainer_state, save_trainer_state
from .world import mean_over_ranks, rank_and_world

DIVERGED_EXIT = 3  # `zoo train` exit status when a run diverged
TRAIN_CONFIG_NAME = "train.json"


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
        return cls(**{k: v for k, v in saved.items() if k in known})


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
        self.out = Path(out_dir)
        self.rank, self.world = rank_and_world()
        self.variant = variant if variant is not None else model_source if isinstance(model_source, str) else None
        if tc.batch_size % self.world:
            raise ZooError(f"the global batch ({tc.batch_size}) must be divisible by the number of processes ({self.world})")
        self.cfg = cfg = get_config(model_source, overrides)
        if tc.seq_len > cfg.max_seq_len:
            raise ZooError(f"seq_len {tc.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        self.corpus = corpus or load_corpus(tc.data, tokenizer=tc.tokenizer, progress=progress and self.rank == 0)
        if self.corpus.vocab_size > cfg.vocab_size:
            raise ZooError(f"the tokenizer ({self.corpus.tokenizer_spec}) has {self.corpus.vocab_size} tokens but the "
                           f"model's vocab_size is {cfg.vocab_size}; add --set vocab_size={self.corpus.vocab_size} (or more)")
        self.device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
                       else torch.device("cpu"))
        if self.device.type == "cpu":
            retain_freed_memory()
        torch.manual_seed(tc.seed)
        self.model = build_model(cfg, device=self.device, variant=self.variant)
        self.opt = make_optimizer(self.model, tc)
        self.state = RunState()
        folder = self.out / CHECKPOINT_DIR
        self.weights, self.trainer_state = folder / WEIGHTS_NAME, folder / TRAINER_STATE_NAME
        self.metrics_path = self.out / "metrics.jsonl"
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
        self.forward = self.wrap(self.model)
        self.autocast = tc.autocast_bf16 if tc.autocast_bf16 is not None else self.device.type == "cuda"
        self.train_flops = model_stats(cfg, tc.seq_len).train_flops_per_token
        self.peak = matmul_peak() if self.device.type == "cpu" else None
        self.last_loss, self.val_loss = float("nan"), None

    def _resume(self) -> None:
        if not self.trainer_state.exists():
            raise ZooError(f"--resume: no checkpoint in {self.trainer_state.parent}; start without --resume")
        self.model.load_state_dict(load(self.weights, device=self.device).state_dict())
        self.state = load_trainer_state(self.trainer_state, self.opt)
        if self.rank == 0 and self.metrics_path.exists():  # drop lines logged after the checkpoint
            lines = [ln for ln in self.metrics_path.read_text().splitlines()
                     if json.loads(ln).get("step", -1) < self.state.step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in lines))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The seam where a parallel layout wraps the plain model, which never knows: across processes,
        DDP averages the gradients; ``tc.compile`` compiles the result."""
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
        return torch.compile(wrapped) if self.tc.compile else wrapped

    def step(self, probe: BlockProbe) -> dict[str, Any]:
        """One optimizer step on the next batch; returns its metrics record (raises ``DivergenceError``)."""
        tc, state, model = self.tc, self.state, self.model
        step = state.step
        lr = lr_at(step, tc)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = self.corpus.batch("train", tc.seed, step, tc.batch_size, tc.seq_len)
        x, y = x[self.rank::self.world].to(self.device), y[self.rank::self.world].to(self.device)
        t0 = time.perf_counter()
        probe.start()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            output = self.forward(x, y)
        step_logits = probe.logits()
        loss = output.loss + (output.aux_loss if output.aux_loss is not None else 0.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        lm_loss = float(mean_over_ranks(output.loss.detach()))
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
        if output.aux_loss is not None:
            record["aux_loss"] = float(output.aux_loss.detach())
            record["router"] = [{"load_cv": float(s["load_cv"]), "max_over_mean": float(s["max_over_mean"]),
                                 "dropped": int(s["dropped"]), "router_logsumexp": float(s["router_logsumexp"])}
                                for s in output.router_stats]
        if self.peak:
            record["mfu"] = self.train_flops * tps * self.world / self.peak
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
                x, y = self.corpus.batch("val", tc.seed, i, tc.batch_size, tc.seq_len)
                losses.append(float(model(x.to(self.device), y.to(self.device)).loss))
        model.train()
        return sum(losses) / len(losses)

    def checkpoint(self) -> None:
        """The weights (``zoo.load`` reads them alone) and, beside them, what resuming needs."""
        save(self.model, self.weights, variant=self.variant)
        save_trainer_state(self.trainer_state, self.opt, self.state)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

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
        finally:
            probe.close()
            if bar:
                bar.close()
        result = TrainResult(self.out, state.step, self.last_loss, self.val_loss,
                             state.tokens / max(state.wall, 1e-9) * self.world, self.metrics_path)
        if self.rank == 0:
            write_json(self.out / "summary.json", {
                "steps": state.step, "tokens": state.tokens, "wall": state.wall, "final_train_loss": self.last_loss,
                "final_val_loss": self.val_loss, "tokens_per_s": result.tokens_per_s,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        return result


def train(model_source: Union[str, ModelConfig], overrides: ConfigSource = None, tc: Optional[TrainConfig] = None, *,
          out_dir: Union[str, Path] = "runs/train", resume: bool = False, progress: bool = True,
          corpus: Optional[Corpus] = None, stop_after: Optional[int] = None, variant: Optional[str] = None) -> TrainResult:
    """Train a variant (by name or config) and write metrics.jsonl and checkpoints to ``out_dir``.

    ``stop_after`` ends this call's work after that many steps (for tests of resume)."""
    trainer = Trainer(model_source, overrides, tc, out_dir=out_dir, resume=resume, progress=progress, corpus=corpus,
                      variant=variant)
    return trainer.run(stop_after, progress)
