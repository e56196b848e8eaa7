"""Receive on a ZeroMQ socket from an asyncio loop with a plain callback, not a Future per message.

The daemon's hot sockets (the upload ROUTER, one DEALER per parent) carry a few messages per
piece each. Through `zmq.asyncio` every message costs a Future, a Task wake-up and pyzmq's
event bookkeeping: in a trickling swarm (the network lab) that was over a third of a daemon's
event-loop time (py-spy, tools/swarm_cpu.py). `Drain` instead registers the socket's ZMQ_FD with
the loop and, when it fires, receives everything queued (NOBLOCK) and hands each message to a
callback, in order, on the loop thread.

ZeroMQ's FD is edge-like: it signals that the socket's state may have changed, and reading
ZMQ_EVENTS (which every receive and send does) can consume that signal. So:
- `_ready` receives until ZMQ_EVENTS says nothing is left (then the FD fires on the next change);
- every send on a drained socket goes through `Drain.send`, which schedules one receive pass for
  the end of the loop turn (a message may have slipped in while sending; one ZMQ_EVENTS check
  per turn, not per send: a HAVE fan-out sends to every child in one turn);
- at most `limit` messages per pass; the rest in the next loop turn, so one busy socket cannot
  starve the others.

The socket must be a plain (synchronous) `zmq.Socket`: an asyncio socket registers its own
reader on the same FD. `plain_context` gives one sharing an asyncio context's I/O threads.
It never blocks, and never lets the callback's exception stop the socket (the caller decides:
`on_error`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import zmq

log = logging.getLogger(__name__)
# Plain ints: pyzmq's flag enums cost a few microseconds per operation (py-spy: EnumType.__call__
# and Flag.__and__ were 6% of a daemon's loop), and these run several times per message.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)


def plain_context(ctx: zmq.Context) -> zmq.Context:
    """A synchronous Context over the same libzmq context (no new I/O threads, same endpoints)."""
    if type(ctx) is zmq.Context:
        return ctx
    return zmq.Context.shadow(ctx.underlying)


class Drain:
    def __init__(self, sock: zmq.Socket, on_message: Callable[[list[Any]], None], copy: bool = True,
                 limit: int = 256, on_error: Callable[[BaseException], None] | None = None,
                 first_frame: bool = False) -> None:
        self.sock = sock
        self.on_message = on_message
        self.on_error = on_error
        self.copy = copy
        # The first frame as a zmq.Frame (its properties, e.g. the connection's descriptor, can be
        # read), the rest as `copy` says: small frames are cheaper copied than tracked.
        self.first_frame = first_frame
        self.limit = limit
        self.loop = asyncio.get_running_loop()
        self.fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        self.closed = False
        self.loop.add_reader(self.fd, self._ready)
        self._schedule()  # something may be queued already (the FD only signals changes)

    def _schedule(self) -> None:
        if not self._scheduled and not self.closed:
            self._scheduled = True
            self.loop.call_soon(self._ready)

    def _ready(self) -> None:
        self._scheduled = False
        sock = self.sock
        for _ in range(self.limit):
            if self.closed:
                return
            try:
                if not sock.getsockopt(_EVENTS) & _POLLIN:
                    return
                if self.first_frame:
                    first = sock.recv(_NOBLOCK, copy=False)
                    frames = [first, *sock.recv_multipart(_NOBLOCK, copy=self.copy)] if first.more else [first]
                else:
                    frames = sock.recv_multipart(_NOBLOCK, copy=self.copy)
            except zmq.Again:
                return
            except zmq.ZMQError as e:  # closed under us, or a context ending
                if self.on_error is not None and not self.closed:
                    self.on_error(e)
                return
            try:
                self.on_message(frames)
            except Exception as e:  # the callback's own failure: report it, keep receiving
                if self.on_error is None:
                    log.exception("message handler failed")
                else:
                    self.on_error(e)
        self._schedule()  # more queued: next loop turn

    def send(self, frames: list[Any], copy: bool = True, track: bool = False) -> Any:
        """Send without blocking (zmq.Again past the high-water mark, as with NOBLOCK), then
        look for messages that arrived meanwhile: the send may have consumed the FD's signal."""
        try:
            return self.sock.send_multipart(frames, flags=_NOBLOCK, copy=copy, track=track)
        finally:
            self._schedule()

    def close(self) -> None:
        """Stop receiving (the caller closes the socket)."""
        if not self.closed:
            self.closed = True
            try:
                self.loop.remove_reader(self.fd)
            except (ValueError, OSError, RuntimeError):  # the loop is closing
                pass
