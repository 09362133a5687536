"""Scale-out in real torchrun processes over gloo: FSDP2, HSDP and expert parallel against one process,
micro-batches, activation checkpointing, DCP checkpoints and their export, and the layouts' errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import data, env, losses, zoo_cmd  # noqa: F401  (data is a fixture)

from zoo.distributed.activation import ac_interval
from zoo.distributed.layout import Layout
from zoo.errors import ZooError

FP64 = ["--precision", "fp64", "--set", "moe.backend=loop", "--set", "moe.lb_scope=global"]
STEPS = ["--steps", "3", "--batch-size", "8", "--seq-len", "32", "--eval-every", "3", "--warmup", "1", "--seed", "5"]


def torchrun(nproc, *args, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "zoo", *args]
    r = subprocess.run(cmd, env=exact_env(), capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def exact_env():
    """The plain-PyTorch path (ZOO_KERNELS=reference) keeps every op in float64."""
    return {**env(), "ZOO_KERNELS": "reference"}


def one_process(*args):
    subprocess.run(zoo_cmd(*args), env=exact_env(), check=True, capture_output=True)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one, many, tol):
    """Every logged figure of the two runs (loss, aux loss, router statistics, gradient norms, validation
    loss) and every weight of their final checkpoints agree to ``tol``."""
    a, b = records(one), records(many)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(len(a)))
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "aux_loss", "val_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=tol, abs=tol), (key, ra["step"])
        assert rb["ffn_grad_norms"] == pytest.approx(ra["ffn_grad_norms"], rel=tol)
        for la, lb in zip(ra.get("router", []), rb.get("router", [])):
            assert lb == pytest.approx(la, rel=tol, abs=tol), ra["step"]
    wa = load_file(str(one / "checkpoint" / "model.safetensors"))
    wb = load_file(str(many / "checkpoint" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype == torch.float64
        torch.testing.assert_close(wb[k], wa[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("name, nproc, layout", [
    ("tiny-dense-hybridnorm", 2, ["--dp-shard", "2"]),
    ("tiny-moe-hybridnorm", 2, ["--ep", "2"]),
])
def test_sharded_runs_equal_one_process_in_float64(tmp_path, data, name, nproc, layout):  # noqa: F811
    """3 AdamW steps at the same global batch; the sharded run's checkpoint is joined by `zoo export`."""
    args = ["train", name, "--data", data, *STEPS, *FP64]
    one_process(*args, "--out", str(tmp_path / "one"))
    torchrun(nproc, *args, *layout, "--out", str(tmp_path / "many"))
    r = subprocess.run(zoo_cmd("export", str(tmp_path / "many")), env=exact_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_same_run(tmp_path / "one", tmp_path / "many", 1e-9)


def test_a_rank_whose_experts_get_no_tokens():
    """ParallelExperts' output and weight gradients equal one process's experts when every token goes to
    rank 0's experts (tests/workers/expert_parallel.py exits nonzero otherwise)."""
    worker = Path(__file__).parent / "workers" / "expert_parallel.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker)], env=exact_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("max errors") == 2


def test_micro_batches_and_activation_checkpointing_leave_the_run_unchanged(tmp_path, data):  # noqa: F811
    """--grad-accum 2 equals one micro-batch in float64; --ac full gives bit-identical losses and weights, with
    the sigmoid-bias router, whose load count must not be taken again when a block reruns."""
    args = ["train", "tiny-dense-hybridnorm", "--data", data, *STEPS, *FP64]
    one_process(*args, "--out", str(tmp_path / "one"))
    one_process(*args, "--grad-accum", "2", "--out", str(tmp_path / "accum"))
    assert_same_run(tmp_path / "one", tmp_path / "accum", 1e-9)
    base = ["train", "tiny-moe-hybridnorm", "--data", data, *STEPS, "--set", "moe.router=sigmoid-bias"]
    one_process(*base, "--out", str(tmp_path / "none"))
    one_process(*base, "--ac", "full", "--out", str(tmp_path / "full"))
    assert losses(tmp_path / "none") == losses(tmp_path / "full")
    a, b = (load_file(str(tmp_path / r / "checkpoint" / "model.safetensors")) for r in ("none", "full"))
    assert all(torch.equal(a[k], b[k]) for k in a) and any("expert_bias" in k for k in a)


def test_layouts_refuse_what_cannot_run():
    assert Layout.of(4) == Layout(world=4, dp_replicate=4, fsdp=False)
    assert Layout.of(4, ep=2) == Layout(world=4, dp_replicate=1, dp_shard=2, ep=2, fsdp=True)
    assert Layout.of(4, dp_shard=2, dp_replicate=2) == Layout(world=4, dp_replicate=2, dp_shard=2, ep=1, fsdp=True)
    with pytest.raises(ZooError, match=r"--dp-replicate 1 x --dp-shard 3 x --ep 1 = 3 ranks, but torchrun started 4"):
        Layout.of(4, dp_shard=3)
    with pytest.raises(ZooError, match="4 ranks cannot be split into --dp-replicate 1 x --ep 3 groups"):
        Layout.of(4, ep=3)
    with pytest.raises(ZooError, match="expert parallelism needs an MoE variant"):
        Layout.of(2, ep=2).check_model(None)
    with pytest.raises(ZooError, match=r"--ep 3 must divide the number of experts \(8\)"):
        Layout.of(3, ep=3).check_model(8)
    assert [ac_interval(s) for s in ("none", "full", "every:3")] == [0, 1, 3]
    with pytest.raises(ZooError, match="--ac 'every:0': expected none, full"):
        ac_interval("every:0")


def test_export_says_what_it_needs(tmp_path):
    r = subprocess.run(zoo_cmd("export", str(tmp_path)), env=env(), capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"zoo: error: {tmp_path}: no config.yaml; give the run folder of a zoo train run" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name, layout", [
    ("tiny-dense-hybridnorm", ["--dp-shard", "4"]),
    ("tiny-moe-hybridnorm", ["--ep", "2", "--dp-shard", "2"]),
])
def test_four_rank_layouts_equal_one_process_in_float64(tmp_path, data, name, layout):  # noqa: F811
    args = ["train", name, "--data", data, *STEPS, *FP64]
    one_process(*args, "--out", str(tmp_path / "one"))
    torchrun(4, *args, *layout, "--out", str(tmp_path / "many"))
    subprocess.run(zoo_cmd("export", str(tmp_path / "many")), env=exact_env(), check=True, capture_output=True)
    assert_same_run(tmp_path / "one", tmp_path / "many", 1e-9)


@pytest.mark.slow
def test_hsdp_equals_fsdp_and_a_resume_continues_bit_identically(tmp_path, data):  # noqa: F811
    """HSDP 2x2 gives FSDP-over-4's curve; a run stopped after its step-3 checkpoint and resumed at 4 ranks
    continues it bit for bit, and resumed at 2 ranks (DCP reshards) follows it."""
    args = ["train", "tiny-moe-hybridnorm", "--data", data, "--steps", "6", "--batch-size", "8", "--seq-len", "32",
            "--eval-every", "100", "--checkpoint-every", "3", "--warmup", "1", "--seed", "5", "--set", "moe.lb_scope=global"]
    torchrun(4, *args, "--dp-shard", "4", "--out", str(tmp_path / "fsdp"))
    torchrun(4, *args, "--dp-shard", "2", "--dp-replicate", "2", "--out", str(tmp_path / "hsdp"))
    full, hsdp = losses(tmp_path / "fsdp"), losses(tmp_path / "hsdp")
    assert all(hsdp[s] == pytest.approx(full[s], abs=1e-5) for s in range(6)), (full, hsdp)
    base = ["tiny-moe-hybridnorm", *args[4:], "--dp-shard", "4"]
    for world, name in ((4, "cut"), (2, "resharded")):
        run = tmp_path / name
        worker = Path(__file__).parent / "workers" / "train_part.py"
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                            str(worker), str(run), data, "3", *base], env=exact_env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (run / "checkpoint" / "sharded" / "latest").read_text() == "step-00000003"
        torchrun(world, *args, "--dp-shard", str(world), "--resume", "--out", str(run))
        if world == 4:
            assert losses(run) == full  # bit for bit
        else:
            again = losses(run)
            assert all(again[s] == pytest.approx(full[s], abs=1e-5) for s in range(6)), (full, again)


@pytest.mark.slow
def test_a_sharded_checkpoint_loads_bit_for_bit_at_other_world_sizes(tmp_path, data):  # noqa: F811
    """A checkpoint saved by 4 ranks (MoE, --ep 2 --dp-shard 2), loaded at 4, 2 and 1 ranks and gathered whole:
    the same weights and AdamW state, bit for bit; `zoo export` gives the same weights, and zoo.load of the
    export gives the logits of the model loaded in the run."""
    import zoo
    args = ["tiny-moe-hybridnorm", "--data", data, "--steps", "4", "--batch-size", "8", "--seq-len", "32",
            "--eval-every", "100", "--checkpoint-every", "3", "--warmup", "1", "--seed", "5"]
    run = tmp_path / "run"
    torchrun(4, "train", *args, "--ep", "2", "--dp-shard", "2", "--out", str(run))
    worker = Path(__file__).parent / "workers" / "dcp_state.py"
    states = {}
    for world, layout in ((4, ["--ep", "2", "--dp-shard", "2"]), (2, ["--dp-shard", "2"]), (1, ["--dp-shard", "1"])):
        out = tmp_path / f"state-{world}.safetensors"
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            str(world), str(worker), str(out), str(run), *args, *layout], env=exact_env(),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        states[world] = load_file(str(out))
    assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in states[4])
    for world in (2, 1):
        assert states[world].keys() == states[4].keys()
        for k, v in states[4].items():
            assert torch.equal(states[world][k], v), (world, k)
    r = subprocess.run(zoo_cmd("export", str(run)), env=exact_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    exported = zoo.load(str(run / "checkpoint" / "model.safetensors"))
    for k, v in exported.state_dict().items():
        assert torch.equal(v, states[4][f"model.{k}"]), k
    model = zoo.build("tiny-moe-hybridnorm")
    model.load_state_dict({k[len("model."):]: v for k, v in states[1].items() if k.startswith("model.")})
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(idx).logits, model.eval()(idx).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bf16_mixed_precision_trains_like_fp32(tmp_path, data):  # noqa: F811
    args = ["train", "tiny-dense-hybridnorm", "--data", data, "--steps", "20", "--batch-size", "8", "--seq-len", "64",
            "--eval-every", "100", "--warmup", "2", "--dp-shard", "2"]
    torchrun(2, *args, "--precision", "fp32", "--out", str(tmp_path / "fp32"))
    torchrun(2, *args, "--precision", "bf16", "--out", str(tmp_path / "bf16"))
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert a[19] < a[0] - 1.0
    assert b[19] == pytest.approx(a[19], rel=0.02), (a[19], b[19])


def memory(tmp_path, nproc, name, *options):
    """Per-rank bytes of parameters, gradients and AdamW state after one step (tests/workers/memory.py)."""
    out = tmp_path / f"mem-{nproc}-{'-'.join(options) or 'one'}" / "bytes"
    out.parent.mkdir()
    worker = [str(Path(__file__).parent / "workers" / "memory.py"), str(out), name, "--steps", "1", "--batch-size", "4",
              "--seq-len", "32", "--eval-every", "100", *options]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *worker]
           if nproc > 1 else [sys.executable, *worker])
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(nproc)]


def test_sharded_memory_per_rank_and_the_plan_agree(tmp_path):
    """Under FSDP2 at N ranks each rank holds at most 1.1/N of one process's weights, gradients and AdamW
    state, and building and initializing it never holds the whole model (it holds one weight whole at a time);
    under --ep 2 a rank holds at most 1.1/2 of the experts; `zoo plan`'s figures are within 10% of these."""
    from zoo.api import get_config
    from zoo.distributed.plan import plan
    one = memory(tmp_path, 1, "tiny-moe-hybridnorm")[0]
    state = one["params"] + one["grads"] + one["optimizer"]
    sharded = memory(tmp_path, 2, "tiny-moe-hybridnorm", "--dp-shard", "2")
    for rank in sharded:
        assert rank["params"] + rank["grads"] + rank["optimizer"] <= 1.1 / 2 * state, (rank, one)
        assert rank["init_peak"] < 1.2 / 2 * rank["model_params"] + rank["largest_param"], rank  # never it all
        assert rank["init_equal"]  # the initial weights, gathered, are a single process's bit for bit
    experts = memory(tmp_path, 2, "tiny-moe-hybridnorm", "--ep", "2")
    for rank in experts:
        assert rank["expert_params"] <= 1.1 / 2 * one["expert_params"], (rank, one)
        assert rank["init_equal"]
    rows = {(r.dp_shard, r.ep): r for r in plan(get_config("tiny-moe-hybridnorm"), "tiny", gpus=2, gpu_memory=80e9,
                                                micro_batch=2, seq_len=32, precision="fp32").rows}
    for measured, row in ((sharded, rows[(2, 1)]), (experts, rows[(1, 2)])):
        for key, planned in (("params", row.params), ("grads", row.grads), ("optimizer", row.optimizer)):
            got = max(rank[key] for rank in measured)
            assert abs(planned - got) <= 0.1 * got, (key, planned, got)


def test_an_init_that_writes_more_than_its_init_calls_is_run_on_gathered_weights(tmp_path):
    """With a q/k/v bias, the attention's init_weights also zeroes the bias itself, so its calls of ``init``
    cannot be replayed one weight at a time; the step runs on gathered weights, and they are still a single
    process's bit for bit."""
    bias = ["--set", "attention.options.qkv_bias=true"]
    for rank in memory(tmp_path, 2, "tiny-dense-hybridnorm", "--dp-shard", "2", *bias):
        assert rank["init_equal"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ladder-20m-dense-hybridnorm", "ladder-20m-moe-hybridnorm", "tiny-dense-hybridnorm",
                                  "tiny-moe-hybridnorm"])
def test_initializing_a_sharded_model_peaks_under_its_share_plus_its_largest_weight(tmp_path, name):
    """Building and initializing at N = 2 and 4 FSDP ranks allocates at most 1.2/N of the model plus its largest
    parameter (one weight or piece of one is drawn whole at a time, each rank keeping its part), and the weights
    are a single process's bit for bit."""
    for n in (2, 4):
        for rank in memory(tmp_path, n, name, "--dp-shard", str(n)):
            bound = 1.2 / n * rank["model_params"] + rank["largest_param"]
            assert rank["init_peak"] < bound, (n, rank["init_peak"], bound)
            assert rank["init_equal"]


@pytest.mark.parametrize("name", ["tiny-dense-hybridnorm", "tiny-moe-hybridnorm"])
@pytest.mark.parametrize("seq", [64, 128])
def test_plan_activations_match_the_bytes_saved_for_backward(name, seq):
    """The plan counts on meta, where the plain paths run (the loop expert backend: an upper bound of the fused
    ones); here the bytes a real CPU forward on the plain paths saves are counted independently."""
    import zoo
    from zoo.api import get_config
    from zoo.distributed.plan import plan
    from zoo.kernels.switch import use
    model = zoo.build(name)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = s.nbytes()
        return t

    idx = torch.randint(0, 256, (2, seq))
    with use("reference"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    measured = sum(storages.values())
    planned = plan(get_config(name), name, gpus=1, gpu_memory=80e9, micro_batch=2, seq_len=seq,
                   precision="fp32").rows[0].activations
    assert abs(planned - measured) <= 0.25 * measured, (planned, measured)


def test_plan_names_a_layout_for_olmoe_and_says_why_ddp_does_not_fit():
    r = subprocess.run(zoo_cmd("plan", "olmoe-1b-7b-hybridnorm-star", "--gpus", "8", "--gpu-memory", "80GB"),
                       env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "\nfits: FSDP2 over 8 ranks" in r.stdout
    assert "DDP over 8 ranks: does not fit: needs " in r.stdout and "AdamW" in r.stdout
    j = subprocess.run(zoo_cmd("plan", "olmoe-1b-7b-hybridnorm-star", "--json"), env=env(), capture_output=True, text=True)
    rows = json.loads(j.stdout)["rows"]
    assert {"layout", "params", "grads", "optimizer", "activations", "total", "fits", "why"} <= rows[0].keys()


@pytest.mark.slow
def test_fp32_first_step_equals_one_process(tmp_path, data):  # noqa: F811
    """In fp32 with the default kernels: the first step's loss and gradient norms (whole, and per FFN) to 1e-5."""
    args = ["train", "tiny-moe-hybridnorm", "--data", data, "--steps", "1", "--batch-size", "8", "--seq-len", "32",
            "--eval-every", "100", "--set", "moe.lb_scope=global"]
    subprocess.run(zoo_cmd(*args, "--out", str(tmp_path / "one")), env=env(), check=True, capture_output=True)
    for name, layout in (("fsdp", ["--dp-shard", "2"]), ("ep", ["--ep", "2"])):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "zoo", *args, *layout, "--out", str(tmp_path / name)], env=env(), capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        a, b = records(tmp_path / "one")[0], records(tmp_path / name)[0]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["ffn_grad_norms"] == pytest.approx(a["ffn_grad_norms"], rel=1e-5)


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_with_a_zoo_error_and_the_checkpoint_resumes(tmp_path, data):  # noqa: F811
    """SIGSTOP one rank: the other fails within --dist-timeout with a zoo error naming its rank and step;
    torchrun then kills the stopped one and exits nonzero; the last checkpoint resumes."""
    import os
    import signal
    import time
    run = tmp_path / "run"
    args = ["train", "tiny-dense-hybridnorm", "--data", data, "--steps", "400", "--batch-size", "4", "--seq-len", "32",
            "--eval-every", "1000", "--checkpoint-every", "5", "--dp-shard", "2", "--dist-timeout", "5"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "zoo", *args, "--out", str(run)], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 12):
        time.sleep(0.2)
    victim = None
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"RANK=1" in environ and f"--out\0{run}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            victim = pid
    assert victim is not None
    os.kill(victim, signal.SIGSTOP)
    stopped = time.time()
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode != 0
    line = next(ln for ln in stderr.splitlines() if "zoo: error: rank 0 of 2 at step" in ln)
    assert "--dist-timeout (5 s)" in line and "Traceback" not in stderr.split("zoo: error:")[0][-200:]
    assert time.time() - stopped < 5 + 60  # the timeout, then torchrun's grace before it kills the stopped rank
    saved = int((run / "checkpoint" / "sharded" / "latest").read_text().split("-")[1])
    assert saved >= 5 and saved % 5 == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "zoo", *args, "--steps", str(saved + 2), "--resume", "--out", str(run)], env=env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(losses(run)) == list(range(saved + 2))
