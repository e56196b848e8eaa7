"""Streaming a task to an HTTP client as its pieces are stored: the proxy's sink.

`StreamSink` has the shape of `OutputSink` (the task run calls `set_length`, `write`, `finish`
and `abort` from its writer thread) but writes nothing: it only posts "piece N is stored" to
the event loop. `StreamSink.body(start, end)` is the asyncio side: it yields the bytes of
[start, end) in order, each piece as soon as it is there, so a client gets bytes while the
task is still downloading.

Where the bytes come from: a piece the run hands over while a client reads, and which lies
within the hold of the client's position, is kept as handed (the received frame, uncopied;
only `bytes` and ZeroMQ frames, which nobody refills) until the client takes it. The hold is
one budget for the daemon's proxy, all clients together (`HoldBudget`, `proxy_hold_bytes`,
default 256 MiB), so a hundred slow clients cannot pin a hundred times that. Without it, a
client slower than the download (curl writing a cold page cache) made the daemon read back
from disk every piece that had left the store's small cache of recent pieces: half of a 1 GiB
body, measured.
Other pieces are read back from the piece store (its memory of recent pieces, else the
disk). What a stream holds in memory is bounded: its held pieces (within the shared budget),
the piece being sent and the reads of the next READ_AHEAD_BYTES (8 MiB) ahead of it, however
slow the client.

With an expected digest (a registry blob's `sha256:...`), the body is hashed in order and the
last piece is held back until the whole body matched: a client never receives the final byte
of content that does not match its digest (it sees a cut connection instead).

It must never block the loop on a store read or a hash (both run in a thread), and never write
to the client itself (the proxy does).
"""

from __future__ import annotations

import asyncio
import bisect
from typing import Any, AsyncIterator

import zmq

from dfzmq.errors import DownloadError, IntegrityError, StorageError
from dfzmq.wire import PieceInfo
from nodes.sink import new_hasher, parse_digest
from nodes.store import DISK

READ_AHEAD_BYTES = 8 << 20  # piece reads in flight ahead of what a streaming client takes
HOLD_BYTES = 256 << 20  # handed-over pieces kept for clients behind the download (proxy_hold_bytes)


class HoldBudget:
    """What the streams of one proxy may hold together (loop thread only)."""

    def __init__(self, limit: int = HOLD_BYTES) -> None:
        self.limit = limit
        self.used = 0


def _stable(data: Any) -> bool:
    """`data` is bytes or a received ZeroMQ frame (or a view of one): nobody writes to it again.
    A bytearray, mapped file or other buffer may be refilled by its owner: not kept."""
    owner = data
    while isinstance(owner, memoryview):
        owner = owner.obj
    return isinstance(owner, (bytes, zmq.Frame))


class StreamSink:
    wants_data = False  # catch-up on attach needs no piece bytes, only which pieces are stored

    def __init__(self, loop: asyncio.AbstractEventLoop, store: Any, expected: str = "",
                 budget: HoldBudget | None = None) -> None:
        self.loop = loop
        self.store = store
        self.budget = budget if budget is not None else HoldBudget()
        self.held: dict[int, Any] = {}  # piece offset -> its bytes as handed over (loop thread)
        self.held_size = 0  # this stream's part of budget.used
        self.held_peak = 0  # the most it held at once
        self.window = (0, 0)  # [pos, end) a body is reading now; (0, 0) while none is
        self.reads_held = 0  # pieces a body took as handed over, and from the store
        self.reads_store = 0
        self.expected = parse_digest(expected) if expected else None
        self.by_offset: dict[int, PieceInfo] = {}  # loop thread only
        self.offsets: list[int] = []  # sorted, for finding the piece under a range start
        self.length = -1
        self.finished = False
        self.failed = False
        self.changed = asyncio.Event()
        # OutputSink's interface, as the run's writer thread uses it:
        self.error: Exception | None = None
        self.closed = False
        self.bytes = 0

    # -- writer thread ---------------------------------------------------------------------

    def set_length(self, content_length: int) -> None:
        self._post(self._on_length, content_length)

    def write(self, info: PieceInfo, data: Any) -> None:
        self.bytes += info.length
        self._post(self._on_piece, info, data)

    def finish(self, content_length: int, file_digest: str) -> None:
        self.closed = True
        self._post(self._on_finish)

    def abort(self) -> None:
        self.closed = True
        self._post(self._on_abort)

    def _post(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closing: nobody is reading any more
            pass

    # -- event loop ------------------------------------------------------------------------

    def _on_length(self, n: int) -> None:
        self.length = n
        self.changed.set()

    def _on_piece(self, info: PieceInfo, data: Any = None) -> None:
        if info.offset not in self.by_offset:
            self.by_offset[info.offset] = info
            bisect.insort(self.offsets, info.offset)
            pos, end = self.window
            budget = self.budget
            ahead = pos < info.offset + info.length and info.offset < min(end, pos + budget.limit)
            if data is not None and ahead and budget.used + info.length <= budget.limit and _stable(data):
                self.held[info.offset] = data
                self.held_size += info.length
                self.held_peak = max(self.held_peak, self.held_size)
                budget.used += info.length
        self.changed.set()

    def _on_finish(self) -> None:
        self.finished = True
        self.changed.set()

    def _on_abort(self) -> None:
        if not self.finished:
            self.failed = True
        self.changed.set()

    def covering(self, pos: int) -> PieceInfo | None:
        info = self.by_offset.get(pos)
        if info is not None:
            return info
        i = bisect.bisect_right(self.offsets, pos) - 1
        if i >= 0:
            info = self.by_offset[self.offsets[i]]
            if info.offset <= pos < info.offset + info.length:
                return info
        return None

    async def body(self, start: int, end: int, verify: bool = False) -> AsyncIterator[memoryview]:
        """The bytes of [start, end) in order, each as soon as the piece holding it is stored.
        `verify` (the whole body, with an expected digest): the last piece waits for the check.
        Reads of the next stored pieces (up to READ_AHEAD_BYTES) run while the client takes
        this one: a piece read from disk (O_DIRECT, see nodes/piecefiles.py) takes a few ms."""
        whole = verify and self.expected is not None and start == 0
        hasher = new_hasher(self.expected[0]) if whole else None
        ahead: dict[int, asyncio.Future] = {}  # piece offset -> its read, in flight or done
        pos = start
        try:
            while pos < end:
                self.window = (pos, end)
                info = self.covering(pos)
                if info is None:
                    if self.failed:
                        raise DownloadError("the task failed while streaming")
                    if self.finished:
                        raise StorageError(f"no stored piece covers byte {pos}")
                    self.changed.clear()
                    await self.changed.wait()
                    continue
                self._read_ahead(ahead, info, end)
                data = await ahead.pop(info.offset)
                if hasher is not None:
                    last = info.offset + info.length >= end
                    await asyncio.to_thread(self._check, data, hasher, last)
                lo = pos - info.offset
                hi = min(info.length, end - info.offset)
                yield memoryview(data)[lo:hi]
                pos = info.offset + hi
        finally:
            self.window = (0, 0)
            self.held.clear()
            self.budget.used -= self.held_size
            self.held_size = 0
            for fut in ahead.values():
                if not fut.cancel() and fut.done():
                    fut.exception()  # retrieved: an unread piece's error is no error

    def _read_ahead(self, ahead: dict[int, asyncio.Future], info: PieceInfo, end: int) -> None:
        """Start reads of `info` and the stored pieces after it, READ_AHEAD_BYTES at most
        (always `info` itself)."""
        budget = READ_AHEAD_BYTES
        p: PieceInfo | None = info
        while p is not None and p.offset < end and (p is info or budget > 0):
            if p.offset not in ahead:
                ahead[p.offset] = self._start_read(p)
            budget -= p.length
            p = self.by_offset.get(p.offset + p.length)

    def _start_read(self, info: PieceInfo) -> asyncio.Future:
        """A held piece, or one still in the store's memory (uncopied) or in LMDB, is taken on
        the loop; only a piece file's read, which waits for the disk, goes to a thread."""
        loop = asyncio.get_running_loop()
        data = self.held.pop(info.offset, None)
        if data is not None:
            self.held_size -= info.length
            self.budget.used -= info.length
            self.reads_held += 1
            fut = loop.create_future()
            fut.set_result(data)
            return fut
        self.reads_store += 1
        data = self.store.get_ready(info.digest, view=True)
        if data is DISK:
            return loop.run_in_executor(None, self._read, info)
        fut = loop.create_future()
        if data is None:
            fut.set_exception(self._vanished(info))
        else:
            fut.set_result(data)
        return fut

    def _read(self, info: PieceInfo) -> Any:
        data = self.store.get(info.digest)
        if data is None:
            raise self._vanished(info)
        return data

    @staticmethod
    def _vanished(info: PieceInfo) -> StorageError:
        return StorageError(f"piece {info.num} vanished from the store")

    def _check(self, data: Any, hasher: Any, last: bool) -> None:
        hasher.update(data)
        if last:
            algo, want = self.expected
            got = hasher.hexdigest()
            if got != want:
                raise IntegrityError(f"digest mismatch: {algo} of the content is {got}, expected {want}")
