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

`keep_freed_buffers()` sets, once per process, the mmap threshold to 32 MiB (glibc's maximum:
pieces up to that come from the heaps) and the trim threshold to TRIM_BYTES, the free memory a
heap may keep for reuse. It does nothing where the C library is not glibc, and leaves alone
what the operator set (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES with
glibc.malloc settings). A process setting, so the commands that run a peer (`daemon`, and
`fetch` and `sync` without one) call it, not the library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_BYTES = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_BYTES = 64 << 20


def keep_freed_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds (above). True if they were set."""
    env = os.environ
    if "MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env or \
            "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu = libc.gnu_get_libc_version  # glibc only: musl has mallopt as a no-op stub
    except (OSError, AttributeError):
        return False
    del gnu
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
