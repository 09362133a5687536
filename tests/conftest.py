"""Shared fixtures: run-time plugins that never leak, and subprocesses that see the real install."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

import zoo
from zoo.registry import REGISTRY

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Run-time plugins
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def runtime_plugin() -> Any:
    """``runtime_plugin(obj, name)`` registers a plugin with ``zoo.register_plugin``; every plugin
    registered through it is unregistered at teardown, whether the test passed or not."""
    names: list[str] = []

    def register(obj: Any, name: str) -> str:
        registered = zoo.register_plugin(obj, name=name)
        names.append(registered)
        return registered

    yield register
    for name in reversed(names):
        if any(r.name == name for r in REGISTRY.plugins()):
            zoo.unregister_plugin(name)


@pytest.fixture
def registry_unchanged() -> Any:
    """The test leaves the global registry with the plugins it found (no leaked registrations).
    Use per module: ``pytestmark = pytest.mark.usefixtures("registry_unchanged")``."""
    before = {r.name: r.to_dict() for r in REGISTRY.plugins()}
    yield
    after = {r.name: r.to_dict() for r in REGISTRY.plugins()}
    assert after == before, f"test leaked plugin registrations: {sorted(set(after) ^ set(before))}"


# ---------------------------------------------------------------------------------------------
# Subprocesses
# ---------------------------------------------------------------------------------------------
def _clean_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ZOO_PLUGINS", "ZOO_DISABLE_PLUGINS", "PYTHONPATH", "PYTHONWARNINGS")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # many small children share 2 cores
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def subprocess_env() -> Callable[..., dict[str, str]]:
    """``subprocess_env(**extra)``: the environment of a clean child process (venv bin on PATH,
    no ZOO_* variables inherited from the caller)."""
    return lambda **extra: _clean_env(extra)


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess]:
    """``run_python(code, env={...}, timeout=...)``: ``python -c code`` in a fresh interpreter."""
    def run(code: str, env: Optional[dict[str, str]] = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_clean_env(env), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
    return run


# ---------------------------------------------------------------------------------------------
# Fake entry points for a fresh Registry (in-process; the global registry is untouched)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[str]]:
    """``fake_entry_points({"ep-name": "module source", ...}, builtins=True)`` makes the ``zoo``
    entry-point group list the given plugins (after the real built-ins, unless ``builtins=False``).
    Each source becomes a uniquely named module; returns the module names. Use with a fresh
    ``zoo.registry.Registry()``."""
    real = list(importlib.metadata.entry_points(group="zoo"))
    tag = uuid.uuid4().hex[:8]

    def install(sources: dict[str, str], builtins: bool = True) -> list[str]:
        monkeypatch.syspath_prepend(str(tmp_path))
        eps, modules = (list(real) if builtins else []), []
        for i, (ep_name, source) in enumerate(sources.items()):
            module = f"_zoo_fake_plugin_{tag}_{i}"
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
            eps.append(importlib.metadata.EntryPoint(ep_name, module, "zoo"))
            modules.append(module)

        def entry_points(**kw: Any) -> Any:
            if kw.get("group") == "zoo":
                return list(eps)
            return orig(**kw)

        orig = importlib.metadata.entry_points
        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
        return modules

    yield install
    for name in [m for m in sys.modules if m.startswith(f"_zoo_fake_plugin_{tag}")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny tensors: one intra-op thread is faster than two, and on a busy 2-core machine far faster
    (OpenMP threads spin waiting for a core). Modules opt in with ``pytestmark``; restored after."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
