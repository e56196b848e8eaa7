"""A parent's own uplink: measured, and shared by need once it is the bottleneck (issue 3).

The lab showed why: with half the hosts on slow uplinks, a peer that had drawn slow parents, or
that got a parent late, reached half the file at twice the others' time. Each parent's kernel
held megabytes per child (TCP autotunes a send buffer up to 4 MiB, and the queue behind a slow
link inflates the round trip it sizes for), so the uplink was shared by TCP: the flows that
came first kept large windows, a child's later flow starved (6-11 s per piece where another
child of the same parent waited 1.4 s), and nothing the parent decided reached the wire in
time. Now, once a parent's own kernel queue is long:

- the child connections' send buffers shrink to about SNDBUF_S of the uplink's measured rate
  together (each at least SNDBUF_MIN), so what waits for the link waits in the parent's queues,
  where it can be ordered and cancelled, not in the kernel;
- at most about INFLIGHT_S of the uplink is handed to the socket for all children together
  (ChildQueues.total), and the next piece goes to the child that lacks the largest share of its
  task (PIECE_REQUEST.left), so the children furthest behind are served first and the swarm
  finishes together instead of in a long tail.

A parent that reads the task from the origin (a seed) starts capped, before any measurement
(`UplinkPolicy.start`): its first children arrive together, each asking for a piece only it
holds, and those pieces should leave one after another, the first passed on while the next is
sent, not side by side to land together seconds later. Its first sample lifts the cap where the
link keeps up.

A fast uplink never queues, so nothing changes there: buffers stay autotuned and the cap stays
off (a fixed small buffer would cap one connection at buffer / round trip, which a 10 Gbit/s
data-centre peer would feel). The measurement: the upload ROUTER's socket monitor names each
accepted connection's file descriptor; once a second the meter reads each one's bytes acked
(TCP_INFO) and bytes still queued (SIOCOUTQ). A connection is checked against the peer address
it had when accepted before anything is read or set, so a descriptor reused after ZeroMQ closed
it is dropped, never touched.

`UplinkPolicy` is pure (samples in, decisions out); `UplinkMeter` does the I/O.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
import termios
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import zmq
from zmq.utils.monitor import parse_monitor_message

from dfzmq import net

log = logging.getLogger(__name__)

TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info (>= 4.1)
TCP_INFO_LEN = 232
QUEUE_S = 0.25  # the kernel holding this much of the uplink's time: the uplink is the bottleneck...
QUEUE_MIN = 64 << 10  # ...and at least this much, in two samples running, on most connections
CALM_QUEUE_S = 0.1  # once capped, the queue must fall below this to count as calm (hysteresis)
CALM_SAMPLES = 3  # calm samples before the buffers grow back (doubling)
CAP_COST = 0.6  # the delivered rate falling below this share of what it was when the cap...
CAP_COST_SAMPLES = 3  # ...came on, this many samples running, while still queuing: lift it
HOLD_OFF_SAMPLES = 60  # and do not cap again for this many samples
SNDBUF_S = 0.1  # the child connections' send buffers together: this much of the uplink's rate...
SNDBUF_MIN = 16 << 10  # ...but never less per connection (the kernel doubles what it is given)
SNDBUF_MAX = 256 << 10  # a connection never shrunk yet is not touched for more than this
SNDBUF_RESTORE = 4 << 20  # a lifted cap's buffers (the kernel clamps it to net.core.wmem_max)
INFLIGHT_S = 0.2  # pieces in the socket for all children together: this much of the uplink...
INFLIGHT_MAX_S = 2.0  # ...or one per queuing child, while they drain in this long
SMOOTHING = 0.5  # weight of the newest sample in the delivered rate
# A parent that read the task from the origin starts capped at this many pieces in the socket
# (and SNDBUF_MIN buffers) until its first sample says whether its uplink queues (`start`).
START_INFLIGHT = 2
START_S = 3.0  # ...for this long of traffic, unless a sample shows a fast link first...
START_WAIT_S = 10.0  # ...and never longer than this in all (too little traffic to measure)
# A capped start on a link where a piece leaves within this (at the rate measured under the cap)
# is lifted: the wave's pieces land within tenths of a second side by side too, and two pieces
# behind small buffers drain between two looks of the release loop. In the lab (N=8, 16 MiB,
# 50 Mbit/s seed) the cap kept the seed's uplink at 0.58-0.65 of its rate in the first fifth of
# the run against 0.94 without it, and the swarm took 1.27-1.45 of the bound against 1.22-1.27.
START_PIECE_S = 0.05
START_POLL_S = 0.25  # the meter samples this often while capped at the start (nodes/upload.py)
EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
# Queue priorities (Linux's TC_PRIO_*: the band pfifo_fast and prio qdiscs put a packet in).
# Child connections carry bulk data: the third band, behind the host's best-effort traffic and
# its low-delay control sockets (dfzmq/net.py). The child a congested uplink serves first gets
# best effort while it is marked (nodes/upload.py, `_mark_neediest`).
BULK_PRIORITY = 2
NEEDY_PRIORITY = 0


@dataclass
class Decision:
    # Bytes per child connection; 0 = leave the kernel's autotuning alone; SNDBUF_RESTORE = give
    # the connections shrunk before a large buffer again (autotuning cannot be switched back on).
    sndbuf: int
    inflight_total: int  # pieces in the socket for all children; 0 = no cap (per child only)


class UplinkPolicy:
    """From (delivered bytes, queued bytes) samples to send buffer and in-flight cap."""

    def __init__(self) -> None:
        self.rate = 0.0  # bytes/s acked by children, smoothed
        self.congested = False
        self.queueing = False  # the last sample saw a long queue
        self.calm = 0
        self.sndbuf = 0
        self.inflight_total = 0
        self.capped_rate = 0.0  # the delivered rate when the cap came on
        self.costly = 0  # samples running in which the cap cost throughput
        self.hold_off = 0  # samples left before the cap may come on again
        self.provisional = False  # capped by `start`...
        self.provisional_s = 0.0  # ...for this long of traffic so far
        self.provisional_age = 0.0  # ...and for this long in all
        self.start_off = 0  # samples left before `start` may cap again (a start just lifted)

    def start(self) -> Decision | None:
        """A parent that read the task from the origin, its uplink not measured yet: capped
        from the start. Its first children arrive together and each asks for a piece only it
        holds; sent side by side they shared the link and all landed seconds later (lab, N=32,
        3 Mbit/s: 20 pieces asked at 0.1 s landed at 1.2-2.3 s), where one after another the
        first lands in a tenth of a second and is passed on while the next leaves. The meter
        samples every START_POLL_S meanwhile; a sample showing a fast link, or pieces leaving
        within START_PIECE_S even under the cap, lifts it at once (and `start` stays off for
        HOLD_OFF_SAMPLES: the ordinary policy decides); after START_S of traffic it is sized by the
        measured rate as for a queuing uplink (under the start cap the kernel holds too little
        to look like a queue), and after START_WAIT_S with less traffic than that it is lifted.
        Known: a fast link far away (tens of ms of round trip) cannot show itself fast through
        the small buffers, and then lets go only as a calm capped link does, over tens of
        seconds. Lifting after START_S instead, one lab run (N=32, equal) put 2.6 MB into the
        kernel in the two seconds before the cap came back, and took 1.39 of the bound."""
        # Not "never measured": the children's subscriptions and HAVEs are acked bytes too, and
        # a sample of them before the wave's last child subscribed kept the cap off in the lab.
        if self.congested or self.hold_off or self.start_off:
            return None
        self.congested = self.provisional = True
        self.sndbuf = SNDBUF_MIN
        self.inflight_total = START_INFLIGHT
        return Decision(self.sndbuf, self.inflight_total)

    def sample(self, acked: int, queued: int, dt: float, piece_len: int,
               busy: int = 1, active: int = 1) -> Decision:
        """`acked`: bytes children acknowledged in the last `dt` seconds; `queued`: bytes in
        the kernel's send queues now, on `busy` of the `active` connections (those that queue
        or were acked anything); `piece_len`: the pieces being served. One child that stops
        reading queues on its own connection only: that is not a slow uplink. Children whose
        own downlinks are slow look like a slow uplink from here; the cap then costs throughput
        (the children take less than before it), and a cap that does is lifted."""
        if dt > 0:
            r = acked / dt
            self.rate = r if self.rate <= 0 else SMOOTHING * r + (1 - SMOOTHING) * self.rate
        long_queue = QUEUE_S if not self.congested else CALM_QUEUE_S
        queueing = (queued >= max(QUEUE_MIN, long_queue * self.rate) and 2 * busy >= active
                    # A link fast enough that each child's share of the buffers would exceed
                    # SNDBUF_MAX is a busy CPU's queue (loopback, a data centre), not a slow link.
                    and self.rate * SNDBUF_S / max(1, busy) <= SNDBUF_MAX)
        self.start_off = max(0, self.start_off - 1)
        if self.provisional and dt > 0:
            self.provisional_s += dt if acked > 0 else 0.0
            self.provisional_age += dt
            if self.rate * SNDBUF_S / max(1, busy) > SNDBUF_MAX:  # a fast link: not for a while
                self._lift()
                return Decision(SNDBUF_RESTORE, 0)
            # Pieces, not the children's HAVEs and heartbeats: at least one piece's bytes acked.
            if piece_len > 0 and acked >= piece_len and piece_len < self.rate * START_PIECE_S:
                # Quick pieces: the ordinary policy decides (it caps a queuing link as before).
                self._lift(hold_off=0)
                self.start_off = HOLD_OFF_SAMPLES
                return Decision(SNDBUF_RESTORE, 0)
            if self.provisional_s < START_S:
                if self.provisional_age < START_WAIT_S:
                    return Decision(self.sndbuf, self.inflight_total)
                self._lift(hold_off=0)  # no traffic to measure: the ordinary policy decides
                return Decision(SNDBUF_RESTORE, 0)
            self.provisional = False
            self.capped_rate = self.rate
            queueing = self.queueing = True  # sized by the rate below, as a queuing link is
        queueing, self.queueing = queueing and self.queueing, queueing
        if self.hold_off > 0:
            self.hold_off -= 1
            queueing = False
        if queueing and self.congested and self.rate < CAP_COST * self.capped_rate:
            self.costly += 1
            if self.costly >= CAP_COST_SAMPLES:
                self._lift()
                return Decision(SNDBUF_RESTORE, 0)
        elif queueing:
            self.costly = 0
        if queueing:
            if not self.congested:
                self.capped_rate = self.rate
            self.congested = True
            self.calm = 0
            self.sndbuf = max(SNDBUF_MIN, int(self.rate * SNDBUF_S / max(1, busy)))
            # At least a piece for each queuing child while that drains within INFLIGHT_MAX_S:
            # a piece whose pace is a child's own downlink must not hold the parent's few slots
            # (equal peers in the lab, where downlinks are the bound, lost 12% to that).
            per_child = min(busy, int(self.rate * INFLIGHT_MAX_S / max(1, piece_len)))
            self.inflight_total = max(2, per_child, int(self.rate * INFLIGHT_S / max(1, piece_len)))
        elif self.congested:
            self.calm += 1
            if self.calm >= CALM_SAMPLES:  # demand fell, or the link got faster: let go slowly
                self.calm = 0
                self.sndbuf *= 2
                self.inflight_total *= 2
                if self.sndbuf >= SNDBUF_RESTORE:
                    self._lift(hold_off=0)
                    return Decision(SNDBUF_RESTORE, 0)
        return Decision(self.sndbuf, self.inflight_total)

    def _lift(self, hold_off: int = HOLD_OFF_SAMPLES) -> None:
        self.congested = self.provisional = False
        self.provisional_s = self.provisional_age = 0.0
        self.sndbuf = self.inflight_total = 0
        self.costly = self.calm = 0
        self.hold_off = hold_off


@dataclass
class _Conn:
    peer: tuple
    acked: int = -1
    sndbuf: int = 0  # what we set on it; 0 = never touched (autotuned)


class UplinkMeter:
    """The upload ROUTER's accepted TCP connections: `on_event` for each monitor message (the
    caller reads the monitor all the time: libzmq blocks its I/O thread on a full monitor pipe),
    `poll` once a second to sample them. `port` must be set to the bound port after bind: only
    descriptors that are TCP connections to it, from the peer recorded at accept, are touched."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.policy = UplinkPolicy()
        self.conns: dict[int, _Conn] = {}
        self.monitor: zmq.Socket | None = None
        self.port = 0
        self.broken = False  # no TCP_INFO here (not Linux, an old kernel): measure nothing
        self._sock = sock
        self._last: float | None = None
        try:
            self.monitor = sock.get_monitor_socket(EVENTS)
        except zmq.ZMQError as e:  # never let a missing monitor stop uploads
            log.warning("upload socket monitor unavailable: %s", e)

    def close(self) -> None:
        if self.monitor is not None:
            self.drain_events()
            net.stop_monitor(self._sock, self.monitor)
            self.monitor = None

    def drain_events(self) -> None:
        while self.monitor is not None:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.on_event(frames)

    def on_event(self, frames: list) -> None:
        try:
            ev = parse_monitor_message(frames)
            fd = int(ev["value"])
        except Exception:  # not a monitor message after all: nothing to learn
            return
        if ev["event"] != zmq.EVENT_ACCEPTED:
            self.conns.pop(fd, None)
            return
        try:
            with net.dup_socket(fd) as s:
                if self._ours(s):
                    c = self.conns[fd] = _Conn(s.getpeername())
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, BULK_PRIORITY)
                    if self.policy.provisional:  # capped from the start: from its first byte
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.policy.sndbuf)
                        c.sndbuf = self.policy.sndbuf
        except OSError:
            pass

    def set_priority(self, fd: int, conn: _Conn, priority: int) -> bool:
        """Set the queue priority of connection `conn` on descriptor `fd` (ZMQ_SRCFD of a child's
        message, `conns[fd]` when it was learned). False when that connection is gone: the
        descriptor closed, or reused for another connection (a new accept), which is not touched."""
        c = self.conns.get(fd)
        if c is None or c is not conn:
            return False
        try:
            with self._checked(fd, c) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, priority)
                return True
        except OSError:
            del self.conns[fd]
            return False

    @contextmanager
    def _checked(self, fd: int, c: _Conn) -> Iterator[socket.socket]:
        """Our connection `c` on descriptor `fd`, duplicated; OSError when the descriptor is
        closed or now another socket (reused after ZeroMQ closed it)."""
        with net.dup_socket(fd) as s:
            if not self._ours(s) or s.getpeername() != c.peer:
                raise OSError("descriptor reused")
            yield s

    def start(self) -> Decision | None:
        """`UplinkPolicy.start`, and the small buffers on the connections there are now. Not
        where nothing can be measured (no monitor, not TCP): the cap would never be lifted."""
        if self.broken or self.monitor is None or not self.port:
            return None
        decision = self.policy.start()
        if decision is not None:
            self._resize(decision.sndbuf)
            self._last = None  # the first sample counts from here, not from an idle second before
        return decision

    def _ours(self, s: socket.socket) -> bool:
        return s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6) \
            and self.port > 0 and s.getsockname()[1] == self.port

    def poll(self, now: float, piece_len: int) -> Decision | None:
        """Read the connections; returns the policy's decision (None on the first call)."""
        if self.broken:
            return None
        self.drain_events()
        acked = queued = busy = active = 0
        want = self.policy.sndbuf
        for fd, c in list(self.conns.items()):
            try:
                with self._checked(fd, c) as s:
                    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
                    total = struct.unpack_from("Q", info, TCPI_BYTES_ACKED)[0]
                    q = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
                    # Above SNDBUF_MAX the kernel's autotuning (up to 4 MiB) is left alone:
                    # SO_SNDBUF is clamped to net.core.wmem_max and switches autotuning off.
                    if want and c.sndbuf != want and (want <= SNDBUF_MAX or c.sndbuf):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
                        c.sndbuf = want
            except OSError:
                del self.conns[fd]  # gone (or not a connection of ours): never touched again
                continue
            except (struct.error, AttributeError, ValueError) as e:
                self.broken = True  # not Linux's tcp_info: sharing by need stays off
                if self.policy.provisional:  # capped at the start: give the buffers back
                    self._restore()
                    self.policy._lift(hold_off=0)
                self.conns.clear()
                log.warning("uplink measurement unavailable here (%s): uploads are shared by TCP", e)
                return None
            delta = max(0, total - c.acked) if c.acked >= 0 else 0
            c.acked = total
            acked += delta
            queued += q
            busy += q > 0
            active += q > 0 or delta > 0
        last, self._last = self._last, now
        if last is None:  # the first poll only sets the baselines
            return None
        decision = self.policy.sample(acked, queued, now - last, piece_len, busy, active)
        if decision.sndbuf == SNDBUF_RESTORE:
            self._restore()
        return decision

    def _restore(self) -> None:
        """The cap is lifted: connections shrunk before get a large buffer again."""
        self._resize(SNDBUF_RESTORE, shrunk_only=True)

    def _resize(self, size: int, shrunk_only: bool = False) -> None:
        """Set every connection's send buffer (or only those set before); one whose descriptor
        was reused meanwhile is forgotten, never touched."""
        for fd, c in list(self.conns.items()):
            if shrunk_only and not c.sndbuf:
                continue
            try:
                with self._checked(fd, c) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
                    c.sndbuf = size
            except OSError:
                del self.conns[fd]
