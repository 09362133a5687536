"""`zoo study`: the plan (selection, evaluation, stability map), the best-rate choice that sees only the
selection seed, records and their numbers against hand-computed values, the verdicts, and the committed
docs/results.md rebuilt byte for byte from its records."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from zoo.experiments.analysis import Study, over_seeds, paired, verdict
from zoo.experiments.records import compact, read_record, window_mean, write_record
from zoo.experiments.study import (
    Run,
    StudyConfig,
    best_lrs,
    load_records,
    map_runs,
    plan,
    recorded,
    run_study,
    select_best,
    selection_runs,
)
from zoo.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
ZOO = str(Path(sys.executable).parent / "zoo")
TINY = TrainConfig(steps=4, batch_size=2, seq_len=16, eval_every=4, eval_batches=1, checkpoint_every=4, warmup_steps=1)
SC = StudyConfig(strategies=("prenorm", "hybridnorm"), kinds=("dense",), lrs=(1e-3, 3e-3, 1e-2), shared_lr=3e-3,
                 selection_seed=0, seeds=(1, 2), main=TINY, depths=(2, 4), map_lrs=(1e-3, 1e-2), map=TINY)


def _metrics(val: float, layers: int = 2, steps: int = 10, loss: float = 3.0) -> list[dict]:
    out = [{"step": i, "loss": loss - 0.1 * i, "tokens": 32 * (i + 1), "ffn_grad_norms": [1.0 + i] + [2.0] * (layers - 1),
            "residual_rms": [0.5] * (layers - 1) + [0.7], "max_attn_logit": [1.0] * (layers - 1) + [4.0 + i]}
           for i in range(steps)]
    out[-1]["val_loss"] = val
    return out


def _record(run: Run, val: float, diverged: bool = False, **kw) -> dict:
    return compact(run.settings(), _metrics(val, **kw), {"tokens_per_s": 100.0}, diverged, 2.0, 1)


def _records(values: dict[tuple[str, float, int], float], sc: StudyConfig = SC) -> dict[str, dict]:
    """Records of the plan's main runs from ``{(strategy, lr, seed): val}``."""
    runs = selection_runs(sc) + [Run("eval", k, s, seed, replace(sc.main, seed=seed, lr=lr))
                                 for k in sc.kinds for s in sc.strategies for lr in sc.lrs + (sc.shared_lr,)
                                 for seed in sc.seeds]
    return {run.key: _record(run, values[(run.strategy, run.tc.lr, run.seed)]) for run in runs
            if (run.strategy, run.tc.lr, run.seed) in values}


def test_the_best_rate_is_chosen_on_the_selection_seed_alone():
    selection = {("prenorm", 1e-3, 0): 2.0, ("prenorm", 3e-3, 0): 1.8, ("prenorm", 1e-2, 0): 1.9,
                 ("hybridnorm", 1e-3, 0): 1.7, ("hybridnorm", 3e-3, 0): 1.75, ("hybridnorm", 1e-2, 0): 2.5}
    evaluation = {(s, lr, seed): 2.0 for s in SC.strategies for lr in SC.lrs for seed in SC.seeds}
    assert best_lrs(SC, _records(selection)) == {("dense", "prenorm"): 3e-3, ("dense", "hybridnorm"): 1e-3}

    # evaluation seeds that favour other rates, by far, change nothing
    evaluation.update({("prenorm", 1e-2, 1): 0.1, ("prenorm", 1e-2, 2): 0.1, ("hybridnorm", 1e-2, 1): 0.1})
    assert best_lrs(SC, _records({**selection, **evaluation})) == {("dense", "prenorm"): 3e-3,
                                                                   ("dense", "hybridnorm"): 1e-3}
    # while the selection seed does decide
    assert best_lrs(SC, _records({**selection, ("prenorm", 1e-2, 0): 1.0}))[("dense", "prenorm")] == 1e-2


def test_select_best_skips_diverged_runs_waits_for_the_whole_grid_and_ties_go_to_the_lower_rate():
    run = selection_runs(SC)[0]
    assert select_best({1e-3: _record(run, 2.0), 3e-3: _record(run, 2.0)}) == 1e-3
    assert select_best({1e-3: _record(run, 2.0), 3e-3: _record(run, 1.0, diverged=True)}) == 1e-3
    assert select_best({1e-3: _record(run, 2.0), 3e-3: _record(run, 1.0), 1e-2: None}) is None  # not yet known
    assert select_best({1e-3: _record(run, 1.0, diverged=True)}) is None


def test_the_selection_seed_cannot_be_an_evaluation_seed(tmp_path):
    with pytest.raises(Exception, match=r"--selection-seed 1 is also an evaluation seed \(--seeds 1 2\): the best rate "
                                        r"would be judged on the runs that report it"):
        replace(SC, selection_seed=1).check()
    r = subprocess.run([ZOO, "study", "--seeds", "0", "1", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("zoo: error: --selection-seed 0 is also an evaluation seed (--seeds 0 1): the best rate "
                                "would be judged on the runs that report it")


@pytest.mark.parametrize("args, message", [
    (["--lrs", "-1"], "--lrs: a learning rate must be a positive number, not -1.0"),
    (["--depths", "0"], "--depths: 0 has a value below 1"),
    (["--strategies", "hybridnrom"], "hybridnrom"),
    (["--jobs", "0"], "--jobs must be at least 1, not 0"),
])
def test_bad_study_options_exit_2_with_one_line(tmp_path, args, message):
    r = subprocess.run([ZOO, "study", *args, "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.md")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("zoo: error:") and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_report_only_without_records_says_where_it_looked(tmp_path):
    r = subprocess.run([ZOO, "study", "--report", str(tmp_path / "r.md"), "--report-only"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert f"{tmp_path / 'r'}: no study records here" in r.stderr and "--records" in r.stderr


def test_plan_holds_selection_then_evaluation_at_the_shared_and_best_rates_and_the_map():
    runs = plan(SC, {})
    parts = [r.part for r in runs]
    assert parts.count("selection") == 2 * 3 and parts.count("map") == 2 * 2 * 2
    assert {(r.strategy, r.seed, r.tc.lr) for r in runs if r.part == "eval"} == {
        (s, seed, 3e-3) for s in SC.strategies for seed in (1, 2)}  # best rates unknown yet
    assert len({r.key for r in runs}) == len(runs)
    records = _records({(s, lr, 0): (1.0 if lr == 1e-2 else 2.0) for s in SC.strategies for lr in SC.lrs})
    evals = {(r.strategy, r.seed, r.tc.lr) for r in plan(SC, records) if r.part == "eval"}
    assert evals == {(s, seed, lr) for s in SC.strategies for seed in (1, 2) for lr in (3e-3, 1e-2)}
    cells = map_runs(replace(SC, warmups=(1, 3)))
    assert {(r.depth, r.tc.lr, r.tc.warmup_steps) for r in cells} == {
        (d, lr, w) for d in (2, 4) for lr in (1e-3, 1e-2) for w in (1, 3)}
    assert all(f"n_layers={r.depth}" in r.overrides and "d_model=64" in r.overrides for r in cells)


def test_a_record_of_other_settings_is_not_reused(tmp_path):
    run = selection_runs(SC)[0]
    write_record(tmp_path, run.key, _record(run, 2.0))
    assert run.key in load_records(tmp_path, [run])
    other = replace(run, tc=replace(run.tc, steps=5))
    assert other.key == run.key and load_records(tmp_path, [other]) == {}
    saved = json.loads((tmp_path / "runs" / f"{run.key}.json").read_text())
    del saved["run"]["train"]["decay_norm_and_bias"]  # a record from before an option existed: its default holds
    write_record(tmp_path, run.key, saved)
    assert run.key in load_records(tmp_path, [run])
    assert read_record(tmp_path, "main/none") is None


def test_compact_record_numbers():
    run = selection_runs(SC)[0]
    record = _record(run, 1.5, steps=10)
    assert record["final"] == {"val_loss": 1.5, "train_loss": pytest.approx(3.0 - 0.45)}  # mean of steps 0-9 losses
    assert record["layers"]["ffn_grad_first"] == [1.5, 2.0]  # steps 0 and 1: 1.0 and 2.0
    assert record["layers"]["ffn_grad_last"] == [9.5, 2.0]   # steps 8 and 9
    assert record["layers"]["residual_rms"] == [0.5, 0.7]
    assert record["layers"]["max_attn_logit"] == [1.0, 13.0]
    assert record["curve"]["tokens"] == [32 * (i + 1) for i in range(10)]
    long = _record(run, 1.5, steps=200)
    assert len(long["curve"]["tokens"]) == 60 and long["curve"]["tokens"][-1] == 32 * 200
    nan = compact(run.settings(), _metrics(math.nan), {}, False, 1.0, 1)
    assert nan["ended"]["nonfinite"] and nan["final"]["val_loss"] is None
    assert window_mean([{"g": [1.0, math.nan]}, {"g": [3.0, 2.0]}], "g", 0.0, 1.0) == [2.0, 2.0]


def test_means_and_paired_differences_by_hand():
    run = selection_runs(SC)[0]
    a = {1: _record(run, 2.0), 2: _record(run, 2.2)}
    b = {1: _record(run, 1.9), 2: _record(run, 2.3)}
    t = over_seeds([a[1], a[2]])
    assert t["val"] == pytest.approx(2.1) and t["val_std"] == pytest.approx((2 * 0.1 ** 2) ** 0.5)
    assert t["logit"] == pytest.approx(13.0) and t["rms"] == pytest.approx(0.7)
    assert t["spread"] == pytest.approx(math.log10(9.5 / 2.0))
    d = paired(b, a)
    assert d["mean"] == pytest.approx(0.0) and d["better"] == 1 and d["n"] == 2
    assert d["std"] == pytest.approx((0.1 ** 2 + 0.1 ** 2) ** 0.5)
    assert paired({1: _record(run, 1.0, diverged=True)}, a) is None


@pytest.mark.parametrize("val, diverged, expected", [
    (2.0, False, "trained"), (3.15, False, "stalled"), (3.14, False, "trained"), (3.4, False, "stalled"),
    (1.0, True, "diverged"), (math.nan, False, "diverged"),
])
def test_verdicts(val, diverged, expected):
    run = map_runs(SC)[0]
    assert verdict(_record(run, val, diverged=diverged), unigram=3.25) == expected
    assert verdict(None, unigram=3.25) is None


def test_the_committed_report_is_rebuilt_byte_for_byte_from_its_records(tmp_path):
    """docs/results.md: every number in it comes from docs/results/ (the records and study.json)."""
    shutil.copytree(REPO / "docs" / "results", tmp_path / "docs" / "results")
    r = subprocess.run([ZOO, "study", "--report", "docs/results.md", "--report-only"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "docs" / "results.md").read_bytes() == (REPO / "docs" / "results.md").read_bytes()
    for png in (REPO / "docs" / "results").glob("*.png"):
        assert (tmp_path / "docs" / "results" / png.name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_committed_study_has_the_issue_s_grid():
    """Three or more evaluation seeds apart from the selection seed, the five placements, both kinds, and
    a stability map, as the report says, every run of it recorded."""
    study = json.loads((REPO / "docs" / "results" / "study.json").read_text())
    sc = StudyConfig.from_json(study["config"])
    assert len(sc.seeds) >= 3 and sc.selection_seed not in sc.seeds
    assert sc.strategies == ("prenorm", "postnorm", "mixln", "hybridnorm", "hybridnorm-star")
    assert sc.kinds == ("dense", "moe") and len(sc.depths) >= 4 and sc.main.decay_norm_and_bias
    assert sc.main.steps * sc.main.batch_size * sc.main.seq_len >= 1_000_000
    assert Study(sc, study["data"], {}).unigram == study["data"]["unigram_entropy"] > 0
    got = recorded(sc, REPO / "docs" / "results")
    assert len(got) == len(plan(sc, got)) and all(best_lrs(sc, got).values())


@pytest.mark.slow
def test_study_end_to_end_on_a_tiny_grid_with_a_placement_from_an_installed_plugin(tmp_path, subprocess_env):
    """Built-in placements and one from a pip-installed package (entry point), which the study's training
    processes see too: selection, evaluation at the shared and best rates, the map, the report, the cards;
    a second run trains nothing, and --report-only rebuilds the same bytes."""
    from test_third_party_plugin import GOOD_MODULE, GOOD_PYPROJECT, _write

    package = _write(tmp_path / "my-zoo-norm", {"pyproject.toml": GOOD_PYPROJECT, "my_zoo_norm.py": GOOD_MODULE})
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--disable-pip-version-check", "-q", "--target", str(site), str(package)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    env = subprocess_env(PYTHONPATH=str(site))
    cards = tmp_path / "cards"
    cmd = [ZOO, "study", "--strategies", "prenorm", "hybridnorm", "scaled-prenorm", "--kinds", "dense",
           "--lrs", "1e-3", "1e-2", "--shared-lr", "3e-3", "--selection-seed", "0", "--seeds", "1", "--steps", "3",
           "--batch-size", "2", "--seq-len", "32", "--depths", "2", "3", "--map-lrs", "1e-2", "--map-steps", "3",
           "--warmups", "1", "2", "--jobs", "2", "--out", str(tmp_path / "runs"), "--report", "docs/results.md",
           "--cards", str(cards)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    records = tmp_path / "docs" / "results"
    assert "0 runs recorded in docs/results, 21 to train" in r.stderr  # 3 x 2 selection, 3 shared, 3 x 2 x 2 map
    done = sorted(p.relative_to(records / "runs").as_posix() for p in (records / "runs").rglob("*.json"))
    assert {"main/dense-scaled-prenorm-lr0.001-s0.json", "main/dense-scaled-prenorm-lr0.01-s0.json",
            "main/dense-scaled-prenorm-lr0.003-s1.json", "map/scaled-prenorm-L3-lr0.01-w2-s0.json"} <= set(done)
    study = json.loads((records / "study.json").read_text())
    sc = StudyConfig.from_json(study["config"])
    got = recorded(sc, records)
    assert set(got) == {p.removesuffix(".json") for p in done} and len(got) == len(plan(sc, got))
    best = best_lrs(sc, got)
    for s in sc.strategies:  # each best rate is the selection seed's lowest final validation loss
        sel = {lr: got[f"main/dense-{s}-lr{lr:g}-s0"]["final"]["val_loss"] for lr in (1e-3, 1e-2)}
        assert best[("dense", s)] == min(sel, key=sel.get)
        assert f"main/dense-{s}-lr{best[('dense', s)]:g}-s1" in got
    trained = got["main/dense-scaled-prenorm-lr0.003-s1"]
    assert trained["run"]["variant"] == "tiny-dense-prenorm"
    assert trained["run"]["overrides"] == ["norm_strategy=scaled-prenorm"] and trained["ended"]["steps"] == 3

    text = (tmp_path / "docs" / "results.md").read_text()
    for heading in ("## All placements at the shared rate (0.003)", "## Choosing each placement's rate",
                    "## Each placement at its own best rate", "## Stability map: depth by peak learning rate",
                    "## What this says about the paper's claim", "| dense | scaled-prenorm |"):
        assert heading in text
    val = trained["final"]["val_loss"]
    assert f"| dense | scaled-prenorm | {val:.4f} ± 0.0000 | {val:.4f} |" in text
    assert f"The unigram entropy of the training split is {study['data']['unigram_entropy']:.4f}" in text
    for name in ("loss_shared", "loss_best", "grad_best", "logit_best", "map_prenorm", "map_scaled-prenorm"):
        assert (records / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](results/{name}.png)" in text
    saved = json.loads((cards / "results" / "tiny-dense-hybridnorm.json").read_text())
    assert saved["lr"] == best[("dense", "hybridnorm")] and not (cards / "results" / "tiny-dense-scaled-prenorm.json").exists()

    before = {p: p.stat().st_mtime_ns for p in (records / "runs").rglob("*.json")}
    first = (tmp_path / "docs" / "results.md").read_bytes()
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{len(got)} runs recorded in docs/results, 0 to train" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in (records / "runs").rglob("*.json")} == before
    (tmp_path / "docs" / "results.md").unlink()
    r = subprocess.run([ZOO, "study", "--report", "docs/results.md", "--report-only"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "docs" / "results.md").read_bytes() == first


def test_a_study_resumed_on_other_data_warns_and_keeps_the_records_facts(tmp_path):
    """Every run is recorded, so nothing trains; the records' study.json names other stdlib data (another
    Python's), which is said, and the report keeps the facts the records were trained with."""
    sc = replace(SC, depths=())
    records = _records({(s, lr, seed): 2.0 for s in sc.strategies for lr in sc.lrs + (sc.shared_lr,)
                        for seed in (0, *sc.seeds)}, sc)
    for key, record in records.items():
        write_record(tmp_path, key, record)
    theirs = {"spec": "stdlib", "tokenizer": "byte", "train_tokens": 7, "val_tokens": 1, "documents": 1,
              "unigram_entropy": 3.0}
    (tmp_path / "study.json").write_text(json.dumps({"config": sc.to_json(), "data": theirs}))
    with pytest.warns(UserWarning, match=r"the records were trained on other data \(stdlib: 7 training tokens, here "
                                         r"\d+; `stdlib` is this Python's own source\)"):
        got = run_study(sc, tmp_path / "out", tmp_path)
    assert set(got) == {r.key for r in plan(sc, got)} and not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "study.json").read_text())["data"] == theirs
