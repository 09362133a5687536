"""Training: exact resume after a kill, divergence detection, distributed parity, and `zoo compare`."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zoo
from zoo.train import TrainConfig, train
from zoo.train.optim import make_optimizer

SMALL = ["--set", "d_model=64", "--set", "n_layers=2", "--set", "n_heads=2", "--set", "ffn.hidden_size=128",
         "--steps", "12", "--batch-size", "4", "--seq-len", "32", "--eval-every", "100", "--warmup", "2", "--seed", "3"]


@pytest.fixture
def data(tmp_path):
    """A small text corpus of its own (the stdlib corpus is the default; this keeps tests quick)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"f{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(300)))
    return str(folder)


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ZOO_", "WORLD_SIZE", "RANK", "LOCAL_RANK"))}
    e["ZOO_CACHE"] = os.environ.get("ZOO_TEST_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "zoo-test-cache"))
    e["OMP_NUM_THREADS"] = "1"
    return e


def zoo_cmd(*args):
    return [sys.executable, "-m", "zoo", *args]


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r and "event" not in r}


def test_resume_after_kill_continues_the_loss_curve_exactly(tmp_path, data):
    base = ["train", "tiny-moe-hybridnorm", "--data", data, *SMALL, "--set", "moe.router=sigmoid-bias", "--set", "moe.jitter=0.01"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(zoo_cmd(*base, "--out", str(full)), env=env(), check=True, capture_output=True)
    # the interrupted run checkpoints every 4 steps (env override read by the test hook below)
    proc = subprocess.Popen(zoo_cmd(*base, "--out", str(cut), "--checkpoint-every", "4"), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (cut / "metrics.jsonl").exists() and len(losses(cut)) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 7 <= len(losses(cut)) < 12, "the run must be killed mid-way"
    subprocess.run(zoo_cmd(*base, "--out", str(cut), "--checkpoint-every", "4", "--resume"), env=env(), check=True,
                   capture_output=True)
    a, b = losses(full), losses(cut)
    assert sorted(b) == list(range(12))
    assert all(a[s] == pytest.approx(b[s], abs=1e-6) for s in range(12)), [(s, a[s], b[s]) for s in range(12)]


def test_divergence_is_reported_and_keeps_the_last_good_checkpoint(tmp_path, data):
    run = tmp_path / "run"
    r = subprocess.run(zoo_cmd("train", "tiny-dense-postnorm", "--data", data, *SMALL, "--lr", "30", "--out", str(run),
                               "--checkpoint-every", "1"), env=env(), capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert "zoo: error: training diverged at step" in r.stderr and "Traceback" not in r.stderr
    def strict(text):  # NaN and Infinity are not JSON
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {text[:80]}"))

    event = [strict(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "event" in x][-1]
    assert event["event"] == "diverged" and event["layer"] in r.stderr
    summary = strict((run / "summary.json").read_text())
    assert summary["diverged"]["step"] == event["step"] and "training diverged" in summary["diverged"]["message"]
    from safetensors import safe_open
    with safe_open(str(run / "checkpoint" / "trainer.safetensors"), "pt") as f:
        saved_step = json.loads(f.metadata()["run"])["step"]
    assert saved_step == event["step"], "the checkpoint is the last good step, and nothing after it"


@pytest.mark.parametrize("name, tol", [
    ("tiny-dense-hybridnorm", 1e-4),
    # the load-balancing loss is computed on each rank's half of the batch, as Megatron and MegaBlocks
    # do per micro-batch; it is not linear in the batch, so the MoE curve agrees less tightly
    ("tiny-moe-prenorm", 5e-3),
])
def test_two_gloo_processes_follow_the_single_process_curve(tmp_path, data, name, tol):
    args = ["train", name, "--data", data, *SMALL]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(zoo_cmd(*args, "--out", str(one)), env=env(), check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    "-m", "zoo", *args, "--out", str(two)], env=env(), check=True, capture_output=True)
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(12))
    assert all(a[s] == pytest.approx(b[s], abs=tol) for s in range(12)), [(s, a[s], b[s]) for s in range(12)]
    assert a[11] < a[0] - 1.0
    for run in (one, two):  # the batch is global: throughput counts each token once, whatever the number of ranks
        summary = json.loads((run / "summary.json").read_text())
        assert summary["tokens"] == 12 * 4 * 32
        assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["wall"])


def test_compare_writes_table_report_and_plots(tmp_path, data):
    out = tmp_path / "cmp"
    r = subprocess.run(zoo_cmd("compare", "tiny-dense-hybridnorm", "tiny-moe-prenorm", "--data", data, *SMALL[:8],
                               "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--out", str(out)),
                       env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "tiny-dense-hybridnorm" in r.stdout and "val_loss" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert [row["variant"] for row in report["rows"]] == ["tiny-dense-hybridnorm", "tiny-moe-prenorm"]
    for row in report["rows"]:
        assert row["val_loss"] > 0 and row["tokens_per_s"] > 0 and row["diverged"] is False
        assert row["active_params"] <= row["total_params"]
    assert "| tiny-moe-prenorm |" in (out / "report.md").read_text()
    for png in ("loss_vs_tokens.png", "loss_vs_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compiled_training_follows_eager(tmp_path):
    """``--compile`` (inductor, minutes the first time on 2 cores) gives the eager run's losses and metrics."""
    runs = {}
    for compiled in (False, True):
        tc = TrainConfig(steps=3, batch_size=2, seq_len=64, eval_every=3, compile=compiled)
        train("tiny-dense-hybridnorm", ["n_layers=2"], tc, out_dir=tmp_path / str(compiled), progress=False)
        runs[compiled] = [json.loads(line) for line in (tmp_path / str(compiled) / "metrics.jsonl").read_text().splitlines()]
    for eager, compiled in zip(runs[False], runs[True]):
        assert compiled["loss"] == pytest.approx(eager["loss"], abs=1e-4)
        assert compiled["residual_rms"] == pytest.approx(eager["residual_rms"], abs=1e-4)
        assert compiled["max_attn_logit"] == pytest.approx(eager["max_attn_logit"], abs=1e-4)


def test_a_kill_during_the_checkpoint_swap_leaves_a_whole_checkpoint(tmp_path, data):
    """Weights, trainer state and tokenizer are written to .checkpoint.partial and swapped in by two renames;
    a kill between them (both folders complete, no checkpoint/) or during the write (a partial folder beside
    the old checkpoint) still resumes, from the newest whole checkpoint."""
    import shutil
    args = ["train", "tiny-dense-hybridnorm", "--data", data, *SMALL, "--checkpoint-every", "4"]
    run, plain = tmp_path / "run", tmp_path / "plain"
    for folder in (plain, run):  # 8 steps, then on to 12: plainly, and after a kill between the renames
        subprocess.run(zoo_cmd(*args, "--steps", "8", "--out", str(folder)), env=env(), check=True, capture_output=True)
    ckpt = run / "checkpoint"
    (ckpt.parent / ".checkpoint.old").mkdir()  # the old one aside, the new one not yet in place
    ckpt.rename(run / ".checkpoint.partial")
    for folder in (plain, run):
        r = subprocess.run(zoo_cmd(*args, "--resume", "--out", str(folder)), env=env(), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert losses(run) == losses(plain) and sorted(losses(run)) == list(range(12))
    partial = run / ".checkpoint.partial"  # killed while writing: a half folder beside the whole one
    partial.mkdir()
    shutil.copy(ckpt / "model.safetensors", partial / "model.safetensors")
    r = subprocess.run(zoo_cmd(*args, "--steps", "14", "--resume", "--out", str(run)), env=env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert not partial.exists() and sorted(losses(run)) == list(range(14))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The corpus and the uninterrupted run that the kill-at-each-phase runs must reproduce."""
    folder = tmp_path_factory.mktemp("phases")
    corpus = folder / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(300)))
    args = ["tiny-dense-hybridnorm", "--data", str(corpus), *SMALL, "--checkpoint-every", "4"]
    subprocess.run(zoo_cmd("train", *args, "--out", str(folder / "full")), env=env(), check=True, capture_output=True)
    return args, losses(folder / "full")


@pytest.mark.parametrize("phase", ["before-weights", "after-weights", "after-state", "between-renames", "after-swap"])
def test_a_kill_at_each_phase_of_a_checkpoint_resumes_bit_identically(tmp_path, uninterrupted, phase):
    """Killed during its second checkpoint (step 8), the run resumes from a whole checkpoint (step 4, or step 8
    once the new one is in place) and its curve equals the uninterrupted run's; no partial folder stays behind."""
    args, full = uninterrupted
    run = tmp_path / "run"
    worker = Path(__file__).parent / "workers" / "kill_during_checkpoint.py"
    r = subprocess.run([sys.executable, str(worker), phase, *args, "--out", str(run)], env=env(), capture_output=True,
                       text=True)
    assert r.returncode == 9, r.stderr[-2000:]
    r = subprocess.run(zoo_cmd("train", *args, "--resume", "--out", str(run)), env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(run) == full
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    leftovers += [p.name for p in (run / "checkpoint").iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def test_resume_refuses_files_that_do_not_belong_together_or_another_model(tmp_path, data, capsys):
    """The checkpoint's manifest.json (written last) names its files' sizes and digests and the step: a folder
    whose files come from different saves, or a command that builds another model, is refused naming what
    differs; a folder from before manifests resumes with a warning; temporary files of killed writes go."""
    import shutil

    from zoo.cli import main
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint"
    args = ["train", "tiny-dense-hybridnorm", "--data", data, *SMALL, "--checkpoint-every", "4", "--out", str(run)]
    assert main([*args, "--steps", "4"]) == 0
    shutil.copy(ckpt / "trainer.safetensors", tmp_path / "trainer-4.safetensors")
    assert main([*args, "--steps", "8", "--resume"]) == 0
    shutil.copy(ckpt / "trainer.safetensors", tmp_path / "trainer-8.safetensors")
    shutil.copy(tmp_path / "trainer-4.safetensors", ckpt / "trainer.safetensors")  # step-8 weights, step-4 optimizer
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"zoo: error: --resume: {ckpt} is not the checkpoint of step 8 that its manifest.json "
                          "records: trainer.safetensors has "), err
    assert err.endswith("Its files come from different saves; put back the folder as it was saved, or start without "
                        "--resume\n") and len(err.splitlines()) == 1, err
    shutil.copy(tmp_path / "trainer-8.safetensors", ckpt / "trainer.safetensors")
    other = [a.replace("n_layers=2", "n_layers=3") for a in args]
    assert main([*other, "--resume"]) == 2
    err = capsys.readouterr().err
    assert (f"zoo: error: --resume: the checkpoint in {ckpt} is of another model than this command builds: "
            f"n_layers: 2 vs 3; resume with the run's own config (`zoo train {run} --resume`, without --set)\n") == err
    (ckpt / "manifest.json").unlink()
    stale = run / ".summary.json.killed.tmp"
    stale.write_text("{")
    assert main([*args, "--resume"]) == 0
    assert "has no manifest.json (an older zoo wrote it)" in capsys.readouterr().err
    assert not stale.exists() and sorted(losses(run)) == list(range(12))
    assert json.loads((ckpt / "manifest.json").read_text())["step"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("world,kills", [(1, 20), (2, 6)])
def test_random_kills_then_resume_give_the_uninterrupted_curve(tmp_path, data, world, kills):
    """SIGKILL `zoo train` (one process, or torchrun with FSDP2 over 2 ranks and its distributed checkpoint) at
    random moments, each time resuming from whatever checkpoint is there; the finished run's loss curve equals
    the uninterrupted one bit for bit, and no temporary or partial file is left."""
    import random
    import shutil
    args = ["tiny-dense-hybridnorm", "--data", data, *SMALL, "--steps", "24", "--checkpoint-every", "2"]
    if world > 1:
        args += ["--dp-shard", str(world)]
    launch = zoo_cmd if world == 1 else (lambda *a: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node", str(world), "-m", "zoo", *a])
    started = time.monotonic()
    subprocess.run(launch("train", *args, "--out", str(tmp_path / "full")), env=env(), check=True, capture_output=True)
    full_time = time.monotonic() - started
    run = tmp_path / "run"
    rng = random.Random(1234 + world)
    resumed = 0
    for _ in range(kills):
        ckpt = run / "checkpoint"
        has_checkpoint = any(p.exists() for p in (ckpt / "trainer.safetensors", ckpt / "sharded" / "latest",
                                                  run / ".checkpoint.old"))
        if not has_checkpoint:
            shutil.rmtree(run, ignore_errors=True)
        resumed += has_checkpoint
        proc = subprocess.Popen(launch("train", *args, *(["--resume"] if has_checkpoint else []), "--out", str(run)),
                                env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            proc.wait(timeout=rng.uniform(0.3, 1.0) * full_time)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read()[-3000:]
        proc.stderr.close()
    assert resumed >= kills // 2  # most kills landed after a checkpoint, so resuming was tried that often
    r = subprocess.run(launch("train", *args, "--resume", "--out", str(run)), env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(run) == losses(tmp_path / "full")
    leftovers = [str(p.relative_to(run)) for p in run.rglob("*")
                 if (p.name.startswith(".") and p.name != ".metadata") or p.suffix in (".tmp", ".partial")]
    assert leftovers == []  # (.metadata is the index torch.distributed.checkpoint writes into each step's folder)


@pytest.mark.parametrize("decay_norm_and_bias", [False, True])
def test_decay_norm_and_bias_puts_norm_gains_under_weight_decay(decay_norm_and_bias):
    """The HybridNorm code's ``decay_norm_and_bias: true``: every norm gain (Q/K/V norms included) decays;
    the embedding never does. One AdamW step from lr 1 with zero gradients shows it on the values."""
    model = zoo.build("tiny-dense-hybridnorm")
    opt = make_optimizer(model, TrainConfig(lr=1.0, weight_decay=0.5, decay_norm_and_bias=decay_norm_and_bias))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    gains = {n: p for n, p in model.named_parameters() if p.ndim == 1}
    assert any(".q_norm." in n for n in gains) and all(("norm" in n) for n in gains)
    assert all((id(p) in decayed) == decay_norm_and_bias for p in gains.values())
    assert id(model.embed.weight) not in decayed
    before = {n: p.detach().clone() for n, p in gains.items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in gains.items():
        expected = before[n] * (0.5 if decay_norm_and_bias else 1.0)  # AdamW: p -= lr * wd * p, with no gradient
        torch.testing.assert_close(p.detach(), expected)


def test_zoo_train_takes_decay_norm_and_bias_and_eval_batches(tmp_path, data):
    run = tmp_path / "run"
    r = subprocess.run(zoo_cmd("train", "tiny-dense-prenorm", "--out", str(run), "--steps", "1", "--batch-size", "1",
                               "--seq-len", "16", "--eval-every", "1", "--eval-batches", "2", "--decay-norm-and-bias",
                               "--data", data), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    saved = json.loads((run / "train.json").read_text())
    assert saved["decay_norm_and_bias"] is True and saved["eval_batches"] == 2
