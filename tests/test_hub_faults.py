"""Pulls against a hub that misbehaves (tests/faulty_hub.py): each fault served once, then a healthy hub.

Whatever goes wrong, nothing bad is kept in the cache, the error says what happened and who sent it, and
the next pull succeeds with no manual cleanup.
"""
from __future__ import annotations

import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from faulty_hub import HTML, Fault, faulty_hub
from test_hub import NAME, assert_pulled, published, snapshot_of  # noqa: F401 (fixtures)

from zoo import hub
from zoo.hub.protocol import CHECKSUMS
from zoo.hub.server import serve_background

WEIGHTS = "model.safetensors"


@pytest.fixture(autouse=True)
def hf_home(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "ZOO_ENDPOINT", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE", "ZOO_ALLOW_REDIRECTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("ZOO_PULL_MIN_RATE", "1000")  # a trickle fails in about a second
    monkeypatch.setenv("ZOO_PULL_RATE_WINDOW", "1")
    return tmp_path / "hf"


def cached_files(hf_home: Path) -> list[str]:
    """Every file in the cache's blobs and snapshots, partial downloads included."""
    repo = hf_home / "hub" / f"models--zoo--{NAME}"
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() or p.is_symlink()) \
        if repo.exists() else []


# what the first pull does when its weights meet the fault: None, it recovers on its own; else its error
WEIGHT_FAULTS = {
    "drop": None,          # asked again
    "truncate": None,      # resumed with a Range request
    "unavailable": None,   # asked again after Retry-After
    "corrupt": r"checksum mismatch for zoo/tiny-dense-prenorm/model\.safetensors from {url}: the zoo's index has "
               r"blake3 [0-9a-f]{{64}}, the download has [0-9a-f]{{64}}; the bad file was removed from the cache",
    "replace": r"checksum mismatch for zoo/tiny-dense-prenorm/model\.safetensors from {url}: ",
    "html": r"checksum mismatch for zoo/tiny-dense-prenorm/model\.safetensors from {url} \(the server sent an HTML "
            r"page, not the file\): ",
    "trickle": r"downloading zoo/tiny-dense-prenorm/model\.safetensors from {url} was too slow: the server sent ",
    "redirect": r"{host} redirected the download to http://127\.0\.0\.1:\d+/zoo/.*; the zoo follows redirects to "
                r"other hosts only from the official Hub, or to hosts listed in ZOO_ALLOW_REDIRECTS",
}


@pytest.mark.parametrize("kind", sorted(WEIGHT_FAULTS))
def test_a_fault_on_the_weights_then_a_healthy_hub(published, hf_home, kind):  # noqa: F811
    arg = {"replace": b"x" * 100, "unavailable": 1}.get(kind)
    with serve_background(published.dir) as elsewhere:
        arg = elsewhere if kind == "redirect" else arg
        with faulty_hub(published.dir, Fault(kind, WEIGHTS, arg=arg)) as faulty:
            url = faulty.url
            started = time.monotonic()
            if WEIGHT_FAULTS[kind] is None:
                assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
            else:
                with pytest.raises(hub.HubError) as e:
                    hub.pull(NAME, endpoint=url, index=published.index)
                pattern = WEIGHT_FAULTS[kind].format(url=re.escape(url), host=re.escape(url.removeprefix("http://")))
                assert re.search(pattern, str(e.value)), str(e.value)
                assert not any(f.startswith("snapshots") and WEIGHTS in f for f in cached_files(hf_home))
            took = time.monotonic() - started
            assert faulty.hits == [(kind, WEIGHTS)]
            assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
    assert took < 10, took
    if kind == "unavailable":
        assert took >= 1  # it waited as asked
    assert not [f for f in cached_files(hf_home) if f.endswith(".incomplete")]


CHECKSUM_FAULTS = {
    "corrupt": "checksum mismatch for {url}/zoo/tiny-dense-prenorm/resolve/{commit}/checksums.sha256: expected "
               "sha256 ",
    "html": "(the server sent an HTML page, not the file)",
    "non-utf8": "checksum mismatch for {url}/zoo/tiny-dense-prenorm/resolve/{commit}/checksums.sha256: expected ",
    "truncate": None,
    "head-html": "{url} does not answer like an HF hub for zoo/tiny-dense-prenorm/checksums.sha256",
}


@pytest.mark.parametrize("kind", sorted(CHECKSUM_FAULTS))
def test_a_bad_checksums_file_is_never_kept(published, hf_home, kind):  # noqa: F811
    """checksums.sha256 of a variant the index does not pin: checked against the ETag the hub sent before it is
    kept, so a corrupted, HTML or non-UTF-8 copy fails that pull and the next pull succeeds."""
    fault = {"head-html": Fault("html", CHECKSUMS, head=True),
             "non-utf8": Fault("replace", CHECKSUMS, arg=b"\xff\xfe not text\n")}.get(kind, Fault(kind, CHECKSUMS))
    with faulty_hub(published.dir, fault) as faulty:
        url = faulty.url
        if CHECKSUM_FAULTS[kind] is None:
            assert_pulled(hub.pull(NAME, endpoint=url, index={}), published, hf_home)
        else:
            with pytest.raises(hub.HubError) as e:
                hub.pull(NAME, endpoint=url, index={})
            assert CHECKSUM_FAULTS[kind].format(url=url, commit=published.commit) in str(e.value), str(e.value)
            assert len(str(e.value).splitlines()) == 1
            assert not any(CHECKSUMS in f for f in cached_files(hf_home)), cached_files(hf_home)
        assert faulty.hits == [(fault.kind, CHECKSUMS)]
        assert_pulled(hub.pull(NAME, endpoint=url, index={}), published, hf_home)


def test_a_hub_that_serves_a_malformed_checksums_file(published, hf_home):  # noqa: F811
    """The hub's checksums.sha256 is not UTF-8 and its ETag matches those bytes (a publisher's mistake, not a
    transfer's): the pull fails saying so and keeps nothing; the right file is pulled afterwards."""
    bad = (published.folder / CHECKSUMS).read_bytes() + b"\xff\xfe\n"
    with faulty_hub(published.dir, Fault("replace", CHECKSUMS, times=2, arg=bad, head=None, own_etag=True)) as faulty:
        with pytest.raises(hub.HubError) as e:
            hub.pull(NAME, endpoint=faulty.url, index={})
        assert re.fullmatch(rf"zoo/{NAME}/{CHECKSUMS} \(commit {published.commit}\) from {re.escape(faulty.url)} is not "
                            r"a checksums file: not UTF-8 text \(byte \d+: b'\\xff'\); it was removed from the cache "
                            r"\(.*\); pull again once the hub serves it right", str(e.value)), str(e.value)
        assert not any(CHECKSUMS in f and f.startswith(("blobs", "snapshots")) for f in cached_files(hf_home))
        assert faulty.hits == [("replace", CHECKSUMS)] * 2
        assert_pulled(hub.pull(NAME, endpoint=faulty.url, index={}), published, hf_home)


def test_a_poisoned_cached_checksums_file_is_evicted_and_fetched_again(published, hf_home):  # noqa: F811
    """A copy that an older client left in the cache under the real file's blob name (its ETag), with other
    bytes: the next pull sees that they do not match the name, drops them and downloads the file."""
    with serve_background(published.dir) as url:
        assert_pulled(hub.pull(NAME, endpoint=url, index={}), published, hf_home)
        blob = (snapshot_of(hf_home) / published.commit / CHECKSUMS).resolve()
        blob.chmod(0o644)
        blob.write_bytes(HTML)
        assert_pulled(hub.pull(NAME, endpoint=url, index={}), published, hf_home)


def test_redirects_to_an_allowed_host_are_followed_and_errors_name_the_sender(published, hf_home,  # noqa: F811
                                                                               monkeypatch):
    with faulty_hub(published.dir, Fault("corrupt", WEIGHTS)) as cdn:  # the host the hub redirects to
        host = cdn.url.removeprefix("http://")
        with faulty_hub(published.dir, Fault("redirect", WEIGHTS, times=2, arg=cdn.url)) as faulty:
            url = faulty.url
            monkeypatch.setenv("ZOO_ALLOW_REDIRECTS", f"example.org, {host}")
            with pytest.raises(hub.HubError) as e:
                hub.pull(NAME, endpoint=url, index=published.index)
            assert (f"checksum mismatch for zoo/{NAME}/{WEIGHTS} from {url} (sent by {host}, to which "
                    f"{url.removeprefix('http://')} redirected): the zoo's index has blake3") in str(e.value)
            assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
    assert faulty.hits == [("redirect", WEIGHTS)] * 2 and cdn.hits == [("corrupt", WEIGHTS)]


def test_redirect_policy():
    from zoo.hub.transfer import redirect_allowed
    assert redirect_allowed("http://127.0.0.1:1/a", "http://127.0.0.1:1/b")
    assert not redirect_allowed("http://127.0.0.1:1/a", "http://127.0.0.1:2/b")
    assert redirect_allowed("https://huggingface.co/zoo/x/resolve/main/f", "https://cas-bridge.xethub.hf.co/f")
    assert not redirect_allowed("https://huggingface.co/a", "http://cdn.example/f")  # no downgrade
    assert not redirect_allowed("https://hub.example/a", "https://cdn.example/f")
    assert not redirect_allowed("http://127.0.0.1:1/a", "file:///etc/passwd")


def test_connections_over_the_limit_get_503_and_pulls_wait_for_a_slot(published, hf_home):  # noqa: F811
    """With every slot held by a silent client, the next one is answered 503 with Retry-After at once (no thread
    of its own); a pull retries after it and gets a slot when the idle timeout frees them."""
    with serve_background(published.dir, max_connections=4, idle_timeout=1.5) as url:
        host, port = url.removeprefix("http://").split(":")
        baseline = threading.active_count()
        idle = [socket.create_connection((host, int(port))) for _ in range(4)]
        try:
            time.sleep(0.2)
            with pytest.raises(urllib.error.HTTPError) as busy:
                urllib.request.urlopen(f"{url}/zoo/{NAME}/resolve/main/config.yaml", timeout=5)
            assert busy.value.code == 503 and busy.value.headers["Retry-After"] == "1"
            assert threading.active_count() <= baseline + 4
            assert_pulled(hub.pull(NAME, endpoint=url, index=published.index), published, hf_home)
        finally:
            for s in idle:
                s.close()


def test_a_file_kept_in_git_is_checked_against_its_git_id(published, tmp_path):  # noqa: F811
    """The Hub's ETag for a file kept in git (not LFS) is git's blob id; the transfer checks that id too."""
    from zoo.hub.listing import git_blob_id
    from zoo.hub.transfer import GIT_SHA1, ChecksumError, download_verified, etag_algorithm
    data = (published.folder / "config.yaml").read_bytes()
    assert etag_algorithm(git_blob_id(data)) == GIT_SHA1
    with serve_background(published.dir) as url:
        file_url = f"{url}/zoo/{NAME}/resolve/main/config.yaml"
        download_verified(file_url, tmp_path / "good", git_blob_id(data), algorithm=GIT_SHA1)
        assert (tmp_path / "good").read_bytes() == data
        with pytest.raises(ChecksumError):
            download_verified(file_url, tmp_path / "bad", git_blob_id(data + b"x"), algorithm=GIT_SHA1)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.incomplete").exists()
