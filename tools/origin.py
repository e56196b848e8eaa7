"""A counting HTTP origin for dfzmq's tests, demo and benchmarks.

It serves the files under one root directory over plain HTTP (GET and HEAD, a single byte
range, ETag / Last-Modified / If-Range) and counts the file bytes it actually sends, per path
and in total, so a test can assert "the origin served the file's bytes once". Switches that
tests flip at start or at run time: a global rate limit (token bucket), a forced status per
path, an origin without range support, and a required request header (-> 401 otherwise).

Two ways to run it:
- in-process: `with Origin(root) as origin: origin.url("big.bin"); origin.stats()` runs the
  aiohttp app on its own event loop in a daemon thread, on 127.0.0.1 and an ephemeral port;
- as a process: `python -m tools.origin --root DIR [--port 0] [--port-file PATH]` prints
  `origin listening on http://HOST:PORT` and stops cleanly on SIGTERM / SIGINT.

HTTP control endpoints (no auth, like everything here): `GET /_stats`, `POST /_reset`,
`POST /_config` with JSON `{"rate_bytes_per_s": int|null, "statuses": {path: code|null},
"ignore_range": bool, "required_header": [name, value]|null}` (statuses merge; null clears). With `listing`
(`--listing`), GET on a directory answers an nginx-style HTML index (for `dfzmq sync`).

Choices worth knowing:
- "bytes" counts file content handed to the kernel. A chunk whose write fails is not counted,
  so a client that disconnects early is counted for what was sent plus at most the socket
  buffers (a few MiB on loopback), never for the whole file. Error bodies are not counted.
- A counted chunk is counted just before it is written, so a client that has read the whole
  body always sees it in `stats()`.
- A zero-length file is answered 200 with an empty body whatever its Range header says.
- A multi-range, malformed or non-bytes Range header is ignored (200 with the whole body).

What it must never do: be a production server. It binds loopback unless told otherwise, has
no TLS and no real auth, never serves anything outside its root (no `..`, no symlink escape),
and never holds a whole file in memory (bodies stream in chunks of at most 256 KiB).
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import enum
import mimetypes
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

CHUNK_BYTES = 256 * 1024
CONTROL_PATHS = ("/_stats", "/_reset", "/_config")


# --- pure parts: range decisions, the token bucket, the counters ------------------------------


class RangeKind(enum.Enum):
    FULL = "full"  # 200, whole body
    PARTIAL = "partial"  # 206, bytes start..end inclusive
    UNSATISFIABLE = "unsatisfiable"  # 416


@dataclass(frozen=True, slots=True)
class RangeDecision:
    kind: RangeKind
    start: int = 0
    end: int = -1  # inclusive; -1 with start 0 means an empty body


def parse_range(header: str | None, size: int) -> RangeDecision:
    """Decide how to answer `Range: header` for a body of `size` bytes (RFC 9110, one range)."""
    full = RangeDecision(RangeKind.FULL, 0, size - 1)
    if header is None or size == 0:
        return full
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return full
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return full
    if first == "":
        if last == "":
            return full
        suffix = int(last)
        if suffix == 0:
            return RangeDecision(RangeKind.UNSATISFIABLE)
        return RangeDecision(RangeKind.PARTIAL, max(0, size - suffix), size - 1)
    start = int(first)
    if last != "" and int(last) < start:
        return full  # syntactically invalid: ignored, as RFC 9110 says
    if start >= size:
        return RangeDecision(RangeKind.UNSATISFIABLE)
    end = size - 1 if last == "" else min(int(last), size - 1)
    return RangeDecision(RangeKind.PARTIAL, start, end)


@dataclass(slots=True)
class TokenBucket:
    """Reservation-style bucket: `reserve(n, now)` takes n tokens (going into debt if needed)
    and returns how long to sleep before sending them. Concurrent senders queue behind the debt,
    so the rate is global, not per request."""

    rate: float  # bytes per second, > 0
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def start(cls, rate: float, now: float) -> TokenBucket:
        burst = max(1.0, rate / 10)
        return cls(rate=rate, burst=burst, tokens=burst, stamp=now)

    def reserve(self, n: int, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def slice_bytes(self) -> int:
        # about 20 writes a second at low rates, so the rate is smooth, not one burst a second
        return max(4096, min(CHUNK_BYTES, int(self.rate / 20)))


@dataclass(slots=True)
class PathStats:
    bytes: int = 0
    requests: int = 0


@dataclass(slots=True)
class OriginState:
    """Switches and counters shared by the handlers (loop thread) and `Origin` (test thread).
    Every access holds `lock`; each critical section is a few attribute updates."""

    rate_bytes_per_s: int | None = None
    statuses: dict[str, int] = field(default_factory=dict)
    ignore_range: bool = False
    required_header: tuple[str, str] | None = None
    listing: bool = False  # answer GET on a directory with an HTML index (autoindex), for `dfzmq sync`
    total_bytes: int = 0
    paths: dict[str, PathStats] = field(default_factory=dict)
    active: int = 0
    bucket: TokenBucket | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set_rate(self, bps: int | None) -> None:
        with self.lock:
            self.rate_bytes_per_s = bps if bps else None
            self.bucket = TokenBucket.start(bps, time.monotonic()) if bps else None

    def set_status(self, path: str, code: int | None) -> None:
        with self.lock:
            if code is None:
                self.statuses.pop(normalize_path(path), None)
            else:
                self.statuses[normalize_path(path)] = int(code)

    def configure(self, cfg: dict[str, Any]) -> None:
        """Apply a `/_config` body; raises ValueError on a malformed one (nothing applied)."""
        unknown = set(cfg) - {"rate_bytes_per_s", "statuses", "ignore_range", "required_header"}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        rate = cfg.get("rate_bytes_per_s")
        if "rate_bytes_per_s" in cfg and not (rate is None or isinstance(rate, int) and rate >= 0):
            raise ValueError("rate_bytes_per_s must be a non-negative integer or null")
        statuses = cfg.get("statuses", {})
        if not isinstance(statuses, dict) or not all(
            c is None or isinstance(c, int) and 100 <= c <= 599 for c in statuses.values()
        ):
            raise ValueError("statuses must map paths to HTTP status codes or null")
        if "ignore_range" in cfg and not isinstance(cfg["ignore_range"], bool):
            raise ValueError("ignore_range must be a boolean")
        header = cfg.get("required_header")
        if header is not None and not (
            isinstance(header, list) and len(header) == 2 and all(isinstance(h, str) for h in header)
        ):
            raise ValueError("required_header must be [name, value] or null")
        if "rate_bytes_per_s" in cfg:
            self.set_rate(rate)
        for path, code in statuses.items():
            self.set_status(path, code)
        with self.lock:
            if "ignore_range" in cfg:
                self.ignore_range = cfg["ignore_range"]
            if "required_header" in cfg:
                self.required_header = tuple(header) if header else None

    def count_request(self, path: str) -> None:
        with self.lock:
            self.paths.setdefault(path, PathStats()).requests += 1

    def count_bytes(self, path: str, n: int) -> None:
        with self.lock:
            self.paths.setdefault(path, PathStats()).bytes += n
            self.total_bytes += n

    def reserve(self, n: int) -> float:
        with self.lock:
            return 0.0 if self.bucket is None else self.bucket.reserve(n, time.monotonic())

    def slice_bytes(self) -> int:
        with self.lock:
            return CHUNK_BYTES if self.bucket is None else self.bucket.slice_bytes()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "total_bytes": self.total_bytes,
                "paths": {p: {"bytes": s.bytes, "requests": s.requests} for p, s in self.paths.items()},
                "active": self.active,
            }

    def reset(self) -> None:
        with self.lock:
            self.total_bytes = 0
            self.paths.clear()


def normalize_path(path: str) -> str:
    return "/" + path.lstrip("/")


# --- the aiohttp app --------------------------------------------------------------------------


def build_app(root: Path, state: OriginState) -> web.Application:
    root = root.resolve()

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(state.snapshot())

    async def reset(request: web.Request) -> web.Response:
        state.reset()
        return web.json_response(state.snapshot())

    async def config(request: web.Request) -> web.Response:
        try:
            cfg = await request.json()
            if not isinstance(cfg, dict):
                raise ValueError("config must be a JSON object")
            state.configure(cfg)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response({"ok": True})

    async def serve(request: web.Request) -> web.StreamResponse:
        path = request.path
        state.count_request(path)
        with state.lock:
            forced = state.statuses.get(path)
            ignore_range = state.ignore_range
            required = state.required_header
            state.active += 1
        try:
            if request.method not in ("GET", "HEAD"):
                return web.Response(status=405, headers={"Allow": "GET, HEAD"})
            if required and request.headers.get(required[0]) != required[1]:
                return web.Response(status=401, text="missing or wrong required header\n")
            if forced is not None:
                return web.Response(status=forced, text=f"forced status {forced}\n")
            file = resolve_under(root, path)
            if file is None and state.listing:
                page = directory_index(root, path)
                if page is not None:
                    return web.Response(text=page, content_type="text/html")
            if file is None:
                return web.Response(status=404, text="not found\n")
            return await send_file(request, file, path, state, ignore_range)
        finally:
            with state.lock:
                state.active -= 1

    app = web.Application()
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_reset", reset)
    app.router.add_post("/_config", config)
    app.router.add_route("*", "/{tail:.*}", serve)
    return app


def resolve_under(root: Path, url_path: str) -> Path | None:
    """The regular file `url_path` names under `root`, or None (missing, a directory, or an
    escape through `..` or a symlink)."""
    try:
        file = (root / url_path.lstrip("/")).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if not file.is_relative_to(root) or not file.is_file():
        return None
    return file


def directory_index(root: Path, url_path: str) -> str | None:
    """An nginx-style autoindex page for the directory `url_path` names under `root` (links are
    relative, subdirectories end with '/'), or None when it is not a directory under `root`."""
    import html
    from urllib.parse import quote

    try:
        d = (root / url_path.lstrip("/")).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if not d.is_relative_to(root) or not d.is_dir():
        return None
    rows = ['<a href="../">../</a>'] if d != root else []
    for child in sorted(d.iterdir()):
        name = child.name + ("/" if child.is_dir() else "")
        rows.append(f'<a href="{quote(name)}">{html.escape(name)}</a>')
    title = html.escape(url_path)
    return (f"<html><head><title>Index of {title}</title></head><body><h1>Index of {title}</h1><hr><pre>\n"
            + "\n".join(rows) + "\n</pre><hr></body></html>\n")


async def send_file(
    request: web.Request, file: Path, path: str, state: OriginState, ignore_range: bool
) -> web.StreamResponse:
    st = file.stat()
    size = st.st_size
    etag = f'"{size:x}-{st.st_mtime_ns:x}"'
    headers = {
        "ETag": etag,
        "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
        "Content-Type": mimetypes.guess_type(file.name)[0] or "application/octet-stream",
    }
    range_header = None if ignore_range else request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range not in (etag, headers["Last-Modified"]):
        range_header = None  # the client's copy is stale: send the whole current body
    decision = parse_range(range_header, size)
    if not ignore_range:
        headers["Accept-Ranges"] = "bytes"
    if decision.kind is RangeKind.UNSATISFIABLE:
        headers["Content-Range"] = f"bytes */{size}"
        return web.Response(status=416, headers=headers)
    status = 200
    if decision.kind is RangeKind.PARTIAL:
        status = 206
        headers["Content-Range"] = f"bytes {decision.start}-{decision.end}/{size}"
    length = decision.end - decision.start + 1
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = length
    await resp.prepare(request)
    if request.method == "HEAD" or length == 0:
        await resp.write_eof()
        return resp
    # Blocking reads of at most 256 KiB from a local file: well under a millisecond from the page
    # cache, cheaper than a thread hop per chunk, and this server only ever serves tests.
    with open(file, "rb") as f:
        f.seek(decision.start)
        remaining = length
        while remaining > 0:
            n = min(remaining, state.slice_bytes())
            delay = state.reserve(n)
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = f.read(n)
            if not chunk:
                break  # the file shrank under us; the client sees a short body
            state.count_bytes(path, len(chunk))
            try:
                await resp.write(chunk)
            except ConnectionError:  # the client hung up: expected in tests, not worth a traceback
                state.count_bytes(path, -len(chunk))
                return resp
            except asyncio.CancelledError:  # server stopping: this chunk was not sent either
                state.count_bytes(path, -len(chunk))
                raise
            remaining -= len(chunk)
    await resp.write_eof()
    return resp


# --- in-process adapter -----------------------------------------------------------------------


class Origin:
    """The origin on its own event loop in a daemon thread. Use as a context manager, or
    `start()` / `stop()`. Every method but `start` may be called from any thread."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_bytes_per_s: int | None = None,
        statuses: dict[str, int] | None = None,
        ignore_range: bool = False,
        required_header: tuple[str, str] | None = None,
        listing: bool = False,
    ) -> None:
        self.root = Path(root)
        self.host = host
        self.port = port
        self.state = OriginState(ignore_range=ignore_range, required_header=required_header, listing=listing)
        self.state.set_rate(rate_bytes_per_s)
        for path, code in (statuses or {}).items():
            self.state.set_status(path, code)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Origin:
        if self._thread is not None:
            raise RuntimeError("origin already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._runner, self.port = loop.run_until_complete(
                    start_site(self.root, self.state, self.host, self.port)
                )
            except BaseException as e:
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"origin:{self.root.name}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        loop, runner = self._loop, self._runner
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)

        async def cancel_rest() -> None:  # a request stuck behind the rate limit, say
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_rest(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)
        self._thread = self._loop = self._runner = None

    def __enter__(self) -> Origin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + normalize_path(path)

    def stats(self) -> dict[str, Any]:
        """`{"total_bytes", "paths": {"/p": {"bytes", "requests"}}, "active"}`; active is the
        number of requests still being answered."""
        return self.state.snapshot()

    def bytes_served(self, path: str) -> int:
        return self.stats()["paths"].get(normalize_path(path), {}).get("bytes", 0)

    def wait_idle(self, timeout: float = 5.0) -> dict[str, Any]:
        """Wait until no request is in flight (e.g. after a client hung up) and return stats."""
        deadline = time.monotonic() + timeout
        while (snap := self.stats())["active"] and time.monotonic() < deadline:
            time.sleep(0.01)
        return snap

    def reset(self) -> None:
        self.state.reset()

    def set_rate(self, bps: int | None) -> None:
        """Global rate limit in bytes/s; None or 0 lifts it."""
        self.state.set_rate(bps)

    def set_status(self, path: str, code: int | None) -> None:
        """Answer every request for `path` with `code`; None serves the file again."""
        self.state.set_status(path, code)

    def set_ignore_range(self, ignore: bool) -> None:
        with self.state.lock:
            self.state.ignore_range = ignore

    def set_required_header(self, header: tuple[str, str] | None) -> None:
        with self.state.lock:
            self.state.required_header = header


async def start_site(root: Path, state: OriginState, host: str, port: int) -> tuple[web.AppRunner, int]:
    if not root.is_dir():
        raise FileNotFoundError(f"origin root is not a directory: {root}")
    # short shutdown_timeout: a rate-limited download in flight must not hold up stop()
    runner = web.AppRunner(build_app(root, state), access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]


# --- process mode -----------------------------------------------------------------------------


def parse_header(value: str) -> tuple[str, str]:
    name, sep, val = value.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError("expected 'Name: value'")
    return name.strip(), val.strip()


async def serve_forever(args: argparse.Namespace) -> None:
    state = OriginState(ignore_range=args.ignore_range, required_header=args.require_header,
                        listing=args.listing)
    state.set_rate(args.rate)
    runner, port = await start_site(Path(args.root), state, args.host, args.port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if args.port_file:
        # write-then-rename, so a script polling for the file never reads half a port
        tmp = Path(f"{args.port_file}.tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(args.port_file)
    print(f"origin listening on http://{args.host}:{port}", flush=True)
    try:
        await stopping.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.origin", description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="directory whose files are served")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    parser.add_argument("--port", type=int, default=0, help="0 picks an ephemeral port")
    parser.add_argument("--rate", type=int, default=None, help="global rate limit, bytes/s")
    parser.add_argument("--port-file", default=None, help="write the bound port here")
    parser.add_argument("--ignore-range", action="store_true", help="act as an origin without ranges")
    parser.add_argument("--listing", action="store_true", help="serve HTML indexes of directories")
    parser.add_argument("--require-header", type=parse_header, default=None, metavar="'NAME: VALUE'")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve_forever(args))
    except (FileNotFoundError, OSError) as e:
        print(f"origin: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
