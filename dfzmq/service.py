"""What every socket service shares: core outputs, receiving with drop-and-count, the stop flag.

A core (scheduler, manager) is pure: it takes (sender, message, now) and returns a list of
`Send` / `Publish` actions plus a deadline. A service is a short loop around it:
receive, decode, call the core, send what it returns, sleep until the next deadline.
Malformed frames never reach a core: `decode_routed` counts and drops them.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import zmq

from dfzmq import wire
from dfzmq.actions import Counters, Publish, Send  # noqa: F401  (re-exported)
from dfzmq.errors import LocalProtocolError, RemoteProtocolError

# Counter names per message kind, made once (hot paths count every message): `msg.in.HAVE`,
# `msg.out.PIECE_REQUEST`, ... (what a daemon sends and receives per piece is what
# tools/swarm_cpu.py reports).
MSG_IN = {k: "msg.in." + k.decode() for k in wire.REGISTRY}
MSG_OUT = {k: "msg.out." + k.decode() for k in wire.REGISTRY}

log = logging.getLogger(__name__)


def decode_routed(frames: list[Any], counters: Counters) -> tuple[bytes, Any] | None:
    """(identity, message) from ROUTER frames, or None after counting and logging a bad one."""
    try:
        ident, rest = wire.split_routed(frames)
        return ident, wire.decode(rest)
    except RemoteProtocolError as e:
        counters["dropped.bad-frame"] += 1
        log.debug("dropped malformed frame: %s", e)
        return None


def decode_plain(frames: list[Any], counters: Counters) -> Any | None:
    """A message from DEALER/SUB frames, or None after counting a bad one."""
    try:
        return wire.decode(frames)
    except RemoteProtocolError as e:
        counters["dropped.bad-frame"] += 1
        log.debug("dropped malformed frame: %s", e)
        return None


def send_routed(sock: zmq.Socket, to: bytes, msg: Any, counters: Counters) -> None:
    """Send on a ROUTER without ever blocking the loop: a full or gone peer loses the message."""
    try:
        sock.send_multipart([to, *wire.encode(msg)], flags=zmq.NOBLOCK, copy=False)
        counters["sent." + type(msg).KIND.decode()] += 1
    except zmq.Again:
        counters["dropped.hwm"] += 1
    except LocalProtocolError:
        # A message our own core built but cannot encode: a bug, but never a reason to stop.
        counters["error.encode"] += 1
        log.exception("cannot encode %s", type(msg).__name__)


def dispatch(actions: list[Send | Publish], router: zmq.Socket, pub: zmq.Socket | None,
             counters: Counters) -> None:
    for a in actions:
        if isinstance(a, Send):
            send_routed(router, a.to, a.msg, counters)
        elif pub is not None:
            try:
                pub.send_multipart(wire.encode(a.msg), flags=zmq.NOBLOCK)
            except zmq.Again:
                counters["dropped.pub-hwm"] += 1


class StopFlag:
    """Set by SIGTERM/SIGINT (when installed) or by a test; loops poll it between events."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self, *_: Any) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self.set)
        signal.signal(signal.SIGINT, self.set)
