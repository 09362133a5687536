"""The benchmark scripts run and compare like with like (timings themselves are not asserted)."""
import json
import subprocess
import sys
from pathlib import Path

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
