"""The benchmark scripts run and compare like with like (timings themselves are not asserted)."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_moe_layer_benchmark_runs_and_matches_hf(tmp_path):
    out = tmp_path / "moe.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--shapes", "tiny", "--dtypes", "fp32",
                        "--repeats", "1", "--warmups", "0", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["runs"]
    assert row["hf_impl"] in ("grouped_mm", "eager")
    assert set(row["max_abs_diff_vs_hf"]) == {"zoo_auto", "zoo_fused", "zoo_grouped_mm", "zoo_loop"}
    assert max(row["max_abs_diff_vs_hf"].values()) < 1e-5  # same weights, same outputs
    for name in ("zoo_auto", "hf", "dense_swiglu"):
        assert row[name]["fwd_bwd_ms"] > 0 and row[name]["fwd_bwd_mfu"] > 0
    assert "zoo_auto vs HF" in r.stdout


@pytest.mark.slow  # about 45 s on 2 cores: it pulls from a served hub and from the code before issue 19
def test_checkpoint_io_benchmark_runs_and_loads_the_saved_weights(tmp_path):
    import torch
    from safetensors.torch import load_file

    import zoo

    out, work = tmp_path / "io.json", tmp_path / "work"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_io.py"), "--quick", "--out", str(out),
                        "--workdir", str(work)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert {"machine", "model", "repeats", "page_cache", "load", "pull", "ratios", "goals", "table"} <= set(data)
    assert set(data["load"]["variants"]) == {"read_bytes", "zoo_load", "zoo_load_sharded", "safetensors_load_file",
                                             "torch_load", "torch_load_mmap", "zoo_load_then_touch", "torch_load_then_touch"}
    assert {"copy", "http_get", "pull", "pull_unindexed", "hf_hub_download_weights",
            "sha256_weights"} <= set(data["pull"]["variants"])
    for part in ("load", "pull"):
        for v in data[part]["variants"].values():
            assert len(v["times_ms"]) == data["repeats"] == 2 and v["median_ms"] > 0
    assert set(data["goals"]) == {"load_vs_read", "load_vs_torch_load", "pull_vs_copy", "pull_vs_baseline",
                                  "pull_unindexed_vs_baseline"} <= set(data["ratios"])
    assert data["ratios"]["pull_unindexed_vs_copy"] > 0 and "unindexed" in data["table"]
    assert all(isinstance(g["pass"], bool) and g["ratio"] > 0 for g in data["goals"].values())
    assert data["load"]["shards"] > 1 and data["load"]["fresh_process"]["zoo_load"]["median_ms"] > 0
    assert data["load"]["weights_equal"] == {"zoo_load": True, "zoo_load_sharded": True}
    assert data["pull"]["pulled_bytes_match"] is True
    ab = data["against_baseline"]  # the same pulls by the zoo before issue 19, and a SIGKILLed pull of each
    assert all(len(t) == 1 and t[0] > 0 for t in ab["times_ms"].values()) and ab["ratio_indexed"] > 0
    now, before = ab["killed_pull"]["current"], ab["killed_pull"]["baseline"]
    assert now["part_bytes_after_kill"] == now["file_bytes"] // 2 == now["bytes_sent_again"]
    assert now["requests"] == [{"range": f"bytes={now['file_bytes'] // 2}-", "bytes": now["file_bytes"] // 2}]
    assert before["bytes_sent_again"] == before["file_bytes"]  # it pre-sized the part, so it started over
    assert "PASS" in r.stdout or "FAIL" in r.stdout
    # the files it timed: zoo.load gives back exactly the state dict that was saved (torch.save and safetensors)
    saved = torch.load(work / "model.pt", weights_only=True)
    for path in (work / "model.safetensors", work / "sharded" / "model.safetensors.index.json"):
        loaded = zoo.load(path).state_dict()
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    raw = load_file(work / "model.safetensors")
    assert all(torch.equal(raw[k], saved[k]) for k in saved)


@pytest.mark.slow  # about 30 s on 2 cores
def test_train_step_benchmark_runs_identical_models(tmp_path):
    out = tmp_path / "train.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--models", "llama", "mixtral",
                        "--dtypes", "fp32", "--repeats", "1", "--batch", "1", "--seq", "16", "--mfu-batch", "1",
                        "--mfu-seq", "16", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert [row["model"] for row in result["vs_hf"]] == ["llama", "mixtral"]
    for row in result["vs_hf"]:
        assert row["first_step_loss_diff"] < 1e-4  # same weights: same loss
        assert row["zoo_step_ms"] > 0 and row["hf_step_ms"] > 0 and row["speedup_vs_hf"] > 0
    (mfu,) = result["mfu"]
    assert 25e6 < mfu["params"] < 35e6 and mfu["mfu"] > 0
    if platform.libc_ver()[0] == "glibc":  # as zoo train runs it, and beside it with the C library's default
        assert mfu["allocator"] == "retain" and mfu["default_allocator"]["mfu"] > 0
        assert all(row["allocator"] == "retain" for row in result["vs_hf"])  # both libraries' processes alike
    assert result["matmul_peak_gflops"]["fp32"] > 0


def test_run_all_reads_goals_from_measurements():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from run_all import goals
    finally:
        sys.path.pop(0)
    train = {"vs_hf": [{"model": "olmoe", "dtype": "fp32", "speedup_vs_hf": 1.19, "first_step_loss_diff": 2e-4},
                       {"model": "llama", "dtype": "bf16", "speedup_vs_hf": 1.0}],
             "mfu": [{"dtype": "fp32", "seq": 512, "mfu": 0.66, "allocator": "retain"}]}
    io = {"ratios": {"load_vs_read": 1.5, "load_vs_torch_load": 1.0, "pull_vs_copy": 1.9}}
    got = {label: met for label, _, _, met in goals(train, io)}
    assert got == {
        "olmoe fp32 training step vs HF >= 1.2x": False, "olmoe fp32 first-step loss |zoo - HF| <= 1e-4": False,
        "llama bf16 training step vs HF >= 1.0x": True, "~30M dense fp32 training-step MFU >= 65% (seq 512, eager, retain allocator)": True,
        "zoo.load / reading the file's bytes <= 1.5": True, "zoo.load / torch.load < 1": False,
        "pull from zoo serve / file copy <= 2": True}


def _gpu_script():
    import importlib.util
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))  # its `from common import ...`
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_runs_its_cpu_mode(tmp_path):
    """benchmarks/gpu.py --cpu: the parity check (megablocks through a reference gmm) and training steps."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--cpu", "--out", str(tmp_path),
                        "--steps", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    parity = data["parity"]
    assert set(parity["backends"]) == {"loop", "grouped_mm", "fused", "megablocks"} and parity["failed"] == []
    assert parity["empty_experts"] == 2
    assert {"out", "grad_x", "grad_w1", "grad_v1", "grad_w2"} == set(parity["backends"]["megablocks"])
    assert [row["variant"] for row in data["train"]] == ["tiny-dense-hybridnorm", "tiny-moe-hybridnorm",
                                                         "tiny-moe-hybridnorm"]
    assert all(row["tokens_per_s"] > 0 and row["mfu"] > 0 for row in data["train"])


def test_gpu_parity_check_fails_a_wrong_backend():
    import torch

    from zoo.kernels.moe_glu import expert_glu_reference
    gpu = _gpu_script()

    def off_by_a_little(*args):
        return expert_glu_reference(*args) * 1.001

    result = gpu.parity(torch.device("cpu"), torch.float32, torch.float64,
                        {"loop": expert_glu_reference, "wrong": off_by_a_little})
    assert result["failed"] == ["wrong"]
    assert result["backends"]["wrong"]["out"] > 1e-4


@pytest.mark.slow
def test_distributed_benchmark_runs_1_2_and_4_ranks(tmp_path):
    out = tmp_path / "distributed.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--steps", "1", "--seq", "32",
                        "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["variant"], row["ranks"]) for row in rows] == [
        (v, n) for v in ("tiny-dense-hybridnorm", "tiny-moe-hybridnorm") for n in (1, 2, 4)]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["state_vs_1_rank"] <= 1.1 / row["ranks"]
        assert (row["a2a_share"] > 0) == (row["variant"] == "tiny-moe-hybridnorm" and row["ranks"] > 1)
