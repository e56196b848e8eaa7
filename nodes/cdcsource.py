"""Back-to-source for content-defined pieces: one sequential stream, cut as it arrives.

Used by `SourceReader` for tasks that ask for content-defined chunking (nodes/cdc.py). The
boundaries of a piece are only known once the bytes before it have been read, so the origin is
read with one request (no parallel ranges). Resuming or taking over the source role follows
the manifest that exists: pieces already in it keep their boundaries (the reader starts at the
first one this peer lacks, with a Range request), and cutting restarts where the manifest's
contiguous prefix ends, which is a cut of the original chunking, so the new pieces are exactly
those the first reader would have cut. Pieces the peer holds are read again only when they sit
between ones it lacks in that prefix (rare: a handover mid-file), never beyond it.

Cutting and hashing run in a worker thread, one batch of about 1 MiB at a time, while the loop
keeps receiving; pieces go to `on_piece` (the store and outputs) a few behind, from a task of
their own. Memory: the cutter's buffer (three maximum-size pieces), one batch, four pieces.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, AsyncIterator
from urllib.parse import urlsplit

from dfzmq.errors import IntegrityError, SourceError
from dfzmq.wire import PieceInfo
from nodes.cdc import Cutter, average_for
from nodes.source import digest, open_file_url

if TYPE_CHECKING:
    from nodes.source import SourceReader, SourceResult

READ_BYTES = 1 << 20


def _cut_hash(cutter: Cutter, batch: list[bytes], final: bool) -> list[tuple[int, bytes, str]]:
    """Worker thread: feed a batch to the cutter; the finished pieces with their digests."""
    parts = []
    for chunk in batch:
        if chunk:
            parts += cutter.feed(chunk)
    if final:
        parts += cutter.finish()
    return [(off, data, digest(data)) for off, data in parts]


def _resume_point(known: dict[int, PieceInfo], have: set[int]) -> tuple[int, int, int, int]:
    """(first num to read, its offset, first num to cut, offset where cutting starts)."""
    k = 0
    while k in known and (k == 0 or known[k].offset == known[k - 1].offset + known[k - 1].length):
        k += 1
    prefix_end = known[k - 1].offset + known[k - 1].length if k else 0
    first = next((n for n in range(k) if n not in have), k)
    start = known[first].offset if first < k else prefix_end
    return first, start, k, prefix_end


async def run_cdc(reader: "SourceReader", session, known: dict[int, PieceInfo], have: set[int],
                  content_length: int, on_piece) -> "SourceResult":
    pipe = _Pipe(on_piece)
    try:
        result = await _run_cdc(reader, session, known, have, content_length, pipe.put)
        await pipe.close()
        return result
    finally:
        pipe.cancel()


class _Pipe:
    """Hands pieces to `on_piece` (which stores and writes them, in the writer thread) from a
    task of its own, a few pieces behind the stream, so that the one connection keeps reading
    while pieces are written. Parallel Range requests get this overlap for free; one
    sequential stream does not. Order is kept; an `on_piece` failure surfaces at the next put."""

    DEPTH = 4

    def __init__(self, on_piece) -> None:
        self.on_piece = on_piece
        self.q: asyncio.Queue = asyncio.Queue(self.DEPTH)
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            item = await self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    await self.on_piece(*item)
                except Exception as e:  # raised to the reader at its next put or at close
                    self.error = e

    async def put(self, info: PieceInfo, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        await self.q.put((info, data))

    async def close(self) -> None:
        await self.q.put(None)
        await self.task
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()


async def _run_cdc(reader: "SourceReader", session, known: dict[int, PieceInfo], have: set[int],
                   content_length: int, on_piece) -> "SourceResult":
    from nodes.source import SourceResult, _range_total, _safe

    first, start, cut_num, cut_at = _resume_point(known, have)
    meta = SourceResult(content_length)

    async def pieces(chunks: AsyncIterator[bytes]) -> int:
        """Cut the stream that starts at `start`; returns the offset where it ended."""
        num, offset = first, start
        pending = b""
        # Known pieces first, at their known boundaries.
        while num < cut_num:
            want = known[num].length
            while len(pending) < want:
                batch = await anext(chunks, None)
                if batch is None:
                    raise SourceError(f"origin body ended early at byte {offset + len(pending)}", transient=True)
                chunk = b"".join(batch)
                reader.bytes_read += len(chunk)
                pending += chunk
            data, pending = pending[:want], pending[want:]
            if num not in have:
                await reader._emit(known, num, offset, data, on_piece)
            num, offset = num + 1, offset + want
        cutter = Cutter(average_for(reader.content_length), cut_at)
        emitted = [num]
        loop = asyncio.get_running_loop()

        async def emit(parts):
            for off, data, dg in parts:
                n = emitted[0]
                prior = known.get(n)
                if prior is not None and (prior.digest != dg or prior.offset != off):
                    raise IntegrityError(f"origin content changed: piece {n} differs from the manifest")
                await on_piece(PieceInfo(n, off, len(data), dg), data)
                emitted[0] += 1

        # Cutting and hashing run in a worker thread (both release the GIL for the heavy part)
        # while the loop keeps receiving the stream.
        await emit(await loop.run_in_executor(None, _cut_hash, cutter, [pending], False))
        async for batch in chunks:
            reader.bytes_read += sum(len(c) for c in batch)
            await emit(await loop.run_in_executor(None, _cut_hash, cutter, batch, False))
        end = cutter.base + cutter.pending
        await emit(await loop.run_in_executor(None, _cut_hash, cutter, [], True))
        return end

    scheme = urlsplit(reader.url).scheme.lower()
    if scheme == "file":
        fd, path = open_file_url(reader.url)
        try:
            size = meta.content_length = reader.content_length = os.fstat(fd).st_size

            async def file_chunks():
                pos = start
                while pos < size:
                    data = os.pread(fd, min(READ_BYTES, size - pos), pos)
                    if not data:
                        break
                    pos += len(data)
                    yield [data]
                    await asyncio.sleep(0)

            end = await pieces(file_chunks())
        finally:
            os.close(fd)
        if end != size:
            raise SourceError(f"{path} changed while reading")
        return meta

    hdrs = dict(reader.headers)
    if start > 0:
        hdrs["Range"] = f"bytes={start}-"
    async with session.get(reader.url, headers=hdrs, allow_redirects=True, timeout=reader.timeout) as resp:
        meta.etag = resp.headers.get("ETag", "")
        meta.content_type = resp.headers.get("Content-Type", "")
        if resp.status == 416 and start > 0:
            total = _range_total(resp.headers.get("Content-Range", ""))
            if total == start:  # everything is held already
                meta.content_length = reader.content_length = total
                return meta
        reader._check_status(resp)
        skip = 0
        if resp.status == 206:
            total = _range_total(resp.headers.get("Content-Range", ""))
            if total < 0:
                raise SourceError("origin sent 206 without a usable Content-Range")
        elif resp.status == 200:
            total = resp.content_length if resp.content_length is not None else -1
            skip = start  # no range support: read past what we have
        else:
            raise SourceError(f"origin answered {resp.status} for {_safe(reader.url)}")
        meta.content_length = reader.content_length = total

        async def http_chunks():
            """Batches of about READ_BYTES (one thread hop each), as received."""
            left = skip
            batch, got = [], 0
            while True:
                chunk = await resp.content.read(READ_BYTES)
                if not chunk:
                    break
                if left:
                    reader.bytes_read += min(left, len(chunk))
                    if len(chunk) <= left:
                        left -= len(chunk)
                        continue
                    chunk, left = chunk[left:], 0
                batch.append(chunk)
                got += len(chunk)
                if got >= READ_BYTES:
                    yield batch
                    batch, got = [], 0
            if batch:
                yield batch

        end = await pieces(http_chunks())
    if total >= 0 and end != total:
        raise SourceError(f"origin body ended early at byte {end}", transient=True)
    meta.content_length = reader.content_length = end
    return meta
