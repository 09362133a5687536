"""Checkpoints: safetensors round trips, sharding, atomic writes under SIGKILL, clear errors for bad files."""
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

import zoo
from zoo.checkpoint import CheckpointError
from zoo.errors import MissingPluginError


def logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


@pytest.fixture
def idx():
    torch.manual_seed(0)
    return torch.randint(0, 256, (2, 16))


@pytest.mark.parametrize("name", ["tiny-dense-hybridnorm-star", "tiny-moe-hybridnorm"])
def test_round_trip_rebuilds_from_the_file_alone(tmp_path, idx, name):
    model = zoo.build(name)
    path = zoo.save(model, tmp_path / "m.safetensors", variant=name)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "hybridnorm-zoo" and meta["format_version"] == "1" and meta["variant"] == name
    assert json.loads(meta["config"]) == model.cfg.to_dict()
    assert int(meta["total_params"]) == zoo.stats(name, flops=False).total_params
    assert int(meta["active_params"]) == zoo.stats(name, flops=False).active_params
    loaded = zoo.load(path)
    assert loaded.variant == name and loaded.cfg == model.cfg
    assert torch.equal(logits(model, idx), logits(loaded, idx))


def test_moe_checkpoint_loads_on_every_backend(tmp_path, idx):
    model = zoo.build("tiny-moe-prenorm", ["moe.backend=grouped_mm"])
    path = zoo.save(model, tmp_path / "moe.safetensors")
    ref = logits(model, idx)
    for backend in ("loop", "fused", "grouped_mm"):
        other = zoo.load(path, [f"moe.backend={backend}"])
        assert other.cfg.moe.backend == backend
        torch.testing.assert_close(logits(other, idx), ref, atol=1e-5, rtol=0)


def test_sharded_save_writes_hf_index_and_loads(tmp_path, idx):
    model = zoo.build("tiny-dense-prenorm")
    index = zoo.save(model, tmp_path / "model.safetensors", max_shard_bytes=500_000)
    assert index.name == "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = set(data["weight_map"].values())
    assert len(shards) > 1 and set(data["weight_map"]) == set(model.state_dict())
    assert data["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for path in (index, tmp_path / "model.safetensors"):
        assert torch.equal(logits(zoo.load(path), idx), logits(model, idx))
    # saving again replaces the old shards; a later single-file save removes the sharded set
    zoo.save(model, tmp_path / "model.safetensors", max_shard_bytes=500_000)
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".safetensors"]) == len(shards)
    zoo.save(model, tmp_path / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


KILLER = textwrap.dedent("""
    import sys, zoo, safetensors.torch as st
    model = zoo.build("tiny-dense-prenorm", ["d_model=512", "n_layers=8", "ffn.hidden_size=2048"])
    real = st.save_file
    def slow_save(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        print("WRITING", flush=True)     # the new bytes are on disk under a temporary name
        import time; time.sleep(60)      # ...and the process dies here, before the rename
    zoo.checkpoint.save_file = slow_save
    zoo.save(model, sys.argv[1], max_shard_bytes=int(sys.argv[2]))
""")


@pytest.mark.parametrize("shard_bytes", [10**12, 4_000_000])
def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path, idx, shard_bytes):
    path = tmp_path / "ckpt.safetensors"
    previous = zoo.build("tiny-dense-prenorm", ["d_model=512", "n_layers=8", "ffn.hidden_size=2048"])
    zoo.save(previous, path, max_shard_bytes=shard_bytes)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(path), str(shard_bytes)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    loaded = zoo.load(path)
    assert torch.equal(logits(loaded, idx), logits(previous, idx))
    assert [n for n in sorted(p.name for p in tmp_path.iterdir()) if not n.startswith(".")] == before


KILL_AT = textwrap.dedent("""
    import sys, time, zoo, zoo.checkpoint as ck
    model = zoo.build("tiny-dense-prenorm")
    phase, calls = sys.argv[3], {"n": 0}
    real_save, real_text = ck.save_file, ck.write_text
    def hang():
        print("HANG", flush=True)
        time.sleep(60)
    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        calls["n"] += 1
        if phase == "third-shard" and calls["n"] == 3:
            hang()  # two shards in place, the third under its temporary name
    def write_text(path, text):
        real_text(path, text)
        if phase == "after-index":
            hang()  # the new index in place, the shards it replaced not yet removed
    ck.save_file, ck.write_text = save_file, write_text
    zoo.save(model, sys.argv[1], max_shard_bytes=int(sys.argv[2]))
""")


@pytest.mark.parametrize("phase", ["third-shard", "after-index"])
def test_the_next_save_removes_what_killed_saves_left_but_not_a_running_ones(tmp_path, idx, phase):
    """Killed sharded saves leave temporary files and shards no index names; the next save removes them, but
    not the files of a save that is still running (here: this process holds its claim and a temporary file)."""
    from zoo.files import atomic_path, claim
    path, shard_bytes = tmp_path / "ckpt.safetensors", 400_000
    model = zoo.build("tiny-dense-prenorm")
    zoo.save(model, path, max_shard_bytes=shard_bytes)
    clean = sorted(p.name for p in tmp_path.iterdir())
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", KILL_AT, str(path), str(shard_bytes), phase],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "HANG"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    leftovers = set(p.name for p in tmp_path.iterdir()) - set(clean)
    assert len(leftovers) >= 4, leftovers  # the two kills' files: shards, temporaries, claims
    running = tmp_path / "ckpt-0123abcd-00001-of-00002.safetensors"
    with claim(tmp_path, "ckpt.safetensors.0123abcd"):
        running.write_bytes(b"a running save's first shard")
        with pytest.raises(KeyboardInterrupt), atomic_path(path.with_name(path.name + ".index.json")) as tmp:
            tmp.write_text("a running save's index, not yet in place")
            index = zoo.save(model, path, max_shard_bytes=shard_bytes)
            assert tmp.exists() and running.exists()
            raise KeyboardInterrupt  # the running save stops: its temporary file goes with it
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([index.name, *shards, running.name])
    assert torch.equal(logits(zoo.load(path), idx), logits(model, idx))
    zoo.save(model, path, max_shard_bytes=shard_bytes)  # its claim gone, the running save's shard is a leftover
    assert not running.exists()


def write_raw(path, header_len, header_bytes, data=b""):
    path.write_bytes(struct.pack("<Q", header_len) + header_bytes + data)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = zoo.save(zoo.build("tiny-dense-prenorm"), tmp_path / "m.safetensors")
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated: tensor .* ends at byte"):
        zoo.load(path)
    path.write_bytes(blob[:5])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        zoo.load(path)


def test_absurd_header_sizes_are_clear_errors(tmp_path):
    path = tmp_path / "bad.safetensors"
    write_raw(path, 2**62, b"{}")
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors header"):
        zoo.load(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 16]}}).encode()
    write_raw(path, len(header), header, b"\0" * 16)
    with pytest.raises(CheckpointError, match="inconsistent sizes"):
        zoo.load(path)
    write_raw(path, 7, b"not json")
    with pytest.raises(CheckpointError, match="cannot read a safetensors header"):
        zoo.load(path)


def test_foreign_and_mismatched_checkpoints(tmp_path):
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a hybridnorm-zoo checkpoint"):
        zoo.load(foreign)
    model = zoo.build("tiny-dense-prenorm")
    path = zoo.save(model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"does not match its config: tensor 'embed.weight' has shape \[256, 128\], the config needs \[512, 128\]"):
        zoo.load(path, ["vocab_size=512"])
    state = {k: v for k, v in model.state_dict().items() if k != "blocks.0.attn.qkv.weight"}
    state["extra"] = torch.zeros(1)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="missing tensor 'blocks.0.attn.qkv.weight'.*unexpected tensor 'extra'"):
        zoo.load(path)


def test_config_naming_an_unknown_plugin(tmp_path):
    model = zoo.build("tiny-dense-prenorm")
    path = zoo.save(model, tmp_path / "m.safetensors")
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["config"])
    cfg["norm_strategy"] = "fancy-norm"
    save_file(model.state_dict(), str(path), metadata={**meta, "config": json.dumps(cfg)})
    with pytest.raises(MissingPluginError) as e:
        zoo.load(path)
    assert str(e.value) == (f"{path} uses plugins that are not installed: norm strategy 'fancy-norm' (the checkpoint "
                            "does not record which package provides it)")


@pytest.mark.parametrize("shard_bytes", [None, 100_000])
def test_a_checkpoint_folder_loads_like_its_file(tmp_path, idx, shard_bytes):
    torch.manual_seed(0)
    model = zoo.build("tiny-dense-hybridnorm")
    kwargs = {"max_shard_bytes": shard_bytes} if shard_bytes else {}
    zoo.save(model, tmp_path / "ckpt" / "model.safetensors", **kwargs)
    assert (tmp_path / "ckpt" / ("model.safetensors.index.json" if shard_bytes else "model.safetensors")).exists()
    torch.testing.assert_close(logits(zoo.load(tmp_path / "ckpt"), idx), logits(model, idx), rtol=0, atol=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty is a folder without model\.safetensors or model\.safetensors"
                                              r"\.index\.json; pass the checkpoint file itself"):
        zoo.load(tmp_path / "empty")


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        zoo.load(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="end in .safetensors"):
        zoo.save(zoo.build("tiny-dense-prenorm"), tmp_path / "m.pt")


SAVE_TWICE = """
    import sys, torch, zoo
    torch.manual_seed(0)
    model = zoo.build("tiny-dense-hybridnorm", ["d_model=64", "n_layers=2", "n_heads=2"])
    zoo.save(model, sys.argv[1] + "/single/model.safetensors", variant="det")
    zoo.save(model, sys.argv[1] + "/sharded/model.safetensors", variant="det", max_shard_bytes=100_000)
"""


def test_saves_are_byte_deterministic_across_processes(tmp_path, run_python):
    """safetensors writes metadata in a random per-process order; zoo.save sorts it, so saving the same model in
    two processes gives the same bytes (republished checksums stay). Sharded saves differ only in the per-save id
    that keeps their swaps atomic."""
    for run in ("a", "b"):
        r = run_python(SAVE_TWICE.replace("sys.argv[1]", repr(str(tmp_path / run))))
        assert r.returncode == 0, r.stderr
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "single" / "model.safetensors").read_bytes() == (b / "single" / "model.safetensors").read_bytes()
    index_a, index_b = (json.loads((d / "sharded" / "model.safetensors.index.json").read_text()) for d in (a, b))
    ids = index_a["metadata"].pop("save_id"), index_b["metadata"].pop("save_id")
    assert ids[0] != ids[1] and index_a["metadata"] == index_b["metadata"]
    shards_a, shards_b = (sorted(set(i["weight_map"].values())) for i in (index_a, index_b))
    assert len(shards_a) == len(shards_b) > 1
    for name_a, name_b in zip(shards_a, shards_b):
        assert name_a.replace(ids[0], ids[1]) == name_b
        blob_a = (a / "sharded" / name_a).read_bytes()
        blob_b = (b / "sharded" / name_b).read_bytes()
        assert blob_a.replace(ids[0].encode(), ids[1].encode()) == blob_b


def test_metadata_is_sorted_and_the_header_stays_valid(tmp_path):
    path = zoo.save(zoo.build("tiny-dense-prenorm"), tmp_path / "m.safetensors", variant="tiny-dense-prenorm")
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"]) and n % 8 == 0
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["variant"] == "tiny-dense-prenorm"
        assert all(torch.equal(f.get_tensor(k), v) for k, v in zoo.load(path).state_dict().items())


def test_first_load_in_a_fresh_process_runs_no_initializer(tmp_path, run_python):
    """The model is built on meta with initializers skipped: meta kernels of normal_ and friends import
    torch._dynamo on first use, seconds that a fresh process would pay on its first zoo.load."""
    path = zoo.save(zoo.build("tiny-moe-hybridnorm-star"), tmp_path / "m.safetensors")
    r = run_python(f"""
        import sys, torch, zoo
        before = "torch._dynamo" in sys.modules
        calls = []
        real = torch.Tensor.normal_
        torch.Tensor.normal_ = lambda self, *a, **k: calls.append(self.shape) or real(self, *a, **k)
        model = zoo.load({str(path)!r})
        assert not calls, calls
        assert before or "torch._dynamo" not in sys.modules
        assert not any(t.is_meta for t in model.state_dict().values())
    """)
    assert r.returncode == 0, r.stderr


def test_a_header_claiming_200000_layers_fails_fast_and_small(tmp_path):
    """The config is checked against the tensors before any model is built: within 1 s of zoo.load and under
    100 MB of extra memory (measured in a fresh process, after its imports)."""
    good = tmp_path / "good.safetensors"
    zoo.save(zoo.build("tiny-dense-hybridnorm"), good)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    config = json.loads(header["__metadata__"]["config"])
    config["n_layers"] = 200_000
    header["__metadata__"]["config"] = json.dumps(config)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    probe = ("import resource, sys, time, zoo\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "t = time.perf_counter()\n"
             "try:\n    zoo.load(sys.argv[1])\nexcept zoo.ZooError as e:\n    print(e)\n"
             "print(time.perf_counter() - t, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
    r = subprocess.run([sys.executable, "-c", probe, str(huge)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    message, figures = r.stdout.strip().splitlines()
    assert message == f"{huge} does not match its config: its tensors hold blocks 0-3, but its config says n_layers=200000"
    seconds, extra_mb = map(float, figures.split())
    assert seconds < 1.0 and extra_mb < 100, (seconds, extra_mb)
