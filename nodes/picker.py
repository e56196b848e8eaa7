"""Piece picking for one download: which piece to ask of which parent, next. Pure, no I/O.

Inputs: the manifest entries the scheduler relayed (authoritative digests), what each parent
says it holds (HAVE), what arrived, failed or timed out, and `now`. Output: (parent, piece)
requests that fill every parent's credit window (fileio3: a window of outstanding bytes per
parent, not one request at a time, keeps each pipe full).

Choice, in order:
- rarest first among the parents this peer knows, so pieces spread instead of everyone
  fetching the same ones;
- a piece is asked of non-seed parents before the seed, so the seed's upload goes to pieces
  nobody else has yet and the swarm, not the seed, carries most bytes;
- endgame: when every missing piece is already requested, an idle parent may duplicate the
  oldest outstanding request (at most one duplicate per piece), so one slow parent cannot hold
  the last piece hostage; the first copy to arrive wins.
A parent whose request times out or whose bytes fail verification loses its outstanding
requests; the caller decides whether to drop it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dfzmq.wire import PieceInfo


@dataclass
class ParentState:
    pid: str
    seed: bool = False
    have: set[int] = field(default_factory=set)
    outstanding: dict[int, float] = field(default_factory=dict)  # num -> requested at
    bytes_received: int = 0
    pieces_received: int = 0
    failures: int = 0
    latency_s: float | None = None  # moving average, request to verified piece

    def outstanding_bytes(self, manifest: dict[int, PieceInfo]) -> int:
        return sum(manifest[n].length for n in self.outstanding if n in manifest)


class Picker:
    def __init__(self, window_bytes: int = 8 << 20, min_window: int = 2,
                 piece_timeout_s: float = 20.0, rng: random.Random | None = None,
                 max_outstanding: int = 0, endgame_after_s: float = 1.0) -> None:
        self.window_bytes = window_bytes
        self.max_outstanding = max_outstanding  # requests in flight for the task; 0 = no cap
        # The endgame only makes sense once the manifest is whole: while the source is still
        # reading, "everything requested" just means "caught up", and duplicates would be waste.
        self.complete = False
        self.duplicates = 0  # endgame duplicate requests made
        # Only a request this old is duplicated: on a healthy link the first copy is coming,
        # and a duplicate would cost a piece's worth of someone's upload for nothing.
        self.endgame_after_s = endgame_after_s
        self.min_window = min_window
        self.piece_timeout_s = piece_timeout_s
        self.manifest: dict[int, PieceInfo] = {}
        self.have: set[int] = set()
        self.parents: dict[str, ParentState] = {}
        self.counts: dict[int, int] = {}  # num -> how many parents hold it
        self.requested: dict[int, set[str]] = {}  # num -> parents it is outstanding at
        self.rng = rng or random.Random()
        self._tiebreak: dict[int, float] = {}
        # >= 0 while a client reads the task in order from this byte offset (the proxy streams
        # it): pieces are asked for in order from there, so the client's reads overlap the
        # download instead of waiting for a contiguous prefix that rarest-first builds last.
        self.stream_offset = -1

    # -- inputs ---------------------------------------------------------------------------

    def add_manifest(self, pieces: list[PieceInfo]) -> None:
        for p in pieces:
            self.manifest[p.num] = p
            self._tiebreak.setdefault(p.num, self.rng.random())

    def add_parent(self, pid: str, seed: bool = False) -> None:
        if pid not in self.parents:
            self.parents[pid] = ParentState(pid, seed)

    def remove_parent(self, pid: str) -> list[int]:
        """Forget a parent; returns the piece numbers that were outstanding at it."""
        st = self.parents.pop(pid, None)
        if st is None:
            return []
        for n in st.have:
            self.counts[n] = self.counts.get(n, 1) - 1
        for n in st.outstanding:
            self._unrequest(n, pid)
        return list(st.outstanding)

    def on_have(self, pid: str, nums: list[int]) -> None:
        st = self.parents.get(pid)
        if st is None:
            return
        for n in nums:
            if n not in st.have:
                st.have.add(n)
                self.counts[n] = self.counts.get(n, 0) + 1

    def on_piece(self, pid: str, num: int, now: float | None = None) -> None:
        """A piece from `pid` verified and stored (or the peer got it some other way)."""
        st = self.parents.get(pid)
        if st is not None and now is not None and num in st.outstanding:
            latency = now - st.outstanding[num]
            st.latency_s = latency if st.latency_s is None else 0.8 * st.latency_s + 0.2 * latency
        self.have.add(num)
        for other in list(self.requested.get(num, ())):
            st = self.parents.get(other)
            if st is not None:
                st.outstanding.pop(num, None)
        self.requested.pop(num, None)
        st = self.parents.get(pid)
        if st is not None and num in self.manifest:
            st.bytes_received += self.manifest[num].length
            st.pieces_received += 1

    def on_missing(self, pid: str, num: int) -> None:
        """The parent said it does not have the piece after all."""
        st = self.parents.get(pid)
        if st is None:
            return
        st.outstanding.pop(num, None)
        self._unrequest(num, pid)
        if num in st.have:
            st.have.discard(num)
            self.counts[num] = self.counts.get(num, 1) - 1

    def cancel(self, pid: str, num: int) -> None:
        """Forget a request without blame (its duplicate from another parent won)."""
        st = self.parents.get(pid)
        if st is not None:
            st.outstanding.pop(num, None)
        self._unrequest(num, pid)

    def on_failure(self, pid: str, num: int) -> None:
        """Bytes from `pid` failed verification, or the request timed out."""
        st = self.parents.get(pid)
        if st is None:
            return
        st.failures += 1
        st.outstanding.pop(num, None)
        self._unrequest(num, pid)

    def _unrequest(self, num: int, pid: str) -> None:
        s = self.requested.get(num)
        if s is not None:
            s.discard(pid)
            if not s:
                del self.requested[num]

    # -- outputs --------------------------------------------------------------------------

    def expired(self, now: float) -> list[tuple[str, int]]:
        """(parent, num) requests older than the piece timeout."""
        return [
            (st.pid, n)
            for st in self.parents.values()
            for n, t in st.outstanding.items()
            if now - t > self.piece_timeout_s
        ]

    def missing(self) -> list[int]:
        return [n for n in self.manifest if n not in self.have]

    def next_requests(self, now: float) -> list[tuple[str, int]]:
        out = self._next_requests(now)
        if self.max_outstanding > 0:
            room = self.max_outstanding - sum(len(s) for s in self.requested.values()) + len(out)
            for pid, num in out[max(0, room):]:
                self.cancel(pid, num)  # over the cap: not sent after all
            out = out[:max(0, room)]
        return out

    def _next_requests(self, now: float) -> list[tuple[str, int]]:
        if not any(self._budget(st) > 0 for st in self.parents.values()):
            return []
        wanted = [n for n in self.manifest if n not in self.have and n not in self.requested]
        if self.stream_offset >= 0:
            wanted.sort(key=self._stream_rank)
        else:
            wanted.sort(key=lambda n: (self.counts.get(n, 0), self._tiebreak[n]))
        out: list[tuple[str, int]] = []
        # Non-seed parents first: the seed serves what only it has.
        order = sorted(self.parents.values(), key=lambda s: (s.seed, len(s.outstanding)))
        taken: set[int] = set()
        for st in order:
            budget = self._budget(st)
            if budget <= 0:
                continue
            for n in wanted:
                if budget <= 0:
                    break
                if n in taken or n not in st.have:
                    continue
                if st.seed and self._other_has(n, st.pid):
                    continue
                taken.add(n)
                self._request(st, n, now)
                out.append((st.pid, n))
                budget -= self.manifest[n].length
        # Pieces only the seed has, or that non-seed parents had no room for.
        for st in order:
            if not st.seed:
                continue
            budget = self._budget(st)
            for n in wanted:
                if budget <= 0:
                    break
                if n in taken or n not in st.have:
                    continue
                taken.add(n)
                self._request(st, n, now)
                out.append((st.pid, n))
                budget -= self.manifest[n].length
        if self.complete and not out and not [n for n in wanted if n not in taken]:
            out.extend(self._endgame(now))
        return out

    def _stream_rank(self, num: int) -> tuple[bool, int]:
        end = self.manifest[num].offset + self.manifest[num].length
        return end <= self.stream_offset, self.manifest[num].offset

    def _budget(self, st: ParentState) -> int:
        if st.seed:
            # A seed's upload is the swarm's scarcest resource: each child keeps only a couple
            # of requests there, so the seed spreads distinct pieces that children then trade.
            return 1 if len(st.outstanding) < self.min_window else 0
        used = st.outstanding_bytes(self.manifest)
        if len(st.outstanding) < self.min_window:
            return max(self.window_bytes - used, 1)
        return self.window_bytes - used

    def _other_has(self, num: int, pid: str) -> bool:
        return self.counts.get(num, 0) > (1 if pid in self.parents and num in self.parents[pid].have else 0)

    def _request(self, st: ParentState, num: int, now: float) -> None:
        st.outstanding[num] = now
        self.requested.setdefault(num, set()).add(st.pid)

    def _endgame(self, now: float) -> list[tuple[str, int]]:
        out = []
        pending = []
        for n, ps in self.requested.items():
            if len(ps) != 1:
                continue
            holder = self.parents.get(next(iter(ps)))
            if holder is None:
                continue
            asked_at = holder.outstanding.get(n, now)
            # Late means later than this parent usually is (its queue may be long for good reasons).
            late_after = max(self.endgame_after_s, 3 * (holder.latency_s or 0.0))
            if now - asked_at >= late_after:
                pending.append((asked_at, n))
        for asked_at, n in sorted(pending):
            for st in self.parents.values():
                if n in st.have and n not in st.outstanding and not st.outstanding:
                    self._request(st, n, now)
                    out.append((st.pid, n))
                    self.duplicates += 1
                    break
        return out
