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

Windows (issue 3, measured in the network lab with half the peers on slow uplinks). With
`window_target_s` > 0 (the daemon's default) a parent's window is not a fixed number of bytes:
- "aimd" (default): it grows by a piece per window's worth of pieces that arrived within the
  target and shrinks by a quarter per window's worth that came late, between `min_window`
  pieces and `window_bytes`. A slow uplink's queue stays about the target long (a fixed 1 MiB
  per child queued 5-19 s at a 5 Mbit/s parent, and the last pieces waited there), and the
  children of one parent converge to equal shares, as TCP flows do;
- "rate": the bytes the parent sent us in `window_target_s`, measured only while it had our
  requests (a parent left idle is not slow). Lab runs could not tell the two apart.
- rescue: a parent gone quiet far beyond what our parents usually take (a starved TCP flow;
  judged against its own pace, so a slow parent that still delivers is left alone) has its
  requests asked once more of the fastest parent with room, before any new piece is asked.
  When the rescue copy lands first, the daemon sends the quiet parent a PIECE_CANCEL, which
  removes the request if it still waits in that parent's queue (nodes/uploadq.py); bytes already
  in its socket still come, so a rescue may cost a piece of upload, and the lab counts them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from sortedcontainers import SortedList

from dfzmq.wire import EARLY_LEFT, REPEAT_HOLD_S, PieceInfo


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
    # Upload rate this parent gives us, measured only while it had requests of ours (a parent
    # we left idle is not slow): bytes over the time since the later of its last arrival and
    # the start of its current busy period.
    rate_bps: float | None = None
    busy_from: float | None = None
    last_arrival: float = 0.0
    window: float = 0.0  # window_mode "aimd": this parent's credit window in bytes (0 = not yet set)
    benched: bool = False  # went quiet and had requests rescued: no new ones until it delivers
    full: bool = False  # holds every piece of the manifest (Picker._holding_all)...
    full_at: tuple[int, int] = (-1, -1)  # ...as of (len(have), len(manifest)) then

    def outstanding_bytes(self, manifest: dict[int, PieceInfo]) -> int:
        return sum(manifest[n].length for n in self.outstanding if n in manifest)


TIMEOUTS_TO_DROP = 2  # failed or timed-out requests after which a non-seed parent is dropped
# A request this many times older than our parents' median latency is stuck (_rescue).
RESCUE_FACTOR = 3.0
# Rescues are copies: at most this share of the task's pieces (and RESCUE_MIN), so a swarm of
# starved flows cannot turn into a swarm of duplicates (the goal: redundant bytes < 2%).
RESCUE_BUDGET = 0.01
RESCUE_MIN = 2
# Endgame: a request this many times older than its parent's usual wait is late and may be
# asked of an idle parent too. The copy costs nothing while the request still waits in the slow
# parent's queue (the winner's PIECE_CANCEL removes it there); under uplink sharing the child
# furthest ahead waits longest there, and was 3 times: 2-3.5 s pieces at the end (lab).
ENDGAME_LATE = 1.5
TAIL_SLOWER = 2.0  # the tail: a parent this many times slower than our quickest is passed over
TAIL_SHARE = 0.25  # the tail is at most this share of a task's pieces (the seed's window opens there)
AIMD_DECREASE = 0.25  # of a piece, per late piece (window_mode "aimd")
# The smallest AIMD window, in pieces. Two, not one: a parent whose uplink is the bottleneck
# serves the child furthest behind first (nodes/uploadq.py), but a child with one request there
# sends the next only after the last piece landed, and by then the parent has handed its few
# in-socket slots to others: the child furthest behind got a slow parent's piece every 2-3 s
# instead of back to back (lab, N=32, slow half: three peers that had drawn five slow parents
# each held a quarter of the file at 33-36 s where the others took 20-25 s, and finished last).
AIMD_MIN_PIECES = 2
# A trial, off (0): a request waiting in a seed's queue is asked of a non-seed parent that has
# since got the piece and would send it sooner, while it has waited less than this share of the
# seed's usual wait (an older one is probably next); the first copy wins, and the seed's
# PIECE_CANCEL frees its place for pieces nobody else has (_from_seed). In the lab (N=32, equal
# peers) every peer's last piece came from the seed after 5-15 s in its queue; at 0.75 equal
# peers gained about 0.05 of the bound but redundant bytes rose to about 2% and the slow half
# gained nothing (README, end of the eighth round).
SEED_MOVE_BEFORE = 0.0
# The last pieces: while a download lacks at most this share of its pieces (and SEED_MOVE_MIN),
# a request waiting in a seed's queue is asked also of a non-seed parent with room that holds
# it now and would send it sooner (_from_seed): one that has waited less than
# SEED_MOVE_TAIL_BEFORE of the seed's usual wait, or more than ENDGAME_LATE times it (the seed
# serves the children furthest behind first, so a child ahead can wait there far longer than
# usual). In the lab (N=32, 16 MiB, equal) 27-31 of 32 peers got their last piece from the
# seed, after up to 10 s in its queue (the endgame only copies to a parent with nothing
# outstanding, and at the end none is); with the move 5-8 did, and the swarm took 1.21 of the
# bound in three runs against 1.28-1.29, redundant bytes 0.7-0.9% against 0.2-0.5% (README,
# tenth round).
# The first seconds (wire.EARLY_LEFT): a seed holds back a repeat of a piece it read from the
# origin moments ago (nodes/upload.py), so a request asked of it when no other parent held the
# piece, and held by a peer parent since, is asked of that peer too while it has waited less
# than this share of the seed's usual wait (any, while the seed has sent us nothing yet); the
# peer's copy lands first and the child's PIECE_CANCEL removes the held repeat at the seed.
SEED_MOVE_EARLY_BEFORE = 0.75
SEED_MOVE_TAIL = 0.05
SEED_MOVE_MIN = 4
SEED_MOVE_TAIL_BEFORE = 0.75


class Picker:
    def __init__(self, window_bytes: int = 8 << 20, min_window: int = 2,
                 piece_timeout_s: float = 20.0, rng: random.Random | None = None,
                 max_outstanding: int = 0, endgame_after_s: float = 1.0,
                 window_target_s: float = 0.0, window_mode: str = "aimd") -> None:
        self.window_bytes = window_bytes
        # > 0: each parent's window is what it sends us in this many seconds (at least
        # min_window pieces, at most window_bytes), so a slow parent's queue stays short.
        self.window_target_s = window_target_s
        # How a window follows its parent when window_target_s > 0: "aimd" grows it by a piece
        # per window of pieces that came within the target and shrinks it by a quarter per window
        # that came late (children of one parent converge to equal shares, as TCP flows do);
        # "rate" makes it the bytes the parent sent us in window_target_s while busy (shares
        # stay as unequal as they started: a child served less asks for less).
        self.window_mode = window_mode
        self.max_outstanding = max_outstanding  # requests in flight for the task; 0 = no cap
        # The endgame only makes sense once the manifest is whole: while the source is still
        # reading, "everything requested" just means "caught up", and duplicates would be waste.
        self.complete = False
        self.duplicates = 0  # endgame duplicate requests made
        self.rescued = 0  # of which stuck requests asked again before the endgame (_rescue)
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
        # num -> how many parents hold it + its tiebreak (in [0, 1)): the rarest-first order as
        # one float kept up to date as counts change, so a pick sorts with a C-level key (a
        # Python key function per piece per pick was most of a pick's cost, tools/swarm_cpu.py).
        self._rank: dict[int, float] = {}
        # (rank, num) of every manifest piece not yet held, kept sorted as ranks change: a pick
        # walks it from the rarest held piece until the parents' windows are full, instead of
        # sorting every wanted piece (O(pieces log pieces) per pick, half a daemon's loop time
        # with 4096 pieces: `bench.py warm` under py-spy). Pieces put into `have` directly (tests)
        # stay in it and are skipped.
        self._order: SortedList = SortedList()
        self._piece_len = 0  # the longest piece in the manifest
        # >= 0 while a client reads the task in order from this byte offset (the proxy streams
        # it): pieces are asked for in order from there, so the client's reads overlap the
        # download instead of waiting for a contiguous prefix that rarest-first builds last.
        self.stream_offset = -1
        self._seed_open = False  # the tail (_tail): the seed's window is an ordinary parent's
        self._seed_only: set[int] = set()  # asked of a seed when no other parent held it (_from_seed)

    # -- inputs ---------------------------------------------------------------------------

    def add_manifest(self, pieces: list[PieceInfo]) -> None:
        fresh = []
        for p in pieces:
            self.manifest[p.num] = p
            self._piece_len = max(self._piece_len, p.length)
            self._tiebreak.setdefault(p.num, self.rng.random())
            old = self._rank.get(p.num)
            rank = self._rank[p.num] = self.counts.get(p.num, 0) + self._tiebreak[p.num]
            if old is not None:
                self._order.discard((old, p.num))
            if p.num not in self.have:
                fresh.append((rank, p.num))
        self._order.update(fresh)

    def add_parent(self, pid: str, seed: bool = False) -> None:
        if pid not in self.parents:
            self.parents[pid] = ParentState(pid, seed)

    def remove_parent(self, pid: str) -> list[int]:
        """Forget a parent; returns the piece numbers that were outstanding at it."""
        st = self.parents.pop(pid, None)
        if st is None:
            return []
        for n in st.have:
            self._count(n, -1)
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
                self._count(n, 1)

    def _count(self, n: int, delta: int) -> None:
        c = self.counts[n] = self.counts.get(n, 0 if delta > 0 else 1) + delta
        tb = self._tiebreak.get(n)
        if tb is not None:
            if n not in self.have:
                self._order.discard((self._rank[n], n))
                self._order.add((c + tb, n))
            self._rank[n] = c + tb

    def have_is_news(self, pid: str, nums: list[int]) -> bool:
        """Could a HAVE of `nums` from `pid` lead to a request now? Only if `pid` has room in its
        window and holds a piece we still want: a parent with a full window is asked again when
        one of its pieces arrives. Lets the caller skip a pick per HAVE (a daemon gets one HAVE
        per piece per parent; picking after each one was a sixth of a daemon's loop time)."""
        st = self.parents.get(pid)
        if st is None or self._budget(st) <= 0:
            return False
        return any(n not in self.have and n not in self.requested for n in nums)

    def on_piece(self, pid: str, num: int, now: float | None = None) -> None:
        """A piece from `pid` verified and stored (or the peer got it some other way)."""
        st = self.parents.get(pid)
        if st is not None and now is not None and num in st.outstanding:
            latency = now - st.outstanding[num]
            st.latency_s = latency if st.latency_s is None else 0.8 * st.latency_s + 0.2 * latency
            st.benched = False
            if num in self.manifest:
                self._measure(st, self.manifest[num].length, now)
                self._adapt(st, self.manifest[num].length, latency)
        if num not in self.have and num in self._rank:
            self._order.discard((self._rank[num], num))
        self.have.add(num)
        self._seed_only.discard(num)
        for other in list(self.requested.get(num, ())):
            st = self.parents.get(other)
            if st is not None:
                st.outstanding.pop(num, None)
        self.requested.pop(num, None)
        st = self.parents.get(pid)
        if st is not None and num in self.manifest:
            st.bytes_received += self.manifest[num].length
            st.pieces_received += 1

    def unhave(self, num: int) -> None:
        """A piece counted as held is not after all (a local copy failed): wanted again."""
        if num in self.have:
            self.have.discard(num)
            if num in self._rank:
                self._order.add((self._rank[num], num))

    def on_missing(self, pid: str, num: int) -> None:
        """The parent said it does not have the piece after all."""
        st = self.parents.get(pid)
        if st is None:
            return
        st.outstanding.pop(num, None)
        self._unrequest(num, pid)
        self._unbench_if_idle(st)
        if num in st.have:
            st.have.discard(num)
            st.full_at = (-1, -1)  # a size seen before may now hold other pieces
            self._count(num, -1)

    def cancel(self, pid: str, num: int) -> None:
        """Forget a request without blame (its duplicate from another parent won)."""
        st = self.parents.get(pid)
        if st is not None:
            st.outstanding.pop(num, None)
        self._unrequest(num, pid)

    def on_duplicate(self, pid: str, num: int) -> None:
        """`pid` delivered a piece another parent's copy already brought: forget the request
        without blame, and take the parent off the bench (it is alive and delivering)."""
        st = self.parents.get(pid)
        if st is not None:
            st.benched = False
        self.cancel(pid, num)

    def on_failure(self, pid: str, num: int) -> None:
        """Bytes from `pid` failed verification, or the request timed out."""
        st = self.parents.get(pid)
        if st is None:
            return
        st.failures += 1
        st.outstanding.pop(num, None)
        self._unrequest(num, pid)
        self._unbench_if_idle(st)

    def on_timeout(self, pid: str, num: int) -> bool:
        """A request of ours at `pid` outlived the piece timeout; it is wanted again (asked of
        any parent holding it, the same one if nobody else does). True:
        drop the parent, at its second failure, unless it is a seed. A seed's queue is every
        child's, served neediest first, so a child ahead can wait there past the timeout while
        the seed is busy, not broken; dropped, it was blocklisted for the task, and the pieces
        only it held had to come some longer way (lab, N=32, slow half: nine of 32 children
        dropped the seed at 30-58 s, each after two 20 s waits). A seed gone dead is the
        scheduler's and the silence check's to find; one sending bad bytes is dropped at once."""
        st = self.parents.get(pid)
        if st is None:
            return False
        self.on_failure(pid, num)
        return st.failures >= TIMEOUTS_TO_DROP and not st.seed

    @staticmethod
    def _unbench_if_idle(st: ParentState) -> None:
        # The bench only holds new requests back while old ones are stuck there: a parent with
        # none left (they timed out or it said it lacks them) gets requests again, or it would
        # sit benched for good while it still heartbeats and the scheduler keeps it.
        if not st.outstanding:
            st.benched = False

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

    def silence_allowed_s(self, pid: str, liveness_s: float) -> float:
        """How long `pid` may stay silent before it counts as dead: on the piece timeout's scale,
        not the heartbeat's. A parent's heartbeat replies and HAVEs leave through the same
        uplink as its uploads to every child, and a full slow uplink holds them for seconds (a
        0.6 Mbit/s parent in the lab: 85 parents dropped as silent in one run). A parent whose
        host died is taken out of our list by the scheduler, which hears the host's own
        heartbeats on a low-delay socket within its liveness."""
        return max(2 * liveness_s, self.piece_timeout_s)

    def left_per_mille(self) -> int:
        """How much of the task this peer still lacks, per mille (for PIECE_REQUEST.left)."""
        total = len(self.manifest)
        return 1000 * max(0, total - len(self.have)) // total if total else 1000

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
        slow, quick, seeds = self._tail(now) if self.complete else ([], [], [])
        self._seed_open = bool(slow)
        if not any(self._budget(st) > 0 for st in self.parents.values()):
            return []
        # A stuck request is older news than any new piece: it gets a parent's room first.
        out: list[tuple[str, int]] = self._rescue(now) if self.complete and self.window_target_s > 0 else []
        slow_ids = {st.pid for st in slow}
        out += self._from_seed(now, slow_ids)
        # Streamed (the proxy reads in order): every wanted piece sorted by offset, as before.
        stream = (sorted(self.manifest.keys() - self.have - self.requested.keys(), key=self._stream_rank)
                  if self.stream_offset >= 0 else None)
        # Non-seed parents first: the seed serves what only it has.
        order = sorted(self.parents.values(), key=lambda s: (s.seed, len(s.outstanding)))
        stand_ins = quick + seeds
        full = self._holding_all()
        for st in order:
            budget = self._budget(st)
            if budget <= 0:
                continue
            # Outside the tail the seed is asked here only for pieces no other parent holds:
            # those rank below 2 (held by one parent, itself).
            for n in self._wanted_at(st, stream, 2.0 if st.seed and not slow else 0.0, full):
                if budget <= 0:
                    break
                if st.pid in slow_ids and any(n in q.have for q in stand_ins):
                    continue  # the tail: a quick parent or the seed holds it (_tail)
                if st.seed and self._other_has(n, st.pid) and (not slow or any(n in q.have for q in quick)):
                    continue
                self._request(st, n, now)
                out.append((st.pid, n))
                budget -= self.manifest[n].length
        # Pieces only the seed has, or that non-seed parents had no room for.
        for st in order:
            if not st.seed:
                continue
            budget = self._budget(st)
            if budget <= 0:
                continue
            for n in self._wanted_at(st, stream, 0.0, full):
                if budget <= 0:
                    break
                self._request(st, n, now)
                out.append((st.pid, n))
                budget -= self.manifest[n].length
        if self.complete and not out and not self._unasked(stream):
            out.extend(self._endgame(now))
        return out

    def _holding_all(self) -> set[str]:
        """The parents that hold every piece of the manifest (a seed, a finished peer); the
        subset test is redone only when the parent's or the manifest's size changed."""
        total = len(self.manifest)
        out = set()
        for st in self.parents.values():
            if not total or len(st.have) < total:
                continue
            key = (len(st.have), total)
            if st.full_at != key:
                st.full_at, st.full = key, self.manifest.keys() <= st.have
            if st.full:
                out.add(st.pid)
        return out

    def _wanted_at(self, st: ParentState, stream: list[int] | None, below: float,
                   full: set[str] = frozenset()) -> Iterator[int]:
        """The pieces `st` holds that we lack and have not asked anyone for, rarest first (in
        offset order while streamed), checked as they are yielded so that requests made
        meanwhile count; `below` > 0: only those ranked below it. A parent holding few of them
        (a quarter of what we lack or less) has its own list sorted; for the others the sorted
        order of all we lack is walked until the caller's window is full, from the lowest rank
        a piece `st` holds can have: one, plus one for each other parent in `full` (holding
        every piece). Without that floor a peer's walk crossed every piece only the seed held
        before reaching its own (a fifth of a daemon's loop time, `tools/swarm_cpu.py`)."""
        if stream is not None:
            src: Iterable[int] = stream
        elif 4 * len(st.have) <= len(self.manifest) - len(self.have):
            rank = self._rank
            src = sorted((n for n in st.have if n in rank and n not in self.have and n not in self.requested
                          and (below <= 0 or rank[n] < below)), key=rank.__getitem__)
        else:
            lo = 1.0 + len(full) - (st.pid in full)
            hi = (below,) if below > 0 else None
            src = (n for _, n in self._order.irange((lo,), hi, inclusive=(True, False)))
        for n in src:
            if n in st.have and n not in self.have and n not in self.requested:
                yield n

    def _unasked(self, stream: list[int] | None) -> bool:
        """Is some piece we lack not asked of anyone? (Rarest first, the asked ones lead.)"""
        src = stream if stream is not None else (n for _, n in self._order)
        return any(n not in self.have and n not in self.requested for n in src)

    def _tail(self, now: float) -> tuple[list[ParentState], list[ParentState], list[ParentState]]:
        """The download's last stretch (the last TAIL_SHARE of its pieces): slow parents, quick
        non-seed parents, quick seeds. Slow: a request asked of it now would take (`_wait`)
        longer than the rest of the download should take at the rate all our parents give
        together, and more than TAIL_SLOWER times the quickest parent's (the seed counts). A
        slow parent is not asked for a piece a quick parent or the seed holds (the piece waits
        for their next free slot), and the seed may be asked for a piece only slow parents hold,
        with a full window: its upload no longer needs saving for pieces nobody has, and it
        answers in tens of milliseconds where a loaded fast peer took half a second. In the lab
        (N=8, 16 MiB, half the peers at 5 Mbit/s) the last pieces were asked of 5 Mbit/s
        parents and came 1.5-2.8 s later while the seed and the fast uplinks idled, a second on
        every peer's finish (side by side with the code before, the lab could not separate
        the gain from run-to-run scatter: README, fourth round). No restriction while every
        parent is quick enough, or when nobody quick is left to take the slow parents' place."""
        left = len(self.manifest) - len(self.have)
        rate = sum(st.rate_bps for st in self.parents.values() if st.rate_bps)
        if rate <= 0 or left > TAIL_SHARE * len(self.manifest):
            return [], [], []
        wait = {st.pid: self._wait(st, now) for st in self.parents.values()
                if st.latency_s is not None or st.outstanding}
        others = [st for st in self.parents.values() if not st.seed and st.pid in wait]
        if not others:
            return [], [], []
        limit = max(left * self._piece_len / rate, TAIL_SLOWER * min(wait.values()))
        slow = [st for st in others if wait[st.pid] > limit]
        quick = [st for st in others if wait[st.pid] <= limit and not st.benched]
        seeds = [st for st in self.parents.values() if st.seed and not st.benched
                 and wait.get(st.pid, 0.0) <= limit]
        if not slow or not (quick or seeds):
            return [], [], []
        return slow, quick, seeds

    def _wait(self, st: ParentState, now: float) -> float:
        """How long a request asked of `st` now would take: its usual wait; more when our
        requests queued there and one more take longer at the rate it gives us (which misses
        the other children's requests ahead of ours: in the lab a 10 Mbit/s parent whose queue
        said 0.5 s took a second at the end, as the child furthest on); and at least as long as
        its oldest request has waited (a parent gone quiet is not quick, whatever it was)."""
        queue = (len(st.outstanding) + 1) * self._piece_len / st.rate_bps if st.rate_bps else 0.0
        oldest = now - min(st.outstanding.values()) if st.outstanding else 0.0
        return max(st.latency_s or 0.0, queue, oldest)

    def _stream_rank(self, num: int) -> tuple[bool, int]:
        end = self.manifest[num].offset + self.manifest[num].length
        return end <= self.stream_offset, self.manifest[num].offset

    def _budget(self, st: ParentState) -> int:
        if st.benched:
            return 0
        if st.seed and not self._seed_open:
            # A seed's upload is the swarm's scarcest resource: each child keeps only a couple
            # of requests there, so the seed spreads distinct pieces that children then trade.
            # In the tail (_tail) its window is a parent's like any other.
            return 1 if len(st.outstanding) < self.min_window else 0
        used = st.outstanding_bytes(self.manifest)
        window = self.window_bytes
        if self.window_target_s > 0 and self.window_mode == "aimd":
            # From min_window pieces; late pieces may take it down to AIMD_MIN_PIECES (a
            # parent's queue is ordered by need, and cancellable, so two waiting there cost
            # little: before that ordering, a 0.6 Mbit/s parent with ten children queued 17 s
            # at two pieces each, and the floor was one piece).
            window = int(st.window) or self.min_window * self._piece_len
            return max(window - used, 1) if not st.outstanding else window - used
        elif self.window_target_s > 0:
            window = min(window, max(int((st.rate_bps or 0.0) * self.window_target_s),
                                     self.min_window * self._piece_len))
        if len(st.outstanding) < self.min_window:
            return max(window - used, 1)
        return window - used

    def _other_has(self, num: int, pid: str) -> bool:
        return self.counts.get(num, 0) > (1 if pid in self.parents and num in self.parents[pid].have else 0)

    def _adapt(self, st: ParentState, length: int, latency: float) -> None:
        """AIMD on delay: a piece within window_target_s of its request adds length/window pieces
        (one piece per window's worth), a later one takes a quarter piece (a quarter of the window
        per window's worth). It starts at min_window pieces and stays between AIMD_MIN_PIECES and
        window_bytes; where window_bytes holds fewer pieces (1 MiB pieces and longer with the
        default 1 MiB) the ceiling wins: one request per parent after its first piece. Letting
        the floor win was tried in the lab (N=16, 512 MiB, 1 MiB pieces, 12.5 Mbit/s): two
        1 MiB requests per child queued 20-39 s at busy parents, hundreds of requests timed
        out, and it took 1.34 of the bound with 10.8% redundant against 1.26 and 0.05%."""
        if self.window_target_s <= 0 or self.window_mode != "aimd":
            return
        piece = max(self._piece_len, length)
        floor = AIMD_MIN_PIECES * piece
        w = st.window or self.min_window * piece
        if latency <= self.window_target_s:
            w += length * length / w
        else:
            w -= AIMD_DECREASE * length
        st.window = min(float(self.window_bytes), max(float(floor), w))

    def _measure(self, st: ParentState, length: int, now: float) -> None:
        start = max(st.last_arrival, st.busy_from if st.busy_from is not None else now)
        st.last_arrival = now
        dt = now - start
        if dt <= 0:
            return
        sample = length / dt
        st.rate_bps = sample if st.rate_bps is None else 0.75 * st.rate_bps + 0.25 * sample
        if len(st.outstanding) <= 1:
            st.busy_from = None  # this was the last one: idle until the next request

    def _request(self, st: ParentState, num: int, now: float) -> None:
        if not st.outstanding or st.busy_from is None:
            st.busy_from = now
        st.outstanding[num] = now
        self.requested.setdefault(num, set()).add(st.pid)
        if st.seed and not self._other_has(num, st.pid) and (SEED_MOVE_BEFORE > 0 or self._early()):
            self._seed_only.add(num)

    def _early(self) -> bool:
        """The download's first seconds, when a seed holds back repeats: by the share we lack
        that our requests tell it (wire.EARLY_LEFT)."""
        return self.left_per_mille() >= EARLY_LEFT

    def _rescue(self, now: float) -> list[tuple[str, int]]:
        """Before the endgame: the requests at a parent that has gone quiet far beyond what our
        parents usually take (a starved TCP flow) are asked once more of the fastest parent with
        room that holds them; the first copy wins. A slow parent is given time by its own pace
        (measured on the pieces it was first to send), up to twice the usual wait: a parent
        whose every piece was rescued has no pace yet and waits only the usual time (known:
        a steady but very slow parent can take the whole rescue budget; it is bounded).
        Only with rate-sized windows, where a parent's queue is about `window_target_s` long."""
        cap = max(RESCUE_MIN, int(RESCUE_BUDGET * len(self.manifest)))
        lat = sorted(st.latency_s for st in self.parents.values() if st.latency_s is not None)
        if not lat or self.rescued >= cap:
            return []
        typical = RESCUE_FACTOR * lat[len(lat) // 2]
        stuck = []
        quiet_pids: set[str] = set()  # never asked to stand in for another quiet parent
        for st in self.parents.values():
            if not st.outstanding:
                continue
            quiet = now - max(st.last_arrival, st.busy_from if st.busy_from is not None else now)
            # its own time per piece for us, so a slow uplink is judged by its own pace
            own = self._piece_len / st.rate_bps if st.rate_bps else 0.0
            # A slow parent gets up to twice its own time per piece, but never more than twice what
            # our parents usually take: a starved flow and a very slow uplink look alike, and
            # either one holding a piece a fast parent could send in a moment costs the download
            # more than one copy does (the budget above bounds the copies).
            if quiet < max(self.endgame_after_s, typical, min(2 * own, 2 * typical)):
                continue
            quiet_pids.add(st.pid)
            stuck += [(asked_at, n, st) for n, asked_at in st.outstanding.items()
                      if len(self.requested.get(n, ())) == 1]
        stuck.sort(key=lambda x: (x[0], x[1]))
        out = []
        for _, n, quiet_st in stuck:
            if self.rescued >= cap:
                break
            best = None
            for st in self.parents.values():
                if (n in st.have and n not in st.outstanding and st.pid not in quiet_pids
                        and self._budget(st) > 0):
                    if best is None or (st.rate_bps or 0.0) > (best.rate_bps or 0.0):
                        best = st
            if best is not None:
                quiet_st.benched = True  # only a parent something was re-asked from
                self._request(best, n, now)
                out.append((best.pid, n))
                self.duplicates += 1
                self.rescued += 1
        return out

    def _from_seed(self, now: float, slow: set[str] = frozenset()) -> list[tuple[str, int]]:
        """Requests queued at a seed that a non-seed parent with room holds now are asked of
        the quickest such parent too: the seed's queue is shared by every child, a peer's is
        not. In the last pieces (SEED_MOVE_TAIL) any such request, young or overdue; in the
        first seconds (`_early`: the seed holds back repeats then, nodes/upload.py) young ones
        for pieces no other parent held when asked; between them only with the
        SEED_MOVE_BEFORE trial on. Never to a parent the tail found slow (`slow`, _tail): with
        half the uplinks at 0.6 Mbit/s, moves to them timed out there (26-40 timeouts against 6)
        and redundant bytes reached 2%."""
        out: list[tuple[str, int]] = []
        left = len(self.manifest) - len(self.have)
        tail = self.complete and left <= max(SEED_MOVE_MIN, SEED_MOVE_TAIL * len(self.manifest))
        early = not tail and self._early()
        if SEED_MOVE_BEFORE <= 0 and not tail and not early:
            return out
        before = SEED_MOVE_TAIL_BEFORE if tail else max(SEED_MOVE_BEFORE, SEED_MOVE_EARLY_BEFORE if early else 0.0)
        for seed in [st for st in self.parents.values() if st.seed and st.outstanding]:
            usual = seed.latency_s or 0.0
            for n, asked_at in sorted(seed.outstanding.items(), key=lambda x: x[1]):
                if len(self.requested.get(n, ())) != 1 or not (tail or n in self._seed_only):
                    continue
                waited = now - asked_at
                if not usual:
                    # The seed has sent us nothing yet; in the first seconds a repeat it holds
                    # back goes out REPEAT_HOLD_S after its first copy at the latest.
                    remaining = max(0.0, REPEAT_HOLD_S - waited) if early else float("inf")
                elif waited < before * usual:
                    remaining = usual - waited
                elif tail and waited >= ENDGAME_LATE * usual:
                    remaining = usual  # overdue: others are served first; another usual wait
                else:
                    continue  # probably next in the seed's queue
                # Only where it would come sooner: a slow parent's queue can be longer than the
                # seed's (in the lab, 0.6 Mbit/s parents took the moved pieces and lost time).
                # Early, only to a parent that has sent us a piece: one not heard from yet may
                # be a 0.6 Mbit/s uplink, where moved pieces waited 10-18 s and timed out (lab,
                # slow half: 47-71 timeouts a run against 4-12, and up to 2.6% redundant).
                holders = [st for st in self.parents.values()
                           if not st.seed and st.pid not in slow and n in st.have
                           and (st.latency_s is not None or not early)
                           and self._budget(st) > 0 and self._wait(st, now) < remaining]
                if holders:
                    st = min(holders, key=lambda q: self._wait(q, now))
                    self._request(st, n, now)
                    out.append((st.pid, n))
                    self.duplicates += 1
        return out

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
            late_after = max(self.endgame_after_s, ENDGAME_LATE * (holder.latency_s or 0.0))
            if now - asked_at >= late_after:
                pending.append((asked_at, n))
        for asked_at, n in sorted(pending):
            idle = [st for st in self.parents.values()
                    if n in st.have and n not in st.outstanding and not st.outstanding]
            if idle:  # the quickest idle holder (the tail leaves slow parents idle)
                st = min(idle, key=lambda q: self._wait(q, now))
                self._request(st, n, now)
                out.append((st.pid, n))
                self.duplicates += 1
        return out
