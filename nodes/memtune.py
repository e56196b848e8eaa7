"""Freed piece buffers stay in the daemon for the next piece instead of going back to the kernel.

Every piece a daemon receives lands in a fresh allocation of the piece's size (libzmq allocates
each message it receives; a piece file's read fills a new buffer). glibc serves allocations
above its mmap threshold (128 KiB at start, raised as such blocks are freed, to 32 MiB at most)
with their own mapping and returns it on free, and gives back the top of its heaps beyond the
trim threshold (twice the mmap threshold). So piece after piece arrived in pages the kernel had
to find and zero: `perf record` of a daemon receiving 1 GiB (tools/bench_cpu.py 1024 proxy)
put 22% of its CPU in `clear_page_erms` under the ZMQ I/O thread's `recv`, 2.6% with the
thresholds below (this VM makes fresh pages dear, see README Benchmarks; a bare-metal host pays
less, never more).

`keep_freed_buffers()` sets, once per process, the mmap threshold to 32 MiB (the most glibc's
own adjustment would reach: pieces up to that come from the heaps) and the trim threshold to
TRIM_BYTES, the free memory a heap may keep for reuse. It does nothing where the C library is
not glibc, and leaves alone each one the operator set (MALLOC_MMAP_THRESHOLD_ or
glibc.malloc.mmap_threshold in GLIBC_TUNABLES; MALLOC_TRIM_THRESHOLD_ or
glibc.malloc.trim_threshold). A process setting, so the commands that run a peer (`daemon`,
and `fetch` and `sync` without one) call it, not the library. `release()` hands the free memory
of every heap back to the system (malloc_trim), for after a burst such as a proxy client's
held pieces (nodes/stream.py).
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_BYTES = 64 << 20


def _glibc() -> ctypes.CDLL | None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL(None)  # this process's C library
    except (ValueError, OSError, AttributeError):
        return None


def _operator_set(env_name: str, tunable: str) -> bool:
    return env_name in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_buffers() -> tuple[bool, bool]:
    """Raise glibc's mmap and trim thresholds (above). Whether each was set."""
    libc = _glibc()
    if libc is None:
        return False, False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    mmap_set = (not _operator_set("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold")
                and mallopt(M_MMAP_THRESHOLD, MMAP_BYTES) == 1)
    trim_set = (not _operator_set("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold")
                and mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1)
    return mmap_set, trim_set


def release() -> None:
    """Give the heaps' free memory back to the system (blocks for a few ms: call it in a thread)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
