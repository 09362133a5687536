"""Publish, serve and pull over real HTTP on 127.0.0.1: clean, cached, offline, resumed, truncated, corrupted,
404/500, concurrent pulls, malformed names, pretrained builds and the embedded hub."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from blake3 import blake3
from safetensors.torch import load_file

import zoo
from zoo import hub
from zoo.cli import main
from zoo.hub import client as hub_client
from zoo.hub.protocol import CHECKSUMS, parse_checksums
from zoo.hub.server import HubRequestHandler, HubServer, serve_background

ZOO = str(Path(sys.executable).parent / "zoo")
NAME = "tiny-dense-prenorm"  # not in the zoo's index: verified against a test index or the served checksums
HUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "ZOO_ENDPOINT", "HF_HUB_OFFLINE",
           "TRANSFORMERS_OFFLINE")


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    """Every test gets its own empty HF cache; no hub variable leaks in from the caller."""
    for var in HUB_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """One published variant in DIR, with a test index that records it."""
    root = tmp_path_factory.mktemp("published")
    index = root.parent / f"{root.name}-index.json"
    folder = zoo.publish(NAME, root / "hub", index=index)
    sums = (folder / CHECKSUMS).read_bytes()
    files = parse_checksums(sums.decode(), "test")
    return types.SimpleNamespace(dir=root / "hub", folder=folder, index=index, commit=hashlib.sha1(sums).hexdigest(),
                                 files=files, blake3={f: b3(folder / f) for f in [*files, CHECKSUMS]})


def b3(path: Path) -> str:
    return blake3(path.read_bytes()).hexdigest()


def snapshot_of(hf_home: Path, name: str = NAME) -> Path:
    return hf_home / "hub" / f"models--zoo--{name}" / "snapshots"


def blobs_of(hf_home: Path, name: str = NAME) -> list[Path]:
    return sorted((hf_home / "hub" / f"models--zoo--{name}" / "blobs").iterdir())


def assert_pulled(path: Path, published, hf_home: Path) -> None:
    assert path == snapshot_of(hf_home) / published.commit
    for filename in [*published.files, CHECKSUMS]:
        assert (path / filename).read_bytes() == (published.folder / filename).read_bytes(), filename


def mismatch(url: str, filename: str, want: str, got: str, algorithm: str = "blake3") -> str:
    return (f"checksum mismatch for zoo/{NAME}/{filename} from {url}: the zoo's index has {algorithm} {want}, the download has "
            f"{got}; the bad file was removed from the cache (the hub or the transfer is corrupt; pull again, or check "
            "the hub's files with `sha256sum -c checksums.sha256`)")


def use_transfer(kind: str, monkeypatch) -> type[HubRequestHandler]:
    """Steer the zoo's transfer onto one of its paths: 'splice' (Linux, plain http), 'readinto' (a buffer, then a
    write, as over https or without os.splice) or 'unsized' (no Content-Length: plain reads); returns the handler."""
    if kind != "splice":
        monkeypatch.delattr(os, "splice", raising=False)
    return NoLength if kind == "unsized" else HubRequestHandler


class NoLength(HubRequestHandler):
    """Sends the weights without a Content-Length: their body ends when the connection closes."""

    def send_header(self, keyword, value):
        if not (keyword == "Content-Length" and self.path.endswith("/model.safetensors")):
            super().send_header(keyword, value)


class Recording(HubRequestHandler):
    """Records the Range header (None for none) of every download of the weights (or of ``filename``)."""

    ranges: list = []
    filename = "model.safetensors"

    def send_body(self, f, length, filename):
        if filename == Recording.filename:
            Recording.ranges.append(self.headers.get("Range"))
        super().send_body(f, length, filename)


class Requests(HubRequestHandler):
    """Records every request as (method, path)."""

    seen: list = []

    def _handle(self, head):
        Requests.seen.append(("HEAD" if head else "GET", self.path))
        super()._handle(head)


def cache_tree(cache: Path) -> dict[str, str]:
    """Everything under an HF cache: 'dir', a symlink's target, or a file's sha256."""
    return {str(p.relative_to(cache)): (f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
                                         else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(cache.rglob("*"))}


def pull_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(f"pull {NAME}")]


def request(url: str, method: str = "GET", headers: dict | None = None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, headers=headers or {}), timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# ---------------------------------------------------------------------------------------------
# publish
# ---------------------------------------------------------------------------------------------
def test_publish_writes_an_hf_style_repository(published):
    folder = published.folder
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CHECKSUMS, "config.yaml", "model.safetensors"]
    assert sorted(published.files) == ["README.md", "config.yaml", "model.safetensors"]
    for filename, digest in published.files.items():
        assert hashlib.sha256((folder / filename).read_bytes()).hexdigest() == digest
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "**untrained**" in card and "torch.manual_seed(0)" in card
    assert (folder / "config.yaml").read_text() == zoo.get_config(NAME).to_yaml()
    model = zoo.load(folder / "model.safetensors")
    assert model.variant == NAME
    index = json.loads(published.index.read_text())
    assert index == {NAME: {"revision": published.commit, "files": {
        **published.files, CHECKSUMS: hashlib.sha256((folder / CHECKSUMS).read_bytes()).hexdigest()},
        "blake3": published.blake3}}


def test_publish_a_checkpoint_under_a_name(tmp_path):
    torch.manual_seed(1)
    ckpt = zoo.save(zoo.build("tiny-dense-hybridnorm"), tmp_path / "ckpt" / "mine.safetensors")
    assert main(["publish", str(ckpt), "--to", str(tmp_path / "out"), "--name", "my-tiny"]) == 0
    folder = tmp_path / "out" / "my-tiny"
    assert "come from the zoo checkpoint `mine.safetensors`" in (folder / "README.md").read_text()
    a, b = load_file(ckpt), load_file(folder / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_republishing_in_another_process_keeps_the_commit(published, tmp_path, subprocess_env):
    """Saves are byte-deterministic, so the same variant published again has the same checksums and commit."""
    r = subprocess.run([ZOO, "publish", NAME, "--to", str(tmp_path)], env=subprocess_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / NAME / CHECKSUMS).read_bytes() == (published.folder / CHECKSUMS).read_bytes()


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------
def test_server_speaks_the_resolve_protocol_and_serves_nothing_outside_dir(published, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(published.folder, root / NAME)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for you")
    evil = root / "evil"
    evil.mkdir()
    (evil / "leak.txt").symlink_to(secret)
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    (evil / CHECKSUMS).write_text(f"{digest}  leak.txt\n")
    weights = (published.folder / "model.safetensors").read_bytes()
    with serve_background(root) as url:
        base = f"{url}/zoo/{NAME}/resolve"
        status, h, body = request(f"{base}/main/model.safetensors", "HEAD")
        assert status == 200 and body == b""
        assert h["Content-Length"] == str(len(weights)) and h["Accept-Ranges"] == "bytes"
        assert h["ETag"] == f'"{published.files["model.safetensors"]}"' == h["X-Linked-Etag"]
        assert h["X-Linked-Size"] == str(len(weights)) and h["X-Repo-Commit"] == published.commit
        status, h, body = request(f"{base}/{published.commit}/model.safetensors", headers={"Range": "bytes=100-199"})
        assert status == 206 and body == weights[100:200] and h["Content-Range"] == f"bytes 100-199/{len(weights)}"
        assert request(f"{base}/main/config.yaml", headers={"Range": "bytes=-5"})[2] == (published.folder / "config.yaml").read_bytes()[-5:]
        status, h, _ = request(f"{base}/main/config.yaml", headers={"Range": "bytes=99999-"})
        assert status == 416 and h["Content-Range"].startswith("bytes */")
        status, _, body = request(f"{url}/api/models/zoo/{NAME}/revision/main")
        info = json.loads(body)
        assert status == 200 and info["id"] == f"zoo/{NAME}" and info["sha"] == published.commit
        assert sorted(s["rfilename"] for s in info["siblings"]) == sorted([*published.files, CHECKSUMS])
        for path, code in [(f"/zoo/nope/resolve/main/{CHECKSUMS}", "RepoNotFound"),
                           (f"/other/{NAME}/resolve/main/{CHECKSUMS}", "RepoNotFound"),
                           (f"/zoo/{NAME}/resolve/v2/{CHECKSUMS}", "RevisionNotFound"),
                           (f"/zoo/{NAME}/resolve/main/missing.bin", "EntryNotFound"),
                           ("/zoo/..%2F..%2Fetc/resolve/main/passwd", "RepoNotFound"),
                           (f"/zoo/{NAME}/resolve/main/..%2F..%2Fsecret.txt", "EntryNotFound"),
                           (f"/zoo/{NAME}/resolve/main/../../secret.txt", "EntryNotFound"),
                           ("/zoo/evil/resolve/main/leak.txt", "EntryNotFound")]:  # symlink out of DIR
            status, h, body = request(url + path)
            assert status == 404 and h.get("X-Error-Code") == code and "error" in json.loads(body), path
            assert b"not for you" not in body


def test_server_etag_is_the_recorded_sha256_and_weights_are_never_hashed(published, monkeypatch):
    """As the Hub sends an LFS file's recorded oid: a fresh server answers at once, whatever the file's size."""
    from zoo.hub import server as hub_server
    hashed = []
    real = hub_server.sha256_file
    monkeypatch.setattr(hub_server, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    with serve_background(published.dir) as url:
        _, weights, _ = request(f"{url}/zoo/{NAME}/resolve/main/model.safetensors", "HEAD")
        _, sums, _ = request(f"{url}/zoo/{NAME}/resolve/main/{CHECKSUMS}", "HEAD")
    assert weights["ETag"] == f'"{published.files["model.safetensors"]}"'
    assert sums["ETag"] == f'"{hashlib.sha256((published.folder / CHECKSUMS).read_bytes()).hexdigest()}"'
    assert hashed == [CHECKSUMS]


def test_server_sends_empty_files_and_ranges_with_sendfile(tmp_path):
    from zoo.hub.protocol import format_checksums
    repo = tmp_path / "sendfile-test"
    repo.mkdir()
    data = bytes(range(256)) * 1000
    (repo / "empty.txt").write_bytes(b"")
    (repo / "data.bin").write_bytes(data)
    (repo / CHECKSUMS).write_text(format_checksums({n: hashlib.sha256((repo / n).read_bytes()).hexdigest()
                                                    for n in ("empty.txt", "data.bin")}))
    with serve_background(tmp_path) as url:
        base = f"{url}/zoo/sendfile-test/resolve/main"
        assert request(f"{base}/empty.txt")[::2] == (200, b"")
        assert request(f"{base}/data.bin")[::2] == (200, data)
        assert request(f"{base}/data.bin", headers={"Range": "bytes=1000-"})[::2] == (206, data[1000:])


# ---------------------------------------------------------------------------------------------
# pull: the real `zoo serve`, cache, offline
# ---------------------------------------------------------------------------------------------
def test_pull_from_zoo_serve_then_from_cache_then_offline(published, hf_home, monkeypatch, subprocess_env):
    # Ctrl-C must reach the server even when this suite runs in the background (where SIGINT is inherited ignored)
    server = subprocess.Popen([ZOO, "serve", str(published.dir), "--port", "0", "--quiet"], env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = server.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, (line, server.stderr.read() if server.poll() is not None else "")
        url = match.group(0)
        assert NAME in line
        path = hub.pull(NAME, endpoint=url, index={})  # verified against the served checksums.sha256
        assert_pulled(path, published, hf_home)
        assert (hf_home / "hub" / f"models--zoo--{NAME}" / "refs" / "main").read_text() == published.commit
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
        assert "serve stopped" in server.stderr.read()
    # the server is gone: the cache answers, with no network
    assert_pulled(hub.pull(NAME, endpoint=url, index={}), published, hf_home)
    assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
    monkeypatch.setenv("ZOO_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_pulled(hub.pull(NAME, index={}), published, hf_home)
    assert_pulled(hub.pull(NAME, index=published.index), published, hf_home)
    with pytest.raises(hub.HubError) as e:
        hub.pull("tiny-moe-prenorm", index={})
    assert str(e.value) == (f"zoo/tiny-moe-prenorm/{CHECKSUMS} is not in the cache {hf_home / 'hub'} and offline mode "
                            "is on (HF_HUB_OFFLINE=1); pull it once with offline mode off (the embedded hub needs no internet)")


def test_pretrained_build_loads_the_published_weights(published, monkeypatch):
    with serve_background(published.dir) as url:
        monkeypatch.setenv("ZOO_ENDPOINT", url)
        model = zoo.build(NAME, pretrained=True)
    want = load_file(published.folder / "model.safetensors")
    got = model.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert model.variant == NAME


@pytest.mark.parametrize("kind", ["splice", "readinto", "unsized"])
def test_pull_places_verified_files_in_the_hf_cache_layout(published, hf_home, monkeypatch, kind):
    """Blobs named by their sha256 and relative snapshot symlinks, as hf_hub_download lays them out, so
    huggingface_hub finds them offline; each file hashed once, while it downloaded."""
    handler = use_transfer(kind, monkeypatch)
    hashed = []
    real = hub_client.file_digest
    monkeypatch.setattr(hub_client, "file_digest", lambda path, algorithm: hashed.append(Path(path).name) or real(path, algorithm))
    with serve_background(published.dir, handler=handler) as url:
        path = hub.pull(NAME, endpoint=url, index={})  # revision main, verified against the served checksums
    assert_pulled(path, published, hf_home)
    assert hashed == []  # all verified on the way in (checksums.sha256 is the reference here, not checked)
    repo = hf_home / "hub" / f"models--zoo--{NAME}"
    for filename, digest in published.files.items():
        assert os.readlink(path / filename) == f"../../blobs/{digest}"
        assert (repo / "blobs" / digest).read_bytes() == (published.folder / filename).read_bytes()
    assert not [p for p in blobs_of(hf_home) if p.name.endswith(".incomplete")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the server is gone
    assert_pulled(hub.pull(NAME, endpoint=url, index={}), published, hf_home)
    assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
    assert hashed.count("model.safetensors") == 2  # from the cache: hashed before use, every time
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    weights = path / "model.safetensors"
    assert Path(hf_hub_download(f"zoo/{NAME}", "model.safetensors", revision=published.commit,
                                cache_dir=hf_home / "hub", local_files_only=True)) == weights
    assert Path(try_to_load_from_cache(f"zoo/{NAME}", "model.safetensors", cache_dir=hf_home / "hub")) == weights


def test_an_indexed_pull_asks_the_hub_nothing_first_and_fills_the_cache_as_huggingface_hub_does(
        published, hf_home, monkeypatch, tmp_path):
    """The index pins the commit and every sha256 (checksums.sha256's too): no huggingface_hub call, no HEAD,
    one GET per file at the pinned commit, and the cache huggingface_hub's own downloads of that commit make."""
    import huggingface_hub

    def no_hf_hub_download(*args, **kwargs):
        raise AssertionError(f"hf_hub_download{args} was called")

    Requests.seen = []
    with serve_background(published.dir, handler=Requests) as url:
        with monkeypatch.context() as m:
            m.setattr(huggingface_hub, "hf_hub_download", no_hf_hub_download)
            path = hub.pull(NAME, endpoint=url, index=published.index)
        assert_pulled(path, published, hf_home)
        assert sorted(Requests.seen) == sorted(("GET", f"/zoo/{NAME}/resolve/{published.commit}/{filename}")
                                               for filename in [*published.files, CHECKSUMS])
        other = tmp_path / "hf-cache"
        for filename in [*published.files, CHECKSUMS]:
            huggingface_hub.hf_hub_download(f"zoo/{NAME}", filename, revision=published.commit, endpoint=url,
                                            cache_dir=other, token=False)
    assert cache_tree(hf_home / "hub") == cache_tree(other)
    assert pull_threads() == []


class HoldWeights(HubRequestHandler):
    """Holds the weights' body until the three other files were sent: a pull that fetches one file after the
    other waits here (5 s, below the client's read timeout) and gets them late."""

    sent = 0
    others_sent = threading.Event()
    overlapped = False
    lock = threading.Lock()

    def send_body(self, f, length, filename):
        if filename == "model.safetensors":
            HoldWeights.overlapped = HoldWeights.others_sent.wait(5)
            return super().send_body(f, length, filename)
        super().send_body(f, length, filename)
        with HoldWeights.lock:
            HoldWeights.sent += 1
            if HoldWeights.sent == 3:
                HoldWeights.others_sent.set()


def test_an_indexed_pull_checks_blake3_and_a_third_party_one_sha256(published, hf_home, monkeypatch):
    """Each file is hashed once, on the way in: with the index's BLAKE3 digests where it has them, else with the
    sha256 of the checksums.sha256 served, itself checked against the sha256 its ETag gives."""
    from zoo.hub import transfer as hub_transfer
    used = []
    real = hub_transfer.new_hash
    monkeypatch.setattr(hub_transfer, "new_hash",
                        lambda algorithm, data=b"", size=None: used.append(algorithm) or real(algorithm, data, size))
    with serve_background(published.dir) as url:
        assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
        assert used == ["blake3"] * 4
        shutil.rmtree(hf_home / "hub")
        used.clear()
        assert_pulled(hub.pull(NAME, endpoint=url, index={}), published, hf_home)
        assert used == ["sha256"] * 4


def test_a_pull_fetches_its_files_at_once(published, hf_home):
    HoldWeights.sent, HoldWeights.overlapped = 0, False
    HoldWeights.others_sent.clear()
    with serve_background(published.dir, handler=HoldWeights) as url:
        assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
    assert HoldWeights.overlapped


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an mmap's file through /proc")
@pytest.mark.parametrize("kind", ["splice", "readinto"])
def test_small_files_are_read_hashed_and_written_without_a_thread_or_a_map(published, hf_home, monkeypatch, kind):
    """README.md, config.yaml and checksums.sha256 (1 MiB or less) cost no hasher (no thread) and no mmap; the weights
    get one, hashing through mmaps (inline for BLAKE3, in a thread for sha256)."""
    import mmap

    from zoo.hub import transfer as hub_transfer
    use_transfer(kind, monkeypatch)
    hashers, maps = [], []

    class Hasher(hub_transfer._Hasher):
        def __init__(self, path, algorithm):
            hashers.append(path.name)
            super().__init__(path, algorithm)

    def mapping(fd, *args, **kwargs):
        maps.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        return mmap.mmap(fd, *args, **kwargs)

    monkeypatch.setattr(hub_transfer, "_Hasher", Hasher)
    monkeypatch.setattr(hub_transfer, "mmap", types.SimpleNamespace(mmap=mapping, ACCESS_READ=mmap.ACCESS_READ,
                                                                     ALLOCATIONGRANULARITY=mmap.ALLOCATIONGRANULARITY))
    with serve_background(published.dir) as url:
        assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
    weights = f"{published.files['model.safetensors']}.incomplete"
    assert hashers == [weights] and maps and set(maps) == {weights}


class FailReadme(HubRequestHandler):
    """README.md answers 500 once the weights are on their way; the weights' second half goes out after that."""

    weights_started = threading.Event()
    readme_failed = threading.Event()

    def _handle(self, head):
        if not head and self.path.endswith("/README.md"):
            FailReadme.weights_started.wait(10)
            self.send_error_json(500, None, "Internal Server Error", head)
            FailReadme.readme_failed.set()
            return
        super()._handle(head)

    def send_body(self, f, length, filename):
        if filename == "model.safetensors" and not self.headers.get("Range"):
            half = length // 2
            self.wfile.write(f.read(half))
            self.wfile.flush()
            FailReadme.weights_started.set()
            FailReadme.readme_failed.wait(10)
            time.sleep(0.2)  # the pull has seen README.md fail by now, most likely
            return super().send_body(f, length - half, filename)
        super().send_body(f, length, filename)


def test_a_failed_file_stops_the_others_and_its_error_is_raised(published, hf_home):
    """The other downloads stop (their bytes kept for the next pull) or finish; the pull raises the failure, and no
    download thread outlives it."""
    FailReadme.weights_started.clear()
    FailReadme.readme_failed.clear()
    data = (published.folder / "model.safetensors").read_bytes()
    sha = published.files["model.safetensors"]
    with serve_background(published.dir, handler=FailReadme) as url:
        with pytest.raises(hub.HubError) as e:
            hub.pull(NAME, endpoint=url, index=published.index)
    assert str(e.value) == (f"the hub at {url} answered HTTP 500 for zoo/{NAME}/README.md: "
                            "HTTP Error 500: Internal Server Error")
    assert pull_threads() == []
    blobs = hf_home / "hub" / f"models--zoo--{NAME}" / "blobs"
    part = blobs / f"{sha}.incomplete"
    assert (blobs / sha).exists() or data.startswith(part.read_bytes())  # stopped: a prefix kept
    assert not (snapshot_of(hf_home) / published.commit / "README.md").exists()
    with serve_background(published.dir) as url:
        assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
    assert not part.exists()


def test_a_cancelled_download_keeps_its_bytes_and_resumes(published, tmp_path):
    from zoo.hub import transfer as hub_transfer
    cancel = threading.Event()
    ranges = []

    class CancelMidway(HubRequestHandler):
        def send_body(self, f, length, filename):
            ranges.append(self.headers.get("Range"))
            if self.headers.get("Range") is None:
                half = length // 2
                self.wfile.write(f.read(half))
                self.wfile.flush()
                cancel.set()  # before the rest goes out: the transfer sees it at its next step
                return super().send_body(f, length - half, filename)
            super().send_body(f, length, filename)

    data = (published.folder / "model.safetensors").read_bytes()
    dest, part = tmp_path / "weights", tmp_path / "weights.incomplete"
    with serve_background(published.dir, handler=CancelMidway) as url:
        file_url = f"{url}/zoo/{NAME}/resolve/main/model.safetensors"
        with pytest.raises(hub_transfer.Cancelled):
            hub_transfer.download_verified(file_url, dest, published.files["model.safetensors"], cancel=cancel)
        kept = part.read_bytes()
        assert not dest.exists() and 0 < len(kept) and data.startswith(kept)
        hub_transfer.download_verified(file_url, dest, published.files["model.safetensors"])
    assert ranges == [None, f"bytes={len(kept)}-"] or (len(kept) == len(data) and ranges[-1] is None)
    assert dest.read_bytes() == data and not part.exists()


@pytest.mark.parametrize("filename,kind", [("model.safetensors", "splice"), ("model.safetensors", "readinto"),
                                           ("config.yaml", "splice")])  # a small file: read, hashed, written at once
@pytest.mark.parametrize("prefix", ["right", "wrong"])
def test_a_pull_resumes_an_incomplete_download(published, hf_home, monkeypatch, filename, kind, prefix):
    """A .incomplete blob left by an earlier pull is resumed with a Range request and verified with its prefix:
    a wrong prefix fails the checksum, and is deleted so that the next pull starts over."""
    use_transfer(kind, monkeypatch)
    monkeypatch.setattr(Recording, "filename", filename)
    data = (published.folder / filename).read_bytes()
    good_sha, good_b3, half = published.files[filename], published.blake3[filename], len(data) // 2
    blobs = hf_home / "hub" / f"models--zoo--{NAME}" / "blobs"
    blobs.mkdir(parents=True)
    part = blobs / f"{good_sha}.incomplete"
    part.write_bytes(data[:half] if prefix == "right" else bytes(half))
    Recording.ranges = []
    with serve_background(published.dir, handler=Recording) as url:
        if prefix == "right":
            assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
            assert Recording.ranges == [f"bytes={half}-"]
        else:
            with pytest.raises(hub.ChecksumError) as e:
                hub.pull(NAME, endpoint=url, index=published.index)
            assert str(e.value) == mismatch(url, filename, good_b3, blake3(bytes(half) + data[half:]).hexdigest())
            assert not part.exists() and not (blobs / good_sha).exists()
            assert not os.path.lexists(snapshot_of(hf_home) / published.commit / filename)
            assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
            assert Recording.ranges == [f"bytes={half}-", None]
    assert not part.exists()


class Truncating(HubRequestHandler):
    """Announces the whole weights (or the range asked for) but leaves out their last 1000 bytes."""

    def send_body(self, f, length, filename):
        if filename != "model.safetensors":
            return super().send_body(f, length, filename)
        Recording.ranges.append(self.headers.get("Range"))
        self.wfile.write(f.read(max(0, length - 1000)))
        self.wfile.flush()


def test_a_truncated_download_fails_clearly_and_the_next_pull_resumes_it(published, hf_home):
    data = (published.folder / "model.safetensors").read_bytes()
    good_sha, sent = published.files["model.safetensors"], len(data) - 1000
    part = hf_home / "hub" / f"models--zoo--{NAME}" / "blobs" / f"{good_sha}.incomplete"
    Recording.ranges = []
    with serve_background(published.dir, handler=Truncating) as url:
        with pytest.raises(hub.HubError) as e:
            hub.pull(NAME, endpoint=url, index=published.index)
    assert str(e.value) == (f"downloading zoo/{NAME}/model.safetensors from {url} broke off: the connection closed "
                            f"after {sent} of {len(data)} bytes, which are kept in {part} for the next pull to resume; "
                            "run the pull again")
    from zoo.hub.transfer import RETRIES
    assert Recording.ranges == [None] + [f"bytes={sent}-"] * RETRIES  # asked again in the call; nothing more came
    assert part.read_bytes() == data[:sent]
    assert not os.path.lexists(snapshot_of(hf_home) / published.commit / "model.safetensors")
    Recording.ranges = []
    with serve_background(published.dir, handler=Recording) as url:
        assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
    assert Recording.ranges == [f"bytes={sent}-"] and not part.exists()


# ---------------------------------------------------------------------------------------------
# pull: a dropped connection, a corrupted file, errors
# ---------------------------------------------------------------------------------------------
class DropOnce(HubRequestHandler):
    """Sends half of model.safetensors the first time, then drops the connection."""

    dropped = 0
    ranges: list[str] = []

    def send_body(self, f, length, filename):
        if self.headers.get("Range"):
            DropOnce.ranges.append(self.headers["Range"])
        if filename == "model.safetensors" and DropOnce.dropped == 0:
            DropOnce.dropped += 1
            self.wfile.write(f.read(length // 2))
            self.wfile.flush()
            self.close_connection = True
            return
        super().send_body(f, length, filename)


@pytest.mark.parametrize("kind", ["splice", "readinto"])
def test_pull_resumes_after_the_server_drops_the_connection(published, hf_home, monkeypatch, kind):
    """Within one call the transfer retries a broken download with a Range request from the last byte it wrote."""
    use_transfer(kind, monkeypatch)
    DropOnce.dropped, DropOnce.ranges = 0, []
    with serve_background(published.dir, handler=DropOnce) as url:
        path = hub.pull(NAME, endpoint=url, index=published.index)
    half = (published.folder / "model.safetensors").stat().st_size // 2
    assert DropOnce.dropped == 1
    assert DropOnce.ranges == [f"bytes={half}-"]
    assert_pulled(path, published, hf_home)
    assert not [p for p in blobs_of(hf_home) if p.name.endswith(".incomplete")]


def index_verifying_with(published, algorithm: str) -> dict:
    """The test index as written (BLAKE3 digests checked), or as zoo versions before BLAKE3 wrote it (sha256)."""
    index = json.loads(published.index.read_text())
    if algorithm == "sha256":
        del index[NAME]["blake3"]
    return index


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_corrupted_file_fails_and_leaves_nothing_bad_in_the_cache(published, hf_home, tmp_path, algorithm):
    bad = tmp_path / "corrupt.safetensors"
    data = bytearray((published.folder / "model.safetensors").read_bytes())
    data[-10:] = bytes(10)  # same size, other weights
    bad.write_bytes(bytes(data))
    bad_sha = hashlib.sha256(data).hexdigest()
    index = index_verifying_with(published, algorithm)

    class Corrupting(HubServer):
        def file_path(self, repo, filename):
            return bad if filename == "model.safetensors" else super().file_path(repo, filename)

    server = Corrupting(published.dir, quiet=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = server.url
    try:
        with pytest.raises(hub.ChecksumError) as e:
            hub.pull(NAME, endpoint=url, index=index)
    finally:
        server.shutdown()
        server.server_close()
    good_sha = published.files["model.safetensors"]
    want, got = ((published.blake3["model.safetensors"], blake3(data).hexdigest()) if algorithm == "blake3"
                 else (good_sha, bad_sha))
    assert str(e.value) == mismatch(url, "model.safetensors", want, got, algorithm)
    snapshot = snapshot_of(hf_home) / published.commit
    assert not (snapshot / "model.safetensors").exists() and not (snapshot / "model.safetensors").is_symlink()
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() != bad_sha for p in blobs_of(hf_home))
    names = [p.name for p in blobs_of(hf_home)]
    assert bad_sha not in names and good_sha not in names and f"{good_sha}.incomplete" not in names
    # and the next pull from a good hub repairs it
    with serve_background(published.dir) as url:
        assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_a_corrupted_file_in_the_cache_is_evicted_and_pulled_again(published, hf_home, algorithm):
    """Files found in the cache are hashed before use; a bad one goes (blob and snapshot entry)."""
    index = index_verifying_with(published, algorithm)
    with serve_background(published.dir) as url:
        weights = hub.pull(NAME, endpoint=url, index=index) / "model.safetensors"
        blob = Path(os.path.realpath(weights))
        data = bytearray(blob.read_bytes())
        data[-1] ^= 1
        blob.write_bytes(bytes(data))
        with pytest.raises(hub.ChecksumError) as e:
            hub.pull(NAME, endpoint=url, index=index)
        want, got = ((published.blake3["model.safetensors"], blake3(data).hexdigest()) if algorithm == "blake3"
                     else (published.files["model.safetensors"], hashlib.sha256(data).hexdigest()))
        assert str(e.value) == mismatch(url, "model.safetensors", want, got, algorithm)
        assert not os.path.lexists(weights) and not blob.exists()
        assert_pulled(hub.pull(NAME, endpoint=url, index=index), published, hf_home)


def test_a_hub_on_another_commit_than_the_index_is_refused(published, hf_home):
    index = json.loads(published.index.read_text())
    index[NAME]["revision"] = "0" * 40
    with serve_background(published.dir) as url:
        with pytest.raises(hub.HubError) as e:  # the pinned commit, asked for directly
            hub.pull(NAME, endpoint=url, index=index)
        assert str(e.value) == (f"zoo/{NAME} at {url} has no commit {'0' * 40}, which the zoo's index pins: that hub "
                                "serves other files than the index records; pass the index that goes with its files "
                                "(index=FILE / --index FILE)")
        repo = hf_home / "hub" / f"models--zoo--{NAME}"
        assert not list((repo / "blobs").iterdir()) and not (repo / "snapshots").exists()  # nothing left behind
        with pytest.raises(hub.HubError) as e:  # another revision: resolved by the hub, then compared
            hub.pull(NAME, endpoint=url, revision="main", index=index)
        assert str(e.value) == (f"zoo/{NAME} at {url} is at commit {published.commit}, but the zoo's index pins "
                                f"{'0' * 40}: that hub serves other files than the index records; pass the index that "
                                "goes with them (index=FILE / --index FILE)")


class Always500(HubRequestHandler):
    def _handle(self, head):
        self.send_error_json(500, None, "Internal Server Error", head)


def test_404_and_500_give_clear_errors(published, tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    shutil.copytree(published.folder, root / NAME)
    with open(root / NAME / CHECKSUMS, "a") as f:
        f.write(f"{'0' * 64}  missing.bin\n")
    commit = hashlib.sha1((root / NAME / CHECKSUMS).read_bytes()).hexdigest()
    with serve_background(root) as url:
        with pytest.raises(hub.HubError) as e:
            hub.pull("tiny-dense-mixln", endpoint=url)
        assert str(e.value) == (f"zoo/tiny-dense-mixln not found at {url} (HTTP 404): that hub has no such repository; "
                                "check the name, or publish it there with `zoo publish tiny-dense-mixln --to DIR`")
        with pytest.raises(hub.HubError) as e:
            hub.pull(NAME, endpoint=url, index={})
        assert str(e.value) == f"file 'missing.bin' of zoo/{NAME} (revision {commit}) not found at {url} (HTTP 404)"
        assert main(["pull", "tiny-dense-mixln", "--endpoint", url]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("zoo: error: zoo/tiny-dense-mixln not found at")
    # a server error: huggingface_hub retries with backoff (its sleeps skipped here), then gives up
    from huggingface_hub.utils import _http
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with serve_background(root, handler=Always500) as url:
        with pytest.raises(hub.HubError) as e:
            hub.pull(NAME, endpoint=url, index={})
    assert str(e.value) == (f"the hub at {url} answered HTTP 500 for zoo/{NAME}/{CHECKSUMS} and no copy is cached; "
                            "try again later, or check the server's log")


def test_unreachable_hub_with_nothing_cached(monkeypatch):
    from huggingface_hub.utils import _http
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    with serve_background(Path(__file__).parent) as url:
        pass  # a port on which nothing listens any more
    with pytest.raises(hub.HubError, match=rf"^cannot reach the hub at {url} \(.*\) and zoo/{NAME}/{CHECKSUMS} is not cached"):
        hub.pull(NAME, endpoint=url, index={})


# ---------------------------------------------------------------------------------------------
# malformed input
# ---------------------------------------------------------------------------------------------
class Counting(HubRequestHandler):
    seen: list[str] = []

    def _handle(self, head):
        Counting.seen.append(self.path)
        super()._handle(head)


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "/etc/passwd", "x/../../y", "Tiny", "", "a\\b"])
def test_malformed_names_fail_before_any_request(published, name, capsys):
    Counting.seen = []
    with serve_background(published.dir, handler=Counting) as url:
        with pytest.raises(hub.HubError) as e:
            hub.pull(name, endpoint=url)
        assert str(e.value) == (f"invalid variant name {name!r}: use lowercase letters, digits, '.', '_' and '-', "
                                "starting with a letter or digit, without '..' or path separators")
        assert main(["pull", name, "--endpoint", url]) == 2
        err = capsys.readouterr().err
        assert err == f"zoo: error: {e.value}\n"
    assert Counting.seen == []


def test_other_malformed_inputs(published, tmp_path, capsys):
    for kwargs, message in [({"revision": "../main"}, "invalid revision '../main'"),
                            ({"endpoint": "ftp://x"}, "invalid hub endpoint 'ftp://x'"),
                            ({"endpoint": "127.0.0.1:80"}, "invalid hub endpoint")]:
        with pytest.raises(hub.HubError, match=re.escape(message)):
            hub.pull(NAME, **kwargs)
    bad = tmp_path / "index.json"
    bad.write_text('{"x": {"revision": "abc", "files": {}}}')
    with pytest.raises(hub.HubError, match="malformed index .*entry 'x' needs a 40-hex 'revision'"):
        hub.pull(NAME, index=bad)
    entry = {"revision": "a" * 40, "files": {"config.yaml": "b" * 64}}
    for fast in ({"README.md": "c" * 64}, {"config.yaml": "short"}, ["c" * 64]):
        with pytest.raises(hub.HubError, match="malformed index .*entry 'x' has a 'blake3' that is not a mapping of "
                                               "its files' names to 64-hex BLAKE3 digests"):
            hub.pull(NAME, index={"x": {**entry, "blake3": fast}})
    with pytest.raises(hub.HubError, match="index not found"):
        hub.pull(NAME, index=tmp_path / "nope.json")
    assert main(["publish", "../x", "--to", str(tmp_path)]) == 2
    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["zoo: error: checkpoint not found: ../x",  # a path, so a checkpoint: never a variant name
                   f"zoo: error: cannot serve {tmp_path / 'missing'}: not a folder (publish variants into one with "
                   "`zoo publish NAME --to DIR`)"]
    with pytest.raises(zoo.ConfigError, match="invalid variant name 'Bad'"):
        zoo.publish("Bad", tmp_path)
    with pytest.raises(zoo.UnknownNameError, match="unknown variant 'no-such-variant'"):
        zoo.publish("no-such-variant", tmp_path)


# ---------------------------------------------------------------------------------------------
# two processes, one cache
# ---------------------------------------------------------------------------------------------
class Gate(HubRequestHandler):
    """Holds the download of the weights until the other pull waits on the cache's lock for them, so the
    two pulls overlap for certain (with a time limit, so a failure cannot hang the suite)."""

    gets: list[str] = []
    downloading = threading.Event()
    other_waits = threading.Event()
    overlapped = False

    def send_body(self, f, length, filename):
        Gate.gets.append(filename)
        if filename == "model.safetensors":
            Gate.downloading.set()
            Gate.overlapped = Gate.other_waits.wait(60)
        super().send_body(f, length, filename)


def test_two_processes_pull_the_same_variant_at_once(published, hf_home, subprocess_env, monkeypatch):
    """A `zoo pull` process downloads the weights; this process pulls meanwhile, waits on huggingface_hub's lock
    file for that blob, and then links the blob instead of downloading it again."""
    from filelock import FileLock, Timeout

    from zoo.hub import transfer as hub_transfer

    class Watched(FileLock):
        def acquire(self, timeout=None, *args, **kwargs):
            try:
                return super().acquire(0)
            except Timeout:
                Gate.other_waits.set()
                return super().acquire(timeout, *args, **kwargs)

    monkeypatch.setattr(hub_transfer, "FileLock", Watched)
    Gate.gets, Gate.overlapped = [], False
    Gate.downloading.clear()
    Gate.other_waits.clear()
    env = subprocess_env(HF_HOME=str(hf_home), HF_HUB_DISABLE_PROGRESS_BARS="1")
    with serve_background(published.dir, handler=Gate) as url:
        cmd = [ZOO, "pull", NAME, "--endpoint", url, "--index", str(published.index)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            started = Gate.downloading.wait(120)
            path = hub.pull(NAME, endpoint=url, index=published.index) if started else None
        finally:
            out, err = proc.communicate(timeout=120)
    assert started and proc.returncode == 0, err
    assert out.strip() == str(path) == str(snapshot_of(hf_home) / published.commit)
    assert Gate.overlapped  # this pull came for the weights while the other process was downloading them
    assert Gate.gets.count("model.safetensors") == 1  # ... then waited on the lock and reused the blob
    assert_pulled(snapshot_of(hf_home) / published.commit, published, hf_home)
    blobs = blobs_of(hf_home)
    assert sorted(p.name for p in blobs) == sorted({*published.files.values(),
                                                    hashlib.sha256((published.folder / CHECKSUMS).read_bytes()).hexdigest()})


# ---------------------------------------------------------------------------------------------
# the embedded hub
# ---------------------------------------------------------------------------------------------
def test_embedded_hub_matches_the_index_and_fits_the_budget():
    root = hub.embedded_hub()
    index = hub.load_index()
    assert sorted(index) == sorted(p.name for p in root.iterdir() if p.is_dir()) and len(index) >= 2
    total = 0
    for name, entry in index.items():
        sums = (root / name / CHECKSUMS).read_bytes()
        assert entry["revision"] == hashlib.sha1(sums).hexdigest()
        assert entry["files"] == {**parse_checksums(sums.decode(), name), CHECKSUMS: hashlib.sha256(sums).hexdigest()}
        for filename, digest in entry["files"].items():
            assert hashlib.sha256((root / name / filename).read_bytes()).hexdigest() == digest
        assert entry["blake3"] == {filename: b3(root / name / filename) for filename in entry["files"]}
        total += (root / name / "model.safetensors").stat().st_size
        card = (root / name / "README.md").read_text()
        measured = json.loads((Path(__file__).resolve().parents[1] / "model_cards" / "results" / f"{name}.json").read_text())
        assert f"# {name}" in card and "trained by the zoo's recipe" in card  # the study's seed-0 checkpoints
        assert f"value: {round(measured['eval']['loss'], 4)}" in card and f"value: {measured['val_loss']}" in card
    assert total <= 25 * 1024 * 1024


def test_embedded_hub_needs_no_endpoint(hf_home):
    assert "ZOO_ENDPOINT" not in os.environ
    name = "tiny-dense-hybridnorm"
    entry = hub.load_index()[name]
    path = hub.pull(name)
    assert path == snapshot_of(hf_home, name) / entry["revision"]
    model = zoo.build(name, pretrained=True)
    want = load_file(hub.embedded_hub() / name / "model.safetensors")
    assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())
    with pytest.raises(hub.HubError, match=r"zoo/tiny-dense-mixln is not in the zoo's embedded hub \(it holds: "):
        hub.pull("tiny-dense-mixln")


def test_publish_puts_a_checkpoints_results_on_its_card(tmp_path):
    model = zoo.build("tiny-dense-prenorm", ["n_layers=1"])
    ckpt = zoo.save(model, tmp_path / "model.safetensors", variant="tiny-dense-prenorm")
    results = {"val_loss": 1.2345, "recipe": "a test recipe", "eval": {"loss": 1.5, "data": "stdlib", "split": "val"}}
    r = subprocess.run([sys.executable, "-m", "zoo", "publish", str(ckpt), "--to", str(tmp_path / "hub"), "--results",
                        str(_write(tmp_path / "r.json", results))], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "hub" / "tiny-dense-prenorm" / "README.md").read_text()
    assert "trained by the zoo's recipe: a test recipe" in card and "| val_loss | 1.2345 |" in card
    assert "value: 1.5" in card  # the eval loss in the model-index
    fresh = zoo.publish("tiny-dense-prenorm", tmp_path / "hub2", results=results)  # untrained: no numbers
    assert "1.2345" not in (fresh / "README.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "zoo", "publish", str(ckpt), "--to", str(tmp_path / "hub"), "--results",
                          str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith(f"zoo: error: --results {tmp_path / 'missing.json'}: cannot read")


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_a_plain_huggingface_hub_client_lists_and_snapshots_a_zoo_hub(published, tmp_path):
    """Every read-only call of huggingface_hub's listing and snapshot API, and the `hf download` command,
    against `zoo serve`: results checked against the published folder itself."""
    from huggingface_hub import HfApi, snapshot_download
    repo_id = f"zoo/{NAME}"
    names = sorted([*published.files, CHECKSUMS])
    with serve_background(published.dir) as url:
        api = HfApi(endpoint=url)
        assert api.list_repo_files(repo_id) == names
        for recursive in (False, True):
            tree = {f.path: f for f in api.list_repo_tree(repo_id, recursive=recursive)}
            assert sorted(tree) == names
        weights = tree["model.safetensors"]
        assert weights.size == (published.folder / "model.safetensors").stat().st_size
        assert weights.lfs.sha256 == published.files["model.safetensors"]
        config = (published.folder / "config.yaml").read_bytes()
        assert tree["config.yaml"].blob_id == hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
        assert [p.path for p in api.get_paths_info(repo_id, ["config.yaml", "missing.txt"])] == ["config.yaml"]
        refs = api.list_repo_refs(repo_id)
        assert [(b.name, b.target_commit) for b in refs.branches] == [("main", published.commit)]
        assert [c.commit_id for c in api.list_repo_commits(repo_id)] == [published.commit]
        assert [m.id for m in api.list_models(search=NAME[5:].upper())] == [repo_id]  # a part, any case
        assert list(api.list_models(search="no-such-model")) == []
        info = api.model_info(repo_id, files_metadata=True)
        assert info.sha == published.commit and {s.rfilename: s.size for s in info.siblings} == {
            n: (published.folder / n).stat().st_size for n in names}
        snapshot = Path(snapshot_download(repo_id, endpoint=url, cache_dir=str(tmp_path / "cache")))
        assert sorted(p.name for p in snapshot.iterdir()) == names
        assert (snapshot / "model.safetensors").read_bytes() == (published.folder / "model.safetensors").read_bytes()
        hf = Path(sys.executable).parent / "hf"
        r = subprocess.run([str(hf), "download", repo_id, "--local-dir", str(tmp_path / "local")],
                           env={**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf-cli")},
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in (tmp_path / "local").iterdir() if not p.name.startswith(".")) == names


def test_serve_survives_huge_ranges_and_closes_idle_connections(published, tmp_path):
    """A 5,000-digit Range gets 416, a header line over 64 KiB or over 100 headers 431, and the server stays up;
    300 connections that never send a request do not stop a pull, and the idle timeout closes them, so their
    threads end."""
    import socket
    with serve_background(published.dir, idle_timeout=2.0) as url:
        file_url = f"{url}/zoo/{NAME}/resolve/main/config.yaml"
        request = urllib.request.Request(file_url, headers={"Range": f"bytes={'9' * 5000}-"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 416
        for headers in ({"X-Big": "x" * 70_000}, {f"X-{i}": "1" for i in range(150)}):  # http.server's bounds
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(file_url, headers=headers), timeout=10)
            assert refused.value.code == 431
        baseline = threading.active_count()
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(300)]
        try:
            assert urllib.request.urlopen(file_url, timeout=10).read() == (published.folder / "config.yaml").read_bytes()
            folder = hub.pull(NAME, endpoint=url)
            assert (Path(folder) / "model.safetensors").read_bytes() == (published.folder / "model.safetensors").read_bytes()
            deadline = time.time() + 30
            while threading.active_count() > baseline + 2 and time.time() < deadline:
                time.sleep(0.2)
            assert threading.active_count() <= baseline + 2  # every idle connection's thread has ended
            assert all(s.recv(1) == b"" for s in idle)  # and the server closed each of them
        finally:
            for s in idle:
                s.close()


class HalfThenHold(HubRequestHandler):
    """Sends the first half of the weights, then holds the connection open."""

    half_sent = threading.Event()

    def send_body(self, f, length, filename):
        if filename != "model.safetensors":
            return super().send_body(f, length, filename)
        self.wfile.write(f.read(length // 2))
        self.wfile.flush()
        HalfThenHold.half_sent.set()
        time.sleep(20)


@pytest.mark.parametrize("kind", ["splice", "readinto"])
def test_a_killed_pull_resumes_with_only_the_missing_bytes(published, hf_home, tmp_path, monkeypatch, kind):
    """SIGKILL during the weights' transfer: the part file holds exactly the bytes that arrived (it is not
    pre-sized, on either path), and the next pull asks for the rest with one Range request."""
    data = (published.folder / "model.safetensors").read_bytes()
    half = len(data) // 2
    part = hf_home / "hub" / f"models--zoo--{NAME}" / "blobs" / f"{published.files['model.safetensors']}.incomplete"
    HalfThenHold.half_sent.clear()
    with serve_background(published.dir, handler=HalfThenHold) as url:
        code = ("import os; os.__dict__.pop('splice', None); " if kind != "splice" else "") + \
            f"from zoo import hub; hub.pull({NAME!r}, endpoint={url!r}, index={str(published.index)!r})"
        proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "HF_HOME": str(hf_home)})
        try:
            assert HalfThenHold.half_sent.wait(60)
            deadline = time.time() + 20
            while (not part.exists() or part.stat().st_size < half) and time.time() < deadline:
                time.sleep(0.05)
        finally:
            proc.kill()
            proc.wait()
    assert part.stat().st_size == half and part.read_bytes() == data[:half]
    Recording.ranges = []
    use_transfer(kind, monkeypatch)
    with serve_background(published.dir, handler=Recording) as url:
        assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
    assert Recording.ranges == [f"bytes={half}-"] and not part.exists()
