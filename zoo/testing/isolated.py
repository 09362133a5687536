"""The kit's checks that need other processes: save/load in a fresh interpreter, 2-rank DDP and 2-rank FSDP2.

Each runs once for a whole list of subjects (one fresh interpreter, one torchrun), so checking many plugins
costs a few process starts, not a few per plugin. Plugins that came from entry points load in the children by
themselves; plugins registered at run time are registered there again from their modules.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import save
from ..registry import REGISTRY
from .checks import build, tokens
from .subjects import Subject

ISOLATED = ("save_load", "ddp", "fsdp")
TIMEOUT = 900


def _runtime_plugins() -> tuple[list[tuple[str, str]], list[str]]:
    """(name, module) of every plugin registered at run time from a module, and the names of those registered from
    another object, which a child process cannot register again."""
    modules, others = [], []
    for record in REGISTRY.plugins():
        if not record.source.startswith("runtime"):
            continue
        plugin = REGISTRY.pm.get_plugin(record.name)
        if isinstance(plugin, types.ModuleType):
            modules.append((record.name, plugin.__name__))
        else:
            others.append(record.name)
    return modules, others


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def run(check: str, subjects: list[Subject]) -> dict[str, dict[str, str]]:
    """``{"SUBJECT_ID/MODEL": {"status", "message"}}`` of ``check`` (one of ``ISOLATED``) for every subject."""
    modules, others = _runtime_plugins()
    results: dict[str, dict[str, str]] = {}
    runnable = []
    for s in subjects:
        owner = REGISTRY.owner(s.kind, s.name)
        if owner in others:
            for model in s.kinds_of_model():
                results[f"{s.id}/{model}"] = {"status": "failed", "message": (
                    f"plugin {owner!r} was registered at run time from a {type(REGISTRY.pm.get_plugin(owner)).__name__}, "
                    "which another process cannot register again: register a module, or install it with an entry point")}
        else:
            runnable.append(s)
    if not runnable:
        return results
    with tempfile.TemporaryDirectory(prefix=f"zoo-check-{check}-") as tmp:
        folder = Path(tmp)
        spec: dict[str, Any] = {"folder": tmp, "runtime_plugins": modules, "checkpoints": [],
                                "threads": torch.get_num_threads(),  # the same GEMM blocking, so the same sums
                                "subjects": [{"kind": s.kind, "name": s.name, "overrides": list(s.overrides),
                                              "models": list(s.kinds_of_model())} for s in runnable]}
        expected: dict[str, torch.Tensor] = {}
        if check == "save_load":
            for s in runnable:
                for model in s.kinds_of_model():
                    key = f"{len(spec['checkpoints'])}"
                    try:
                        m = build(s, model).eval()
                        idx = tokens(m.cfg)
                        with torch.no_grad():
                            expected[key] = m(idx).logits
                        save(m, folder / f"{key}.safetensors", variant=s.name if model == "variant" else None)
                        save_file({"idx": idx}, folder / f"{key}.input.safetensors")
                    except Exception as e:
                        results[f"{s.id}/{model}"] = {"status": "failed", "message": f"zoo.save: {type(e).__name__}: {e}"}
                        continue
                    spec["checkpoints"].append(key)
                    spec.setdefault("keys", {})[key] = f"{s.id}/{model}"
        (folder / "spec.json").write_text(json.dumps(spec))
        worker = [sys.executable, "-m", "zoo.testing.worker", check, str(folder / "spec.json")]
        if check != "save_load":
            worker = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "-m", "zoo.testing.worker", check, str(folder / "spec.json")]
        try:
            proc = subprocess.run(worker, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
            returncode, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
            returncode, stderr = None, f"it did not finish within {TIMEOUT} s"
        out = folder / f"{check}.json"
        if returncode != 0 or not out.exists():
            why = (stderr.strip().splitlines() or ["no output"])[-1]
            for s in runnable:
                for model in s.kinds_of_model():
                    results.setdefault(f"{s.id}/{model}", {"status": "failed",
                                                           "message": f"the {check} worker failed: {why}"})
            return results
        got = json.loads(out.read_text())
        if check != "save_load":
            return {**results, **got}
        for key, target in spec.get("keys", {}).items():
            outcome = got[key]
            if outcome["status"] == "passed":
                logits = load_file(folder / f"{key}.child.safetensors")["logits"]
                if not torch.equal(logits, expected[key]):
                    err = float((logits - expected[key]).abs().max())
                    outcome = {"status": "failed", "message": f"loaded in a fresh process, the model gives other logits "
                               f"(max difference {err:.3g}): some state is not saved or not restored"}
            results[target] = outcome
    return results
