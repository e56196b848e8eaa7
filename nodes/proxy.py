"""The daemon's HTTP proxy (and the front door of the registry mirror), on 127.0.0.1 by default.

One asyncio server, HTTP/1.1 parsed by h11 (keep-alive, chunked bodies, CONNECT), three ways:
- a GET of an http:// URL that matches a rule (`proxy_rules`, URL regexes) is served from the
  P2P task of that URL: the origin's status, Content-Length, Content-Type, ETag (and the other
  headers in nodes/source.REPLAY_HEADERS) as the origin gave them, carried with the task, so a
  peer that never read the origin answers the same; the body streams as pieces are stored
  (nodes/stream.py), in order, while the task downloads;
- Range: answered 206 from the pieces that cover it when this daemon holds or is fetching the
  task; otherwise, with `proxy_prefetch` the whole task starts (P2P) and the range is answered
  from its pieces as they come, without it the range passes through to the origin (the cluster
  would otherwise read the whole file for a few bytes);
- everything else (other methods, unmatched URLs, CONNECT tunnels) passes through to its
  destination, streamed both ways, headers and body untouched except hop-by-hop headers;
  origin-form requests for `/v2/...` go to the registry mirror (nodes/registry.py).

Errors: an origin that refuses a P2P task (4xx) is asked again directly and its own answer is
relayed (status, headers, body: the client sees exactly what the origin says); any other
failure before the answer started is a 502 with a one-line reason; after it started, the
connection is cut, so a client never takes a short body for a whole one.

A matched URL that the origin redirects is fetched from where it points (the task is the
content of the URL the client asked for). An origin that does not say how long the body is
(chunked, no Content-Length) is answered once the task is complete: Content-Length comes first.

Request headers go to the origin (they travel with the task to the seed peer, as in Dragonfly)
and are never logged; URLs are logged without their query string (it may hold a signature).
HTTPS through CONNECT is a tunnel: the proxy cannot see those URLs, so they are never P2P.
The proxy has no authentication of its own: it must listen on loopback or a trusted network.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, AsyncIterator

import aiohttp
import h11
from multidict import CIMultiDict
from yarl import URL

from dfzmq import ids
from dfzmq.errors import ConfigError, DfzmqError, IntegrityError, SourceError
from nodes import httprules, memtune
from nodes.source import REPLAY_HEADERS, _safe
from nodes.stream import HoldBudget, StreamSink

if TYPE_CHECKING:
    from nodes.daemon import Daemon

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024  # request line and headers
REPLAY = {h.title() for h in REPLAY_HEADERS}
CHUNK = 256 * 1024
RELEASE_AFTER_BYTES = 64 << 20  # a stream that held this much: free heap memory goes back after it
IDLE_TIMEOUT_S = 120.0  # a keep-alive connection with no request for this long is closed


def parse_listen(value: str) -> tuple[str, int]:
    """'HOST:PORT' or 'PORT' (on 127.0.0.1). Raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    return host.strip("[]") or "127.0.0.1", int(port)


class ClientGone(Exception):
    """The client closed its connection (or sent something we cannot parse)."""


class BadRequest(ClientGone):
    """The client sent bytes that are not HTTP/1.1: answered 400 (when we still can), counted."""


class Exchange:
    """One HTTP connection from a client: h11 state plus the stream under it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.started = False  # a response head went out for the current request

    async def next_event(self, timeout_s: float | None = None) -> Any:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                raise BadRequest(f"bad request: {e}") from e
            if event is not h11.NEED_DATA:
                return event
            data = await asyncio.wait_for(self.reader.read(CHUNK), timeout_s)
            self.conn.receive_data(data)

    async def send(self, event: Any) -> None:
        for part in self.conn.send_with_data_passthrough(event):
            self.writer.write(part)
        await self.writer.drain()

    async def respond(self, status: int, headers: list[tuple[str, str]], reason: str = "") -> None:
        self.started = True
        if not reason:
            try:
                reason = HTTPStatus(status).phrase
            except ValueError:
                reason = ""
        await self.send(h11.Response(status_code=status, headers=headers, reason=reason.encode("latin-1", "replace")))

    async def simple(self, status: int, text: str, headers: list[tuple[str, str]] = ()) -> None:
        body = (text + "\n").encode()
        await self.respond(status, [("Content-Type", "text/plain; charset=utf-8"),
                                    ("Content-Length", str(len(body))), *headers])
        await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def body(self) -> AsyncIterator[bytes]:
        """The request body, as it arrives."""
        while True:
            event = await self.next_event(IDLE_TIMEOUT_S)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise ClientGone("connection closed in the request body")

    async def drain_request(self) -> None:
        """Read what is left of the request (h11 needs it before the next request)."""
        while self.conn.their_state is h11.SEND_BODY:
            event = await self.next_event(IDLE_TIMEOUT_S)
            if isinstance(event, h11.ConnectionClosed):
                raise ClientGone("closed")


def _strs(headers: Any) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]


class ProxyServer:
    def __init__(self, daemon: "Daemon") -> None:
        from nodes.registry import RegistryMirror

        self.daemon = daemon
        self.cfg = daemon.cfg
        try:
            self.rules = httprules.Rules(self.cfg.proxy_rules)
            parse_listen(self.cfg.proxy_listen)
        except ValueError as e:
            raise ConfigError(f"proxy: {e}") from None
        self.filters = tuple(self.cfg.proxy_filter_params)
        self.registry = RegistryMirror(self, self.cfg.registry_mirrors)
        self.counters = daemon.counters
        self.server: asyncio.base_events.Server | None = None
        self.addr = ""
        self.session: aiohttp.ClientSession | None = None
        self._conns: set[asyncio.Task] = set()
        self.streaming: collections.Counter[str] = collections.Counter()  # task id -> clients reading it
        self.hold = HoldBudget(self.cfg.proxy_hold_bytes)  # pieces kept for clients behind their download
        self.readers: dict[str, collections.Counter[int]] = {}  # task id -> start offsets of clients reading it

    async def start(self) -> None:
        host, port = parse_listen(self.cfg.proxy_listen)
        # Pass-through requests: redirects and compressed bodies go to the client as they are,
        # and no cookie is kept between clients.
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=300),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        try:
            self.server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        except OSError as e:
            await self.session.close()
            raise ConfigError(f"proxy cannot listen on {host}:{port}: {e.strerror}") from None
        sock = self.server.sockets[0].getsockname()
        self.addr = f"{sock[0]}:{sock[1]}"
        log.info("proxy listening on %s (%d rule(s), registry mirrors: %s)", self.addr,
                 len(self.rules.patterns), ", ".join(self.cfg.registry_mirrors) or "none")

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*list(self._conns), return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    # -- connections ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        ex = Exchange(reader, writer)
        try:
            while True:
                event = await ex.next_event(IDLE_TIMEOUT_S)
                if not isinstance(event, h11.Request):
                    break
                ex.started = False
                self.counters["proxy.requests"] += 1
                tunnel = await self._handle(ex, event)
                if tunnel or ex.conn.our_state is not h11.DONE:
                    break
                await ex.drain_request()
                if ex.conn.our_state is not h11.DONE or ex.conn.their_state is not h11.DONE:
                    break
                ex.conn.start_next_cycle()
        except BadRequest as e:
            self.counters["proxy.bad-request"] += 1
            log.debug("proxy: %s", e)
            if not ex.started:
                try:
                    await ex.simple(400, "dfzmq proxy: bad request")
                except (h11.LocalProtocolError, ConnectionError):
                    pass
        except (ClientGone, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                h11.LocalProtocolError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            self.counters["proxy.errors"] += 1
            log.exception("proxy connection failed")
        finally:
            self._conns.discard(task)
            writer.close()

    async def _handle(self, ex: Exchange, req: h11.Request) -> bool:
        """Serve one request. True when the connection became a tunnel (and is now finished)."""
        method = req.method.decode("latin-1")
        target = req.target.decode("latin-1")
        headers = _strs(req.headers)
        log.debug("proxy %s %s", method, target if method == "CONNECT" else _safe(target))
        try:
            if method == "CONNECT":
                await self._tunnel(ex, target)
                return True
            if target.startswith("/"):
                if target.startswith("/v2") and self.registry.enabled:
                    await self.registry.handle(ex, method, target, headers)
                else:
                    await ex.simple(404, "dfzmq proxy: use this address as an HTTP proxy"
                                    + (" or registry mirror" if self.registry.enabled else ""))
                return False
            if self.rules.match(method, target):
                tag = httprules.header(headers, httprules.TAG_HEADER) or ""
                app = httprules.header(headers, httprules.APPLICATION_HEADER) or ""
                tid = ids.task_id(target, tag, app, extra_filters=self.filters)
                await self.serve_task(ex, tid, target, headers, tag, app)
            else:
                await self.passthrough(ex, method, target, headers)
        except (ClientGone, ConnectionError):
            raise
        except Exception as e:
            if isinstance(e, DfzmqError):
                log.warning("proxy %s %s: %s", method, _safe(target), e)
            else:
                log.exception("proxy %s %s failed", method, _safe(target))
            self.counters["proxy.failed"] += 1
            if ex.started:
                raise ClientGone("cut after a failure mid-answer") from e
            await ex.simple(502, f"dfzmq proxy: {e}")
        return False

    # -- P2P --------------------------------------------------------------------------------

    async def serve_task(self, ex: Exchange, tid: str, url: str, headers: list[tuple[str, str]],
                         tag: str = "", application: str = "", expected: str = "",
                         extra: list[tuple[str, str]] = ()) -> None:
        """Answer a GET from the P2P task `tid` (fetching it through the cluster if needed)."""
        d = self.daemon
        rng = httprules.header(headers, "range")
        if rng is not None and not self.cfg.proxy_prefetch and tid not in d.tasks and not self._held(tid):
            self.counters["proxy.range-passthrough"] += 1
            await self.passthrough(ex, "GET", url, headers)
            return
        run, new = d.require_task(tid, url, httprules.origin_headers(headers), tag, application)
        d.gc.note_access(tid)
        sink = StreamSink(asyncio.get_running_loop(), d.store, expected, self.hold)
        try:
            await run.attach(sink)
        except BaseException:
            if new:
                d.task_finished(run)
            raise
        if new:
            d._spawn_start(run)
        self.streaming[tid] += 1  # GC leaves the task alone while a client reads it
        try:
            await self._answer_task(ex, run, sink, url, headers, list(extra))
        finally:
            self.streaming[tid] -= 1
            if self.streaming[tid] <= 0:
                del self.streaming[tid]
            try:
                await run._in_writer(run._detach, sink, True)
            except Exception:
                pass

    def _held(self, tid: str) -> bool:
        meta = self.daemon.store.get_task(tid)
        return bool(meta and meta.get("complete") and len(self.daemon.held(tid)) == meta.get("piece_count", -1))

    async def _answer_task(self, ex: Exchange, run: Any, sink: StreamSink, url: str,
                           headers: list[tuple[str, str]], extra: list[tuple[str, str]]) -> None:
        waiter = asyncio.ensure_future(run.meta_event.wait())
        try:
            await asyncio.wait([waiter, run.done], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not run.meta_event.is_set():
            err = run.done.exception()
            if isinstance(err, SourceError) and err.final:
                # The origin refused (4xx): the client gets the origin's own answer.
                self.counters["proxy.origin-refused"] += 1
                await self.passthrough(ex, "GET", url, headers)
                return
            raise err if isinstance(err, BaseException) else DfzmqError("task ended without content")
        meta = run.origin_meta
        length = run.content_length
        etag = meta.get("etag", "")
        # Metadata came from another peer through the scheduler: only the known names, and no
        # value that could split a header.
        common = [("ETag" if k == "etag" else k.title(), v) for k, v in meta.items()
                  if k.title() in REPLAY and v.isprintable()]
        common += [("Accept-Ranges", "bytes"), ("X-Dfzmq-Task", run.task_id[:16]), *extra]
        if httprules.etag_matches(httprules.header(headers, "if-none-match"), etag):
            await ex.respond(304, [h for h in common if h[0] in ("ETag", "Last-Modified")])
            await ex.send(h11.EndOfMessage())
            return
        ans = httprules.answer_range(httprules.header(headers, "range"), httprules.header(headers, "if-range"),
                                     etag, length)
        if ans.status == 416:
            await ex.respond(416, [("Content-Range", f"bytes */{length}"), ("Content-Length", "0")])
            await ex.send(h11.EndOfMessage())
            return
        out = [*common, ("Content-Length", str(ans.end - ans.start))]
        if ans.status == 206:
            out.append(("Content-Range", f"bytes {ans.start}-{ans.end - 1}/{length}"))
            self.counters["proxy.p2p-range"] += 1
        else:
            self.counters["proxy.p2p"] += 1
        await ex.respond(ans.status, out)  # 200: what a whole-body GET of the task got from the origin
        self._reading(run, ans.start, +1)
        try:
            # Closed as soon as the client goes (its held pieces freed now, not by the GC).
            async with contextlib.aclosing(sink.body(ans.start, ans.end, verify=(ans.status == 200))) as body:
                async for chunk in body:
                    await ex.send(h11.Data(data=chunk))  # h11 passes the buffer through uncopied
        except IntegrityError:
            # Stored bytes that do not match the blob's digest (its run checked them, so the
            # store changed since): delete them, so the next pull reads the registry afresh.
            self.counters["proxy.digest-mismatch"] += 1
            await asyncio.wait([run.done])  # whole here, so ending; then nothing writes to it
            if self.daemon.tasks.get(run.task_id) is None:
                await run._in_writer(self.daemon.store.delete_task, run.task_id)
                self.daemon.forget(run.task_id)
            raise
        finally:
            self._reading(run, ans.start, -1)
            if sink.held_peak >= RELEASE_AFTER_BYTES and self.hold.used == 0:
                # The frames it held are free now, but glibc keeps such memory for reuse.
                asyncio.get_running_loop().run_in_executor(None, memtune.release)
        await ex.send(h11.EndOfMessage())
        self.counters["proxy.p2p-bytes"] += ans.end - ans.start

    def _reading(self, run: Any, offset: int, delta: int) -> None:
        """A client starts (+1) or stops (-1) reading `run` in order from `offset`: while any
        does, the run's picker asks for pieces in order from the lowest such offset."""
        starts = self.readers.setdefault(run.task_id, collections.Counter())
        starts[offset] += delta
        if starts[offset] <= 0:
            del starts[offset]
        if not starts:
            del self.readers[run.task_id]
        run.picker.stream_offset = min(starts) if starts else -1
        if starts and delta > 0:
            run._pump()

    # -- pass-through -----------------------------------------------------------------------

    async def passthrough(self, ex: Exchange, method: str, url: str, headers: list[tuple[str, str]],
                          extra: list[tuple[str, str]] = ()) -> None:
        """Forward a request to its destination and stream the answer back untouched."""
        fwd = [(n, v) for n, v in httprules.end_to_end(headers) if n.lower() != "host"]
        fwd += list(extra)
        has_body = ex.conn.their_state is h11.SEND_BODY
        if has_body and ex.conn.they_are_waiting_for_100_continue:
            await ex.send(h11.InformationalResponse(status_code=100, headers=[]))
        names = {n.lower() for n, _ in fwd}
        skip = [h for h in ("User-Agent", "Accept-Encoding", "Accept") if h.lower() not in names]
        self.counters["proxy.passthrough"] += 1
        try:
            async with self.session.request(method, URL(url, encoded=True), headers=CIMultiDict(fwd),
                                            data=ex.body() if has_body else None, allow_redirects=False,
                                            skip_auto_headers=skip, compress=None) as resp:
                out = [(n, v) for n, v in httprules.end_to_end(_strs(resp.raw_headers))]
                await ex.respond(resp.status, out, resp.reason or "")
                async for chunk in resp.content.iter_chunked(CHUNK):
                    await ex.send(h11.Data(data=chunk))
                await ex.send(h11.EndOfMessage())
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            if ex.started:
                raise ClientGone("origin failed mid-answer") from e
            self.counters["proxy.passthrough-failed"] += 1
            await ex.simple(502, f"dfzmq proxy: cannot reach {_safe(url)}: {type(e).__name__}: {e}")

    async def _tunnel(self, ex: Exchange, target: str) -> None:
        host, _, port = target.rpartition(":")
        try:
            r2, w2 = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 15)
        except (OSError, ValueError, asyncio.TimeoutError) as e:
            self.counters["proxy.connect-failed"] += 1
            await ex.simple(502, f"dfzmq proxy: cannot connect to {target}: {e}")
            return
        self.counters["proxy.connect"] += 1
        await ex.respond(200, [], "Connection Established")
        rest, _ = ex.conn.trailing_data
        if rest:
            w2.write(rest)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(CHUNK):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    if dst.can_write_eof():
                        dst.write_eof()
                except (ConnectionError, OSError):
                    pass

        try:
            await asyncio.gather(pump(ex.reader, w2), pump(r2, ex.writer))
        finally:
            w2.close()
