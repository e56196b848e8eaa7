"""Content-defined chunking (FastCDC, via pyfastcdc): piece boundaries that follow the bytes.

With fixed-length pieces, one byte inserted near the start of a file shifts every later piece
and a new version shares nothing with the old one. FastCDC cuts where a rolling hash of the last
bytes matches a mask, so a cut depends only on nearby content: after an insertion or an edit
the cuts resynchronise within a piece or two, and every later piece keeps its bytes and hence
its blake3 digest (its key in the piece store). A peer that holds the old version then already
holds most pieces of the new one (nodes/task.py takes them from its store, no transfer).

Which tasks are cut this way: only those that ask, by a task tag starting with `cdc/`
(`dfzmq sync` tags every file so, with the file's version after the slash; `dfzmq fetch
--tag cdc/...` asks for it by hand). The chunking is part of a task's identity (two chunkings of
one URL are two manifests), and the tag is already part of the task id and already travels to
the seed peer, so no message had to change. Plain fetches keep fixed pieces read with parallel
Range requests; a CDC task is read as one sequential stream (boundaries are only known once the
bytes before them are read), cut and hashed in a worker thread while the stream keeps coming:
a cold fetch takes about 1.15x the time of fixed pieces, a swarm the same time
(tools/bench_sync.py cost). Opt-in keeps plain fetches exactly as fast as before.

Average piece length comes from the file size in bands a factor of 16 wide (64 KiB below
16 MiB, 128 KiB below 256 MiB, 512 KiB below 4 GiB, 2 MiB above), so a file that grows or
shrinks a little keeps the same parameters and hence the same cuts. Pieces are between a
quarter and four times the average. That is more pieces than fixed chunking's ~512 (a 1 GiB
file has about 2000): smaller pieces are what keeps an edit's cost near the edit's size (the
issue's goal: 1% changed in scattered places, under 3% received), and tools/bench_sync.py
`cost` measures what the extra pieces cost a cold fetch and a swarm, side by side.

pyfastcdc (Cython, 2.6 GB/s on this VM, as fast as blake3) was chosen over `fastcdc`
(0.9 GB/s). Pure functions and one small stateful cutter; no I/O.
"""

from __future__ import annotations

from pyfastcdc import FastCDC

CDC_TAG_PREFIX = "cdc/"
# FastCDC's normalised chunking level. Level 2 clusters lengths tighter but resynchronises more
# slowly after an edit: on the 1 GiB benchmark file, 1% changed in 8 places costs 4.7% of the
# file at level 2 and 1 MiB pieces, 3.0% at level 1, and 2.1% at level 1 with 512 KiB pieces.
NORMALIZATION = 1

_BANDS = [(16 << 20, 64 << 10), (256 << 20, 128 << 10), (4 << 30, 512 << 10)]
_TOP_AVG = 2 << 20


def wants_cdc(tag: str) -> bool:
    """Whether a task with this tag is cut at content-defined boundaries."""
    return tag.startswith(CDC_TAG_PREFIX)


def cdc_tag(version: str) -> str:
    return CDC_TAG_PREFIX + version


def average_for(content_length: int) -> int:
    """Average piece length for a file of this size (unknown size: the 1 MiB band)."""
    if content_length < 0:
        return 1 << 20
    for limit, avg in _BANDS:
        if content_length < limit:
            return avg
    return _TOP_AVG


class Cutter:
    """Cuts a byte stream fed in arbitrary slices into content-defined pieces.

    `feed(data)` returns the pieces whose end is certain, as (offset, bytes); `finish()` the
    rest. A piece is only emitted once `max_size` bytes after its start are buffered (or the
    stream ended), because FastCDC's choice of cut depends on how much data follows, up to
    `max_size`; so the cuts are exactly those of cutting the whole stream at once, whatever the
    slices. Memory: one buffer of three times `max_size`, allocated once and reused (fresh
    allocations cost a page fault per 4 KiB, which on a VM is most of the time cutting takes).
    """

    def __init__(self, avg_size: int, start_offset: int = 0) -> None:
        self.cdc = FastCDC(avg_size, min_size=avg_size // 4, max_size=avg_size * 4,
                           normalized_chunking=NORMALIZATION)
        self.max_size = avg_size * 4
        self.buf = bytearray(3 * self.max_size)
        self.fill = 0  # valid bytes in buf
        self.base = start_offset  # stream offset of buf[0]

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        view = memoryview(data)
        while view:
            n = min(len(view), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill >= 2 * self.max_size:
                out += self._cut(final=False)
        return out

    def finish(self) -> list[tuple[int, bytes]]:
        return self._cut(final=True) if self.fill else []

    def _cut(self, final: bool) -> list[tuple[int, bytes]]:
        with memoryview(self.buf) as mv:
            valid = mv[:self.fill]
            cuts = []
            for ch in self.cdc.cut_buf(valid):
                if not final and ch.offset + self.max_size > self.fill:
                    break
                cuts.append((ch.offset, ch.length))
            del ch
            out = [(self.base + o, bytes(valid[o:o + n])) for o, n in cuts]
            used = cuts[-1][0] + cuts[-1][1] if cuts else 0
            rest = bytes(valid[used:])
            valid.release()
        self.buf[:len(rest)] = rest
        self.fill = len(rest)
        self.base += used
        return out

    @property
    def pending(self) -> int:
        """Bytes fed but not yet emitted."""
        return self.fill


def cut(data: bytes, avg_size: int) -> list[tuple[int, int]]:
    """(offset, length) of every piece of `data`, cut at once (tests, benchmarks)."""
    cdc = FastCDC(avg_size, min_size=avg_size // 4, max_size=avg_size * 4, normalized_chunking=NORMALIZATION)
    return [(c.offset, c.length) for c in cdc.cut_buf(data)]
