"""Sharded checkpoints with torch.distributed.checkpoint (DCP), committed as one unit, and their export.

A run's ``checkpoint/sharded/`` holds one folder per saved step and ``latest``, the name of the last
complete one. A save writes every rank's shards of the model and the optimizer (DCP), each rank's RNG
state and the run's counters into ``.step-N.partial``; once all ranks are done, rank 0 renames it to
``step-N`` and then replaces ``latest`` atomically. A kill at any moment leaves ``latest`` naming a
whole checkpoint: never a mix of two steps. DCP reshards on load, so a run resumes at another world
size or layout. ``export`` joins the shards into the ordinary safetensors checkpoint.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..builder import empty_model
from ..checkpoint import save as save_checkpoint
from ..config import merge_config
from ..errors import ZooError
from ..files import CHECKPOINT_DIR, CONFIG_NAME, WEIGHTS_NAME, write_text
from .world import barrier

SHARDED_DIR = "sharded"
LATEST = "latest"
RUN_STATE = "run.json"


def latest(folder: Path) -> Optional[Path]:
    """The last complete checkpoint in ``folder``, or None."""
    pointer = folder / LATEST
    if not pointer.exists():
        return None
    return folder / pointer.read_text().strip()


def save(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, run: dict[str, Any], rank: int) -> Path:
    """Every rank's shards of ``model`` and ``opt``, its RNG state, and ``run`` (rank 0's counters) as
    ``folder/step-N``; call on every rank."""
    name = f"step-{run['step']:08d}"
    partial = folder / f".{name}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial))
    save_file({"torch": torch.get_rng_state()}, str(partial / f"rng-{rank}.safetensors"))
    barrier()
    if rank == 0:
        write_text(partial / RUN_STATE, json.dumps(run))
        final = folder / name
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        write_text(folder / LATEST, name)
        for old in folder.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return folder / name


def load(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
    """Load the last complete checkpoint into ``model`` and ``opt`` (resharded to this layout) and this
    rank's RNG state (if the saving run had this rank); returns the run's counters."""
    where = latest(folder)
    if where is None:
        raise ZooError(f"--resume: no sharded checkpoint in {folder} (no {LATEST}); start without --resume")
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(where))
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    rng = where / f"rng-{rank}.safetensors"
    if rng.exists():
        torch.set_rng_state(load_file(str(rng))["torch"])
    return json.loads((where / RUN_STATE).read_text())


def load_full_model(where: Path, model: nn.Module) -> None:
    """Fill an unsharded ``model`` (one process, no process group) with the weights of the checkpoint ``where``."""
    state = model.state_dict()
    with warnings.catch_warnings():  # that it loads in one process, which it means to
        warnings.simplefilter("ignore")
        dcp.load({"model": state}, checkpoint_id=str(where), no_dist=True)
    model.load_state_dict(state)


def export(run: Union[str, Path], out: Optional[Union[str, Path]] = None) -> Path:
    """Join the last sharded checkpoint of the run folder ``run`` into ``out`` (default: the run's
    ``checkpoint/model.safetensors``, where ``zoo.load(run)`` looks): the ordinary checkpoint that
    ``zoo.load``, cards and ``zoo publish`` read. One process; it holds the whole model."""
    run = Path(run)
    config = run / CONFIG_NAME
    if not config.exists():
        raise ZooError(f"{run}: no {CONFIG_NAME}; give the run folder of a zoo train run")
    cfg = merge_config(config, where=str(config))
    folder = run / CHECKPOINT_DIR / SHARDED_DIR
    where = latest(folder)
    if where is None:
        raise ZooError(f"{run}: no sharded checkpoint in {folder}; `zoo export` joins the checkpoints of runs trained "
                       "with --dp-shard/--dp-replicate/--ep (a DDP or one-process run already has its model.safetensors)")
    variant = json.loads((where / RUN_STATE).read_text()).get("variant")
    saved = dcp.FileSystemReader(str(where)).read_metadata().state_dict_metadata
    dtype = next(m.properties.dtype for k, m in saved.items() if k.startswith("model.") and hasattr(m, "properties"))
    model = empty_model(cfg, variant).to(dtype).to_empty(device="cpu")
    load_full_model(where, model)
    target = Path(out) if out is not None else run / CHECKPOINT_DIR / WEIGHTS_NAME
    save_checkpoint(model, target, variant=variant)
    return target
