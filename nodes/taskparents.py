"""A task run's parents: the direct pipes to them and what arrives on them.

`ParentLink` is one parent's pipe (a plain DEALER read by a Drain, nodes/zdrain.py: a callback
per message on the loop thread). `ParentSide` is the part of `TaskRun` (nodes/task.py) that
connects to the parents the scheduler gives, takes their messages (pieces, HAVEs, "missing"),
fills their credit windows from the picker's choices once per loop turn, cancels requests that
another parent answered first (PIECE_CANCEL), and drops and reports bad or dead parents. It is
a mixin: the state it uses (parents, picker, manifest, blocklist, ...) is TaskRun's.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING, Any

import zmq

from dfzmq import net, wire
from dfzmq.errors import DfzmqError, DownloadError
from dfzmq.service import MSG_IN, MSG_OUT, decode_plain
from nodes.source import digest
from nodes.trace import trace
from nodes.zdrain import Drain, plain_context

if TYPE_CHECKING:
    from nodes.task import TaskRun



class ParentLink:
    """The direct pipe to one parent: a plain DEALER and the Drain that reads it (a callback per
    message on the loop thread, nodes/zdrain.py: no Future or Task wake-up per message)."""

    def __init__(self, run: "TaskRun", info: wire.ParentInfo) -> None:
        self.run = run
        self.info = info
        self.sock = net.make_socket(plain_context(run.daemon.ctx), "parent_dealer", run.daemon.curve)
        try:
            self.sock.connect(info.addr)
        except zmq.ZMQError:
            self.sock.close(0)
            raise
        self.last_seen = time.monotonic()
        self.last_sent = 0.0
        self.drain: Drain | None = None

    def send(self, msg: Any) -> None:
        counters = self.run.daemon.counters
        counters[MSG_OUT[msg.KIND]] += 1
        self.last_sent = time.monotonic()
        try:
            if self.drain is not None:
                self.drain.send(wire.encode(msg))
            else:
                self.sock.send_multipart(wire.encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            counters["parent.send-dropped"] += 1

    def close(self) -> None:
        if self.drain is not None:
            self.drain.close()
        self.sock.close(linger=200)  # let a final UNSUBSCRIBE leave


class ParentSide:
    """TaskRun's parent handling (a mixin; see the module docstring)."""

    def _set_parents(self, parents: list[wire.ParentInfo]) -> None:
        if self.state == "source":
            return
        self.state = "running"
        wanted = {p.peer_id: p for p in parents if p.peer_id not in self.blocklist and p.peer_id != self.peer_id}
        trace("parents", self.task_id, len(wanted), "", sorted(wanted))
        for pid in list(self.parents):
            if pid not in wanted:
                self._drop_parent(pid, block=False)
        for pid, info in wanted.items():
            if pid in self.parents:
                continue
            try:
                link = ParentLink(self, info)
            except zmq.ZMQError as e:
                self.log.warning("cannot connect to parent %s at %s: %s", pid, info.addr, e)
                self.blocklist.add(pid)
                continue
            self.parents[pid] = link
            self.picker.add_parent(pid, seed=info.seed)
            link.drain = Drain(link.sock, functools.partial(self._on_parent_frames, link), copy=False,
                               on_error=functools.partial(self._on_parent_error, link))
            link.send(wire.Subscribe(self.task_id, self.peer_id))
        self.last_progress = time.monotonic()

    def _on_parent_frames(self, link: ParentLink, frames: list) -> None:
        """One message from a parent (the link's Drain calls this on the loop thread)."""
        msg = decode_plain(frames, self.daemon.counters)
        if msg is None:
            return
        self.daemon.counters[MSG_IN[msg.KIND]] += 1
        link.last_seen = time.monotonic()
        if isinstance(msg, wire.PieceData):
            self._on_piece_data(link, msg)
        elif isinstance(msg, wire.Have):
            pid = link.info.peer_id
            self.picker.on_have(pid, msg.nums)
            if self.picker.have_is_news(pid, msg.nums):
                self._pump()
        elif isinstance(msg, wire.PieceMissing):
            self.picker.on_missing(link.info.peer_id, msg.num)
            self._pump()

    def _on_parent_error(self, link: ParentLink, err: BaseException) -> None:
        if isinstance(err, DfzmqError):
            self.fail(err)
        elif isinstance(err, zmq.ZMQError):  # the pipe itself broke: drop the parent, ask again
            self.daemon.counters["parent.recv-errors"] += 1
            self.log.warning("parent %s receive failed: %s", link.info.peer_id, err)
            if self.parents.get(link.info.peer_id) is link:
                self._drop_parent(link.info.peer_id, block=False)
                self._reschedule(f"receive from {link.info.peer_id} failed")
        else:
            self.log.error("parent %s reader failed", link.info.peer_id, exc_info=err)
            self.fail(DownloadError(f"internal error: {err}"))

    def _on_piece_data(self, link: ParentLink, msg: wire.PieceData) -> None:
        pid = link.info.peer_id
        info = self.manifest.get(msg.num)
        if msg.num in self.held or msg.num in self.writing:
            self.picker.on_duplicate(pid, msg.num)  # an endgame or rescue copy; the first one wins
            trace("dup", self.task_id, msg.num, pid)
            self.stats["duplicate_bytes"] += len(msg.data)
            return
        if info is None or msg.digest != info.digest or len(msg.data) != info.length:
            self._bad_piece(pid, msg.num)
            return
        source = "seed" if link.info.seed else "peer"
        now = time.monotonic()
        wait = max(self.daemon.download_bucket.reserve(info.length, now), self.bucket.reserve(info.length, now))
        if wait > 0:
            self.pump_after = max(self.pump_after, now + wait)
        self.writing.add(msg.num)
        # Hashed in the verifier thread while the writer stores the pieces before it (blake3
        # releases the GIL): the writer thread is the download's critical path.
        check = self.daemon.verifier.submit(digest, msg.data)
        fut = self._in_writer(self._write, info, msg.data, check)
        fut.add_done_callback(lambda f: self._written(f, info, source, pid))

    def _bad_piece(self, pid: str, num: int) -> None:
        self.daemon.counters["parent.bad-piece"] += 1
        self.log.warning("bad piece %d from parent %s: blocking it", num, pid)
        self.picker.on_failure(pid, num)
        self._drop_parent(pid, block=True)
        self.bad_parents.add(pid)
        self._reschedule(f"bad piece from {pid}")

    def _pump(self) -> None:
        """Fill the parents' windows, once per loop turn however many messages asked for it."""
        if not self._pump_due:
            self._pump_due = True
            asyncio.get_running_loop().call_soon(self._pump_now)

    def _pump_now(self) -> None:
        self._pump_due = False
        if self.state != "running":
            return
        delay = self.pump_after - time.monotonic()
        if delay > 0:  # over a download limit: ask for more only once the tokens are back
            self._pump_due = True
            asyncio.get_running_loop().call_later(delay, self._pump_now)
            return
        self.daemon.counters["msg.picks"] += 1  # not a message: picker runs, per piece in swarm_cpu
        left = self.picker.left_per_mille()  # a congested parent serves the furthest behind first
        for pid, num in self.picker.next_requests(time.monotonic()):
            info = self.manifest[num]
            self.parents[pid].send(wire.PieceRequest(self.task_id, num, info.digest, left))
            trace("req", self.task_id, num, pid)

    def _cancel_elsewhere(self, num: int, got_from: str) -> None:
        """The piece came from `got_from`: other parents it was asked of (a rescue or endgame
        copy) may drop the request if its bytes have not left yet (PIECE_CANCEL)."""
        for other in self.picker.requested.get(num, ()):
            link = self.parents.get(other)
            if other != got_from and link is not None:
                link.send(wire.PieceCancel(self.task_id, [num]))

    def _drop_parent(self, pid: str, block: bool) -> None:
        link = self.parents.pop(pid, None)
        self.picker.remove_parent(pid)
        if block:
            self.blocklist.add(pid)
        if link is not None:
            link.send(wire.Unsubscribe(self.task_id))
            link.close()

    def _reschedule(self, reason: str) -> None:
        if self.scheduler is not None and self.scheduler.alive:
            self.scheduler.send(wire.Reschedule(self.task_id, self.peer_id, sorted(self.blocklist), reason,
                                                sorted(self.bad_parents)))
        elif not self.parents:
            self.go_source(f"{reason}; no scheduler")
        self._pump()
