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
import os
import socket
import struct
import termios
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info (>= 4.1)
TCP_INFO_LEN = 232
QUEUE_S = 0.25  # the kernel holding this much of the uplink's time: the uplink is the bottleneck...
QUEUE_MIN = 64 << 10  # ...and at least this much, in two samples running, on most connections
CALM_SAMPLES = 3  # samples without such a queue before the buffers grow back (doubling)
SNDBUF_S = 0.1  # the child connections' send buffers together: this much of the uplink's rate...
SNDBUF_MIN = 16 << 10  # ...but never less per connection (the kernel doubles what it is given)
SNDBUF_MAX = 256 << 10  # a connection never shrunk yet is not touched for more than this
INFLIGHT_S = 0.2  # pieces in the socket for all children together: this much of the uplink
SMOOTHING = 0.5  # weight of the newest sample in the delivered rate
EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


@dataclass
class Decision:
    sndbuf: int  # bytes per child connection; 0 = leave the kernel's autotuning alone
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

    def sample(self, acked: int, queued: int, dt: float, piece_len: int,
               busy: int = 1, active: int = 1) -> Decision:
        """`acked`: bytes children acknowledged in the last `dt` seconds; `queued`: bytes in
        the kernel's send queues now, on `busy` of the `active` connections (those that queue
        or were acked anything); `piece_len`: the pieces being served. One child that stops
        reading queues on its own connection only: that is not a slow uplink."""
        if dt > 0:
            r = acked / dt
            self.rate = r if self.rate <= 0 else SMOOTHING * r + (1 - SMOOTHING) * self.rate
        queueing = (queued >= max(QUEUE_MIN, QUEUE_S * self.rate) and 2 * busy >= active
                    # A link fast enough that each child's share of the buffers would exceed
                    # SNDBUF_MAX is a busy CPU's queue (loopback, a data centre), not a slow link.
                    and self.rate * SNDBUF_S / max(1, busy) <= SNDBUF_MAX)
        queueing, self.queueing = queueing and self.queueing, queueing
        if queueing:
            self.congested = True
            self.calm = 0
            self.sndbuf = max(SNDBUF_MIN, int(self.rate * SNDBUF_S / max(1, busy)))
            self.inflight_total = max(2, int(self.rate * INFLIGHT_S / max(1, piece_len)))
        elif self.congested:
            self.calm += 1
            if self.calm >= CALM_SAMPLES:  # demand fell, or the link got faster: let go slowly
                self.calm = 0
                self.sndbuf *= 2
                self.inflight_total *= 2
                if self.sndbuf >= 4 << 20:
                    self.congested = False
                    self.sndbuf = self.inflight_total = 0
        return Decision(self.sndbuf, self.inflight_total)


@dataclass
class _Conn:
    peer: tuple
    acked: int = -1
    sndbuf: int = 0


class UplinkMeter:
    """The upload ROUTER's accepted TCP connections, sampled once a second (`poll`)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.policy = UplinkPolicy()
        self.conns: dict[int, _Conn] = {}
        self.monitor: zmq.Socket | None = None
        self._sock = sock
        self._last: float | None = None
        try:
            self.monitor = sock.get_monitor_socket(EVENTS)
        except zmq.ZMQError as e:  # never let a missing monitor stop uploads
            log.warning("upload socket monitor unavailable: %s", e)

    def close(self) -> None:
        if self.monitor is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self.monitor.close(0)
            self.monitor = None

    def _events(self) -> None:
        while self.monitor is not None:
            try:
                ev = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            fd = int(ev["value"])
            if ev["event"] == zmq.EVENT_ACCEPTED:
                try:
                    with _dup(fd) as s:
                        self.conns[fd] = _Conn(s.getpeername())
                except OSError:
                    pass
            else:
                self.conns.pop(fd, None)

    def poll(self, now: float, piece_len: int) -> Decision | None:
        """Read the connections; returns the policy's decision (None on the first call)."""
        self._events()
        acked = queued = busy = active = 0
        for fd, c in list(self.conns.items()):
            try:
                with _dup(fd) as s:
                    if s.getpeername() != c.peer:
                        raise OSError("descriptor reused")
                    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
                    total = struct.unpack_from("Q", info, TCPI_BYTES_ACKED)[0]
                    q = struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
                    want = self.policy.sndbuf
                    # Above SNDBUF_MAX the kernel's autotuning (up to 4 MiB) is left alone:
                    # SO_SNDBUF is clamped to net.core.wmem_max and switches autotuning off.
                    if want and c.sndbuf != want and (want <= SNDBUF_MAX or c.sndbuf):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
                        c.sndbuf = want
            except OSError:
                del self.conns[fd]  # gone (or not TCP): never touched again
                continue
            delta = max(0, total - c.acked) if c.acked >= 0 else 0
            c.acked = total
            acked += delta
            queued += q
            busy += q > 0
            active += q > 0 or delta > 0
        last, self._last = self._last, now
        if last is None:  # the first poll only sets the baselines
            return None
        return self.policy.sample(acked, queued, now - last, piece_len, busy, active)


def _dup(fd: int) -> socket.socket:
    """A socket object on a duplicate of `fd` (closing it leaves ZeroMQ's descriptor open)."""
    return socket.socket(fileno=os.dup(fd))
