"""zoo.malloc: with retention, a freed large tensor's pages stay in the process, so allocating it again
faults (almost) no pages in; each case runs in a fresh process, as the setting is process-wide."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from zoo.train.malloc import ENV, retain_enabled

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")

PROBE = """
import json, resource, sys, torch
from zoo.train.malloc import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)  # 64 MiB, filled: every page touched
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def probe(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True).stdout
    return json.loads(out)


@glibc
def test_retained_memory_is_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    default, retained = probe("default"), probe("retain")
    assert retained["applied"] is True and default["applied"] is False
    assert min(default["faults"][4:]) > pages // 2  # glibc unmaps the freed block: faulted in again each time
    assert max(retained["faults"][4:]) < pages // 20  # kept in the heap (once it has grown to fit): reused


@glibc
def test_the_environment_turns_it_off():
    off = probe("retain", **{ENV: "0"})
    assert off["applied"] is False and min(off["faults"][4:]) > (64 << 20) // os.sysconf("SC_PAGE_SIZE") // 2


@pytest.mark.parametrize("value,enabled", [("", True), ("1", True), ("0", False), ("off", False), (" False ", False)])
def test_retain_enabled_reads_the_environment(value, enabled, monkeypatch):
    monkeypatch.setenv(ENV, value)
    assert retain_enabled() is enabled
