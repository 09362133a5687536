"""A run's resumable state beside its weights: optimizer moments, the RNG and the run's counters,
as safetensors (no pickle), scalars in the header's metadata; and the checkpoint's manifest, written
last, which names the files that belong together (their sizes and BLAKE3 digests) and the step they hold."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import ZooError
from ..files import MANIFEST_NAME, atomic_path, blake3_file, write_json


@dataclass
class RunState:
    """Where a run stands: steps done, tokens seen, seconds spent, the loss's running mean."""

    step: int = 0
    tokens: int = 0
    wall: float = 0.0
    loss_ema: Optional[float] = None

    @classmethod
    def of(cls, saved: dict[str, Any]) -> "RunState":
        """From its saved form; keys written by other versions are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


def save_trainer_state(path: Path, opt: torch.optim.Optimizer, state: RunState) -> None:
    """Optimizer moments and the torch RNG state as tensors; the run's counters and the optimizer's
    scalars in the metadata."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    scalars: dict[str, Any] = {}
    for p_id, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{p_id}.{k}"] = v.contiguous()
            else:
                scalars[f"opt.{p_id}.{k}"] = v
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"run": json.dumps(asdict(state)), "scalars": json.dumps(scalars)})


def load_trainer_state(path: Path, opt: torch.optim.Optimizer) -> RunState:
    """Restore the optimizer and the RNG from ``path``; returns the run's counters."""
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
    return RunState.of(json.loads(meta["run"]))


def write_manifest(folder: Path, step: int) -> None:
    """The last file of a checkpoint folder: every other file's size and BLAKE3 digest, and the step."""
    files = {p.name: {"bytes": p.stat().st_size, "blake3": blake3_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    write_json(folder / MANIFEST_NAME, {"step": step, "files": files})


def check_manifest(folder: Path, required: tuple[str, ...]) -> Optional[int]:
    """The step a checkpoint folder holds, once its files are those its manifest names (sizes and digests);
    a ``ZooError`` naming each difference otherwise. None for a folder without a manifest (older zoos)."""
    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        step, listed = int(manifest["step"]), dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ZooError(f"--resume: {path} is unreadable ({e}); the checkpoint cannot be checked") from None
    differences = [f"{name} is missing" for name in required if name not in listed]
    for name, want in listed.items():
        file = folder / name
        if not file.is_file():
            differences.append(f"{name} is missing")
        elif file.stat().st_size != want.get("bytes"):
            differences.append(f"{name} has {file.stat().st_size:,} bytes, the manifest says {want.get('bytes'):,}")
        elif blake3_file(file) != want.get("blake3"):
            differences.append(f"{name} has other bytes than the manifest records (BLAKE3 differs)")
    if differences:
        raise ZooError(f"--resume: {folder} is not the checkpoint of step {step} that its {MANIFEST_NAME} records: "
                       + "; ".join(differences) + ". Its files come from different saves; put back the folder as "
                       "it was saved, or start without --resume")
    return step
