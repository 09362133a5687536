"""Checkpoints on safetensors only: the header carries what rebuilds the model, writes are atomic.

A checkpoint is ``NAME.safetensors``, or above ``max_shard_bytes`` shards plus
``NAME.safetensors.index.json`` in the Hugging Face convention (``metadata`` and ``weight_map``).
Shard names carry a per-save id, so a new save never overwrites the files of the old one: the
index (or the single file) is replaced last, atomically, and a crash at any point leaves the
previous checkpoint loadable. Single-file saves are byte-deterministic: the same model saved twice, in
any two processes, gives the same bytes (so republishing it keeps its checksums); sharded saves differ
only in their per-save id.

Loading builds the model on the ``meta`` device without running any initializer, then adopts the
file's tensors as they are (``load_state_dict(assign=True)`` on safetensors' memory-mapped load): no
init compute, no second copy of the weights.
"""
from __future__ import annotations

import json
import re
import struct
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from .builder import check_plugins, empty_model, plugin_providers
from .config import ConfigSource, ModelConfig, merge_config
from .errors import ZooError
from .files import (
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    atomic_path,
    claim,
    glob_escape,
    live_claims,
    remove_stale_temps,
    write_text,
)
from .model import ZooModel, count_params
from .version import __version__

FORMAT = "hybridnorm-zoo"
FORMAT_VERSION = "1"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors limit
DEFAULT_SHARD_BYTES = 2 * 1024**3
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class CheckpointError(ZooError):
    """A checkpoint is missing, malformed, or does not match its config."""


def _metadata(model: ZooModel, variant: Optional[str]) -> dict[str, str]:
    total, active = count_params(model)
    dtype = next(model.parameters()).dtype
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "zoo_version": __version__,
            "variant": variant or "", "config": json.dumps(model.cfg.to_dict(), sort_keys=True),
            "plugins": json.dumps(plugin_providers(model.cfg), sort_keys=True),
            "total_params": str(total), "active_params": str(active), "dtype": str(dtype).replace("torch.", "")}


def _sort_metadata(path: Union[str, Path]) -> None:
    """Rewrite a safetensors header in place with its ``__metadata__`` keys sorted, at the same length.

    safetensors writes the metadata in a random per-process order (safetensors#584; upstream PR #790
    sorts it the same way), which made identical saves byte-different. Tensor entries keep their order.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        if not header.get("__metadata__"):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= n:  # same content reordered: always; padding with spaces is what safetensors does
            f.seek(8)
            f.write(canonical.ljust(n, b" "))


def _write_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        _sort_metadata(tmp)


def split_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most ``max_shard_bytes`` each (a larger tensor stands alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save(model: ZooModel, path: Union[str, Path], *, variant: Optional[str] = None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Save ``model`` to ``path`` (``*.safetensors``); returns the file to load (file or index)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint paths end in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = _metadata(model, variant)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    index_path = path.with_name(path.name + ".index.json")
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    save_id = uuid.uuid4().hex[:8]
    with claim(path.parent, f"{path.name}.{save_id}"):  # until the index names its shards, they are this save's
        remove_leftovers(path)
        if total_bytes <= max_shard_bytes:
            _write_atomic(tensors, path, metadata)
            _remove_sharded(index_path)
            return path
        return _save_sharded(tensors, path, index_path, metadata, save_id, max_shard_bytes, total_bytes)


def remove_leftovers(path: Path) -> list[Path]:
    """What saves to ``path`` that were killed left behind: temporary files, and shards that no index names
    (of a sharded save killed before its index, or after it but before it removed the shards it replaced).
    Those of a save still running, in any process, stay."""
    removed = remove_stale_temps(path.parent, f".{path.name}.") + remove_stale_temps(path.parent, f".{path.stem}-")
    running = {tag.rsplit(".", 1)[1] for tag in live_claims(path.parent, f"{path.name}.")}
    indexed = _shard_files(path.with_name(path.name + ".index.json"))
    shard = re.compile(rf"{re.escape(path.stem)}-([0-9a-f]{{8}})-\d{{5}}-of-\d{{5}}\.safetensors")
    for file in path.parent.glob(f"{glob_escape(path.stem)}-*.safetensors"):
        m = shard.fullmatch(file.name)
        if m and m.group(1) not in running and file.name not in indexed:
            file.unlink(missing_ok=True)
            removed.append(file)
    return removed


def _save_sharded(tensors: dict[str, torch.Tensor], path: Path, index_path: Path, metadata: dict[str, str],
                  save_id: str, max_shard_bytes: int, total_bytes: int) -> Path:
    shards = split_shards(tensors, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        shard_name = f"{path.stem}-{save_id}-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_atomic(shard, path.with_name(shard_name), {**metadata, "save_id": save_id})
        weight_map.update(dict.fromkeys(shard, shard_name))
    old = _shard_files(index_path)
    index = {"metadata": {**metadata, "save_id": save_id, "total_size": total_bytes}, "weight_map": weight_map}
    write_text(index_path, json.dumps(index, indent=2))
    if path.exists():
        path.unlink()  # a single-file checkpoint of the same name is superseded
    for stale in old - set(weight_map.values()):
        path.with_name(stale).unlink(missing_ok=True)
    return index_path


def _shard_files(index_path: Path) -> set[str]:
    try:
        return set(json.loads(index_path.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _remove_sharded(index_path: Path) -> None:
    old = _shard_files(index_path)
    if index_path.exists():
        index_path.unlink()
    for name in old:
        index_path.with_name(name).unlink(missing_ok=True)


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse and check a safetensors header: (tensor entries, metadata); clear errors for bad files."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n + 8 > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (it claims {n:,} header bytes; "
                                      f"the file has {size:,})")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot read a safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
            itemsize = DTYPES[entry["dtype"]].itemsize
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if not 0 <= start <= end or end - start != numel * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has inconsistent sizes in the header")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end:,} of the data, "
                                  f"but the file holds only {data_size:,} data bytes")
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in header.items())
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path}: corrupt header: tensors {first!r} and {second!r} overlap in the data")
    return header, metadata


def _files(path: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files of a checkpoint path (file, index, the file whose index exists, or a folder holding either)."""
    if path.is_dir():
        inside = [path / n for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) if (path / n).exists()]
        if not inside:
            raise CheckpointError(f"{path} is a folder without {WEIGHTS_NAME} or {WEIGHTS_NAME}.index.json; "
                                  "pass the checkpoint file itself")
        path = inside[0]
    if path.name.endswith(".index.json"):
        index_path = path
    elif path.suffix == ".safetensors" and not path.exists() and path.with_name(path.name + ".index.json").exists():
        index_path = path.with_name(path.name + ".index.json")
    else:
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        return [path], {}
    try:
        index = json.loads(index_path.read_text())
        names = sorted(set(index["weight_map"].values()))
        meta = {k: str(v) for k, v in index.get("metadata", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a valid checkpoint index: {e}") from None
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: its weight_map names {name!r}, which is not a file beside the index "
                                  "(paths elsewhere are refused)")
    return [index_path.with_name(n) for n in names], meta


def _config(path: Union[str, Path], meta: dict[str, str]) -> ModelConfig:
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a hybridnorm-zoo checkpoint (no zoo metadata in its header); "
                              "HF checkpoints are imported with `zoo convert --from-hf`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('format_version')!r}; this zoo reads {FORMAT_VERSION!r}")
    try:
        cfg = merge_config(json.loads(meta["config"]), where=f"checkpoint {path}")
    except ValueError as e:
        raise CheckpointError(f"{path}: the config in the checkpoint header is invalid: {e}") from None
    try:
        recorded = json.loads(meta.get("plugins") or "[]")
    except ValueError:
        recorded = []
    check_plugins(cfg, recorded if isinstance(recorded, list) else [], str(path))
    return cfg


def _check_layers(path: Path, cfg: ModelConfig, headers: list[tuple[dict[str, Any], dict[str, str]]]) -> None:
    """Before any model is built: the blocks the tensors belong to must be exactly those the config asks for,
    so that a header claiming a huge model fails at once instead of building it."""
    found = {int(m.group(1)) for h, _ in headers for name in h if (m := _BLOCK.match(name))}
    if found != set(range(cfg.n_layers)):
        have = f"blocks 0-{max(found)}" if found and found == set(range(max(found) + 1)) else f"{len(found)} blocks"
        raise CheckpointError(f"{path} does not match its config: its tensors hold {have}, but its config says "
                              f"n_layers={cfg.n_layers}")


_BLOCK = re.compile(r"blocks\.(\d+)\.")


def checkpoint_config(path: Union[str, Path]) -> tuple[ModelConfig, dict[str, str]]:
    """The config and metadata a checkpoint carries, without reading its tensors."""
    files, meta = _files(Path(path))
    meta = {**read_header(files[0])[1], **meta}
    return _config(path, meta), meta


def load(path: Union[str, Path], overrides: ConfigSource = None, *, device: Optional[Union[str, torch.device]] = None,
         dtype: Optional[torch.dtype] = None) -> ZooModel:
    """Rebuild a model from a checkpoint alone; ``overrides`` may change run-time settings such as
    ``moe.backend`` (the parameters are the same on every backend).

    The weights are adopted from safetensors' load as they are (on CPU: private copy-on-write memory maps of
    the files, so nothing is copied until written; a file must not be rewritten in place while the model
    lives, which ``save`` never does); ``device`` loads them there, ``dtype`` converts after.
    """
    path = Path(path)
    files, index_meta = _files(path)
    headers = [read_header(f) for f in files]
    meta = {**headers[0][1], **index_meta}
    cfg = _config(path, meta)
    if overrides is not None:
        cfg = merge_config(cfg, overrides, where="overrides")
    _check_layers(path, cfg, headers)
    model = empty_model(cfg, variant=meta.get("variant") or None)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    params = {k for k, _ in model.named_parameters()}
    found = {name: (tuple(e["shape"]), DTYPES[e["dtype"]]) for h, _ in headers for name, e in h.items()}
    want_dtype = getattr(torch, meta.get("dtype", ""), None)
    problems = [f"missing tensor {k!r}" for k in expected if k not in found]
    problems += [f"unexpected tensor {k!r}" for k in found if k not in expected]
    for k, (shape, dt) in found.items():
        if k in expected and shape != expected[k][0]:
            problems.append(f"tensor {k!r} has shape {list(shape)}, the config needs {list(expected[k][0])}")
        elif k in params and want_dtype is not None and expected[k][1].is_floating_point and dt != want_dtype:
            problems.append(f"tensor {k!r} is {dt}, the checkpoint says {want_dtype}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{path} does not match its config: " + "; ".join(problems[:5]) + more)
    target = str(torch.device(device)) if device is not None else "cpu"
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f, device=target))
    model.load_state_dict(state, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: the model has state that checkpoints do not carry: {leftover[:3]}")
    if dtype is not None:
        model.to(dtype)
    return model
