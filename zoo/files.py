"""The zoo's file names, and its one way of writing a file: atomically and durably.

Every file the zoo writes goes through ``atomic_path``: written beside its place under a temporary
name, flushed to disk (``fsync``), then renamed over the target, so a reader (or a crash) sees the
old file or the new one, never half of one. While it is written, the temporary file is locked
(``flock``), which the kernel releases when its process dies: so ``remove_stale_temps`` can tell the
leftovers of a killed writer from the files of one still running in another process, and removes only
the former. ``claim`` marks a longer piece of work (a sharded save) the same way. Where ``flock`` is
missing (Windows), nothing is ever taken for a leftover.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

WEIGHTS_NAME = "model.safetensors"                   # a checkpoint (zoo.save), in runs and published repositories
WEIGHTS_INDEX_NAME = WEIGHTS_NAME + ".index.json"    # ... when sharded, the HF-style index beside its shards
TRAINER_STATE_NAME = "trainer.safetensors"           # a run's optimizer and RNG state, beside its weights
CHECKPOINT_DIR = "checkpoint"                        # where a run folder keeps both
CONFIG_NAME = "config.yaml"                          # a model config, in run folders and repositories
MANIFEST_NAME = "manifest.json"                      # written last into a run's checkpoint: what belongs together
TEMP_SUFFIX = ".tmp"

PathLike = Union[str, Path]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hold(fd: int) -> bool:
    """Lock the open file ``fd`` for this process (True), or say that another holds it (False)."""
    if fcntl is None:  # no flock: every file counts as held, so none is removed as a leftover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _held_temp(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new file in ``folder``, locked by this process, as an open descriptor and its path. A file removed as a
    leftover between its creation and its lock is made again."""
    while True:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
        if _hold(fd) and os.fstat(fd).st_nlink:
            return fd, Path(name)
        os.close(fd)


def abandoned(path: Path) -> bool:
    """Whether ``path`` (a temporary or claim file) was left by a process that died: no process holds its lock.
    Always False where files cannot be locked."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return _hold(fd)
    finally:
        os.close(fd)


def remove_stale_temps(folder: PathLike, prefix: str = ".") -> list[Path]:
    """Remove the temporary files in ``folder`` (names starting with ``prefix``) whose writer died; those of a
    writer still at work, in this process or another, stay. Returns what was removed."""
    removed = []
    for path in Path(folder).glob(f"{glob_escape(prefix)}*{TEMP_SUFFIX}"):
        if path.is_file() and abandoned(path):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


@contextmanager
def claim(folder: PathLike, tag: str) -> Iterator[Path]:
    """``with claim(folder, tag):`` marks work under way in ``folder`` with a locked file ``.{tag}.*.claim``,
    removed when the block ends; ``live_claims`` tells them from those of processes that died."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = _held_temp(folder, f".{tag}.", ".claim")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def live_claims(folder: PathLike, prefix: str) -> set[str]:
    """The tags of the claims in ``folder`` whose tag starts with ``prefix`` and whose process is alive; the
    claim files of processes that died are removed on the way."""
    live = set()
    for path in Path(folder).glob(f".{glob_escape(prefix)}*.claim"):
        if abandoned(path):
            path.unlink(missing_ok=True)
        else:
            live.add(path.name[1:].rsplit(".", 2)[0])
    return live


@contextmanager
def atomic_path(path: PathLike, mode: int = 0o644) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp``; when the block succeeds, ``tmp`` is fsynced, given
    ``mode`` and renamed over ``p`` (its folder is made if missing); when it fails, ``tmp`` is removed.
    ``tmp`` (``.{name}.*.tmp``) stays locked by this process until then."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _held_temp(path.parent, f".{path.name}.", TEMP_SUFFIX)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """``with atomic_folder(p) as tmp:`` fill the folder ``tmp``; when the block succeeds, ``tmp`` replaces ``p``
    whole (``p`` is renamed aside, ``tmp`` renamed to ``p``, the old one removed), so ``p`` holds one version
    of all its files, never a mix. A kill between the two renames leaves both complete; ``recover_folder``
    puts the new one in place."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    recover_folder(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_folder(path: PathLike) -> None:
    """Finish an ``atomic_folder`` that a kill interrupted: a partial write is dropped; between the renames,
    the new (complete) folder is put in place."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        os.rename(tmp if tmp.exists() else old, path)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def blake3_file(path: PathLike) -> str:
    """The hex BLAKE3 digest of a file, over an mmap, on all cores."""
    from blake3 import blake3
    return blake3(max_threads=blake3.AUTO).update_mmap(path).hexdigest()


def write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def strict_json(data: Any, **kwargs: Any) -> str:
    """``data`` as strict JSON: a non-finite float (NaN, infinity), which JSON cannot hold, is written as null."""
    return json.dumps(_finite(data), allow_nan=False, **kwargs)


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def write_json(path: PathLike, data: Any, *, sort_keys: bool = False) -> Path:
    """``data`` as indented strict JSON (``strict_json``) with a final newline."""
    return write_text(path, strict_json(data, indent=2, sort_keys=sort_keys) + "\n")
