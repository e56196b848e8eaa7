"""The peer daemon (and, with `seed`, the seed peer): one asyncio loop around its sockets.

Sockets: a `manager_dealer` (which schedulers are up), one `scheduler_dealer` per scheduler
(host announce, task registration, heartbeats), the `upload_router` (other peers pull pieces),
the `control_router` (local clients: DOWNLOAD, STAT), and one `parent_dealer` per parent per
task (in nodes/task.py). Tasks are spread over schedulers by rendezvous hashing of task ids.

Liveness (Paranoid Pirate): every scheduler link heartbeats; a scheduler silent for `liveness`
intervals is declared dead, its socket closed and reopened with doubling backoff, and on
reconnect the host and every task (finished ones too, with their manifests) are announced
again, so a restarted scheduler rebuilds its view and cached files keep being served P2P.

This module wires things together; it holds no download logic (nodes/task.py) and no piece
picking (nodes/picker.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import aiohttp
import zmq
import zmq.asyncio

from brokers.manager.link import MemberLink
from dfzmq import ids, net, wire
from dfzmq.config import DaemonConfig
from dfzmq.errors import DfzmqError, DownloadError
from dfzmq.service import Counters, decode_plain, decode_routed
from nodes.gc import GarbageCollector
from nodes.limits import TokenBucket
from nodes.metrics import DaemonMetrics, host_stats
from nodes.sink import OutputSink, store_reader
from nodes.store import PieceStore
from nodes.task import TaskRun
from nodes.upload import UploadServer
from nodes.ops import CONTROL as OPS_CONTROL, DaemonOps  # settings, jobs, cache

log = logging.getLogger(__name__)
VERSION = "0.1.0"


class SchedulerLink:
    """The daemon's DEALER to one scheduler, with heartbeats and reconnect-with-backoff."""

    def __init__(self, daemon: "Daemon", member_id: str, addr: str) -> None:
        self.daemon = daemon
        self.member_id = member_id
        self.addr = addr
        self.alive = False
        self.sock: zmq.asyncio.Socket | None = None
        self.task: asyncio.Task | None = None
        self.closed = False

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    def send(self, msg: Any) -> None:
        if self.sock is None:
            return
        self.daemon.counters["msg.out.scheduler"] += 1
        try:
            self.sock.send_multipart(wire.encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.daemon.counters["scheduler.send-dropped"] += 1

    def close(self) -> None:
        self.closed = True
        if self.task is not None:
            self.task.cancel()
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    async def _run(self) -> None:
        d = self.daemon
        interval = d.cfg.heartbeat_interval_s
        backoff = interval
        while not self.closed:
            self.sock = net.make_socket(d.ctx, "scheduler_dealer", d.curve)
            self.sock.connect(self.addr)
            self.send(d.host_announce())
            last_seen = time.monotonic()
            last_beat = time.monotonic()
            late = 0.0  # the longest this loop woke past its poll timeout since last_seen
            while True:
                now = time.monotonic()
                if now - last_seen > interval * d.cfg.liveness:
                    break
                if now - last_beat >= interval:
                    self.send(wire.Heartbeat(d.host_id))
                    if self.alive:
                        self.send(host_stats(d))  # traffic for monitors and `dfzmq hosts`
                    last_beat = now
                timeout = interval / 2
                ready = await self.sock.poll(timeout=int(timeout * 1000))
                late = max(late, time.monotonic() - now - timeout)
                if ready:
                    frames = await self.sock.recv_multipart()
                    msg = decode_plain(frames, d.counters)
                    if msg is None:
                        continue
                    d.counters["msg.in.scheduler"] += 1
                    last_seen = time.monotonic()
                    late = 0.0
                    backoff = interval
                    try:
                        self._handle(msg)
                    except Exception:  # one bad message must not end the link
                        d.counters["scheduler.handler-error"] += 1
                        log.exception("handling %s from the scheduler failed", type(msg).__name__)
            # `late` tells a scheduler that went quiet from a daemon whose own loop was not run.
            log.warning("scheduler %s at %s silent for %.1fs (this daemon's loop ran up to %.1fs "
                        "late): reconnecting", self.member_id, self.addr,
                        time.monotonic() - last_seen, max(0.0, late))
            was_alive, self.alive = self.alive, False
            self.sock.close(0)
            self.sock = None
            if was_alive:
                d.scheduler_lost(self)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def _handle(self, msg: Any) -> None:
        d = self.daemon
        if isinstance(msg, wire.HostAck):
            first = not self.alive
            self.alive = True
            if first:
                d.announce_tasks(self)
        elif isinstance(msg, wire.Heartbeat):
            if not self.alive:
                self.send(d.host_announce())
        elif isinstance(msg, wire.Error):
            if msg.code == "unknown-task" and msg.ref in d.tasks:
                # The scheduler forgot this peer (restart, expiry): register it again.
                d.tasks[msg.ref].register()
            elif msg.code == "unknown-host":
                # The scheduler restarted or forgot us: introduce ourselves again.
                self.alive = False
                self.send(d.host_announce())
            else:
                d.counters["scheduler.error." + msg.code] += 1
                log.debug("scheduler error %s: %s", msg.code, msg.detail)
        elif isinstance(msg, wire.SeedTrigger):
            d.seed_trigger(msg)
        elif hasattr(msg, "task_id"):
            run = d.tasks.get(msg.task_id)
            if run is not None:
                run.on_scheduler(msg)
        else:
            d.counters["scheduler.unexpected"] += 1


class _InUse:
    """A live view of the tasks GC must not evict: running ones, and ones a proxy client is
    still reading (a finished task streams from the store after its run ended)."""

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon

    def __contains__(self, task_id: object) -> bool:
        d = self.daemon
        return task_id in d.tasks or (d.proxy is not None and task_id in d.proxy.streaming)


class Daemon:
    def __init__(self, cfg: DaemonConfig, curve: net.Curve | None = None) -> None:
        self.cfg = cfg
        self.curve = curve
        self.data = Path(cfg.data).expanduser().absolute()
        self.data.mkdir(parents=True, exist_ok=True)
        self.hostname = cfg.hostname or socket.gethostname()
        self.host_id = ids.host_id(self.hostname, salt=str(self.data))
        self.counters = Counters()
        self.tasks: dict[str, TaskRun] = {}
        self.links: dict[str, SchedulerLink] = {}
        self._held: dict[str, dict[int, wire.PieceInfo]] = {}
        self._schedulers_known = asyncio.Event()
        self._bg: set[asyncio.Task] = set()
        self.task_slots = asyncio.Semaphore(cfg.concurrent_tasks) if cfg.concurrent_tasks > 0 else None
        self.ctx: zmq.asyncio.Context | None = None
        self.proxy = None  # nodes/proxy.ProxyServer when proxy_listen is set
        # One thread does every piece store, output write and whole-file hash, in order, so the
        # event loop keeps receiving while bytes are copied (both release the GIL).
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfzmq-writer")
        # Piece digests, ahead of the writer (nodes/task.py _on_piece_data).
        self.verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfzmq-verify")
        self.ops = DaemonOps(self)  # cluster settings, jobs and the cache (nodes/ops.py)
        self.download_bucket = TokenBucket(cfg.download_rate)
        self.source_bucket = TokenBucket(cfg.source_rate)
        self.started = time.monotonic()
        self.metrics: DaemonMetrics | None = None

    # -- start and stop -------------------------------------------------------------------

    async def start(self, use_manager: bool = True) -> None:
        if self.cfg.metrics:  # first: a port in use is a config error before anything is open
            self.metrics = DaemonMetrics(self, self.cfg.metrics)
        self.ctx = zmq.asyncio.Context()
        self.store = PieceStore(self.data, self.cfg.map_size, piece_files=self.cfg.piece_files,
                                file_threshold=self.cfg.piece_file_threshold,
                                cache_bytes=self.cfg.piece_cache_bytes)
        self.gc = GarbageCollector(self.store, self.cfg)
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=60),
            auto_decompress=False,
        )
        host = self.cfg.advertise or ("127.0.0.1" if self.cfg.listen.startswith("127.") else "")
        self.upload = UploadServer(self.ctx, self.store, self.cfg.listen, host, self.held, self.counters,
                                   curve=self.curve, bucket=TokenBucket(self.cfg.upload_rate),
                                   subscriber_ttl_s=max(30.0, 3 * self.cfg.liveness * self.cfg.heartbeat_interval_s),
                                   share=self.cfg.upload_share)
        if os.environ.get("DFZMQ_TEST_CORRUPT_UPLOADS") == "1":
            self.upload.corrupt = True
        self.control = net.make_socket(self.ctx, "control_router")
        control_addr = self.cfg.control_addr()
        if control_addr.startswith("ipc://"):
            path = Path(control_addr[len("ipc://"):])
            if path.exists():
                path.unlink()
        self.control_addr = net.bind(self.control, control_addr)
        if control_addr.startswith("ipc://"):
            # The daemon writes files wherever a client asks: only its own user may ask.
            os.chmod(control_addr[len("ipc://"):], 0o600)
        self.upload.on_access = self.gc.note_access
        self.proxy = None
        if self.cfg.proxy_listen:  # the HTTP proxy and registry mirror (issue 4)
            from nodes.proxy import ProxyServer
            try:
                self.proxy = ProxyServer(self)
                await self.proxy.start()
            except BaseException:  # a bad rule or a busy port: a one-line error, nothing left open
                self.proxy = None
                await self.http.close()
                raise
        self._spawn(self.upload.run())
        self._spawn(self._control_loop())
        if self.gc.enabled:
            self._spawn(self._gc_loop())
        if self.cfg.scheduler:
            self._add_link("fixed", net.tcp(self.cfg.scheduler))
            self._schedulers_known.set()
        elif use_manager and self.cfg.manager:
            self._spawn(self._manager_loop())
        else:
            self._schedulers_known.set()
        log.info("daemon %s%s: upload %s, control %s", self.host_id, " (seed)" if self.cfg.seed else "",
                 self.upload.addr, self.control_addr)

    async def stop(self) -> None:
        for run in list(self.tasks.values()):
            run.fail(DownloadError("daemon stopping"), report=False)
        for link in self.links.values():
            link.close()
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*list(self._bg), return_exceptions=True)
        if self.proxy is not None:
            await self.proxy.close()
        await self.http.close()
        self.upload.close()
        self.control.close(0)
        self.writer.shutdown(wait=True)
        self.verifier.shutdown(wait=True)
        self.store.close()
        self.ctx.term()
        if self.metrics is not None:
            self.metrics.close()

    # -- schedulers -----------------------------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task:
        """A background task that forgets itself when done (no list grows per download)."""
        t = asyncio.create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)
        return t

    def host_announce(self) -> wire.HostAnnounce:
        return wire.HostAnnounce(self.host_id, self.hostname, self.upload.addr, self.cfg.seed,
                                 self.cfg.idc, self.cfg.location, self.cfg.upload_slots, VERSION)

    def _add_link(self, member_id: str, addr: str) -> None:
        link = SchedulerLink(self, member_id, addr)
        self.links[member_id] = link
        link.start()

    async def _manager_loop(self) -> None:
        """Ask the manager which schedulers are up and keep one link per scheduler; a seed peer
        also registers as a member (MemberLink: heartbeats, reconnect with backoff)."""
        addr = net.tcp(self.cfg.manager)
        interval = self.cfg.heartbeat_interval_s
        member = None
        if self.cfg.seed:
            member = MemberLink(wire.MemberInfo(self.host_id, "seed", self.upload.addr, hostname=self.hostname,
                                                version=VERSION, idc=self.cfg.idc, location=self.cfg.location),
                                interval, self.cfg.liveness)
        first_deadline = time.monotonic() + 2.0
        sock = None
        next_list = 0.0
        try:
            while True:
                now = time.monotonic()
                if sock is None and (member is None or now >= member.retry_at):
                    sock = net.make_socket(self.ctx, "manager_dealer", self.curve)
                    sock.connect(addr)
                    self._send_all(sock, member.start(now) if member else [])
                if sock is not None:
                    if now >= next_list:
                        self._send_all(sock, [wire.ListSchedulers()])
                        next_list = now + (5.0 if self._schedulers_known.is_set() else 0.5)
                    if member is not None:
                        self._send_all(sock, member.on_timer(now))
                        if member.reconnect_due(now):
                            sock.close(0)
                            sock = None
                            continue
                if not self._schedulers_known.is_set() and now > first_deadline:
                    self._schedulers_known.set()  # no manager answer: tasks go to source
                # Sleep until something is due (the next scheduler list, the member link's
                # heartbeat or liveness check), not on a fixed 100 ms tick: idle daemons are many.
                due = next_list if sock is not None else now + 0.1
                if member is not None:
                    due = min(due, member.next_deadline())
                if not self._schedulers_known.is_set():
                    due = min(due, first_deadline)
                wait_ms = int(max(10.0, min(1000.0, (due - time.monotonic()) * 1000)))
                if sock is None or not await sock.poll(timeout=wait_ms):
                    if sock is None:
                        await asyncio.sleep(0.1)
                    continue
                msg = decode_plain(await sock.recv_multipart(), self.counters)
                try:
                    if isinstance(msg, wire.SchedulerList):
                        await self._update_links(msg)
                    elif msg is not None and member is not None:
                        self._send_all(sock, member.on_message(msg, time.monotonic()))
                except Exception:  # e.g. a scheduler address we cannot connect to
                    self.counters["manager.handler-error"] += 1
                    log.exception("handling %s from the manager failed", type(msg).__name__)
        finally:
            if sock is not None:
                sock.close(0)

    def _send_all(self, sock, msgs: list) -> None:
        for m in msgs:
            try:
                sock.send_multipart(wire.encode(m), flags=zmq.NOBLOCK)
            except zmq.Again:
                self.counters["manager.send-dropped"] += 1

    async def _update_links(self, reply: wire.SchedulerList) -> None:
        current = {m.member_id: m.addr for m in reply.schedulers if m.state == "up"}
        for mid in list(self.links):
            if mid not in current:
                self.links.pop(mid).close()
        for mid, maddr in current.items():
            if mid not in self.links or self.links[mid].addr != maddr:
                if mid in self.links:
                    self.links.pop(mid).close()
                self._add_link(mid, maddr)
        if current and not self._schedulers_known.is_set():
            # Give new links a moment to be acknowledged before the first tasks pick one.
            await self._wait_alive(1.0)
        self._schedulers_known.set()

    async def _wait_alive(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and not any(l.alive for l in self.links.values()):
            await asyncio.sleep(0.02)

    async def schedulers_known(self) -> None:
        """Wait until the manager has said which schedulers are up (or it could not be reached)."""
        try:
            await asyncio.wait_for(self._schedulers_known.wait(), 5.0)
        except asyncio.TimeoutError:
            self._schedulers_known.set()

    def scheduler_for(self, task_id: str) -> SchedulerLink | None:
        """The task's scheduler: rendezvous hashing over live schedulers (any known if none live)."""
        alive = [m for m, l in self.links.items() if l.alive] or list(self.links)
        if not alive:
            return None
        return self.links[ids.rendezvous(task_id, alive)[0]]

    def announce_tasks(self, link: SchedulerLink) -> None:
        """After (re)connecting: re-register running tasks and announce finished ones we serve."""
        for run in self.tasks.values():
            if run.scheduler is link or run.scheduler is None or not run.scheduler.alive:
                run.scheduler = link if self.scheduler_for(run.task_id) is link else run.scheduler
                if run.scheduler is link:
                    run.register()
        for meta in self.store.tasks():
            tid = meta["task_id"]
            if tid in self.tasks or not meta.get("complete") or self.scheduler_for(tid) is not link:
                continue
            held = self.held(tid)
            if len(held) != meta.get("piece_count", -1):
                continue
            link.send(wire.PeerRegister(
                tid, f"{self.host_id}/{tid[:16]}", meta.get("url", ""), {}, meta.get("tag", ""),
                meta.get("application", ""), state="succeeded", pieces=list(held.values()),
                content_length=meta.get("content_length", -1), file_digest=meta.get("file_digest", ""),
                meta=meta.get("origin_meta") or {},
            ))

    def scheduler_lost(self, link: SchedulerLink) -> None:
        """A scheduler went silent: its tasks move to the next live one (rendezvous order) and
        register there with what they hold, so downloads go on without it."""
        for run in list(self.tasks.values()):
            if run.scheduler is link:
                other = self.scheduler_for(run.task_id)
                if other is not None and other is not link and other.alive:
                    log.info("task %s moves to scheduler %s", run.task_id[:12], other.member_id)
                    run.scheduler = other
                    run.register()

    # -- tasks ----------------------------------------------------------------------------

    async def _gc_loop(self) -> None:
        """Keep the store under its quota and TTL; runs in the writer thread, never evicts a
        task in use (a running task is in `self.tasks`; collect re-checks before each delete)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.gc_interval_s)
            try:
                res = await loop.run_in_executor(self.writer, self.gc.collect, time.time(), _InUse(self))
            except Exception:
                self.counters["gc.errors"] += 1
                log.exception("garbage collection failed")
                continue
            for tid in res["evicted"]:
                self.forget(tid)
            if res["evicted"]:
                log.info("gc: evicted %d task(s), freed %d bytes", len(res["evicted"]), res["freed_bytes"])

    def forget(self, task_id: str) -> None:
        """An evicted task: no cache, no subscribers, and the scheduler no longer counts on us."""
        self._held.pop(task_id, None)
        self.upload.forget(task_id)
        link = self.scheduler_for(task_id)
        if link is not None:
            link.send(wire.PeerLeave(task_id, f"{self.host_id}/{task_id[:16]}"))

    def held(self, task_id: str) -> dict[int, wire.PieceInfo]:
        """The pieces of a task this peer holds (cached view of the store; TaskRuns update it)."""
        h = self._held.get(task_id)
        if h is None:
            h = self.store.manifest(task_id)
            if h:
                self._held[task_id] = h  # cached only for tasks that exist here
        return h

    def task_finished(self, run: TaskRun) -> None:
        if self.tasks.get(run.task_id) is run:
            del self.tasks[run.task_id]

    def require_task(self, task_id: str, url: str, headers: dict[str, str], tag: str,
                     application: str) -> tuple[TaskRun, bool]:
        run = self.tasks.get(task_id)
        if run is not None:
            return run, False
        run = self.tasks[task_id] = TaskRun(self, task_id, url, headers, tag, application)
        self._held[task_id] = run.held  # one dict, updated by the run, read by the upload server
        if self.metrics is not None:
            self.metrics.watch(run)
        return run, True

    def seed_trigger(self, msg: wire.SeedTrigger) -> None:
        from nodes.ops import remote_url_problem
        if remote_url_problem(msg.url):  # never read this host's disk for a remote request
            self.counters["seed-trigger.refused"] += 1
            log.warning("seed trigger for task %s %s", msg.task_id[:12], remote_url_problem(msg.url))
            return
        run, new = self.require_task(msg.task_id, msg.url, msg.headers, msg.tag, msg.application)
        if new:
            self._spawn_start(run)

    def _spawn_start(self, run: TaskRun) -> None:
        async def go() -> None:
            try:
                if self.task_slots is not None:
                    await self.task_slots.acquire()  # released when the run ends
                    run.done.add_done_callback(lambda _: self.task_slots.release())
                await run.start()
            except DfzmqError as e:
                run.fail(e)
            except Exception as e:
                log.exception("task start failed")
                run.fail(DownloadError(f"internal error: {e}"))
        self._spawn(go())

    async def download(self, url: str, output: str, digest: str = "", headers: dict | None = None,
                       tag: str = "", application: str = "",
                       progress: Callable[[int, int], None] | None = None) -> dict:
        """Fetch `url` into `output`. Returns the task's stats; raises DfzmqError on failure."""
        headers = headers or {}
        if "://" not in url:
            raise DownloadError(f"not a URL: {url!r}")
        tid = ids.task_id(url, tag, application)
        # Every piece a run hands a sink is verified against the manifest first (nodes/sink.py).
        sink = OutputSink(output, digest, reader=store_reader(self.store), pieces_verified=True,
                          direct=self.cfg.output_direct, background=True)
        run, new = self.require_task(tid, url, headers, tag, application)
        self.gc.note_access(tid)
        try:
            await run.attach(sink)
        except BaseException as e:
            sink.abort()
            if new:
                self.task_finished(run)
            if isinstance(e, Exception) and not isinstance(e, DfzmqError):
                raise DownloadError(f"internal error: {e}") from e
            raise
        if new:
            self._spawn_start(run)
        reporter = None
        if progress is not None:
            async def report() -> None:
                while True:
                    progress(sink.bytes, run.content_length)
                    await asyncio.sleep(0.2)
            reporter = asyncio.create_task(report())
        try:
            stats = await run.wait(sink)
        finally:
            if reporter is not None:
                reporter.cancel()
        if progress is not None:
            progress(sink.bytes, run.content_length)
        return stats

    # -- control socket -------------------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            frames = await self.control.recv_multipart()
            got = decode_routed(frames, self.counters)
            if got is None:
                continue
            ident, msg = got
            try:
                if isinstance(msg, wire.Download):
                    self._spawn(self._serve_download(ident, msg))
                elif isinstance(msg, wire.StatRequest):
                    self._reply(ident, wire.StatReply(self.stats()))
                elif isinstance(msg, wire.Heartbeat):
                    self._reply(ident, wire.Heartbeat(self.host_id))
                elif isinstance(msg, OPS_CONTROL):
                    self._spawn(self.ops.control(ident, msg))
                else:
                    self._reply(ident, wire.Error("bad-request", f"unexpected {type(msg).__name__}"))
            except Exception:  # never let one request end the control socket
                self.counters["control.errors"] += 1
                log.exception("control request %s failed", type(msg).__name__)

    def _reply(self, ident: bytes, msg: Any) -> None:
        try:
            self.control.send_multipart([ident, *wire.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.counters["control.dropped"] += 1

    async def _serve_download(self, ident: bytes, req: wire.Download) -> None:
        def progress(done: int, total: int) -> None:
            self._reply(ident, wire.DownloadProgress(req.request_id, done, total))
        try:
            stats = await self.download(req.url, req.output, req.digest, req.headers, req.tag,
                                        req.application, progress)
            self._reply(ident, wire.DownloadResult(req.request_id, True, stats=stats))
        except DfzmqError as e:
            self._reply(ident, wire.DownloadResult(req.request_id, False, str(e), type(e).__name__))
        except Exception as e:
            log.exception("download failed")
            self._reply(ident, wire.DownloadResult(req.request_id, False, f"internal error: {e}", "internal"))

    def stats(self) -> dict:
        return {
            "host_id": self.host_id,
            "seed": self.cfg.seed,
            "upload_addr": self.upload.addr,
            "proxy_addr": self.proxy.addr if self.proxy is not None else "",
            "uploaded_bytes": self.upload.bytes_uploaded,
            "limiter_wait_s": {"upload": round(self.upload.bucket.waited_s, 3),
                               "download": round(self.download_bucket.waited_s, 3),
                               "source": round(self.source_bucket.waited_s, 3)},
            "tasks_active": len(self.tasks),
            "settings": self.ops.effective(),  # in force now, and the cluster's part
            "schedulers": {m: l.alive for m, l in self.links.items()},
            "counters": dict(self.counters),
            "uptime_s": round(time.monotonic() - self.started, 1),
            **self.store.stats(),
            "usage_bytes": self.store.usage_bytes(),
            "gc": {"evicted": self.gc.evicted_total, "freed_bytes": self.gc.freed_total},
            "metrics": self.metrics.url if self.metrics is not None else "",
        }


async def run_daemon(cfg: DaemonConfig, stop: asyncio.Event, on_ready: Callable[[dict], None] | None = None,
                     curve: net.Curve | None = None) -> None:
    d = Daemon(cfg, curve)
    await d.start()
    if cfg.manager:
        # A long-running daemon follows cluster settings and jobs, with a fixed scheduler too
        # (that only replaces scheduler discovery); with no manager there it just keeps asking.
        d._spawn(d.ops.follow())
    if on_ready is not None:
        on_ready({"upload": d.upload.addr, "control": d.control_addr, "host_id": d.host_id,
                  **({"proxy": d.proxy.addr} if d.proxy is not None else {}),
                  **({"metrics": d.metrics.url} if d.metrics is not None else {})})
    try:
        await stop.wait()
    finally:
        await d.stop()
