"""nodes/memtune.py: freed piece-sized buffers are reused, not fresh pages per piece. Counted in
page faults of a fresh process (not timed): each 4 MiB buffer in fresh pages costs ~1024."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import resource, sys
from nodes.memtune import keep_freed_buffers
set_ = keep_freed_buffers() if sys.argv[1] == "tune" else None
src = bytes(range(256)) * 16384  # a 4 MiB piece
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # receive a piece into a new buffer, drop it: as piece after piece does
    b = bytearray(len(src)); b[:] = src; del b
print(str(set_).replace(" ", ""), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def probe(mode: str, **env: str) -> tuple[str, int]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env={**e, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


def glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not glibc(), reason="the thresholds are glibc's; other C libraries are left alone")
def test_piece_buffers_are_reused_once_the_thresholds_are_raised():
    _, plain = probe("plain")
    now, tuned = probe("tune")
    assert now == "(True,True)"
    assert plain > 20 * 1024  # every buffer in fresh pages (about 2048 faults each here)
    assert tuned < 4 * 1024  # the first buffer's pages, then the same ones again


def test_what_the_operator_set_wins_and_only_that():
    assert probe("tune", MALLOC_TRIM_THRESHOLD_="1048576")[0] == ("(True,False)" if glibc() else "(False,False)")
    assert probe("tune", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")[0] == \
        ("(False,True)" if glibc() else "(False,False)")
    # A container's arena limit is no reason to leave the thresholds alone:
    state, faults = probe("tune", GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert state == ("(True,True)" if glibc() else "(False,False)")
    if glibc():
        assert faults < 4 * 1024


def test_release_gives_free_memory_back():
    out = subprocess.run([sys.executable, "-c", """
from nodes.memtune import keep_freed_buffers, release
keep_freed_buffers()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
keep = [bytearray(4 << 20) for _ in range(32)]
for b in keep:
    b[::4096] = b"x" * len(b[::4096])
before = rss()
del keep, b
release()
print(before - rss())
"""], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    if glibc():
        assert int(out) > 64 << 20  # most of the 128 MiB went back
