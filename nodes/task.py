"""One task's download on a peer: scheduling, parents, pieces, back-to-source, output sinks.

A `TaskRun` registers with the task's scheduler and then does what it is told: pull pieces
from the parents it is given (several at once, a credit window each, chosen by the picker),
or read the origin itself (BACK_TO_SOURCE). Every piece is verified against the manifest
digest the scheduler relayed before it is stored, served, reported or written out.
Clients attach `OutputSink`s; each gets every piece as it is stored and is finished (whole-file
digest checked, renamed into place) when the task completes.

The parents' side (pipes, incoming pieces and HAVEs, requests, cancels, dropping bad or dead
parents) is the `ParentSide` mixin in nodes/taskparents.py.

Faults it handles on its own: a parent that goes silent, sends bad bytes or times out is
dropped and blocklisted, and the scheduler is asked for others (RESCHEDULE); no progress for
`stall_timeout_s` also asks for a reschedule; no scheduler, or none that answers within
`schedule_timeout_s`, sends the peer to the origin. A download never fails only because the
P2P side failed while the origin is up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING, Any

from dfzmq import wire
from dfzmq.errors import DfzmqError, DownloadError, SourceError, StorageError
from dfzmq.oci import blob_digest_of
from nodes.limits import TokenBucket
from nodes.picker import Picker
from nodes.backsource import read_origin
from nodes.blobcheck import verify_content
from nodes.localhits import take_local
from nodes.sink import OutputSink
from nodes.source import digest
from nodes.trace import trace
from nodes.taskparents import ParentLink, ParentSide

if TYPE_CHECKING:
    from nodes.daemon import Daemon, SchedulerLink

log = logging.getLogger(__name__)

REPORT_BATCH = 64
# The watchdog's tick: piece reports from parents go to the scheduler this often (pieces read
# from the origin are reported every REPORT_INTERVAL_S by nodes/backsource.py), and timeouts on
# the scale of seconds are checked. Each tick costs a pick and a scheduler message per running
# task: at 0.1 s that was a tenth of a lab daemon's CPU (issue 3).
WATCHDOG_TICK_S = 0.25


class TaskRun(ParentSide):
    def __init__(self, daemon: "Daemon", task_id: str, url: str, headers: dict[str, str],
                 tag: str = "", application: str = "") -> None:
        self.daemon = daemon
        self.cfg = daemon.cfg
        self.task_id = task_id
        self.url = url
        self.headers = headers
        self.tag = tag
        self.application = application
        self.peer_id = f"{daemon.host_id}/{task_id[:16]}"
        self.log = logging.LoggerAdapter(log, {"task": task_id[:12]})
        self.state = "pending"
        self.manifest: dict[int, wire.PieceInfo] = {}
        self.held = daemon.held(task_id)
        self.content_length = -1
        self.complete = False
        self.file_digest = ""
        self.piece_count = -1
        self.picker = Picker(window_bytes=self.cfg.window_bytes, max_outstanding=self.cfg.concurrent_pieces,
                             window_target_s=self.cfg.window_target_s, window_mode=self.cfg.window_mode)
        self.parents: dict[str, ParentLink] = {}
        self.blocklist: set[str] = set()
        self.bad_parents: set[str] = set()  # sent bytes that failed verification
        self.sinks: list[OutputSink] = []
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.stats = {"origin_bytes": 0, "seed_bytes": 0, "peer_bytes": 0, "cached_bytes": 0,
                      "duplicate_bytes": 0, "local_bytes": 0}
        self.reports: list[wire.PieceInfo] = []
        self.last_progress = time.monotonic()
        self.started = time.monotonic()
        self.scheduler: "SchedulerLink | None" = None
        self.source_task: asyncio.Task | None = None
        self.hasher = None  # the whole-file hasher while reading the origin (nodes/backsource.py)
        self.etag = ""
        self.content_type = ""
        self.origin_meta: dict[str, str] = {}  # headers a proxy replays (nodes/source.origin_meta)
        self.meta_event = asyncio.Event()  # set once origin_meta and content_length are known
        self._bg: list[asyncio.Task] = []
        self._pump_due = False
        self.writing: set[int] = set()  # pieces in the writer thread right now
        self.bucket = TokenBucket(self.cfg.task_download_rate)
        self.pump_after = 0.0  # download limits: no new requests before this time
        self.stalls = 0  # stall timeouts in a row without progress
        self.done_reported = False  # registered as "succeeded": no PEER_DONE needed
        self.registered_at = time.monotonic()
        # A registry blob stored under its digest: its sha256 is checked before it is kept.
        self.expected_sha256 = blob_digest_of(task_id, url)
        self.verified = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        meta = self.daemon.store.get_task(self.task_id) or {}
        if self.held:
            self.manifest.update(self.held)
            self.picker.add_manifest(list(self.held.values()))
            for n in self.held:
                self.picker.on_piece("", n)
            self.stats["cached_bytes"] = sum(p.length for p in self.held.values())
        self.content_length = meta.get("content_length", -1)
        if meta.get("complete"):
            self.complete = self.picker.complete = True
            self.file_digest = meta.get("file_digest", "")
            self.piece_count = meta.get("piece_count", -1)
        self.etag = meta.get("etag", "")
        self.content_type = meta.get("content_type", "")
        self.verified = bool(meta.get("complete") and meta.get("verified"))
        stored = meta.get("origin_meta") or {}
        if not stored and meta.get("complete"):  # a task stored before origin_meta existed
            stored = {"status": "200", **({"etag": self.etag} if self.etag else {}),
                      **({"content-type": self.content_type} if self.content_type else {})}
        self.set_origin_meta(stored)
        self._save_meta()
        if self._all_held():
            # Already whole here (a seed asked for a task it holds, or a client for a cached
            # file): tell the scheduler we hold it, so others can use us, and finish.
            if self.expected_sha256 and not self.verified and not await verify_content(self):
                return  # a blob stored before digests were checked, and wrong: deleted
            await self.daemon.schedulers_known()
            self.scheduler = self.daemon.scheduler_for(self.task_id)
            if self.scheduler is not None:
                self.scheduler.send(wire.PeerRegister(
                    self.task_id, self.peer_id, self.url, {}, self.tag, self.application,
                    state="succeeded", pieces=list(self.held.values()),
                    content_length=self.content_length, file_digest=self.file_digest,
                    meta=self.origin_meta))
                self.done_reported = True
            await self._finish()
            return
        await self.daemon.schedulers_known()
        self.scheduler = self.daemon.scheduler_for(self.task_id)
        self.registered_at = time.monotonic()
        self._bg.append(asyncio.create_task(self._watchdog()))
        if self.scheduler is None:
            self.go_source("no scheduler")
        else:
            self.register()

    def register(self) -> None:
        """(Re-)register with the scheduler; after a scheduler restart this rebuilds its view."""
        if self.scheduler is None or self.state in ("succeeded", "failed"):
            return
        self.registered_at = time.monotonic()
        self.scheduler.send(wire.PeerRegister(
            self.task_id, self.peer_id, self.url, self.headers, self.tag, self.application,
            state="source" if self.state == "source" else "running" if self.held else "pending",
            pieces=list(self.held.values()), content_length=self.content_length,
            meta=self.origin_meta,
        ))

    async def attach(self, sink: OutputSink) -> None:
        """A client wants this task written to `sink`; it catches up from stored pieces.

        Runs in the writer thread, like every piece write, so no piece can slip between the
        catch-up and the sink joining the list."""
        await self._in_writer(self._catch_up, sink)

    def _catch_up(self, sink: OutputSink) -> None:
        if self.content_length >= 0:
            sink.set_length(self.content_length)
        wants_data = getattr(sink, "wants_data", True)  # a proxy stream reads pieces itself
        for num, info in sorted(self.daemon.store.manifest(self.task_id).items()):
            data = self.daemon.store.get(info.digest) if wants_data else None
            if data is None and wants_data:
                raise StorageError(f"piece {num} vanished from the store")
            sink.write(info, data)
        if not sink.closed:  # aborted meanwhile (the request was cancelled): not a sink any more
            self.sinks.append(sink)

    async def wait(self, sink: OutputSink) -> dict:
        try:
            await asyncio.shield(self.done)
        except BaseException:
            await self._in_writer(self._detach, sink, True)
            raise
        await self._in_writer(self._detach, sink, False)
        return self.result_stats()

    def _detach(self, sink: OutputSink, abort: bool) -> None:
        """Writer thread: the client is done with `sink`. A sink that joined after the finish
        pass is finished here; a sink whose finish failed raises its own error."""
        if sink in self.sinks:
            self.sinks.remove(sink)
        if abort:
            sink.abort()
        elif sink.error is not None:
            raise sink.error
        elif not sink.closed:
            sink.finish(self.content_length, self.file_digest)

    def _in_writer(self, fn, *args):
        """Run `fn` in the daemon's single writer thread (piece stores, output writes, hashing)."""
        return asyncio.get_running_loop().run_in_executor(self.daemon.writer, fn, *args)

    def result_stats(self) -> dict:
        return {
            **self.stats,
            "task_id": self.task_id,
            "content_length": self.content_length,
            "pieces": self.piece_count,
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "state": self.state,
        }

    def _save_meta(self) -> None:
        self.daemon.store.put_task(self.task_id, {
            "url": self.url, "tag": self.tag, "application": self.application,
            "content_length": self.content_length, "complete": self.complete,
            "file_digest": self.file_digest, "piece_count": self.piece_count,
            "etag": self.etag, "content_type": self.content_type, "origin_meta": self.origin_meta,
            "verified": self.verified,
        })

    def _all_held(self) -> bool:
        return self.complete and self.piece_count >= 0 and len(self.held) >= self.piece_count

    # -- scheduler messages ---------------------------------------------------------------

    def on_scheduler(self, msg: Any) -> None:
        if self.state in ("succeeded", "failed", "verifying"):
            return
        if isinstance(msg, wire.TaskManifest):
            self._on_manifest(msg)
        elif isinstance(msg, wire.PeerParents):
            self._set_parents(msg.parents)
        elif isinstance(msg, wire.BackToSource):
            self.go_source(msg.reason or "scheduler said so")
        elif isinstance(msg, wire.TaskFailed):
            # The origin's own refusal (a 4xx), as the peer that read it saw it.
            self.fail(SourceError(msg.reason, final=msg.code == "source"), report=False)

    def _on_manifest(self, msg: wire.TaskManifest) -> None:
        fresh = [p for p in msg.pieces if p.num not in self.manifest]
        for p in fresh:
            self.manifest[p.num] = p
        self.picker.add_manifest(fresh)
        take_local(self, fresh)
        if msg.content_length >= 0 and self.content_length < 0:
            self.content_length = msg.content_length
            self.daemon.writer.submit(self._set_length)
        if msg.meta and not self.origin_meta:
            self.set_origin_meta(msg.meta)
            self._save_meta()
        self._check_meta()
        if msg.complete:
            self.picker.complete = True
        if msg.complete and not self.complete:
            self.complete = True
            self.file_digest = msg.file_digest
            self.piece_count = msg.piece_count
            self._save_meta()
        if self.state == "pending":
            self.state = "running"
        self._pump()
        if self._all_held():
            self._spawn(self._finish())

    # -- storing, reporting, finishing ----------------------------------------------------

    def _write(self, info: wire.PieceInfo, data: Any, verify: "bool | concurrent.futures.Future") -> bool:
        """Writer thread: verify, store, write to every sink. False if the bytes are bad.
        `verify`: True to hash here, or the future of the digest computed elsewhere."""
        if verify:
            got = verify.result() if isinstance(verify, concurrent.futures.Future) else digest(data)
            if got != info.digest:
                return False
        self.daemon.store.put(self.task_id, info, data)
        for sink in list(self.sinks):
            self._sink_do(sink, sink.write, info, data)
        if self.hasher is not None:
            self.hasher.feed(info, data)
        return True

    def _written(self, fut: asyncio.Future, info: wire.PieceInfo, source: str, pid: str) -> None:
        """Back on the loop after a piece from a parent went through the writer."""
        self.writing.discard(info.num)
        if self.state in ("succeeded", "failed"):
            return
        err = fut.exception()
        if err is not None:
            self.fail(err if isinstance(err, DfzmqError) else DownloadError(f"internal error: {err}"))
            return
        if not fut.result():
            self._bad_piece(pid, info.num)
            return
        self._stored(info, source)
        trace("got", self.task_id, info.num, pid)
        self._cancel_elsewhere(info.num, pid)
        self.picker.on_piece(pid, info.num, time.monotonic())
        self._pump()

    def _stored(self, info: wire.PieceInfo, source: str) -> None:
        """A piece is in the store and every sink: account for it, announce it, report it."""
        self.held[info.num] = info
        self.manifest.setdefault(info.num, info)
        self.stats[f"{source}_bytes"] += info.length
        self.daemon.counters[f"bytes.{source}"] += info.length  # daemon-wide, for metrics
        self.daemon.counters[f"pieces.{source}"] += 1
        self.last_progress = time.monotonic()
        self.stalls = 0
        self.daemon.upload.on_piece(self.task_id, info.num, from_origin=(source == "origin"))
        self.reports.append(info)
        if len(self.reports) >= REPORT_BATCH:
            self._flush_reports()
        if self.state == "running" and self._all_held():
            self._spawn(self._finish())

    def _flush_reports(self) -> None:
        if not self.reports:
            return
        if self.scheduler is not None and self.scheduler.alive:
            self.scheduler.send(wire.PieceReport(
                self.task_id, self.peer_id, self.reports, self.content_length,
                "origin" if self.state == "source" else "p2p", self.origin_meta))
        self.reports = []

    async def _finish(self) -> None:
        if self.state in ("succeeded", "failed", "verifying"):
            return
        if self.expected_sha256 and not self.verified and not await verify_content(self):
            return
        self.state = "succeeded"
        try:
            self._flush_reports()
            for pid in list(self.parents):
                self._drop_parent(pid, block=False)
            self._save_meta()
            await self._in_writer(self._finish_sinks)
        except Exception as e:
            self.state = "finishing"
            self.fail(e if isinstance(e, DfzmqError) else DownloadError(f"internal error: {e}"))
            return
        self.daemon.upload.on_complete(self.task_id)
        self._check_meta()
        if self.scheduler is not None and not self.done_reported:
            self.scheduler.send(wire.PeerDone(self.task_id, self.peer_id, self.content_length,
                                              self.file_digest, self.piece_count, self.origin_meta))
        self._stop_bg()
        self.log.info("done: %d bytes in %.2fs (origin %d, seed %d, peers %d, cached %d)",
                      self.content_length, time.monotonic() - self.started, self.stats["origin_bytes"],
                      self.stats["seed_bytes"], self.stats["peer_bytes"], self.stats["cached_bytes"])
        self.daemon.task_finished(self)
        if not self.done.done():
            self.done.set_result(self.result_stats())
        await asyncio.to_thread(self.daemon.store.flush)

    def _finish_sinks(self) -> None:
        for sink in self.sinks:
            try:
                sink.finish(self.content_length, self.file_digest)
            except DfzmqError as e:
                sink.error = e  # that client's output failed; the task itself succeeded

    def _abort_sinks(self) -> None:
        for sink in self.sinks:
            sink.abort()
        self.sinks.clear()

    def fail(self, err: DfzmqError, report: bool = True) -> None:
        if self.state in ("succeeded", "failed"):
            return
        self.state = "failed"
        self.log.warning("failed: %s", err)
        self.daemon.counters["task.failed"] += 1
        for pid in list(self.parents):
            self._drop_parent(pid, block=False)
        self.daemon.writer.submit(self._abort_sinks)
        if self.source_task is not None and self.source_task is not asyncio.current_task():
            self.source_task.cancel()
        if report and self.scheduler is not None:
            # "source" tells the scheduler the origin itself said no (a 4xx): every peer fails.
            # Our own DNS or connection trouble, or a 5xx after retries, is this peer's failure.
            code = "source" if isinstance(err, SourceError) and err.final else type(err).__name__
            self.scheduler.send(wire.PeerFailed(self.task_id, self.peer_id, str(err), code))
        self._stop_bg()
        self.daemon.task_finished(self)
        if not self.done.done():
            self.done.set_exception(err)
            self.done.exception()  # mark retrieved: no client may be waiting

    # -- back to source -------------------------------------------------------------------

    def go_source(self, reason: str) -> None:
        if self.state in ("source", "succeeded", "failed", "verifying"):
            return
        self.log.info("back to source: %s", reason)
        self.state = "source"
        for pid in list(self.parents):
            self._drop_parent(pid, block=False)
        self.source_task = asyncio.create_task(read_origin(self))

    def _set_length(self) -> None:
        for sink in list(self.sinks):
            self._sink_do(sink, sink.set_length, self.content_length)

    def _sink_do(self, sink: OutputSink, fn, *args) -> None:
        """Writer thread: one client's output failing (disk full, say) fails that client only."""
        try:
            fn(*args)
        except DfzmqError as e:
            sink.error = e
            sink.abort()
            self.sinks.remove(sink)

    def set_origin_meta(self, meta: dict[str, str]) -> None:
        """The origin's answer headers for this task (from our own origin read, the scheduler's
        manifest or the store); the first one known stays."""
        if meta and not self.origin_meta:
            self.origin_meta = {str(k): str(v) for k, v in meta.items()}
            self.etag = self.etag or self.origin_meta.get("etag", "")
            self.content_type = self.content_type or self.origin_meta.get("content-type", "")
        self._check_meta()

    def _check_meta(self) -> None:
        if self.content_length >= 0 and (self.origin_meta or self.complete):
            self.meta_event.set()

    def _read_stored(self, info: wire.PieceInfo) -> bytes:
        data = self.daemon.store.get(info.digest)
        if data is None:
            raise StorageError(f"piece {info.num} vanished from the store")
        return data

    # -- watchdog -------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        """Heartbeats to parents, dead-parent and stall detection, report flushing."""
        interval = self.cfg.heartbeat_interval_s
        last_beat = 0.0
        while self.state not in ("succeeded", "failed"):
            await asyncio.sleep(min(WATCHDOG_TICK_S, interval))
            now = time.monotonic()
            self._flush_reports()
            if self.state == "pending":
                if self.scheduler is None or not self.scheduler.alive:
                    if now - self.started > self.cfg.schedule_timeout_s or self.scheduler is None:
                        self.go_source("scheduler unavailable")
                elif now - self.registered_at > self.cfg.schedule_timeout_s:
                    self.go_source("scheduler did not answer")
                continue
            if self.state != "running":
                continue
            if now - last_beat >= interval:
                last_beat = now
                for link in self.parents.values():
                    # Only a quiet pipe needs one: a parent sending us pieces or HAVEs is alive,
                    # and our requests keep us alive at the parent (its subscriber TTL is 30 s).
                    if now - link.last_seen >= interval or now - link.last_sent >= 4 * interval:
                        link.send(wire.Heartbeat(self.peer_id))
            dead = [pid for pid, l in self.parents.items()
                    if now - l.last_seen > self.picker.silence_allowed_s(pid, interval * self.cfg.liveness)]
            for pid in dead:
                self.log.info("parent %s silent: dropping it", pid)
                trace("silent", self.task_id, -1, pid)
                self._drop_parent(pid, block=True)
            timed_out: dict[str, list[int]] = {}
            for pid, num in self.picker.expired(now):
                trace("timeout", self.task_id, num, pid)
                timed_out.setdefault(pid, []).append(num)
                if self.picker.on_timeout(pid, num):
                    self._drop_parent(pid, block=True)
                    dead.append(pid)
            for pid, nums in timed_out.items():  # given up on: the parent may drop them still queued
                if pid in self.parents:
                    self.parents[pid].send(wire.PieceCancel(self.task_id, nums))
            if dead:
                self._reschedule("parents dead or too slow")
            elif now - self.last_progress > self.cfg.stall_timeout_s:
                self.stalls += 1
                if self.stalls >= 2:
                    self.go_source(f"no progress for {2 * self.cfg.stall_timeout_s:.0f}s")
                    continue
                self.log.info("no progress for %.0fs: asking to be rescheduled", now - self.last_progress)
                self.last_progress = now
                for pid, st in list(self.picker.parents.items()):
                    if st.outstanding:
                        self._drop_parent(pid, block=True)
                self._reschedule(wire.RESCHEDULE_STALLED)
            elif not self.parents and self.scheduler is not None and not self.scheduler.alive:
                self.go_source("no parents and no scheduler")
            self._pump()

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._bg.append(t)
        t.add_done_callback(lambda t: self._bg.remove(t) if t in self._bg else None)

    def _stop_bg(self) -> None:
        current = asyncio.current_task()
        for t in self._bg:
            if t is not current and not t.done():
                t.cancel()
