"""The upload server: a ROUTER other peers' DEALERs pull pieces from (the direct pipes).

Children SUBSCRIBE to a task and get HAVE messages: everything this peer holds, then each new
piece as it is stored, so a child can stream from a parent that is itself still downloading.
They ask for pieces by digest (PIECE_REQUEST) and get the bytes as their own frame.

Pieces this peer read from the origin are revealed the way BitTorrent's super-seeding does:
first to one subscriber (round robin), to everyone only `reveal_delay_s` later. By then the
first child usually holds it and the others fetch it from that child, so the origin-reading
peer uploads each piece about once and the swarm carries the rest. A child that subscribes
while pieces are hidden gets its share of them, those shown to the fewest children first: in
the lab (N=32, the origin read in 0.5 s) most children subscribed after the seed had read most
pieces, saw only the two revealed to everyone by then, and 21 of 32 asked the seed for piece 0
(its first seconds of upload went to copies of one piece).

Repeats: a piece read from the origin here is, for its first moments, the swarm's only copy.
While a wave of children (WAVE_CHILDREN) shares an uplink that is capped (measured as the
bottleneck, or not measured yet: nodes/uplink.py), a child in its first seconds
(PIECE_REQUEST.left of at least `wire.EARLY_LEFT`) asking for one that another child asked for
less than `wire.REPEAT_HOLD_S` ago asks for a piece the swarm is about to hold elsewhere. Such a
repeat is held back until that long after the first ask, so the origin reader's upload goes to pieces
nobody has yet; the child meanwhile asks a peer that got the piece (nodes/picker.py,
`_from_seed`) and cancels it here, where it never cost a byte. In the lab (N=32, 16 MiB,
3 Mbit/s) the seed reads the first piece with the range probe and the rest a few tenths of a
second later, so a wave of children subscribing in between saw that one piece and 20-25 of them
asked the seed for it: the seed's first two seconds went to copies of it, which landed after
the children had got it from peers.

It never blocks on a slow child (ROUTER drops past the high-water mark; children's credit
windows bound what is queued), and never lets a malformed frame stop the loop.

Each child has at most two pieces in the socket; its further requests wait here, where a
PIECE_CANCEL can still remove them (nodes/uploadq.py).

The neediest child's bytes first: a capped uplink releases requests neediest child first, but
once bytes are in the kernel the queue behind the uplink decides, and a FIFO there shares it by
what each TCP flow puts in it. Linux sizes a flow's packets by the lowest round trip it has seen
(tcp_tso_rtt_log): a connection opened while the link was idle sends 64 KiB packets, one opened
behind a queue a few kilobytes, and with two packets each in the queue (TCP small queues) the
first takes most of the link. In a network namespace shaped like the lab (3 Mbit/s, eight
flows, then a ninth) one flow took 200-280 kB/s, the others and the newcomer 6-20 (the
README, fourteenth round); a child boosted to a busy fast parent mid-run waited 10-18 s per
piece there. So every child connection sits in the queue's bulk band and, while the uplink is
capped, the child lacking the most of its task (MARK_MARGIN beyond the median child with requests
here) is moved to the best-effort band ahead of it: pfifo_fast and prio qdiscs then send its
bytes first, and the others fill what it leaves. Flow-fair qdiscs (fq_codel, fq) ignore the band
and share the link evenly anyway. Each child's connection is known by the descriptor its
messages arrive on (ZMQ_SRCFD), checked against the meter's accepted connections before it is
touched (nodes/uplink.py).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import zmq
import zmq.asyncio

from dfzmq import net, wire
from dfzmq.service import MSG_IN, MSG_OUT, Counters, decode_routed
from nodes import trace
from nodes.limits import TokenBucket
from nodes.store import DISK, PieceStore
from nodes.uplink import BULK_PRIORITY, NEEDY_PRIORITY, START_POLL_S, UplinkMeter
from nodes.uploadq import ChildQueues, InFlight
from nodes.zdrain import Drain, plain_context

log = logging.getLogger(__name__)

# Announcements of new pieces are batched per child for this long: a daemon sends one HAVE per
# piece per child otherwise, and at lab rates (a piece every 0.1-0.2 s) a loop turn batches
# nothing. 50 ms is under a tenth of a 64 KiB piece's time on a 6 Mbit/s link.
HAVE_BATCH_S = 0.05
REVEAL_TICK_S = 0.05  # hidden pieces are revealed in batches at most this often
# While requests wait in the child queues, look for room this soon, then twice as late after each
# look that released nothing, up to RELEASE_MAX_S: a fast link drains a window's tail within tens
# of milliseconds, while a slow uplink (where requests wait for seconds, clocked by the children's
# own traffic) is not woken a hundred times a second for nothing (an idle wake-up costs CPU that
# 33 daemons on two cores do not have, issue 3). Measured with tools/swarm_cpu.py at 384 KiB/s
# uplinks: starting at 2 ms cost 6.2 ms of CPU per piece, at 10 ms 4.9, with no queue at all 4.9.
RELEASE_TICK_S = 0.01
RELEASE_MAX_S = 0.1
# Repeats are held back and the uplink starts capped (module docstring) only at a parent with
# this many children on the task: a wave. A few children on a fast link lose more by waiting
# than a repeat costs (three registry mirrors fetching one blob through each other).
WAVE_CHILDREN = 8
# A congested uplink marks the connection of its neediest child for the queue's best-effort band
# (module docstring, "The neediest child's bytes first") when that child lacks at least this much
# more of its task (per mille, as PIECE_REQUEST.left) than the median child with requests here.
MARK_MARGIN = 25


class _Done:
    done = True


READER_THREADS = 2  # piece files read at once for uploads (each holds a 4 MiB O_DIRECT buffer)
_DONE = _Done()  # the tracker of a piece that is not in the socket (dropped at the high-water mark)


@dataclass
class Subscriber:
    peer_id: str
    revealed: set[int] = field(default_factory=set)


class UploadServer:
    def __init__(self, ctx: zmq.asyncio.Context, store: PieceStore, listen: str, advertise_host: str,
                 held: Callable[[str], dict], counters: Counters, reveal_delay_s: float = 0.25,
                 curve: net.Curve | None = None, bucket: TokenBucket | None = None,
                 subscriber_ttl_s: float = 30.0, share: bool = True) -> None:
        self.store = store
        self.held = held  # task_id -> {num: PieceInfo} this peer holds
        self.counters = counters
        self.reveal_delay_s = reveal_delay_s
        # A plain socket, received from by a Drain (nodes/zdrain.py): no Future per message.
        self.sock = net.make_socket(plain_context(ctx), "upload_router", curve)
        # Before bind, so that it sees every connection: the uplink's rate and queue, the child
        # connections' send buffers and the in-flight cap once the uplink is the bottleneck.
        self.uplink = UplinkMeter(self.sock) if share else None
        self.drain: Drain | None = None
        bound = net.bind(self.sock, listen)
        self.addr = net.advertise(bound, advertise_host or None)
        if self.uplink is not None:
            self.uplink.port = net.tcp_port(bound)
        self.subs: dict[str, dict[bytes, Subscriber]] = {}
        self.rr: dict[str, int] = {}
        self.pending: list[tuple[float, str, int]] = []  # (reveal at, task, num)
        # task -> nums not yet revealed to all -> how many children they were shown to meanwhile
        self.hidden: dict[str, dict[int, int]] = {}
        self.fresh: dict[str, list[int]] = {}  # task -> nums stored since the last HAVE flush
        # task -> num -> when a child first asked for it (0: nobody yet), for pieces read from
        # the origin here (a repeat of one is held back: module docstring)
        self.origin_asked: dict[str, dict[int, float]] = {}
        self.bytes_uploaded = 0
        self.corrupt = False  # fault switch for tests only (DFZMQ_TEST_CORRUPT_UPLOADS)
        self.bucket = bucket or TokenBucket(0)
        # Children heartbeat their parents; one silent this long is gone (its UNSUBSCRIBE lost).
        self.subscriber_ttl_s = subscriber_ttl_s
        self.last_heard: dict[bytes, float] = {}
        self.on_access: Callable[[str], None] = lambda task_id: None  # for the GC's LRU
        # With an upload limit, pieces wait here for tokens while the loop keeps answering
        # heartbeats and subscriptions (a parent that is only slow must not look dead).
        self.outbox: asyncio.Queue = asyncio.Queue()
        # Per child: pieces in the socket, requests waiting (cancellable); with a cap for all
        # children together while the uplink is the bottleneck (nodes/uplink.py).
        self.queues = ChildQueues()
        self._piece_len = 0  # the last piece sent: the in-flight cap counts pieces
        self._release_max_s = RELEASE_MAX_S
        self._congested_s = 0.0
        self._monitor: Drain | None = None  # reads the upload socket's monitor (nodes/uplink.py)
        # child -> the descriptor its messages come on (ZMQ_SRCFD) and the meter's record of that
        # connection (a descriptor reused for another child's connection is another record)
        self._fd: dict[bytes, tuple[int, object]] = {}
        self._marked: bytes | None = None  # the child whose connection is in the best-effort band

        self._queued = asyncio.Event()  # something waits in self.queues
        self._readers: ThreadPoolExecutor | None = None  # reads piece files not in memory
        self._closed = False
        self._flush_timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()  # the reveal loop has something new to wait for

    # -- notifications from the daemon ------------------------------------------------------

    def on_piece(self, task_id: str, num: int, from_origin: bool) -> None:
        subs = self.subs.get(task_id)
        if from_origin:
            self.origin_asked.setdefault(task_id, {})[num] = 0.0
            self._start_capped(task_id)
        if from_origin and self.reveal_delay_s > 0:
            shown = self.hidden.setdefault(task_id, {})
            shown[num] = 0
            if not self.pending:
                self._wake.set()
            self.pending.append((time.monotonic() + self.reveal_delay_s, task_id, num))
            if subs:
                idents = list(subs)
                i = self.rr.get(task_id, 0) % len(idents)
                self.rr[task_id] = i + 1
                shown[num] = 1
                self._have(task_id, idents[i], [num])
            return
        if subs:
            # Batched: one HAVE per child every HAVE_BATCH_S, however many pieces landed meanwhile.
            if not self.fresh:
                self._flush_timer = asyncio.get_running_loop().call_later(HAVE_BATCH_S, self._flush_fresh)
            self.fresh.setdefault(task_id, []).append(num)

    def _flush_fresh(self) -> None:
        self._flush_timer = None
        fresh, self.fresh = self.fresh, {}
        for task_id, nums in fresh.items():
            for ident in list(self.subs.get(task_id, ())):
                self._have(task_id, ident, nums)

    def on_complete(self, task_id: str) -> None:
        """The task is complete here: reveal everything to everyone now."""
        self.hidden.pop(task_id, None)
        held = self.held(task_id)
        for ident, sub in list(self.subs.get(task_id, {}).items()):
            self._have(task_id, ident, [n for n in held if n not in sub.revealed], complete=True)

    def _have(self, task_id: str, ident: bytes, nums: list[int], complete: bool = False) -> None:
        sub = self.subs.get(task_id, {}).get(ident)
        if sub is None:
            return
        sub.revealed.update(nums)
        self._send(ident, wire.Have(task_id, nums, complete))

    def _send(self, ident: bytes, msg, payload_copy: bool = True) -> None:
        self.counters[MSG_OUT[msg.KIND]] += 1
        try:
            if self.drain is not None:
                self.drain.send([ident, *wire.encode(msg)], copy=payload_copy)
            else:
                self.sock.send_multipart([ident, *wire.encode(msg)], flags=zmq.NOBLOCK, copy=payload_copy)
        except zmq.Again:
            self.counters["upload.dropped-hwm"] += 1
        except zmq.ZMQError:  # the socket closed under a late callback
            self.counters["upload.send-errors"] += 1

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        reveal = asyncio.create_task(self._reveal_loop())
        sender = asyncio.create_task(self._send_loop())
        releaser = asyncio.create_task(self._release_loop())
        # The first frame as a Frame when sharing by need: it names the connection a child's
        # message came on.
        self.drain = Drain(self.sock, self._on_frames, on_error=self._on_recv_error,
                           first_frame=self.uplink is not None)
        if self.uplink is not None and self.uplink.monitor is not None:
            # Read all the time: a full monitor pipe would block libzmq's I/O thread.
            self._monitor = Drain(self.uplink.monitor, self.uplink.on_event, on_error=self._on_recv_error)
        try:
            await asyncio.Event().wait()  # requests are handled by the drain's callback
        finally:
            self.drain.close()
            self.drain = None
            if self._monitor is not None:
                self._monitor.close()
                self._monitor = None
            reveal.cancel()
            sender.cancel()
            releaser.cancel()

    def _on_frames(self, frames: list) -> None:
        got = decode_routed(frames, self.counters)
        if got is None:
            return
        if self.uplink is not None and got[0] not in self._fd:
            self._learn_connection(got[0], frames[0])
        try:
            self.handle(*got)
        except Exception:  # never let one request stop the server
            self.counters["upload.errors"] += 1
            log.exception("upload request failed")

    def _on_recv_error(self, e: BaseException) -> None:
        # Never let the server die on a receive error: count it and keep the socket.
        self.counters["upload.recv-errors"] += 1
        log.warning("upload receive failed: %s", e)

    def handle(self, ident: bytes, msg) -> None:
        self.counters[MSG_IN[msg.KIND]] += 1
        if not self.last_heard:
            self._wake.set()  # children to expire now
        self.last_heard[ident] = time.monotonic()
        if isinstance(msg, wire.PieceRequest):
            self._serve_piece(ident, msg)
        elif isinstance(msg, wire.Subscribe):
            self._subscribe(ident, msg)
        elif isinstance(msg, wire.Heartbeat):
            self._send(ident, wire.Heartbeat("upload"))
        elif isinstance(msg, wire.PieceCancel):
            self._cancel(ident, msg)
        elif isinstance(msg, wire.Unsubscribe):
            subs = self.subs.get(msg.task_id, {})
            subs.pop(ident, None)
            if not subs:
                self.subs.pop(msg.task_id, None)
                self.rr.pop(msg.task_id, None)
            self.queues.drop(ident, msg.task_id)
        else:
            self.counters["upload.unexpected"] += 1
            self._send(ident, wire.Error("bad-request", f"unexpected {type(msg).__name__}"))
        if self.queues.total > 0:
            if self.queues.waiting:
                self._release_all()
            if isinstance(msg, (wire.PieceRequest, wire.PieceCancel, wire.Unsubscribe)):
                self._mark_neediest()  # who needs most changes with requests, not heartbeats
        elif ident in self.queues.waiting:  # the child's own traffic clocks its queue
            self._release(ident)

    def _cancel(self, ident: bytes, msg: wire.PieceCancel) -> None:
        nums = set(msg.nums)
        removed = self.queues.cancel(ident, msg.task_id, nums)
        if removed:
            held = self.held(msg.task_id) or {}
            self.counters["upload.cancelled"] += len(removed)
            self.counters["upload.cancelled-bytes"] += sum(
                held[r.num].length for r in removed if r.num in held)
        # Already in the socket, or never asked for here: this server cannot tell them apart.
        self.counters["upload.cancel-too-late"] += len(nums) - len(removed)

    def forget(self, task_id: str) -> None:
        """The task was evicted from the store."""
        self.subs.pop(task_id, None)
        self.rr.pop(task_id, None)
        self.hidden.pop(task_id, None)
        self.origin_asked.pop(task_id, None)
        self.queues.drop_task(task_id)

    def _subscribe(self, ident: bytes, msg: wire.Subscribe) -> None:
        self.on_access(msg.task_id)
        subs = self.subs.setdefault(msg.task_id, {})
        subs[ident] = Subscriber(msg.peer_id)
        held = self.held(msg.task_id)
        hidden = self.hidden.get(msg.task_id, {})
        nums = [n for n in held if n not in hidden]
        if hidden:  # its share of the hidden pieces, those shown to the fewest children first
            share = sorted(hidden, key=lambda n: (hidden[n], n))[:-(-len(hidden) // len(subs))]
            for n in share:
                hidden[n] += 1
            nums += share
        self._have(msg.task_id, ident, nums, complete=self._complete(msg.task_id, held))
        self._start_capped(msg.task_id)

    def _complete(self, task_id: str, held: dict) -> bool:
        meta = self.store.get_task(task_id)
        return bool(meta and meta.get("complete") and meta.get("piece_count", -1) == len(held))

    def _child(self, ident: bytes, task_id: str) -> str:
        sub = self.subs.get(task_id, {}).get(ident)
        return sub.peer_id if sub else ident.hex()

    def _serve_piece(self, ident: bytes, msg: wire.PieceRequest) -> None:
        self.on_access(msg.task_id)
        if trace.enabled():  # the lab: when a request arrived here, to tell queueing from the wire
            trace.trace("up-asked", msg.task_id, msg.num, self._child(ident, msg.task_id), msg.left)
        now = time.monotonic()
        asked = self.origin_asked.get(msg.task_id)
        first = asked.get(msg.num) if asked is not None else None
        if first == 0.0:
            asked[msg.num] = now  # the first ask: a capped uplink may keep it queued a while
        elif (first and now < first + wire.REPEAT_HOLD_S and msg.left >= wire.EARLY_LEFT  # -1: not said
                and self.queues.total > 0 and self._wave(msg.task_id)):
            self.queues.hold(ident, msg, first + wire.REPEAT_HOLD_S)
            self.counters["upload.repeats-held"] += 1
            self._queued.set()
            return
        self._admit(ident, msg, now)

    def _admit(self, ident: bytes, msg: wire.PieceRequest, now: float) -> None:
        if self.queues.admit(ident, msg, now):
            self._start(ident, msg)
        else:
            self.counters["upload.queued"] += 1
            self._queued.set()

    def _release_all(self) -> int:
        reqs = self.queues.release_all(time.monotonic())
        for ident, req in reqs:
            self._start(ident, req)
        return len(reqs)

    def _release(self, ident: bytes) -> int:
        reqs = self.queues.release(ident)
        for req in reqs:
            self._start(ident, req)
        return len(reqs)

    async def _release_loop(self) -> None:
        """While requests wait, give each child's queue the room its socket has made (the
        end of a window, where no request of the child's follows to clock it)."""
        tick = RELEASE_TICK_S
        while True:
            if not self._queued.is_set():
                tick = RELEASE_TICK_S
                await self._queued.wait()
            await asyncio.sleep(tick)
            released = 0
            if self.queues.held:
                now = time.monotonic()
                # A repeat is held only while the uplink is capped: once the cap is lifted (a
                # fast link) the held ones go now (lab, N=8, 50 Mbit/s seed: a child whose
                # requests were held got nothing from the seed for 1.5 s, and finished last).
                for ident, req in self.queues.due(now if self.queues.total > 0 else float("inf")):
                    self.counters["upload.repeats-released"] += 1
                    try:
                        self._admit(ident, req, now)
                    except Exception:  # never let one request stop the others
                        self.counters["upload.errors"] += 1
                        log.exception("upload release failed")
            if self.queues.total > 0:
                try:
                    released = self._release_all()
                    self._mark_neediest()
                except Exception:
                    self.counters["upload.errors"] += 1
                    log.exception("upload release failed")
            for ident in self.queues.idents_waiting() if self.queues.total <= 0 else ():
                try:
                    released += self._release(ident)
                except Exception:  # never let one child stop the others
                    self.counters["upload.errors"] += 1
                    log.exception("upload release failed")
            # Backing off while nothing leaves; with the in-flight cap (a congested uplink) never
            # beyond a quarter of a piece's time on the link, or the link idles between pieces.
            tick = RELEASE_TICK_S if released else min(self._release_max_s, 2 * tick)
            if not self.queues.waiting and not self.queues.held:
                self._queued.clear()

    def _start(self, ident: bytes, msg: wire.PieceRequest) -> None:
        """Read the piece and hand it to the socket (or to the upload limiter's queue). A piece
        held in a file and not in memory is read in a reader thread, never on the loop (an
        O_DIRECT read waits for the disk); meanwhile it holds one of the child's socket slots
        and a PIECE_CANCEL can still stop it."""
        try:
            data = self.store.get_ready(msg.digest)
        except ValueError:
            data = None
        flight = InFlight(msg)
        self.queues.sent(ident, flight)
        if data is DISK:
            self.counters["upload.disk-reads"] += 1
            if self._readers is None:
                self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="upload-read")
            flight.reading = True
            fut = asyncio.get_running_loop().run_in_executor(self._readers, self._read, flight)
            fut.add_done_callback(lambda f: self._read_done(ident, flight, f))
            return
        self._reply(ident, flight, data)

    def _read(self, flight: InFlight) -> bytes | None:
        """Reader thread. A request cancelled while it waited for a thread is not read."""
        return None if flight.cancelled or self._closed else self.store.get(flight.req.digest)

    def _read_done(self, ident: bytes, flight: InFlight, fut: asyncio.Future) -> None:
        flight.reading = False
        if flight.cancelled or fut.cancelled() or self._closed:  # cancelled meanwhile, or shut down
            self.counters["upload.cancelled-reading"] += flight.cancelled
            flight.tracker = _DONE
            return
        try:
            data = fut.result()
        except Exception:
            self.counters["upload.errors"] += 1
            log.exception("reading piece %d of %s failed", flight.req.num, flight.req.task_id[:12])
            data = None
        self._reply(ident, flight, data)

    def _reply(self, ident: bytes, flight: InFlight, data) -> None:
        msg = flight.req
        try:
            if data is None:
                flight.tracker = _DONE
                self.counters["upload.missing"] += 1
                self._send(ident, wire.PieceMissing(msg.task_id, msg.num, "missing"))
                return
            if self.corrupt and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            reply = wire.PieceData(msg.task_id, msg.num, msg.digest, data)
            if self.bucket.unlimited:
                flight.tracker = self._send_piece(ident, reply)
            else:
                self.outbox.put_nowait((ident, reply, flight))
        except Exception:  # never keep the child's slot for a reply that could not be made
            flight.tracker = _DONE
            self.counters["upload.errors"] += 1
            log.exception("answering a request for piece %d failed", msg.num)

    def _send_piece(self, ident: bytes, reply: wire.PieceData):
        """Send a piece; returns its tracker (done once ZeroMQ wrote it into the kernel)."""
        self.bytes_uploaded += len(reply.data)
        self._piece_len = len(reply.data)
        self.counters["upload.pieces"] += 1
        self.counters[MSG_OUT[reply.KIND]] += 1
        if trace.enabled():  # read and past the upload limiter: from here the child's connection decides
            trace.trace("up-sent", reply.task_id, reply.num, self._child(ident, reply.task_id), self.queues.total)
        try:
            frames = [ident, *wire.encode(reply)]
            if self.drain is not None:
                return self.drain.send(frames, copy=False, track=True) or _DONE
            return self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False, track=True) or _DONE
        except zmq.Again:
            self.counters["upload.dropped-hwm"] += 1
            return _DONE

    async def _send_loop(self) -> None:
        while True:
            ident, reply, flight = await self.outbox.get()
            if flight.cancelled:  # the child cancelled it while it waited for tokens
                continue
            await self.bucket.take(len(reply.data))
            if flight.cancelled:  # cancelled while we waited: the tokens are spent, the bytes not
                continue
            flight.tracker = self._send_piece(ident, reply)

    def expire(self, now: float) -> None:
        """Forget children not heard from for `subscriber_ttl_s`."""
        gone = {i for i, t in self.last_heard.items() if now - t > self.subscriber_ttl_s}
        if not gone:
            return
        for i in gone:
            del self.last_heard[i]
            self.queues.drop(i)
            if self._marked == i:  # silent, perhaps still connected: back to the bulk band
                self._prioritize(i, BULK_PRIORITY)
                self._marked = None
            self._fd.pop(i, None)
        for task_id in list(self.subs):
            subs = self.subs[task_id]
            for i in gone & subs.keys():
                del subs[i]
            if not subs:
                del self.subs[task_id]
                self.rr.pop(task_id, None)
        self.counters["upload.subscribers-expired"] += len(gone)

    async def _reveal_loop(self) -> None:
        """Reveals hidden pieces when due and forgets silent children. An idle daemon has
        neither to do, so this sleeps until there is: a piece to reveal (at most every
        REVEAL_TICK_S while there are) or, with children known, the once-a-second expiry."""
        last_expiry = last_meter = time.monotonic()
        while True:
            self._wake.clear()
            if not self.pending and not self.last_heard:
                await self._wake.wait()
            else:
                timeout = max(0.0, last_meter + self._meter_every() - time.monotonic())
                if self.pending:
                    timeout = min(timeout, max(REVEAL_TICK_S, self.pending[0][0] - time.monotonic()))
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            now = time.monotonic()
            if now - last_expiry > 1.0:
                last_expiry = now
                self.expire(now)
            if now - last_meter >= self._meter_every():
                self._meter_uplink(now, now - last_meter)
                last_meter = now
            if not self.pending:
                continue
            due: dict[str, list[int]] = {}
            while self.pending and self.pending[0][0] <= now:
                _, task_id, num = self.pending.pop(0)
                hidden = self.hidden.get(task_id)
                if hidden is not None and num in hidden:
                    del hidden[num]
                    due.setdefault(task_id, []).append(num)
            for task_id, nums in due.items():
                for ident, sub in list(self.subs.get(task_id, {}).items()):
                    fresh = [n for n in nums if n not in sub.revealed]
                    if fresh:
                        self._have(task_id, ident, fresh)

    def _mark_neediest(self) -> None:
        """While the uplink is capped, put the connection of the child lacking the most of its
        task (MARK_MARGIN beyond the median child with requests here) in the best-effort band and
        every other child's in the bulk band; nobody's once the cap is lifted."""
        target = None
        if self.queues.total > 0 and self.uplink is not None:
            needs = self.queues.needs()
            if len(needs) >= 2:
                top = max(needs, key=lambda i: (needs[i], i))
                # the lower median: of two children, the other one
                if needs[top] - statistics.median_low(needs.values()) >= MARK_MARGIN and top in self._fd:
                    target = top
        if target == self._marked:
            return
        if self._marked is not None:
            self._prioritize(self._marked, BULK_PRIORITY)
        self._marked = target if target is not None and self._prioritize(target, NEEDY_PRIORITY) else None

    def _unmark(self) -> None:
        try:
            self._mark_neediest()
        except Exception:  # never let a queue priority stop the metering loop
            self.counters["upload.errors"] += 1
            log.exception("unmarking a child failed")

    def _learn_connection(self, ident: bytes, frame) -> None:
        """Which of the meter's accepted connections `ident`'s messages come on (once it knows
        the accept; until then the next message asks again)."""
        try:
            fd = frame.get(zmq.SRCFD)
        except (zmq.ZMQError, AttributeError, TypeError):  # not a frame, or no descriptor
            return
        conn = self.uplink.conns.get(fd) if self.uplink is not None else None
        if conn is not None:
            self._fd[ident] = (fd, conn)

    def _prioritize(self, ident: bytes, priority: int) -> bool:
        known = self._fd.get(ident)
        if self.uplink is None or known is None:
            return False
        if self.uplink.set_priority(known[0], known[1], priority):
            self.counters["upload.marked" if priority == NEEDY_PRIORITY else "upload.unmarked"] += 1
            if trace.enabled():  # the lab: which child's bytes went first, and when
                peer = next((subs[ident].peer_id for subs in self.subs.values() if ident in subs), ident.hex())
                trace.trace("up-mark", "", -1, peer, priority)
            return True
        return False

    def _wave(self, task_id: str) -> bool:
        """A task read from the origin here, with a wave of children (WAVE_CHILDREN)."""
        return task_id in self.origin_asked and len(self.subs.get(task_id, ())) >= WAVE_CHILDREN

    def _start_capped(self, task_id: str) -> None:
        """Reading the origin, uplink not measured, a wave of children: pieces leave one after
        another (nodes/uplink.py)."""
        if self.uplink is None or self.queues.total > 0 or not self._wave(task_id):
            return
        try:
            decision = self.uplink.start()
        except Exception:  # a measurement must never stop uploads
            self.counters["upload.errors"] += 1
            log.exception("capping the uplink failed")
            return
        if decision is not None:
            self.counters["upload.uplink-changes"] += 1
            log.info("uplink not measured yet, reading the origin: pieces in flight %d until it is",
                     decision.inflight_total)
            self.queues.total = decision.inflight_total
            self._release_max_s = 2 * RELEASE_TICK_S
            self._wake.set()  # metered every START_POLL_S from now (the reveal loop may be asleep)

    def _meter_every(self) -> float:
        """Once a second; every START_POLL_S while capped at the start (unmeasured)."""
        if self.uplink is not None and self.uplink.policy.provisional:
            return START_POLL_S
        return 1.0

    def _meter_uplink(self, now: float, dt: float = 1.0) -> None:
        if self.uplink is None:
            return
        try:
            decision = self.uplink.poll(now, self._piece_len)
        except Exception:  # a measurement must never stop uploads
            self.counters["upload.errors"] += 1
            log.exception("measuring the uplink failed")
            return
        if decision is None and self.uplink.broken and self.queues.total:
            self.queues.total = 0  # capped at the start (`_start_capped`), then found unmeasurable
            self._release_max_s = RELEASE_MAX_S
            self._unmark()
        if decision is not None:
            if decision.inflight_total != self.queues.total:
                self.counters["upload.uplink-changes"] += 1
                log.info("uplink %s: %.0f kB/s delivered; child send buffers %s, pieces in flight %s",
                         "queues" if decision.inflight_total else "clear", self.uplink.policy.rate / 1e3,
                         decision.sndbuf or "autotuned", decision.inflight_total or "per child")
            self.queues.total = decision.inflight_total
            rate = self.uplink.policy.rate
            self._release_max_s = RELEASE_MAX_S
            if decision.inflight_total and rate > 0:
                self._release_max_s = max(RELEASE_TICK_S, min(RELEASE_MAX_S, self._piece_len / rate / 4))
            if not self.queues.total:
                self._unmark()  # the cap lifted: nobody first
            self._congested_s += dt * self.uplink.policy.congested  # metered every 0.25 s or 1 s
            self.counters["upload.uplink-congested-s"] = int(self._congested_s)

    def close(self) -> None:
        """Before the store closes: reader threads are done with it when this returns."""
        self._closed = True
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self.uplink is not None:
            self.uplink.close()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        if self._readers is not None:
            self._readers.shutdown(wait=True, cancel_futures=True)
            self._readers = None
        if self.drain is not None:
            self.drain.close()
            self.drain = None
        self.sock.close(0)

