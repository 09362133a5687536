"""`zoo study`: runs train for real, the report's numbers are the runs' own, finished runs are reused,
the cards' results keep what other tools wrote; aggregation checked against hand-computed values."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.experiments.report import paired_differences, write_card_results
from zoo.experiments.study import Run, StudyConfig, aggregate, layer_grad_norms, plan, summarize
from zoo.train import TrainConfig

PNG = b"\x89PNG\r\n\x1a\n"


def _last_val(folder: Path) -> float:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


def test_study_cli_trains_reports_and_reuses_runs(tmp_path):
    out, report, cards = tmp_path / "study", tmp_path / "docs" / "results.md", tmp_path / "cards"
    (cards / "results").mkdir(parents=True)
    (cards / "results" / "tiny-dense-hybridnorm.json").write_text(json.dumps({"eval": {"loss": 1.0}}))
    cmd = [sys.executable, "-m", "zoo", "study", "--strategies", "prenorm", "hybridnorm", "--kinds", "dense",
           "--seeds", "0", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--no-depth", "--out", str(out),
           "--report", str(report), "--cards", str(cards)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "2 runs (0 diverged)" in r.stdout
    text = report.read_text()
    for strategy in ("prenorm", "hybridnorm"):
        val = _last_val(out / "main" / f"dense-{strategy}-s0")
        assert f"{val:.4f} ± 0.0000" in text
        saved = json.loads((cards / "results" / f"tiny-dense-{strategy}.json").read_text())
        assert saved["val_loss"] == round(val, 4) and saved["tokens"] == 2 * 2 * 32
    assert json.loads((cards / "results" / "tiny-dense-hybridnorm.json").read_text())["eval"] == {"loss": 1.0}
    for name in ("loss_main.png", "grad_main.png", "logit_main.png"):
        assert (report.parent / "results" / name).read_bytes()[:8] == PNG
        assert f"](results/{name})" in text
    study = json.loads((out / "study.json").read_text())
    assert {row["strategy"] for row in study["runs"]} == {"prenorm", "hybridnorm"}

    marker = out / "main" / "dense-prenorm-s0" / "run.json"
    before = marker.stat().st_mtime_ns
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert marker.stat().st_mtime_ns == before  # reused, not retrained


def test_study_rejects_an_unknown_strategy_before_training(tmp_path):
    r = subprocess.run([sys.executable, "-m", "zoo", "study", "--strategies", "hybridnrom", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("zoo: error:") and "hybridnrom" in r.stderr and "hybridnorm" in r.stderr
    assert not (tmp_path / "main").exists()


def test_plan_covers_the_grid_and_the_depth_test():
    sc = StudyConfig(strategies=("prenorm", "hybridnorm"), seeds=(0, 1), depth_seeds=(3,), depth_lrs=(1e-2, 3e-3))
    runs = plan(sc)
    main = [r for r in runs if r.group == "main"]
    depth = [r for r in runs if r.group != "main"]
    assert len(main) == 2 * 2 * 2 and len(depth) == 2 * 2
    assert {r.tc.seed for r in main} == {0, 1} and {r.tc.seed for r in depth} == {3}
    assert {r.group: r.tc.lr for r in depth} == {"depth-lr0.01": 1e-2, "depth-lr0.003": 3e-3}
    assert all("n_layers=24" in r.overrides for r in depth)
    assert len({r.folder for r in runs}) == len(runs)


def _fake(strategy: str, seed: int, val: float, diverged: bool = False) -> tuple[Run, dict]:
    run = Run("main", "dense", strategy, seed, TrainConfig(seed=seed))
    metrics = [{"step": i, "loss": 3.0 - i, "tokens": i, "ffn_grad_norms": [1.0 + i, 2.0], "residual_rms": [0.5, 0.7],
                "max_attn_logit": [1.0, 4.0 + seed]} for i in range(2)]
    metrics[-1]["val_loss"] = val
    return run, {"metrics": metrics, "summary": {"tokens_per_s": 10.0}, "diverged": diverged}


def test_aggregate_means_stds_and_paired_differences():
    rows = [summarize(*_fake("prenorm", 0, 2.0)), summarize(*_fake("prenorm", 1, 2.2)),
            summarize(*_fake("hybridnorm", 0, 1.9)), summarize(*_fake("hybridnorm", 1, 2.3))]
    by = {t["strategy"]: t for t in aggregate(rows)}
    assert by["prenorm"]["val_loss"] == pytest.approx(2.1)
    assert by["prenorm"]["val_loss_std"] == pytest.approx((2 * 0.1**2) ** 0.5)  # sample std of (2.0, 2.2)
    assert by["prenorm"]["max_attn_logit"] == pytest.approx(4.5)  # max over layers, mean over seeds (4, 5)
    assert by["prenorm"]["final_residual_rms"] == pytest.approx(0.7)
    assert by["prenorm"]["train_loss"] == pytest.approx(2.5)  # mean of the last steps' losses (3, 2)
    assert by["prenorm"]["grad_spread_log10"] == pytest.approx(0.0)  # last-20% window: layers 2.0 and 2.0
    (d,) = paired_differences(rows, "main", "dense", "prenorm")
    assert d["strategy"] == "hybridnorm" and d["mean"] == pytest.approx(0.0) and d["wins"] == 1 and d["n"] == 2
    assert d["std"] == pytest.approx((0.1**2 + 0.1**2) ** 0.5)  # differences -0.1 and +0.1


def test_a_diverged_run_counts_as_diverged_and_has_no_loss():
    row = summarize(*_fake("postnorm", 0, 9.0, diverged=True))
    assert row["diverged"] and row["val_loss"] is None and row["train_loss"] is None
    (t,) = aggregate([row, summarize(*_fake("postnorm", 1, 2.0))])
    assert t["diverged"] == 1 and t["val_loss"] == pytest.approx(2.0)


def test_layer_grad_norms_average_the_window():
    _, result = _fake("prenorm", 0, 2.0)
    assert layer_grad_norms(result["metrics"]) == [1.5, 2.0]
    assert layer_grad_norms(result["metrics"], 0.5, 1.0) == [2.0, 2.0]


def test_card_results_merge_keeps_other_keys(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.json").write_text(json.dumps({"eval": {"bpb": 3.0}, "val_loss": 9.0}))
    write_card_results({"a": {"val_loss": 1.5}}, tmp_path)
    assert json.loads((tmp_path / "results" / "a.json").read_text()) == {"eval": {"bpb": 3.0}, "val_loss": 1.5}
