"""Back-to-source: read a task's bytes from its origin (HTTP, HTTPS, file://) and cut pieces.

The reader decides piece boundaries when nobody has yet (`choose_piece_length`), or follows the
boundaries of a manifest that already exists (a peer that takes over the source role, or a
restarted peer resuming). It only requests the byte ranges of pieces the peer lacks, so the
origin serves each byte once per cluster.

HTTP: the first request is a small Range probe (64 KiB from the first piece the peer lacks,
`bytes=0-65535` for a fresh download). A 206 answer tells the size
and that ranges work; the rest is then read as up to `connections` Range requests in parallel,
each covering a contiguous run of pieces. A 200 answer means no range support: the body is
streamed once and cut as it arrives. No request ever asks for more bytes than it will use,
so the origin's byte count equals the file size.

It never holds more than one piece per connection in memory, and never writes anything itself:
pieces go to the `on_piece` callback.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import re
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import unquote, urlsplit

import aiohttp
import blake3

from dfzmq.errors import IntegrityError, SourceError
from dfzmq.wire import MAX_PIECE, MIN_PIECE, PieceInfo

log = logging.getLogger(__name__)

TARGET_PIECES = 512
CAPPED_PIECES_MAX = 16384  # a `max_piece_length` yields where a file would need more pieces than this
PROBE_BYTES = 64 * 1024
DEFAULT_PIECE = 4 * 1024 * 1024  # when the origin does not say how long the file is

OnPiece = Callable[[PieceInfo, bytes], Awaitable[None]]
# Origin response headers that travel with a task (scheduler manifest, the peer's store), so a
# proxy on any peer answers with them as the origin gave them (issue 4).
REPLAY_HEADERS = ("Content-Type", "ETag", "Last-Modified", "Content-Encoding", "Content-Disposition")


def origin_meta(headers) -> dict[str, str]:
    """The replayed headers of an origin answer (lower-case names), plus status 200: the status
    a whole-body GET of the task is answered with."""
    meta = {"status": "200"}
    for name in REPLAY_HEADERS:
        value = headers.get(name)
        if value:
            meta[name.lower()] = value[:1024]
    return meta


def open_file_url(url: str) -> tuple[int, str]:
    """A read-only descriptor of a file:// URL's file, and its path; SourceError (one line) when
    it can't be opened."""
    path = unquote(urlsplit(url).path)
    try:
        return os.open(path, os.O_RDONLY), path
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror}") from e


def choose_piece_length(content_length: int, max_piece: int = 0) -> int:
    """A power of two that gives about TARGET_PIECES pieces, within [64 KiB, 16 MiB], and no
    longer than `max_piece` (0 = no cap) while that makes at most CAPPED_PIECES_MAX pieces.

    Swarm time grows like (1 + log2(N)/M) with M pieces (DESIGN.md), so M should be in the
    hundreds; below 64 KiB per-piece overhead dominates, above 16 MiB memory per transfer does.
    The cap is the `max_piece_length` setting, for slow links: a piece is the unit a congested
    parent hands its uplink out in (nodes/uplink.py), and at 12.5 Mbit/s a 1 MiB piece holds
    one of its few slots for over half a second. In the network lab (N=16, 512 MiB) 1 MiB
    pieces took 1.26 of the bound and 256 KiB pieces 1.08. Not the default: every piece costs
    CPU on the way (a warm 1 GiB fetch on loopback took 4.7-7.3 CPU-s in 512 KiB pieces against
    2.1-2.5 in 2 MiB ones), and on fast links a long piece takes milliseconds (README).
    """
    if content_length < 0:
        return DEFAULT_PIECE
    length = _pow2_at_least(content_length // TARGET_PIECES)
    if max_piece > 0:
        length = min(length, max(max_piece, _pow2_at_least(content_length // CAPPED_PIECES_MAX)))
    return max(MIN_PIECE, min(MAX_PIECE, length))


def _pow2_at_least(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def digest(data: bytes) -> str:
    # One thread: with max_threads=AUTO rayon's workers spin in sched_yield between pieces (42k
    # calls in a 512 MiB fetch) and took 1.5x the CPU for no gain in wall time, on hosts where
    # the transfer itself (sender, receiver, client) already keeps every core busy.
    return blake3.blake3(data).hexdigest()


def plan(content_length: int, known: dict[int, PieceInfo], max_piece: int = 0) -> list[tuple[int, int, int]]:
    """(num, offset, length) of every piece up to `content_length`.

    Known manifest entries keep their boundaries (they may have gaps: parallel readers and
    parents fill pieces in any order); missing pieces are cut at the manifest's piece length,
    never across the start of the next known piece, or at a chosen length when nothing is known
    (`choose_piece_length`, capped at `max_piece`).
    """
    if known:
        # A piece's offset over its number is the cut length too: a manifest that so far holds
        # only the short last piece must not cut the whole file at that length.
        piece_length = max([p.length for p in known.values()]
                           + [p.offset // p.num for p in known.values() if p.num]) or choose_piece_length(content_length, max_piece)
        end = max(content_length, max(p.offset + p.length for p in known.values()))
    else:
        piece_length = choose_piece_length(content_length, max_piece)
        end = content_length
    starts = sorted(p.offset for p in known.values())
    out: list[tuple[int, int, int]] = []
    num = offset = 0
    while offset < end:
        p = known.get(num)
        if p is not None:
            if p.offset != offset:
                raise IntegrityError(f"manifest is inconsistent at piece {num}; cannot resume from the origin")
            length = p.length
        else:
            i = bisect.bisect_right(starts, offset)
            next_start = starts[i] if i < len(starts) else end
            length = min(piece_length, end - offset, next_start - offset)
        out.append((num, offset, length))
        num, offset = num + 1, offset + length
    return out


def groups(missing: list[tuple[int, int, int]], connections: int) -> list[list[tuple[int, int, int]]]:
    """Split missing pieces into at most `connections` runs of contiguous pieces, balanced by bytes."""
    runs: list[list[tuple[int, int, int]]] = []
    for p in missing:
        if runs and runs[-1][-1][1] + runs[-1][-1][2] == p[1]:
            runs[-1].append(p)
        else:
            runs.append([p])
    total = sum(p[2] for p in missing)
    if not total:
        return runs
    share = max(1, total // max(1, connections))
    out: list[list[tuple[int, int, int]]] = []
    for run in runs:
        cur: list[tuple[int, int, int]] = []
        size = 0
        for p in run:
            cur.append(p)
            size += p[2]
            if size >= share:
                out.append(cur)
                cur, size = [], 0
        if cur:
            out.append(cur)
    return out


@dataclass
class SourceResult:
    content_length: int
    etag: str = ""
    content_type: str = ""
    meta: dict | None = None  # origin_meta() of the probe, when there was one


class SourceReader:
    """Reads one task from its origin. One instance per back-to-source attempt."""

    def __init__(self, url: str, headers: dict[str, str], connections: int = 4,
                 session: aiohttp.ClientSession | None = None, timeout_s: float = 60.0,
                 cdc: bool = False, max_piece: int = 0) -> None:
        self.url = url
        self.max_piece = max_piece  # longest piece when this reader cuts a new task (0 = no cap)
        self.cdc = cdc  # content-defined pieces, one sequential stream (nodes/cdcsource.py)
        self.headers = dict(headers)
        self.connections = max(1, connections)
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(15.0, timeout_s), sock_read=timeout_s)
        self.session = session
        self.bytes_read = 0
        self.content_length = -1  # known once the origin has said (before the first piece)
        self.meta: dict[str, str] = {}  # origin_meta(), known with content_length (probe or file)

    async def run(self, known: dict[int, PieceInfo], have: set[int], content_length: int,
                  on_piece: OnPiece) -> SourceResult:
        scheme = urlsplit(self.url).scheme.lower()
        if scheme == "file":
            if self.cdc:
                from nodes.cdcsource import run_cdc
                return await run_cdc(self, None, known, have, content_length, on_piece)
            return await self._run_file(known, have, on_piece)
        if scheme == "cache":  # `dfzmq cache import` entries have no origin (nodes/ops.py)
            raise SourceError(f"{self.url}: no peer in the cluster holds this cache entry", final=True)
        if scheme not in ("http", "https"):
            raise SourceError(f"unsupported URL scheme {scheme!r} in {self.url}")
        own = self.session is None
        session = self.session or aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=60),
            auto_decompress=False,
        )
        try:
            if self.cdc:
                from nodes.cdcsource import run_cdc
                return await run_cdc(self, session, known, have, content_length, on_piece)
            return await self._run_http(session, known, have, content_length, on_piece)
        except aiohttp.InvalidURL as e:
            raise SourceError(f"invalid URL: {e}") from e
        except aiohttp.ClientConnectorDNSError as e:
            raise SourceError(f"cannot resolve {urlsplit(self.url).hostname}: {e.os_error or e}") from e
        except aiohttp.ClientConnectorError as e:
            raise SourceError(f"cannot reach {urlsplit(self.url).netloc}: {e.os_error or e}", transient=True) from e
        except asyncio.TimeoutError as e:
            raise SourceError(f"origin timed out (nothing for {self.timeout.sock_read:.0f}s)", transient=True) from e
        except aiohttp.ClientError as e:
            raise SourceError(f"origin transfer failed: {type(e).__name__}: {e}", transient=True) from e
        finally:
            if own:
                await session.close()

    # -- file:// ----------------------------------------------------------------------------

    async def _run_file(self, known, have, on_piece) -> SourceResult:
        fd, path = open_file_url(self.url)
        try:
            size = self.content_length = os.fstat(fd).st_size
            self.meta = {"status": "200"}
            for num, offset, length in plan(size, known, self.max_piece):
                if num in have:
                    continue
                data = os.pread(fd, length, offset)
                if len(data) != length:
                    raise SourceError(f"{path} changed while reading")
                self.bytes_read += length
                await self._emit(known, num, offset, data, on_piece)
        finally:
            os.close(fd)
        return SourceResult(size)

    # -- HTTP ----------------------------------------------------------------------------------

    def _check_status(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status >= 400:
            raise SourceError(f"origin answered {resp.status} {resp.reason or ''} for {_safe(self.url)}".strip(),
                              transient=resp.status >= 500 or resp.status in (408, 429),
                              final=400 <= resp.status < 500 and resp.status not in (408, 429))

    async def _run_http(self, session, known, have, content_length, on_piece) -> SourceResult:
        meta = SourceResult(content_length)
        self.content_length = content_length
        probe = b""
        probe_at = _probe_start(known, have)
        if content_length < 0:
            hdrs = {**self.headers, "Range": f"bytes={probe_at}-{probe_at + PROBE_BYTES - 1}"}
            async with session.get(self.url, headers=hdrs, allow_redirects=True, timeout=self.timeout) as resp:
                meta.etag = resp.headers.get("ETag", "")
                meta.content_type = resp.headers.get("Content-Type", "")
                if resp.status in (200, 206, 416):
                    meta.meta = self.meta = origin_meta(resp.headers)
                if resp.status == 416:
                    total = _range_total(resp.headers.get("Content-Range", ""))
                    if total != 0 and not 0 < total <= probe_at:
                        raise SourceError(f"origin refused the range probe (416) for {_safe(self.url)}")
                    meta.content_length = self.content_length = total  # 0, or every piece held
                    return meta
                self._check_status(resp)
                if resp.status == 200:
                    # No range support: one stream, cut as it arrives.
                    length = resp.content_length if resp.content_length is not None else -1
                    self.content_length = length
                    meta.content_length = await self._stream(resp, known, have, length, on_piece)
                    return meta
                if resp.status != 206:
                    raise SourceError(f"origin answered {resp.status} to a range request")
                total = _range_total(resp.headers.get("Content-Range", ""))
                if total < 0:
                    raise SourceError("origin sent 206 without a usable Content-Range")
                probe = await resp.content.read()
                self.bytes_read += len(probe)
                meta.content_length = self.content_length = total
        pieces = plan(meta.content_length, known, self.max_piece)
        missing = [p for p in pieces if p[0] not in have]
        # Bytes already read by the probe belong to the pieces they cover.
        if probe:
            while missing and probe_at <= missing[0][1] and missing[0][1] + missing[0][2] <= probe_at + len(probe):
                num, offset, length = missing.pop(0)
                await self._emit(known, num, offset, probe[offset - probe_at:offset - probe_at + length], on_piece)
        jobs = groups(missing, self.connections)
        await asyncio.gather(*(self._range(session, g, known, probe, probe_at, on_piece) for g in jobs))
        return meta

    async def _range(self, session, group, known, probe: bytes, probe_at: int, on_piece) -> None:
        start = group[0][1]
        end = group[-1][1] + group[-1][2]
        prefix = b""
        if probe_at <= start < probe_at + len(probe):
            prefix = probe[start - probe_at:]
        req_start = start + len(prefix)
        hdrs = {**self.headers, "Range": f"bytes={req_start}-{end - 1}"}
        async with session.get(self.url, headers=hdrs, allow_redirects=True, timeout=self.timeout) as resp:
            self._check_status(resp)
            if resp.status == 200:
                # The origin stopped honouring ranges: skip to where we need to be.
                skipped = 0
                while skipped < req_start:
                    chunk = await resp.content.read(min(1 << 20, req_start - skipped))
                    if not chunk:
                        raise SourceError("origin body ended early", transient=True)
                    skipped += len(chunk)
                    self.bytes_read += len(chunk)
            elif resp.status != 206:
                raise SourceError(f"origin answered {resp.status} to a range request")
            for i, (num, offset, length) in enumerate(group):
                want = length - (len(prefix) if i == 0 else 0)
                try:
                    data = await resp.content.readexactly(want)
                except asyncio.IncompleteReadError as e:
                    raise SourceError(f"origin body ended early at byte {offset + len(e.partial)}",
                                      transient=True) from e
                self.bytes_read += want
                if i == 0 and prefix:
                    data = prefix + data
                await self._emit(known, num, offset, data, on_piece)

    async def _stream(self, resp, known, have, length: int, on_piece) -> int:
        """Cut a whole-body stream. Returns the content length actually read."""
        piece_length = known[0].length if 0 in known else choose_piece_length(length, self.max_piece)
        num = offset = 0
        while True:
            if length >= 0:
                want = min(piece_length, length - offset)
                if want <= 0:
                    break
                try:
                    data = await resp.content.readexactly(want)
                except asyncio.IncompleteReadError as e:
                    raise SourceError(f"origin body ended early at byte {offset + len(e.partial)}",
                                      transient=True) from e
            else:
                data = await _read_up_to(resp.content, piece_length)
                if not data:
                    break
            self.bytes_read += len(data)
            if num not in have:
                await self._emit(known, num, offset, data, on_piece)
            num, offset = num + 1, offset + len(data)
        return offset

    async def _emit(self, known, num, offset, data, on_piece) -> None:
        info = PieceInfo(num, offset, len(data), digest(data))
        prior = known.get(num)
        if prior is not None and (prior.digest != info.digest or prior.offset != offset):
            raise IntegrityError(f"origin content changed: piece {num} differs from the manifest")
        await on_piece(info, data)


def _probe_start(known: dict[int, PieceInfo], have: set[int]) -> int:
    """Where the first piece the peer lacks starts, as far as the manifest tells (else 0), so
    that the probe reads bytes the peer needs rather than bytes it already holds."""
    num = offset = 0
    while num in have and num in known:
        offset = known[num].offset + known[num].length
        num += 1
    return offset


async def _read_up_to(stream: aiohttp.StreamReader, n: int) -> bytes:
    parts = []
    got = 0
    while got < n:
        chunk = await stream.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


_RANGE = re.compile(r"bytes\s+(?:\d+-\d+|\*)/(\d+)")


def _range_total(value: str) -> int:
    m = _RANGE.match(value.strip())
    return int(m.group(1)) if m else -1


def _safe(url: str) -> str:
    """The URL without its query string (which may carry credentials), for messages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
