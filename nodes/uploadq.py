"""The upload server's per-child send queues: few pieces in the socket, the rest cancellable.

A parent used to hand every PIECE_REQUEST's bytes to ZeroMQ at once. Bytes in a socket cannot be
recalled, and on a slow uplink a child's requests could sit there for the 20 s piece timeout;
the child then asked another parent and the slow copy still came (redundant bytes, issue 3).
Now each child has at most `inflight` pieces handed to the socket and not yet written into the
kernel (ZeroMQ's MessageTracker says when); further requests wait here, in order, and a
PIECE_CANCEL from the child removes those it no longer wants. A child's credit window (about a
second of what the parent delivers it, nodes/picker.py) bounds what waits.

Throughput: a child's next request arrives as each piece lands, and every message from a child
releases what its socket has room for, so the queue is clocked by the child itself; the server
also looks every RELEASE_TICK_S while anything waits (the end of a window, where no request
follows). Two pieces in the socket per child keep a link busy while the next is released.

Pure: no sockets and no clock; the server passes tracker-like objects (anything with `done`).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from dfzmq import wire

INFLIGHT_PIECES = 2  # per child, handed to the socket and not yet written into the kernel
# Under a global cap a waiting request gains this much need (per mille of a task) per second it
# waits, so a child ahead of the others is served later, never starved.
AGE_PER_S = 20.0


def need(left: int) -> int:
    """PIECE_REQUEST.left as a priority: clamped to [0, 1000]; a child that does not say (an
    older daemon, -1) counts as furthest behind rather than waiting behind everyone."""
    return 1000 if left < 0 else min(left, 1000)


class InFlight:
    """One piece on its way to a child: being read from disk or waiting for upload tokens
    (`tracker` None: still cancellable), or handed to ZeroMQ (`tracker.done` once written
    into the kernel). A cancelled read keeps its slot until the read ends, so cancels
    cannot queue up disk reads beyond the child's slots."""

    __slots__ = ("req", "tracker", "cancelled", "reading")

    def __init__(self, req: wire.PieceRequest) -> None:
        self.req = req
        self.tracker: Any = None
        self.cancelled = False
        self.reading = False

    @property
    def done(self) -> bool:
        if self.reading:
            return False
        return self.cancelled or (self.tracker is not None and self.tracker.done)


class ChildQueues:
    def __init__(self, inflight: int = INFLIGHT_PIECES, total: int = 0) -> None:
        self.inflight = max(1, inflight)
        # > 0: at most this many pieces in the socket for all children together, and waiting
        # requests go out neediest child first (the largest PIECE_REQUEST.left, then the oldest
        # request): the parent, not TCP, shares its uplink (nodes/uplink.py sets it).
        self.total = total
        self.waiting: dict[bytes, deque[wire.PieceRequest]] = {}
        # Requests set aside until a time (`hold`): outside the queues, cancellable.
        self.held: dict[bytes, list[tuple[float, wire.PieceRequest]]] = {}
        self.sending: dict[bytes, list[InFlight]] = {}
        self._seq = 0
        self._arrived: dict[int, tuple[int, float]] = {}  # id(request) -> (arrival number, time): with a cap

    def _live_total(self) -> int:
        return sum(self._prune(i) for i in list(self.sending))

    def release_all(self, now: float = 0.0) -> list[tuple[bytes, wire.PieceRequest]]:
        """With a global cap: waiting requests of children with room, the child lacking the
        largest share of its task first (its latest request says), then the oldest, while the
        parent's socket has room (the caller sends each and calls `sent`)."""
        out = []
        room = self.total - self._live_total()
        counts = {i: len(self.sending.get(i, ())) for i in self.waiting}
        while room > 0 and self.waiting:
            best = None
            for ident, q in self.waiting.items():
                if counts.get(ident, 0) < self.inflight:
                    seq, at = self._arrived.get(id(q[0]), (0, now))
                    key = (-(need(q[-1].left) + AGE_PER_S * (now - at)), seq)
                    if best is None or key < best[0]:
                        best = (key, ident)
            if best is None:
                break
            ident = best[1]
            q = self.waiting[ident]
            req = q.popleft()
            self._arrived.pop(id(req), None)
            if not q:
                del self.waiting[ident]
            counts[ident] = counts.get(ident, 0) + 1
            room -= 1
            out.append((ident, req))
        return out

    def _prune(self, ident: bytes) -> int:
        flights = self.sending.get(ident)
        if not flights:
            return 0
        live = [f for f in flights if not f.done]
        if live:
            self.sending[ident] = live
        else:
            del self.sending[ident]
        return len(live)

    def admit(self, ident: bytes, req: wire.PieceRequest, now: float = 0.0) -> bool:
        """True: send `req` now (the caller then calls `sent`). False: it waits here."""
        if self.total > 0:
            if not self.waiting and self._prune(ident) < self.inflight and self._live_total() < self.total:
                return True
            self._seq += 1
            self._arrived[id(req)] = (self._seq, now)
        elif not self.waiting.get(ident) and self._prune(ident) < self.inflight:
            return True
        self.waiting.setdefault(ident, deque()).append(req)
        return False

    def hold(self, ident: bytes, req: wire.PieceRequest, until: float) -> None:
        """Set `req` aside until `until` (nodes/upload.py: a repeat of a piece the swarm is about
        to hold elsewhere); a PIECE_CANCEL meanwhile removes it before it costs a byte."""
        self.held.setdefault(ident, []).append((until, req))

    def due(self, now: float) -> list[tuple[bytes, wire.PieceRequest]]:
        """The held requests whose time has come, oldest hold first (the caller admits each)."""
        out: list[tuple[float, bytes, wire.PieceRequest]] = []
        for ident in list(self.held):
            keep = []
            for until, req in self.held[ident]:
                if until <= now:
                    out.append((until, ident, req))
                else:
                    keep.append((until, req))
            if keep:
                self.held[ident] = keep
            else:
                del self.held[ident]
        out.sort(key=lambda x: x[0])
        return [(ident, req) for _, ident, req in out]

    def sent(self, ident: bytes, flight: InFlight) -> None:
        self.sending.setdefault(ident, []).append(flight)

    def release(self, ident: bytes) -> list[wire.PieceRequest]:
        """Requests of `ident` that may go now (oldest first); the caller sends each and calls `sent`."""
        q = self.waiting.get(ident)
        if not q:
            return []
        room = self.inflight - self._prune(ident)
        out = []
        while q and room > 0:
            out.append(q.popleft())
            room -= 1
        if not q:
            del self.waiting[ident]
        return out

    def cancel(self, ident: bytes, task_id: str, nums: set[int]) -> list[wire.PieceRequest]:
        """Forget these requests if their bytes have not reached the socket; returns those removed
        (waiting here, or being read or waiting for upload tokens)."""
        def gone(r: wire.PieceRequest) -> bool:
            return r.task_id == task_id and r.num in nums

        return self._remove_held(ident, gone) + self._remove_waiting(ident, gone) + self._cancel_flights(ident, gone)

    def drop(self, ident: bytes, task_id: str | None = None) -> int:
        """The child left (or unsubscribed from `task_id`): forget what waits for it."""
        def gone(r: wire.PieceRequest) -> bool:
            return task_id is None or r.task_id == task_id

        n = len(self._remove_waiting(ident, gone)) + len(self._remove_held(ident, gone))
        self._cancel_flights(ident, gone)
        if task_id is None:
            self.sending.pop(ident, None)
        return n

    def _remove_held(self, ident: bytes, gone: Callable[[wire.PieceRequest], bool]) -> list[wire.PieceRequest]:
        held = self.held.get(ident)
        if not held:
            return []
        removed = [r for _, r in held if gone(r)]
        if removed:
            keep = [(t, r) for t, r in held if not gone(r)]
            if keep:
                self.held[ident] = keep
            else:
                del self.held[ident]
        return removed

    def _remove_waiting(self, ident: bytes, gone: Callable[[wire.PieceRequest], bool]) -> list[wire.PieceRequest]:
        q = self.waiting.get(ident)
        if not q:
            return []
        removed: list[wire.PieceRequest] = []
        keep: deque[wire.PieceRequest] = deque()
        for r in q:
            (removed if gone(r) else keep).append(r)
        for r in removed:
            self._arrived.pop(id(r), None)
        if keep:
            self.waiting[ident] = keep
        else:
            del self.waiting[ident]
        return removed

    def _cancel_flights(self, ident: bytes, gone: Callable[[wire.PieceRequest], bool]) -> list[wire.PieceRequest]:
        """Mark flights not yet in the socket cancelled (their sender skips them)."""
        out = []
        for f in self.sending.get(ident, ()):
            if f.tracker is None and not f.cancelled and gone(f.req):
                f.cancelled = True
                out.append(f.req)
        return out

    def drop_task(self, task_id: str) -> None:
        for ident in list(self.waiting) + list(self.sending) + list(self.held):
            self.drop(ident, task_id)

    def needs(self) -> dict[bytes, int]:
        """Each child with requests here (waiting, or in the socket) -> need() of its latest."""
        out = {i: need(f[-1].req.left) for i, f in self.sending.items() if f}
        out.update((i, need(q[-1].left)) for i, q in self.waiting.items())
        return out

    def idents_waiting(self) -> list[bytes]:
        return list(self.waiting)
