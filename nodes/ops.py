"""The daemon's part in cluster operations: it follows the manager's settings and jobs, and it
serves the local cache commands (`dfzmq cache import|stat|rm`; export is a plain DOWNLOAD).

Settings (dfzmq/settings.py): the daemon keeps a copy of its own configuration and applies
`local, overridden by the cluster` to the live objects: the download, upload and back-to-source
token buckets (and every running task's bucket), and the load limit, which reaches the
schedulers in a fresh HostAnnounce. Unset keys fall back to the local value.

Jobs: a preheat job makes the daemon fetch each URL into its store, without writing a file, as
if a client had asked (so a seed goes back to source once, and other daemons get pieces from
peers); a cache-rm job removes cache entries here. The result is reported to the manager and
sent again with every snapshot request until the manager's job shows it.

Cache: `import` cuts a local file into pieces (blake3 each, the same piece lengths as a
download), stores them, records the task as complete with the whole file's blake3, and
registers it with the scheduler as a finished task whose URL is `cache:///ID`. There is no
origin behind that URL: when no peer holds the entry, the back-to-source attempt fails at once
with a final error, so an export fails cluster-wide with a clear message instead of hanging.
The id defaults to the file's blake3 (so the same content gets the same id everywhere); an id
of one's own may not be reused for other content until it is removed.
`rm` removes the local copy and tells the scheduler this host no longer has it; the CLI's
`--cluster` makes it a manager job for every daemon.
LMDB work never runs on the event loop: reads (stat, the import's conflict check) in a worker
thread, writes (pieces, the task record, removal with its manifest scan) on the daemon's writer
thread, in order with its other writes. Imported entries are pieces and tasks like
any other: the daemon's storage GC (quota, TTL) may evict them too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import zmq
import zmq.asyncio

from brokers.manager.follow import Follower
from dfzmq import ids, net, settings, wire
from dfzmq.errors import DfzmqError, DownloadError, StorageError
from dfzmq.service import decode_plain
from nodes.limits import TokenBucket
from nodes.source import choose_piece_length, digest

if TYPE_CHECKING:
    from nodes.daemon import Daemon

log = logging.getLogger(__name__)

CONTROL = (wire.CacheImport, wire.CacheStat, wire.CacheRemove)
CACHE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PREHEAT_PARALLEL = 8  # URLs of one job fetched at once
DAEMON_KEYS = tuple(k for k, spec in settings.KEYS.items() if spec.role == "daemon")


def cache_url(cache_id: str) -> str:
    return f"cache:///{cache_id}"


def cache_task_id(cache_id: str) -> str:
    return ids.task_id(cache_url(cache_id))


def check_cache_id(cache_id: str) -> str:
    if not CACHE_ID.match(cache_id):
        raise DownloadError(f"bad cache id {cache_id!r}: 1-128 letters, digits, '.', '_' or '-'")
    return cache_id


def remote_url_problem(url: str) -> str:
    """Why a URL from a remote request (a manager job, a scheduler's SeedTrigger) is refused,
    or "". Only http(s): file:// would read this host's disk and serve it over P2P; a local
    file is fetched with `dfzmq fetch` through the daemon's own 0600 control socket."""
    if url.split("://", 1)[0].lower() in ("http", "https") and "://" in url:
        return ""
    return f"refused {url[:200]!r}: only http:// and https:// URLs are taken from remote requests"


def retune(bucket: TokenBucket, rate: int, now: float | None = None) -> None:
    """Change a live bucket's rate. What it already handed out stays handed out (callers
    already sleep for it), but the debt built at the old rate is not carried into the new
    one: the balance is settled at the old rate up to `now` and kept within one new burst
    either way, so lowering a rate can never stall transfers for the old backlog's time."""
    if bucket.rate == float(rate):
        return
    now = time.monotonic() if now is None else now
    if bucket.unlimited or bucket.last is None:
        tokens = float("inf")  # unlimited until now: nothing owed
    else:
        tokens = bucket.tokens + max(0.0, now - bucket.last) * bucket.rate
    bucket.rate = float(rate)
    bucket.burst = float(max(rate / 4, 256 * 1024))
    bucket.tokens = max(-bucket.burst, min(tokens, bucket.burst))
    bucket.last = now


class DaemonOps:
    def __init__(self, daemon: "Daemon") -> None:
        self.d = daemon
        self.local = dataclasses.replace(daemon.cfg)  # the daemon's own settings, for fallback
        self.follower = Follower(daemon.host_id, "seed" if daemon.cfg.seed else "daemon", daemon.hostname)
        self.applied: dict[str, Any] = {}
        self.running: set[str] = set()  # job ids being worked on here
        self.reports: dict[str, wire.JobReport] = {}  # finished here, not yet shown by the manager
        self._dealer: zmq.asyncio.Socket | None = None

    # -- following the manager ------------------------------------------------------------

    async def follow(self) -> None:
        d = self.d
        addr = net.tcp(d.cfg.manager)
        poller = zmq.asyncio.Poller()
        sub, sub_addr = None, ""
        try:
            while True:
                now = time.monotonic()
                if self._dealer is not None and self.follower.silent(now):
                    poller.unregister(self._dealer)
                    self._dealer.close(0)
                    self._dealer = None
                if self._dealer is None:
                    self._dealer = net.make_socket(d.ctx, "manager_dealer", d.curve)
                    self._dealer.connect(addr)
                    poller.register(self._dealer, zmq.POLLIN)
                asks = self.follower.on_timer(now)
                if asks:
                    self._send(*asks, *self.reports.values())
                if self.follower.events_addr and self.follower.events_addr != sub_addr:
                    if sub is not None:
                        poller.unregister(sub)
                        sub.close(0)
                    sub_addr = self.follower.events_addr
                    sub = net.make_socket(d.ctx, "events_sub", d.curve)
                    sub.connect(sub_addr)
                    poller.register(sub, zmq.POLLIN)
                    self._send(wire.SyncRequest(d.host_id, self.follower.role, d.hostname))  # Clone: snapshot after SUB
                # Until the next sync is due (at most 1 s: liveness is judged in whole seconds),
                # not a fixed 250 ms tick: an idle daemon should cost nothing.
                wait_ms = int(max(10.0, min(1000.0, (self.follower.next_deadline() - time.monotonic()) * 1000)))
                for sock, _ in await poller.poll(wait_ms):
                    for _ in range(100):
                        try:
                            frames = await sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        msg = decode_plain(frames, d.counters)
                        if msg is not None:
                            self._on_message(msg, from_dealer=sock is self._dealer)
        finally:
            for s in (self._dealer, sub):
                if s is not None:
                    s.close(0)
            self._dealer = None

    def _send(self, *msgs: Any) -> None:
        if self._dealer is None:
            return
        for m in msgs:
            try:
                self._dealer.send_multipart(wire.encode(m), flags=zmq.NOBLOCK)
            except zmq.Again:
                self.d.counters["manager.send-dropped"] += 1

    def _on_message(self, msg: Any, from_dealer: bool) -> None:
        try:
            changed, jobs = self.follower.on_message(msg, time.monotonic(), from_dealer)
            if changed or (self.follower.synced and not self.applied and self.follower.config):
                self.apply(self.follower.config)
            for job in jobs:
                self._on_job(job)
        except Exception:  # one bad update must not end the follower
            self.d.counters["ops.errors"] += 1
            log.exception("applying %s from the manager failed", type(msg).__name__)

    def apply(self, cluster: dict[str, Any]) -> None:
        """Effective settings = local settings overridden by the cluster's; applied live."""
        d, cfg = self.d, self.d.cfg
        cluster = settings.valid(cluster, "daemon")
        old_slots = cfg.upload_slots
        for key in DAEMON_KEYS:
            setattr(cfg, key, cluster.get(key, getattr(self.local, key)))
        retune(d.download_bucket, cfg.download_rate)
        retune(d.source_bucket, cfg.source_rate)
        retune(d.upload.bucket, cfg.upload_rate)
        for run in d.tasks.values():
            retune(run.bucket, cfg.task_download_rate)
        if cfg.upload_slots != old_slots:
            for link in d.links.values():
                link.send(d.host_announce())
        self.applied = {k: getattr(cfg, k) for k in DAEMON_KEYS}
        log.info("cluster settings applied: %s", ", ".join(f"{k}={v}" for k, v in sorted(cluster.items())) or "none (local settings)")

    def effective(self) -> dict[str, Any]:
        """The settings in force now (for STAT and tests), and the cluster's part of them."""
        return {**{k: getattr(self.d.cfg, k) for k in DAEMON_KEYS},
                "cluster": settings.valid(self.follower.config, "daemon")}

    # -- jobs -----------------------------------------------------------------------------

    def _on_job(self, job: wire.JobInfo) -> None:
        mine = job.hosts.get(self.d.host_id)
        if job.state != "running" or mine in ("succeeded", "failed"):
            self.reports.pop(job.job_id, None)
            return
        if job.job_id in self.reports:
            self._send(self.reports[job.job_id])
        elif job.job_id not in self.running:
            self.running.add(job.job_id)
            self.d._spawn(self._run_job(job))

    async def _run_job(self, job: wire.JobInfo) -> None:
        d = self.d
        self._send(wire.JobReport(job.job_id, d.host_id, "running", hostname=d.hostname))
        limit = asyncio.Semaphore(PREHEAT_PARALLEL)

        async def one(url: str) -> None:
            async with limit:
                if job.kind == "cache-rm":
                    await self.remove(url.removeprefix("cache:///"))
                elif remote_url_problem(url):
                    raise DownloadError(remote_url_problem(url))
                else:
                    await self.warm(url, job.headers, job.tag, job.application, job.digests.get(url, ""))

        results = await asyncio.gather(*(one(u) for u in job.urls), return_exceptions=True)
        errors = [f"{u}: {r}" for u, r in zip(job.urls, results) if isinstance(r, BaseException)]
        for u, r in zip(job.urls, results):
            if isinstance(r, BaseException) and not isinstance(r, DfzmqError):
                log.error("job %s: %s failed: %r", job.job_id, u, r)
        report = wire.JobReport(job.job_id, d.host_id, "failed" if errors else "succeeded",
                                "; ".join(errors)[:1024], d.hostname)
        log.info("job %s %s here%s", job.job_id, report.state, f": {report.error}" if errors else "")
        self.running.discard(job.job_id)
        self.reports[job.job_id] = report
        self._send(report)

    async def warm(self, url: str, headers: dict[str, str], tag: str = "", application: str = "",
                   content_digest: str = "") -> dict:
        """Fetch `url` into the store only (no output file), as a client's download would."""
        from dfzmq.oci import blob_task_id  # here: keeps this fix to warm() alone

        d = self.d
        if content_digest:  # a registry blob: one task per digest, as the mirror names it
            tid, tag, application = blob_task_id(content_digest), "", ""
        else:
            tid = ids.task_id(url, tag, application)
        run, new = d.require_task(tid, url, headers, tag, application)
        d.gc.note_access(tid)
        if new:
            d._spawn_start(run)
        return await asyncio.shield(run.done)

    # -- the cache ------------------------------------------------------------------------

    async def control(self, ident: bytes, msg: Any) -> None:
        try:
            if isinstance(msg, wire.CacheImport):
                info = await self.cache_import(msg.path, msg.cache_id)
            elif isinstance(msg, wire.CacheStat):
                info = await self.cache_stat(check_cache_id(msg.cache_id))
            else:
                info = await self.remove(check_cache_id(msg.cache_id))
            self.d._reply(ident, wire.CacheResult(msg.request_id, True, info=info))
        except DfzmqError as e:
            self.d._reply(ident, wire.CacheResult(msg.request_id, False, str(e)))
        except Exception as e:
            log.exception("cache request failed")
            self.d._reply(ident, wire.CacheResult(msg.request_id, False, f"internal error: {e}"))

    async def cache_import(self, path: str, cache_id: str = "") -> dict:
        d = self.d
        loop = asyncio.get_running_loop()
        src = Path(path)
        try:
            size = src.stat().st_size
            if not src.is_file():
                raise DownloadError(f"not a regular file: {path}")
            if not os.access(src, os.R_OK):
                raise DownloadError(f"cannot read {path}: permission denied")
        except OSError as e:
            raise DownloadError(f"cannot read {path}: {e.strerror or e}") from None
        file_digest = await loop.run_in_executor(d.writer, _file_blake3, src)
        cache_id = check_cache_id(cache_id or file_digest)
        if len(cache_id) == 64 and cache_id != file_digest and all(c in "0123456789abcdef" for c in cache_id):
            # Exports check a 64-hex id as the content's blake3: it must be that.
            raise DownloadError(f"cache id {cache_id} looks like a blake3 digest but the file's is {file_digest}")
        tid = cache_task_id(cache_id)
        meta = await asyncio.to_thread(d.store.get_task, tid)
        if meta and meta.get("complete") and meta.get("file_digest") != file_digest:
            raise DownloadError(f"cache id {cache_id} holds other content (blake3 {meta.get('file_digest')}); "
                                f"remove it first (dfzmq cache rm {cache_id})")
        if tid in d.tasks:
            raise DownloadError(f"cache id {cache_id} is being downloaded here right now; try again")
        pieces = await loop.run_in_executor(d.writer, _store_file, d.store, tid, src, size, file_digest,
                                                d.cfg.max_piece_length)
        await loop.run_in_executor(d.writer, d.store.put_task, tid, {
            "url": cache_url(cache_id), "tag": "", "application": "", "content_length": size,
            "complete": True, "file_digest": file_digest, "piece_count": pieces, "etag": "",
            "content_type": ""})
        d._held.pop(tid, None)  # a stale view from an earlier failed export
        d.gc.note_access(tid)  # freshly imported: the last thing LRU eviction should take
        run, new = d.require_task(tid, cache_url(cache_id), {}, "", "")
        if new:
            d._spawn_start(run)  # holds it whole: registers with the scheduler as succeeded
        await asyncio.shield(run.done)
        log.info("cache import %s: %d bytes, %d pieces", cache_id, size, pieces)
        return {"cache_id": cache_id, "task_id": tid, "content_length": size, "pieces": pieces,
                "file_digest": file_digest}

    async def cache_stat(self, cache_id: str) -> dict:
        d = self.d
        tid = cache_task_id(cache_id)
        meta, held = await asyncio.to_thread(lambda: (d.store.get_task(tid) or {}, d.store.manifest(tid)))
        link = d.scheduler_for(tid)
        return {
            "cache_id": cache_id, "task_id": tid, "host_id": d.host_id, "hostname": d.hostname,
            "held": bool(meta.get("complete")) and len(held) == meta.get("piece_count", -1),
            "pieces_held": len(held), "content_length": meta.get("content_length", -1),
            "file_digest": meta.get("file_digest", ""),
            "scheduler": {"member_id": link.member_id, "addr": link.addr} if link else {},
        }

    async def remove(self, cache_id: str) -> dict:
        """Drop a cache entry here; the scheduler hears that this host no longer has it."""
        d = self.d
        check_cache_id(cache_id)
        tid = cache_task_id(cache_id)
        run = d.tasks.get(tid)
        if run is not None:
            run.fail(DownloadError(f"cache entry {cache_id} was removed"))
        existed, freed = await asyncio.get_running_loop().run_in_executor(d.writer, _remove, d.store, tid)
        d.forget(tid)
        return {"cache_id": cache_id, "task_id": tid, "removed": existed, "freed_bytes": freed}


def _remove(store, tid: str) -> tuple[bool, int]:
    """Writer thread: (whether anything of the task was here, bytes freed)."""
    existed = store.get_task(tid) is not None or bool(store.manifest(tid))
    return existed, store.delete_task(tid)


def _file_blake3(path: Path) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    try:
        h.update_mmap(path)
    except (AttributeError, ValueError, OSError):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _store_file(store, tid: str, path: Path, size: int, file_digest: str, max_piece: int = 0) -> int:
    """Writer thread: cut the file into pieces and store them; checks the file did not change."""
    length = choose_piece_length(size, max_piece)
    h = blake3.blake3()
    n = 0
    try:
        with open(path, "rb") as f:
            offset = 0
            while True:
                data = f.read(length)
                if not data:
                    break
                h.update(data)
                store.put(tid, wire.PieceInfo(n, offset, len(data), digest(data)), data)
                offset += len(data)
                n += 1
    except OSError as e:
        raise DownloadError(f"cannot read {path}: {e.strerror or e}") from None
    if offset != size or h.hexdigest() != file_digest:
        store.delete_task(tid)
        raise StorageError(f"{path} changed while it was being imported; try again")
    return n
