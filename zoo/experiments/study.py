"""The HybridNorm study at CPU scale: norm placements side by side, dense and MoE, each at a shared
learning rate and at its own best one, plus a depth-by-learning-rate stability map.

The plan has three parts, trained in this order:

- selection: every placement and kind at every rate of ``lrs`` on ``selection_seed``; the best rate of
  each (kind, placement) is the one with the lowest final validation loss there (``select_best`` reads
  the selection seed's records and nothing else);
- evaluation: ``seeds`` (never the selection seed) at ``shared_lr`` and at each one's best rate;
- the stability map: dense models of each depth in ``depths`` at a small width, at each rate of
  ``map_lrs`` (and each warmup of ``warmups``), one seed.

Every run is a ``zoo train`` subprocess in ``out`` (the same command ``zoo compare`` uses); what the
study keeps of it is a compact record in ``records`` (zoo/experiments/records.py). A run with a record
of the same settings is not trained again, so a study continues from its records, on this machine or
another. ``jobs`` trains runs side by side, each on ``cores // jobs`` threads.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..api import get_config, list_models
from ..errors import ConfigError, ZooError
from ..files import CHECKPOINT_DIR
from ..registry import REGISTRY
from ..train.data import load_corpus
from ..train.trainer import DIVERGED_EXIT, TrainConfig
from .compare import read_run, train_command
from .records import compact, read_record, read_study, write_record, write_study


def _study_extras() -> dict[str, list[dict[str, Any]]]:
    """``Variant.extra`` of every variant that offers its placement to the study (a ``study`` entry), by norm
    strategy, in the registry's order."""
    found: dict[str, list[dict[str, Any]]] = {}
    for name in list_models():
        extra = REGISTRY.get("variant", name).extra
        if "study" in extra:
            found.setdefault(get_config(name).norm_strategy, []).append(extra)
    return found


def placements() -> dict[str, str]:
    """The placements registered variants offer the study, ``{norm strategy: label}`` in study order: those
    whose ``Variant.extra`` has a ``study`` position (plugins/variants.py sets them for the built-ins)."""
    first = {s: extras[0] for s, extras in _study_extras().items()}
    return {s: str(e.get("label", s)) for s, e in sorted(first.items(), key=lambda item: int(item[1]["study"]))}


def claims() -> dict[str, str]:
    """What the paper claims of each placement against the baseline, ``{norm strategy: claim}``, from the
    ``paper`` entry of its variants' ``extra`` (plugins/variants.py: ``"lower loss"`` for HybridNorm and
    HybridNorm*)."""
    return {s: str(next(e["paper"] for e in extras if "paper" in e))
            for s, extras in _study_extras().items() if any("paper" in e for e in extras)}


MAP_WIDTH = ("d_model=64", "n_heads=2", "ffn.hidden_size=256")


def _main_training() -> TrainConfig:
    return TrainConfig(steps=500, eval_every=125, eval_batches=16, checkpoint_every=500, decay_norm_and_bias=True)


def _map_training() -> TrainConfig:
    return TrainConfig(steps=150, eval_every=75, eval_batches=8, checkpoint_every=150, decay_norm_and_bias=True)


@dataclass
class StudyConfig:
    """What the study trains (see the module's docstring); the first strategy is the baseline of the
    paired differences. ``depths=()`` leaves the stability map out."""

    strategies: tuple[str, ...] = field(default_factory=lambda: tuple(placements()))
    kinds: tuple[str, ...] = ("dense", "moe")
    lrs: tuple[float, ...] = (1e-3, 2e-3, 3e-3, 6e-3, 1e-2, 2e-2)
    shared_lr: float = 3e-3
    selection_seed: int = 0
    seeds: tuple[int, ...] = (1, 2, 3)
    main: TrainConfig = field(default_factory=_main_training)
    depths: tuple[int, ...] = (4, 8, 16, 24, 32)
    map_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    warmups: tuple[int, ...] = ()          # the map's warmup axis; () = the map's own warmup only
    map_seed: int = 0
    map_width: tuple[str, ...] = MAP_WIDTH
    map: TrainConfig = field(default_factory=_map_training)

    def check(self) -> None:
        """Refuse a study that cannot be fair or cannot run, naming the option."""
        if not self.strategies or not self.kinds:
            raise ConfigError("--strategies and --kinds need at least one name each")
        if not self.seeds:
            raise ConfigError("--seeds needs at least one evaluation seed")
        if self.selection_seed in self.seeds:
            raise ConfigError(f"--selection-seed {self.selection_seed} is also an evaluation seed (--seeds "
                              f"{' '.join(map(str, self.seeds))}): the best rate would be judged on the runs that "
                              "report it")
        for flag, values in (("--lrs", self.lrs), ("--shared-lr", (self.shared_lr,)), ("--map-lrs", self.map_lrs)):
            for lr in values:
                if not math.isfinite(lr) or lr <= 0:
                    raise ConfigError(f"{flag}: a learning rate must be a positive number, not {lr}")
        if not self.lrs:
            raise ConfigError("--lrs needs at least one learning rate")
        for flag, values in (("--depths", self.depths), ("--warmups", self.warmups)):
            if any(v < (1 if flag == "--depths" else 0) for v in values):
                raise ConfigError(f"{flag}: {' '.join(map(str, values))} has a value below "
                                  f"{1 if flag == '--depths' else 0}")
        for tc in (self.main, self.map):
            tc.check()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StudyConfig":
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                continue
            if key in ("main", "map"):
                value = replace(_main_training() if key == "main" else _map_training(),
                                **{k: v for k, v in value.items() if k in {f.name for f in fields(TrainConfig)}})
            elif isinstance(value, list):
                value = tuple(value)
            values[key] = value
        return cls(**values)

    @property
    def map_warmups(self) -> tuple[int, ...]:
        return self.warmups or (self.map.warmup_steps,)


def configure(sc: StudyConfig, *, steps: Optional[int] = None, map_steps: Optional[int] = None,
              batch_size: Optional[int] = None, seq_len: Optional[int] = None, data: Optional[str] = None,
              decay_norm_and_bias: Optional[bool] = None, **given: Any) -> StudyConfig:
    """``sc`` with the options given (None: keep ``sc``'s): the grid's fields by name, and the runs' steps,
    batch, length, data and decay. Evaluation and checkpoint intervals and warmup shrink to fit short runs."""
    def training(tc: TrainConfig, steps: Optional[int]) -> TrainConfig:
        tc = replace(tc, **{k: v for k, v in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len),
                                               ("data", data), ("decay_norm_and_bias", decay_norm_and_bias))
                            if v is not None})
        return replace(tc, eval_every=min(tc.eval_every, tc.steps), checkpoint_every=tc.steps,
                       warmup_steps=min(tc.warmup_steps, tc.steps))

    grid = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in given.items() if v is not None}
    return replace(sc, main=training(sc.main, steps), map=training(sc.map, map_steps), **grid)


@dataclass(frozen=True)
class Run:
    part: str                 # "selection", "eval" or "map"
    kind: str                 # "dense" or "moe"
    strategy: str
    seed: int
    tc: TrainConfig
    depth: Optional[int] = None
    overrides: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The run's name among the records: its folder under ``out`` and ``records/runs``."""
        if self.part == "map":
            return f"map/{self.strategy}-L{self.depth}-lr{self.tc.lr:g}-w{self.tc.warmup_steps}-s{self.seed}"
        return f"main/{self.kind}-{self.strategy}-lr{self.tc.lr:g}-s{self.seed}"

    def settings(self) -> dict[str, Any]:
        """What identifies the run in its record: a record with other settings is trained again."""
        variant, overrides = study_model(self.kind, self.strategy)
        return {"part": self.part, "kind": self.kind, "strategy": self.strategy, "seed": self.seed,
                "lr": self.tc.lr, "warmup": self.tc.warmup_steps, "depth": self.depth, "variant": variant,
                "overrides": [*overrides, *self.overrides], "train": asdict(self.tc)}


def study_model(kind: str, strategy: str) -> tuple[str, tuple[str, ...]]:
    """The variant (and overrides) a placement trains as: ``tiny-KIND-STRATEGY`` where registered, else
    the baseline placement's tiny variant with ``norm_strategy`` set, so that an installed plugin's
    strategy trains at the same shape."""
    own = f"tiny-{kind}-{strategy}"
    if own in REGISTRY.names("variant"):
        return own, ()
    for base in placements():
        if f"tiny-{kind}-{base}" in REGISTRY.names("variant"):
            return f"tiny-{kind}-{base}", (f"norm_strategy={strategy}",)
    raise ZooError(f"no tiny {kind} variant is registered to train {strategy!r} at the study's shape")


def selection_runs(sc: StudyConfig) -> list[Run]:
    return [Run("selection", kind, s, sc.selection_seed, replace(sc.main, seed=sc.selection_seed, lr=lr))
            for kind in sc.kinds for s in sc.strategies for lr in sc.lrs]


def eval_runs(sc: StudyConfig, lr_of: Callable[[str, str], Optional[float]]) -> list[Run]:
    """Evaluation seeds at ``lr_of(kind, strategy)`` (None: nothing to evaluate)."""
    runs = []
    for seed in sc.seeds:
        for kind in sc.kinds:
            for s in sc.strategies:
                lr = lr_of(kind, s)
                if lr is not None:
                    runs.append(Run("eval", kind, s, seed, replace(sc.main, seed=seed, lr=lr)))
    return runs


def map_runs(sc: StudyConfig) -> list[Run]:
    return [Run("map", "dense", s, sc.map_seed, replace(sc.map, seed=sc.map_seed, lr=lr, warmup_steps=w), depth,
                (f"n_layers={depth}", *sc.map_width))
            for w in sc.map_warmups for depth in sc.depths for lr in sc.map_lrs for s in sc.strategies]


def final_val(record: Optional[dict[str, Any]]) -> Optional[float]:
    return None if record is None else record["final"]["val_loss"]


def select_best(selection: dict[float, Optional[dict[str, Any]]]) -> Optional[float]:
    """The rate whose selection run ended with the lowest validation loss; None until every rate has its
    record, or if none trained.

    ``selection`` maps each rate of the grid to its selection-seed record; the caller passes nothing
    else, so evaluation seeds cannot sway the choice. Ties go to the lower rate."""
    if any(r is None for r in selection.values()):
        return None
    scored = [(v, lr) for lr, r in selection.items() if (v := final_val(r)) is not None]
    return min(scored)[1] if scored else None


def selection_records(sc: StudyConfig, records: dict[str, dict[str, Any]], kind: str,
                      strategy: str) -> dict[float, Optional[dict[str, Any]]]:
    """The selection seed's record at each rate of the grid for one (kind, placement)."""
    return {run.tc.lr: records.get(run.key) for run in selection_runs(sc)
            if run.kind == kind and run.strategy == strategy}


def best_lrs(sc: StudyConfig, records: dict[str, dict[str, Any]]) -> dict[tuple[str, str], Optional[float]]:
    return {(kind, s): select_best(selection_records(sc, records, kind, s)) for kind in sc.kinds for s in sc.strategies}


def plan(sc: StudyConfig, records: dict[str, dict[str, Any]]) -> list[Run]:
    """Every run the study holds given the records so far (best-rate runs once their selection is in)."""
    best = best_lrs(sc, records)
    runs = selection_runs(sc) + eval_runs(sc, lambda kind, s: sc.shared_lr)
    runs += eval_runs(sc, lambda kind, s: best[(kind, s)])
    return list({run.key: run for run in runs + map_runs(sc)}.values())


def _same_settings(recorded: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a record was trained as ``wanted``; training options added since it was written count at
    their defaults, so a new option alone does not retrain the study."""
    known = {f.name for f in fields(TrainConfig)}
    train = asdict(TrainConfig(**{k: v for k, v in recorded.get("train", {}).items() if k in known}))
    return {**recorded, "train": train} == wanted


def load_records(folder: Path, runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """The records in ``folder`` whose settings are those of a run of ``runs``."""
    found = {}
    for run in runs:
        record = read_record(folder, run.key)
        if record is not None and _same_settings(record["run"], run.settings()):
            found[run.key] = record
    return found


def recorded(sc: StudyConfig, folder: Path) -> dict[str, dict[str, Any]]:
    """The records in ``folder`` of the study's plan (its best-rate runs as its selection records decide)."""
    return load_records(folder, plan(sc, load_records(folder, selection_runs(sc))))


def _train(run: Run, out: Path, threads: int) -> dict[str, Any]:
    """Train one run in ``out/KEY`` and return its record."""
    folder = out / run.key
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    settings = run.settings()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = folder / "train.log"
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(train_command(settings["variant"], run.tc, folder, settings["overrides"]), env=env,
                              stdout=subprocess.DEVNULL, stderr=err)
    seconds = time.perf_counter() - t0
    where = ""
    if proc.returncode not in (0, DIVERGED_EXIT):  # read_run raises: say what the log ended with
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        where = f"{tail[0]}; its log is {log}"
    result = read_run(run.key, folder, proc.returncode, where)
    shutil.rmtree(folder / CHECKPOINT_DIR, ignore_errors=True)  # the study keeps numbers, not weights
    return compact(settings, result["metrics"], result["summary"], result["diverged"], seconds, threads)


class Progress:
    """One line per finished run with an estimate of the time left (runs of a part cost alike)."""

    def __init__(self, total: int, jobs: int) -> None:
        self.total, self.jobs, self.done = total, jobs, 0
        self.spent: dict[str, list[float]] = {}

    def finished(self, run: Run, record: dict[str, Any], remaining: dict[str, int]) -> None:
        self.done += 1
        seconds = record["ended"]["seconds"] or 0.0
        self.spent.setdefault(run.part, []).append(seconds)
        mean = {part: sum(v) / len(v) for part, v in self.spent.items()}
        fallback = sum(mean.values()) / len(mean)
        left = sum(n * mean.get(part, fallback) for part, n in remaining.items()) / self.jobs
        ended = "diverged" if record["ended"]["diverged"] or record["ended"]["nonfinite"] else \
            f"val {record['final']['val_loss']:.4f}"
        print(f"[{self.done}/{self.total}] {run.key}: {ended} in {seconds:.0f} s; about {_duration(left)} left",
              file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def data_facts(tc: TrainConfig) -> dict[str, Any]:
    """What the report says of the data: its size and the unigram entropy of the training split (nats per
    token), the loss of a model that learned token frequencies only."""
    corpus = load_corpus(tc.data, tokenizer=tc.tokenizer)
    counts = np.bincount(np.asarray(corpus.train, dtype=np.int64), minlength=corpus.vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return {"spec": tc.data, "tokenizer": tc.tokenizer, "train_tokens": int(counts.sum()),
            "val_tokens": int(len(corpus.val)), "documents": corpus.files,
            "unigram_entropy": float(f"{float(-(p * np.log(p)).sum()):.6g}")}


def run_study(sc: StudyConfig, out: Path, records_dir: Path, jobs: int = 1) -> dict[str, dict[str, Any]]:
    """Train every run of the plan that has no record yet, writing each record as its run ends; returns
    the records of the whole plan."""
    sc.check()
    for kind in sc.kinds:
        for s in sc.strategies:
            variant, overrides = study_model(kind, s)
            get_config(variant, list(overrides))  # fail fast on a bad strategy
    for depth in sc.depths:
        get_config(study_model("dense", sc.strategies[0])[0], [f"n_layers={depth}", *sc.map_width])
    data = data_facts(sc.main)
    saved = (read_study(records_dir) or {}).get("data") or {}
    if saved.get("spec") == data["spec"] and saved != data:
        warnings.warn(f"{records_dir}: the records were trained on other data ({saved.get('spec')}: "
                      f"{saved.get('train_tokens')} training tokens, here {data['train_tokens']}; `stdlib` is this "
                      "Python's own source); runs trained here are not comparable with them, and the report keeps "
                      "the records' data facts", stacklevel=2)
        data = saved
    write_study(records_dir, {"config": sc.to_json(), "data": data})
    threads = max(1, (os.cpu_count() or 1) // jobs)
    records = recorded(sc, records_dir)
    todo = [run for run in plan(sc, records) if run.key not in records]
    print(f"{len(records)} runs recorded in {records_dir}, {len(todo)} to train ({jobs} at a time, {threads} "
          f"thread{'s' * (threads > 1)} each; evaluation at the best rates follows their selection)",
          file=sys.stderr, flush=True)
    progress = Progress(len(todo), jobs)
    remaining = {part: sum(r.part == part for r in todo) for part in ("selection", "eval", "map")}

    def one(run: Run) -> None:
        record = _train(run, out, threads)
        write_record(records_dir, run.key, record)
        records[run.key] = record
        remaining[run.part] -= 1
        progress.finished(run, record, remaining)

    def phase(runs: list[Run]) -> None:
        if jobs > 1:
            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(one, runs))
        else:
            for run in runs:
                one(run)

    phase([r for r in todo if r.part == "selection"])
    evaluation = [r for r in plan(sc, records) if r.part == "eval" and r.key not in records]
    progress.total += len(evaluation) - remaining["eval"]
    remaining["eval"] = len(evaluation)
    phase(evaluation)
    phase([r for r in todo if r.part == "map"])
    return load_records(records_dir, plan(sc, records))
