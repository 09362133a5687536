"""Checkpoint I/O benchmark: how long `zoo.load` takes next to reading the file's bytes, safetensors' own
load and `torch.load`; and how long a cold `zoo pull` from a local `zoo serve` takes next to copying the
same file and fetching it with a plain HTTP GET from the same server.

The "pull" row pulls a variant that an index pins (published with `index=`), as `zoo.build(name,
pretrained=True)` pulls the zoo's own variants: every file straight from the zoo's transfer, at once,
verified against the index's BLAKE3 digests. "pull_unindexed" pulls it with no index, as from a
third-party hub: huggingface_hub's metadata request resolves the revision, checksums.sha256 is fetched and
checked first, and the files are verified against its sha256 digests.

The "against the code before the reliability work" part (``--baseline REV``, default BASELINE, the commit
before issue 19) pulls the same files with this checkout's zoo and with REV's (its ``zoo/`` and ``plugins/``
taken with ``git archive``), alternating, each pull in a fresh interpreter timed from its ``hub.pull`` call
on; and it SIGKILLs each one's pull after half the weights arrived and counts the bytes the next pull asks
the server for.

Everything is timed round-robin (each round runs every variant once, so a change in the machine's speed
hits all of them alike), after one untimed warm-up round; the median of the rounds is reported. The page
cache is warm: every variant reads files that are already in memory, so this compares software costs,
not disks. A pull starts from an empty HF cache every time and includes its verification.

    python benchmarks/checkpoint_io.py                     # ~160 MB of fp32 weights, 7 rounds
    python benchmarks/checkpoint_io.py --size large        # ~670 MB (d_model=1024, 8 layers, vocab 32000)
    python benchmarks/checkpoint_io.py --quick             # a tiny model, 2 rounds (what the tests run)
    python benchmarks/checkpoint_io.py --baseline none     # without the comparison with the older pull
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import huggingface_hub
import safetensors
import torch
from safetensors.torch import load_file

import zoo
from zoo import hub
from zoo.files import WEIGHTS_NAME
from zoo.hub.protocol import sha256_file
from zoo.hub.server import HubRequestHandler, serve_background
from zoo.hub.transfer import new_hash

VARIANT = "tiny-dense-prenorm"
SIZES = {  # name: config overrides (tied embeddings, as the variant has them)
    "tiny": [],
    "small": ["d_model=512", "n_heads=8", "n_layers=4", "ffn.hidden_size=1536", "vocab_size=8192"],
    "medium": ["d_model=768", "n_heads=12", "n_layers=4", "ffn.hidden_size=2048", "vocab_size=16000"],
    "large": ["d_model=1024", "n_heads=16", "n_layers=8", "ffn.hidden_size=4096", "vocab_size=32000"],
}
GOALS = {  # ratio key (what benchmarks/run_all.py reads): (what it is, limit, how it compares)
    "load_vs_read": ("zoo.load / read bytes", 1.5, "<="),
    "load_vs_torch_load": ("zoo.load / torch.load", 1.0, "<"),
    "pull_vs_copy": ("pull (indexed) / copy", 2.0, "<="),
    # no slower than before issue 19, within the spread of interleaved fresh-process pulls on a shared machine
    "pull_vs_baseline": ("pull (indexed) / before", 1.1, "<="),
    "pull_unindexed_vs_baseline": ("pull (no index) / before", 1.1, "<="),
}
PAGE = 4096
BASELINE = "6a2af8d"  # the last commit before issue 19 (reliability) changed how a pull writes and verifies
ROOT = Path(__file__).resolve().parent.parent
PULL_SCRIPT = """
import sys, time
from huggingface_hub.utils import disable_progress_bars
from zoo import hub
disable_progress_bars()
name, url, index, cache = sys.argv[1:5]
t = time.perf_counter()
hub.pull(name, endpoint=url, index={} if index == "-" else index, cache_dir=cache)
print(time.perf_counter() - t)
"""
Times = tuple[list[float], list[float]]  # (wall seconds, CPU seconds of this process) per call


def round_robin(fns: dict[str, Callable[[], Any]], repeats: int, warmups: int = 1,
                after: Callable[[], None] = lambda: None) -> dict[str, Times]:
    """(wall, this process's CPU) seconds of each call: ``repeats`` rounds of every fn in turn after ``warmups``
    untimed rounds. Each result is dropped (and ``after`` run, untimed) before the next call, so no variant runs
    with another's memory or files still held. CPU time is the steadier figure on a shared machine (it leaves out
    waiting for a core, and the server's work)."""
    times: dict[str, Times] = {name: ([], []) for name in fns}
    for r in range(warmups + repeats):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            result = fn()
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            del result
            after()
            if r >= warmups:
                times[name][0].append(wall)
                times[name][1].append(cpu)
    return times


def summary(seconds: Times, nbytes: int) -> dict[str, Any]:
    wall, cpu = seconds
    med = statistics.median(wall)
    return {"median_ms": med * 1e3, "min_ms": min(wall) * 1e3, "max_ms": max(wall) * 1e3,
            "cpu_median_ms": statistics.median(cpu) * 1e3, "gb_per_s": nbytes / med / 1e9,
            "times_ms": [s * 1e3 for s in wall]}


def read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def touch_pages(tensors: Any) -> float:
    """Read one element of every 4 KiB page of every tensor: the cost a lazily mapped load defers to first use."""
    total = 0.0
    for t in tensors:
        flat = t.detach().reshape(-1)
        total += float(flat[:: max(1, PAGE // t.element_size())].float().sum())
    return total


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def fresh_process_load(path: Path, pt: Path, runs: int) -> dict[str, Any]:
    """The first load in a new interpreter (after ``import zoo``): what a script that loads once pays,
    lazy imports included."""
    code = ("import json, sys, time, torch, zoo\n"
            "t = time.perf_counter()\n"
            "zoo.load(sys.argv[1]) if sys.argv[3] == 'zoo' else torch.load(sys.argv[2], weights_only=True)\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'dynamo': 'torch._dynamo' in sys.modules}))\n")
    out: dict[str, Any] = {}
    times: dict[str, list[float]] = {"zoo_load": [], "torch_load": []}
    dynamo = False
    for _ in range(runs):
        for name, which in (("zoo_load", "zoo"), ("torch_load", "torch")):
            r = subprocess.run([sys.executable, "-c", code, str(path), str(pt), which], capture_output=True, text=True,
                               check=True, timeout=600)
            data = json.loads(r.stdout.strip().splitlines()[-1])
            times[name].append(data["seconds"])
            dynamo |= which == "zoo" and data["dynamo"]
    for name, seconds in times.items():
        out[name] = {"median_ms": statistics.median(seconds) * 1e3, "times_ms": [s * 1e3 for s in seconds]}
    out["zoo_load_imported_torch_dynamo"] = dynamo
    return out


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """``zoo serve ROOT --port 0`` in its own process, as a user runs it; returns (process, url)."""
    proc = subprocess.Popen([sys.executable, "-m", "zoo", "serve", str(root), "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"zoo serve did not start: {line!r} {proc.stderr.read()}")
    return proc, match.group(0)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench_load(model: zoo.ZooModel, work: Path, repeats: int, fresh_runs: int) -> dict[str, Any]:
    path = zoo.save(model, work / "model.safetensors")
    nbytes = path.stat().st_size
    shard_bytes = nbytes // 4 + 1
    index = zoo.save(model, work / "sharded" / "model.safetensors", max_shard_bytes=shard_bytes)
    pt = work / "model.pt"
    torch.save(model.state_dict(), pt)
    fns: dict[str, Callable[[], Any]] = {
        "read_bytes": lambda: read_bytes(path),
        "zoo_load": lambda: zoo.load(path),
        "zoo_load_sharded": lambda: zoo.load(index),
        "safetensors_load_file": lambda: load_file(path),
        "torch_load": lambda: torch.load(pt, weights_only=True),
        "torch_load_mmap": lambda: torch.load(pt, weights_only=True, mmap=True),
        "zoo_load_then_touch": lambda: touch_pages(zoo.load(path).state_dict().values()),
        "torch_load_then_touch": lambda: touch_pages(torch.load(pt, weights_only=True).values()),
    }
    times = round_robin(fns, repeats)
    want = model.state_dict()
    equal = {"zoo_load": same_weights(zoo.load(path).state_dict(), want),
             "zoo_load_sharded": same_weights(zoo.load(index).state_dict(), want)}
    shards = len(set(json.loads(index.read_text())["weight_map"].values()))
    return {"file": str(path), "file_bytes": nbytes, "shards": shards, "torch_save_bytes": pt.stat().st_size,
            "weights_equal": equal, "variants": {name: summary(t, nbytes) for name, t in times.items()},
            "fresh_process": fresh_process_load(path, pt, fresh_runs) if fresh_runs else None}


def bench_pull(path: Path, work: Path, repeats: int) -> dict[str, Any]:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    name = "checkpoint-io-bench"
    index = work / "index.json"
    folder = zoo.publish(path, work / "hub", name=name, index=index)
    src = folder / WEIGHTS_NAME
    nbytes = src.stat().st_size
    counter = iter(range(10**9))

    def fresh(kind: str) -> Path:
        d = work / "scratch" / f"{kind}-{next(counter)}"
        d.mkdir(parents=True)
        return d

    proc, url = start_server(work / "hub")
    try:
        file_url = f"{url}/zoo/{name}/resolve/main/{WEIGHTS_NAME}"

        def copy() -> None:
            shutil.copyfile(src, fresh("copy") / WEIGHTS_NAME)

        def http_get() -> None:
            with urllib.request.urlopen(file_url) as r, open(fresh("get") / WEIGHTS_NAME, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)

        def pull() -> Path:  # pinned by the index, as zoo.build(name, pretrained=True) pulls the zoo's variants
            return hub.pull(name, endpoint=url, index=index, cache_dir=fresh("pull"))

        def pull_unindexed() -> Path:  # a third-party hub's variant: the revision and checksums.sha256 first
            return hub.pull(name, endpoint=url, index={}, cache_dir=fresh("pull-unindexed"))

        def hf_download(chunk: int = constants.DOWNLOAD_CHUNK_SIZE) -> None:
            default = constants.DOWNLOAD_CHUNK_SIZE
            constants.DOWNLOAD_CHUNK_SIZE = chunk
            try:
                hf_hub_download(f"zoo/{name}", WEIGHTS_NAME, endpoint=url, cache_dir=fresh("hf"), token=False)
            finally:
                constants.DOWNLOAD_CHUNK_SIZE = default

        fns: dict[str, Callable[[], Any]] = {
            "copy": copy,
            "http_get": http_get,
            "pull": pull,
            "pull_unindexed": pull_unindexed,
            "hf_hub_download_weights": hf_download,
            "hf_hub_download_weights_64k_chunks": lambda: hf_download(64 * 1024),
            "sha256_weights": lambda: digest_file(src, "sha256"),
            "blake3_weights": lambda: digest_file(src, "blake3"),
        }
        times = round_robin(fns, repeats, after=lambda: shutil.rmtree(work / "scratch", ignore_errors=True))
        verified = all(sha256_file(fn() / WEIGHTS_NAME) == sha256_file(src) for fn in (pull, pull_unindexed))
    finally:
        stop_server(proc)
        shutil.rmtree(work / "scratch", ignore_errors=True)
    return {"url": url, "file_bytes": nbytes, "hf_download_chunk_bytes": constants.DOWNLOAD_CHUNK_SIZE,
            "pulled_bytes_match": verified, "variants": {n: summary(t, nbytes) for n, t in times.items()}}


class _HalfThenHold(HubRequestHandler):
    """Sends half of the weights and holds the connection (``hold``), or counts what it sends (``count``)."""

    mode, name = "count", WEIGHTS_NAME
    half_sent = threading.Event()
    sent: list[tuple[Optional[str], int]] = []

    def send_body(self, f: Any, length: int, filename: str) -> None:
        if filename != WEIGHTS_NAME:
            return super().send_body(f, length, filename)
        if _HalfThenHold.mode == "hold":
            self.wfile.write(f.read(length // 2))
            self.wfile.flush()
            _HalfThenHold.half_sent.set()
            time.sleep(30)
            return
        _HalfThenHold.sent.append((self.headers.get("Range"), length))
        super().send_body(f, length, filename)


def baseline_tree(rev: str, work: Path) -> Path:
    """``zoo/`` and ``plugins/`` as they were at ``rev``, in a folder to put first on PYTHONPATH."""
    tree = work / f"baseline-{rev}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "zoo", "plugins"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def pull_in_process(tree: Optional[Path], args: list[str], **popen: Any) -> subprocess.Popen:
    """``hub.pull`` in a fresh interpreter: the installed zoo, or ``tree``'s (first on the path, and the working
    folder elsewhere than a checkout, whose zoo/ would come first)."""
    env = {**os.environ, "PYTHONPATH": str(tree) if tree else os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", PULL_SCRIPT, *args], env=env, cwd=tempfile.gettempdir(), **popen)


def bench_against_baseline(work: Path, rev: str, repeats: int) -> dict[str, Any]:
    """Clean pulls (indexed and not) by this zoo and by ``rev``'s, alternating in fresh interpreters; then a
    SIGKILLed pull of each, and the bytes of the weights the next pull is sent."""
    name, index, hub_dir = "checkpoint-io-bench", work / "index.json", work / "hub"
    trees = {"current": None, "baseline": baseline_tree(rev, work)}
    for which, tree in trees.items():
        found = subprocess.run([sys.executable, "-c", "import zoo; print(zoo.__file__)"], capture_output=True,
                               text=True, check=True, env={**os.environ, "PYTHONPATH": str(tree or "")},
                               cwd=tempfile.gettempdir()).stdout
        if tree is not None and not found.startswith(str(tree)):
            raise RuntimeError(f"the baseline zoo did not shadow the installed one: {found}")
    times: dict[str, list[float]] = {f"{w}_{k}": [] for w in trees for k in ("indexed", "unindexed")}
    counter = iter(range(10**9))
    with serve_background(hub_dir, handler=_HalfThenHold) as url:
        _HalfThenHold.mode = "count"
        for r in range(1 + repeats):
            for which, tree in trees.items():
                for kind, idx in (("indexed", str(index)), ("unindexed", "-")):
                    cache = work / "scratch" / f"{which}-{kind}-{next(counter)}"
                    proc = pull_in_process(tree, [name, url, idx, str(cache)], stdout=subprocess.PIPE, text=True)
                    out, _ = proc.communicate(timeout=600)
                    if proc.returncode:
                        raise RuntimeError(f"{which} pull failed ({proc.returncode})")
                    if r:  # the first round warms the page cache and the interpreters' imports
                        times[f"{which}_{kind}"].append(float(out.strip().splitlines()[-1]))
                    shutil.rmtree(cache, ignore_errors=True)
        size = (hub_dir / name / WEIGHTS_NAME).stat().st_size
        killed = {which: killed_pull(tree, work / "scratch" / f"killed-{which}", name, url, index, size)
                  for which, tree in trees.items()}
    shutil.rmtree(work / "scratch", ignore_errors=True)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"baseline": rev, "repeats": repeats, "median_ms": med, "times_ms": {k: [t * 1e3 for t in v]
                                                                               for k, v in times.items()},
            "ratio_indexed": med["current_indexed"] / med["baseline_indexed"],
            "ratio_unindexed": med["current_unindexed"] / med["baseline_unindexed"], "killed_pull": killed}


def killed_pull(tree: Optional[Path], cache: Path, name: str, url: str, index: Path, size: int) -> dict[str, Any]:
    """SIGKILL a pull once half the weights were sent; what its part file kept, and what the next pull asked."""
    _HalfThenHold.mode, _HalfThenHold.sent = "hold", []
    _HalfThenHold.half_sent.clear()
    proc = pull_in_process(tree, [name, url, str(index), str(cache)], stdout=subprocess.DEVNULL)
    try:
        if not _HalfThenHold.half_sent.wait(120):
            raise RuntimeError("the pull never reached the weights")
        time.sleep(0.5)  # the half in flight lands
    finally:
        proc.kill()
        proc.wait()
    parts = list(cache.rglob("*.incomplete"))
    kept = parts[0].stat().st_size if parts else 0
    _HalfThenHold.mode = "count"
    again = pull_in_process(tree, [name, url, str(index), str(cache)], stdout=subprocess.DEVNULL)
    if again.wait(600):
        raise RuntimeError("the pull after the kill failed")
    return {"file_bytes": size, "part_bytes_after_kill": kept, "bytes_sent_again": sum(n for _, n in _HalfThenHold.sent),
            "requests": [{"range": r, "bytes": n} for r, n in _HalfThenHold.sent]}


def digest_file(path: Path, algorithm: str) -> str:
    """A file's digest on one core, read 1 MiB at a time into one buffer (as hashlib.file_digest reads)."""
    h, buf = new_hash(algorithm), bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f, memoryview(buf) as view:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def ratios(load: dict[str, Any], pull: dict[str, Any]) -> dict[str, float]:
    lv, pv = load["variants"], pull["variants"]
    med = lambda v, k: v[k]["median_ms"]  # noqa: E731
    return {"load_vs_read": med(lv, "zoo_load") / med(lv, "read_bytes"),
            "load_vs_torch_load": med(lv, "zoo_load") / med(lv, "torch_load"),
            "sharded_load_vs_read": med(lv, "zoo_load_sharded") / med(lv, "read_bytes"),
            "load_vs_safetensors_load_file": med(lv, "zoo_load") / med(lv, "safetensors_load_file"),
            "pull_vs_copy": med(pv, "pull") / med(pv, "copy"),
            "pull_unindexed_vs_copy": med(pv, "pull_unindexed") / med(pv, "copy"),
            "http_get_vs_copy": med(pv, "http_get") / med(pv, "copy"),
            "hf_download_vs_http_get": med(pv, "hf_hub_download_weights") / med(pv, "http_get"),
            "sha256_vs_copy": med(pv, "sha256_weights") / med(pv, "copy"),
            "blake3_vs_copy": med(pv, "blake3_weights") / med(pv, "copy")}


LABELS = {
    "read_bytes": "read the file's bytes (open().read())",
    "zoo_load": "zoo.load -> ZooModel",
    "zoo_load_sharded": "zoo.load, sharded checkpoint",
    "safetensors_load_file": "safetensors.torch.load_file",
    "torch_load": "torch.load(weights_only=True)",
    "torch_load_mmap": "torch.load(weights_only=True, mmap=True)",
    "zoo_load_then_touch": "zoo.load + read every 4 KiB page",
    "torch_load_then_touch": "torch.load + read every 4 KiB page",
    "copy": "shutil.copyfile (fresh folder)",
    "http_get": "urllib GET from zoo serve",
    "pull": "zoo pull, cold cache, verified (indexed)",
    "pull_unindexed": "zoo pull, same, no index (third-party hub)",
    "hf_hub_download_weights": "  hf_hub_download(weights) alone",
    "hf_hub_download_weights_64k_chunks": "  same, hf chunk 64 KiB (what-if)",
    "sha256_weights": "  sha256 of the weights",
    "blake3_weights": "  BLAKE3 of the weights",
}


def report(results: dict[str, Any]) -> str:
    m, load, pull = results["model"], results["load"], results["pull"]
    lines = [f"checkpoint I/O: {m['variant']} {' '.join(m['overrides'])} -> {m['params'] / 1e6:.1f} M params, "
             f"{load['file_bytes'] / 1e6:.1f} MB {m['dtype']} ({load['shards']} shards in the sharded row)",
             f"machine: {results['machine']['cpus']} CPUs, load average {results['machine']['loadavg_start']:.1f} at the "
             f"start, {results['machine']['loadavg_end']:.1f} at the end; {results['repeats']} interleaved rounds, medians "
             "(cpu: this process only, so not the server's)",
             f"page cache: {results['page_cache']}", ""]
    for title, part, base in (("load", load, "read_bytes"), ("pull", pull, "copy")):
        lines.append(f"{title:44s} {'median ms':>10s} {'min ms':>8s} {'cpu ms':>8s} {'GB/s':>6s} {'vs ' + base:>14s}")
        for name, v in part["variants"].items():
            rel = v["median_ms"] / part["variants"][base]["median_ms"]
            lines.append(f"  {LABELS.get(name, name):42s} {v['median_ms']:10.1f} {v['min_ms']:8.1f} {v['cpu_median_ms']:8.1f} "
                         f"{v['gb_per_s']:6.2f} {rel:13.2f}x")
        lines.append("")
    fresh = load.get("fresh_process")
    if fresh:
        lines.append(f"first load in a fresh process (after import zoo): zoo.load {fresh['zoo_load']['median_ms']:.0f} ms, "
                     f"torch.load {fresh['torch_load']['median_ms']:.0f} ms (torch._dynamo imported by zoo.load: "
                     f"{fresh['zoo_load_imported_torch_dynamo']})")
    small = " (set for checkpoints of ~100 MB and up: at this size zoo.load's fixed cost, the config and the " \
            "module tree, dominates)" if load["file_bytes"] < 50e6 else ""
    lines.append(f"goals (medians){small}:")
    for goal in results["goals"].values():
        lines.append(f"  {goal['what']:28s} {goal['ratio']:6.2f}  {goal['op']} {goal['limit']:<4}  {'PASS' if goal['pass'] else 'FAIL'}")
    pv, r = pull["variants"], results["ratios"]
    lines.append(f"zoo pull: indexed (the index pins it, as for the zoo's own variants; BLAKE3-verified) "
                 f"{pv['pull']['median_ms']:.1f} ms, {r['pull_vs_copy']:.2f}x copy; unindexed (the revision resolved and "
                 "checksums.sha256 fetched first; sha256-verified) "
                 f"{pv['pull_unindexed']['median_ms']:.1f} ms, {r['pull_unindexed_vs_copy']:.2f}x copy")
    ab = results.get("against_baseline")
    if ab:
        med = ab["median_ms"]
        lines.append(f"against {ab['baseline']} (before issue 19), fresh interpreters, {ab['repeats']} alternating rounds: "
                     f"indexed {med['current_indexed']:.1f} ms vs {med['baseline_indexed']:.1f} ms "
                     f"({ab['ratio_indexed']:.2f}x), unindexed {med['current_unindexed']:.1f} ms vs "
                     f"{med['baseline_unindexed']:.1f} ms ({ab['ratio_unindexed']:.2f}x)")
        for which, k in ab["killed_pull"].items():
            lines.append(f"  {which:8s} SIGKILL after half the weights: the part file kept {k['part_bytes_after_kill']:,} "
                         f"of {k['file_bytes']:,} bytes; the next pull was sent {k['bytes_sent_again']:,} bytes of the "
                         f"weights (requests: {', '.join(r['range'] or 'the whole file' for r in k['requests'])})")
    lines.append("other ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in results["ratios"].items() if k not in GOALS))
    lines.append(f"weights equal after zoo.load: {load['weights_equal']}; pulled bytes match (both pulls): "
                 f"{pull['pulled_bytes_match']}")
    return "\n".join(lines)


def run(size: str, overrides: list[str], repeats: int, fresh_runs: int, work: Path, baseline: str = BASELINE,
        baseline_repeats: int = 5) -> dict[str, Any]:
    torch.manual_seed(0)
    overrides = [*SIZES[size], *overrides]
    model = zoo.build(VARIANT, overrides)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0], "python": platform.python_version(),
                    "torch": torch.__version__, "safetensors": safetensors.__version__,
                    "huggingface_hub": huggingface_hub.__version__, "torch_threads": torch.get_num_threads()},
        "model": {"variant": VARIANT, "size": size, "overrides": overrides, "params": sum(p.numel() for p in model.parameters()),
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "repeats": repeats,
        "page_cache": "warm: every variant reads files already in the page cache (written just before, then one "
                      "untimed warm-up round); no disk reads are timed",
    }
    results["load"] = bench_load(model, work, repeats, fresh_runs)
    results["pull"] = bench_pull(Path(results["load"]["file"]), work, repeats)
    results["ratios"] = ratios(results["load"], results["pull"])
    if baseline != "none":
        results["against_baseline"] = ab = bench_against_baseline(work, baseline, baseline_repeats)
        results["ratios"]["pull_vs_baseline"] = ab["ratio_indexed"]
        results["ratios"]["pull_unindexed_vs_baseline"] = ab["ratio_unindexed"]
    results["goals"] = {}
    for name, (what, limit, op) in GOALS.items():
        if name not in results["ratios"]:
            continue
        r = results["ratios"][name]
        results["goals"][name] = {"what": what, "ratio": r, "limit": limit, "op": op,
                                  "pass": r <= limit if op == "<=" else r < limit}
    results["machine"]["loadavg_end"] = os.getloadavg()[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="medium",
                        help="model size: tiny ~4 MB, small ~70 MB, medium ~160 MB (default), large ~670 MB of fp32 weights")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--fresh-runs", type=int, default=3, help="fresh interpreters timing a first load (0: skip)")
    parser.add_argument("--out", default="benchmarks/results/checkpoint_io.json", help="where to write the JSON results")
    parser.add_argument("--workdir", default=None, help="keep the checkpoints and hub folder here (default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--baseline", default=BASELINE, metavar="REV", help="git revision whose pull to compare "
                        f"with, in the same run (default: {BASELINE}, before issue 19; 'none' skips it)")
    parser.add_argument("--baseline-repeats", type=int, default=5, help="alternating rounds of fresh-process pulls")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds, 1 fresh run (for the tests)")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats, args.fresh_runs, args.baseline_repeats = "tiny", 2, 1, 1
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        results = run(args.size, args.set, args.repeats, args.fresh_runs, work, args.baseline, args.baseline_repeats)
    else:
        with tempfile.TemporaryDirectory(prefix="checkpoint-io-") as tmp:
            results = run(args.size, args.set, args.repeats, args.fresh_runs, Path(tmp), args.baseline,
                          args.baseline_repeats)
    text = report(results)
    print(text)
    results["table"] = text
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
