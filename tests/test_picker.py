"""nodes/picker.py: which piece to ask of which parent. Pure, so a whole swarm of arrivals,
failures and departures runs here in milliseconds."""

from __future__ import annotations

import random
from collections import Counter
from typing import Iterable

import pytest

from dfzmq.wire import EARLY_LEFT, PieceInfo
from nodes import picker as picker_mod
from nodes.picker import Picker

L = 1000


def _picker(*args, **kwargs) -> Picker:
    """A picker whose manifest is whole and whose endgame starts at once (unless told)."""
    kwargs.setdefault("endgame_after_s", 0.0)
    p = Picker(*args, **kwargs)
    p.complete = True
    return p


def manifest(n: int, length: int = L) -> list[PieceInfo]:
    return [PieceInfo(i, i * length, length, f"{i:064x}") for i in range(n)]


def picker(n: int, window_pieces: int = 4, min_window: int = 2, **kw) -> Picker:
    p = _picker(window_bytes=window_pieces * L, min_window=min_window, rng=random.Random(0), **kw)
    p.add_manifest(manifest(n))
    return p


def requested_once(p: Picker) -> None:
    for num, parents in p.requested.items():
        assert len(parents) == 1, f"piece {num} requested at {parents}"


def test_rarest_first():
    p = picker(10, window_pieces=5)
    p.add_parent("A")
    p.add_parent("B")
    p.on_have("A", list(range(10)))
    p.on_have("B", list(range(5)))
    reqs = p.next_requests(0.0)
    by = {pid: sorted(n for q, n in reqs if q == pid) for pid in "AB"}
    assert by["A"] == [5, 6, 7, 8, 9]  # only A has these: A spends its window on them
    assert by["B"] == [0, 1, 2, 3, 4]
    requested_once(p)


def test_rarest_first_order_within_one_parent():
    p = picker(6, window_pieces=6)
    for pid in "ABC":
        p.add_parent(pid)
    p.on_have("B", [0, 1, 2, 3])
    p.on_have("C", [0, 1])
    p.on_have("A", list(range(6)))  # counts: 0,1 -> 3; 2,3 -> 2; 4,5 -> 1
    reqs = [n for pid, n in p.next_requests(0.0) if pid == "A"]
    counts = [p.counts[n] for n in reqs]
    assert counts == sorted(counts) and set(reqs[:2]) == {4, 5}


def test_no_piece_twice_before_endgame_and_windows_hold():
    rng = random.Random(5)
    p = picker(200, window_pieces=3)
    for i in range(8):
        p.add_parent(f"P{i}")
        p.on_have(f"P{i}", rng.sample(range(200), 120))
    p.add_parent("S", seed=True)
    p.on_have("S", list(range(200)))
    now = 0.0
    for _ in range(100):
        reqs = p.next_requests(now)
        assert len(reqs) == len(set(n for _, n in reqs))
        if p.missing() and len(p.requested) < len(p.missing()):
            requested_once(p)
        for st in p.parents.values():
            if st.seed:
                assert len(st.outstanding) <= p.min_window
            else:
                assert st.outstanding_bytes(p.manifest) <= p.window_bytes
            assert all(n in st.have for n in st.outstanding)  # only asked for what it has
        # a few arrive
        for pid, n in rng.sample(reqs, min(len(reqs), 3)):
            p.on_piece(pid, n)
        now += 1


def test_min_window_lets_big_pieces_through():
    p = _picker(window_bytes=100, min_window=2, rng=random.Random(0))
    p.add_manifest(manifest(5, length=1000))  # every piece is bigger than the window
    p.add_parent("A")
    p.on_have("A", range(5))
    reqs = p.next_requests(0.0)
    assert 1 <= len(reqs) <= 2
    p.next_requests(0.0)
    assert len(p.parents["A"].outstanding) <= 2


def test_uneven_pieces_respect_the_window():
    p = _picker(window_bytes=10_000, min_window=1, rng=random.Random(0))
    lengths = [3000, 500, 7000, 1, 2500, 9999, 100]
    off = 0
    pieces = []
    for i, ln in enumerate(lengths):
        pieces.append(PieceInfo(i, off, ln, f"{i:064x}"))
        off += ln
    p.add_manifest(pieces)
    p.add_parent("A")
    p.on_have("A", range(len(lengths)))
    p.next_requests(0.0)
    used = p.parents["A"].outstanding_bytes(p.manifest)
    assert used < p.window_bytes + max(lengths)  # at most one piece over the credit
    assert len(p.parents["A"].outstanding) < len(lengths)


def seed_and_peer(pieces: int, window_pieces: int, peer_has: Iterable[int]) -> Picker:
    """A picker with seed S holding every piece and peer parent P holding `peer_has`."""
    p = picker(pieces, window_pieces=window_pieces)
    p.add_parent("S", seed=True)
    p.add_parent("P")
    p.on_have("S", range(pieces))
    p.on_have("P", peer_has)
    return p


def test_non_seed_parents_preferred_over_the_seed():
    p = seed_and_peer(6, 10, range(4))
    reqs = p.next_requests(0.0)
    from_seed = {n for pid, n in reqs if pid == "S"}
    from_peer = {n for pid, n in reqs if pid == "P"}
    assert from_peer == {0, 1, 2, 3}
    assert from_seed and from_seed <= {4, 5}  # the seed serves what only it has
    requested_once(p)


def test_seed_serves_what_peers_have_no_room_for():
    p = picker(6, window_pieces=1, min_window=1)
    p.add_parent("S", seed=True)
    p.add_parent("P")
    p.on_have("S", range(6))
    p.on_have("P", range(6))
    reqs = p.next_requests(0.0)
    assert [pid for pid, _ in reqs].count("P") == 1
    assert [pid for pid, _ in reqs].count("S") == 1  # seed keeps at most min_window requests
    requested_once(p)


def test_seed_only_swarm_completes():
    p = picker(5)
    p.add_parent("S", seed=True)
    p.on_have("S", range(5))
    for _ in range(10):
        for pid, n in p.next_requests(0.0):
            p.on_piece(pid, n)
    assert not p.missing()


def test_removing_a_parent_frees_its_pieces():
    p = picker(8, window_pieces=8)
    p.add_parent("A")
    p.on_have("A", range(8))
    first = {n for _, n in p.next_requests(0.0)}
    assert first == set(range(8))
    p.add_parent("B")
    p.on_have("B", range(8))
    dup = p.next_requests(0.0)
    assert len(dup) == 1 and dup[0][0] == "B"  # endgame: idle B duplicates one request
    freed = p.remove_parent("A")
    assert set(freed) == first
    assert all(p.counts[n] == 1 for n in range(8))
    assert set(p.requested) == {dup[0][1]} and p.requested[dup[0][1]] == {"B"}
    p.cancel(*dup[0])
    again = p.next_requests(1.0)
    assert {n for pid, n in again if pid == "B"} == set(range(8))
    assert p.remove_parent("nobody") == []


def test_on_missing():
    p = picker(4, window_pieces=4)
    p.add_parent("A")
    p.add_parent("B")
    p.on_have("A", [0, 1])
    p.on_have("B", [0, 1, 2, 3])
    reqs = p.next_requests(0.0)
    at_a = [n for pid, n in reqs if pid == "A"]
    assert at_a
    n = at_a[0]
    p.on_missing("A", n)
    assert n not in p.parents["A"].have and n not in p.parents["A"].outstanding
    assert p.counts[n] == 1 and n not in p.requested
    again = p.next_requests(1.0)
    assert ("B", n) in again and ("A", n) not in again
    p.on_missing("ghost", 0)  # unknown parents are ignored


def test_on_failure_and_expired():
    p = picker(4, window_pieces=4, piece_timeout_s=10.0)
    p.add_parent("A")
    p.on_have("A", range(4))
    reqs = p.next_requests(100.0)
    assert p.expired(105.0) == []
    late = p.expired(110.5)
    assert sorted(late) == sorted(reqs)
    for pid, n in late[:2]:
        p.on_failure(pid, n)
    st = p.parents["A"]
    assert st.failures == 2 and len(st.outstanding) == 2
    retried = p.next_requests(111.0)
    assert sorted(n for _, n in retried) == sorted(n for _, n in late[:2])
    assert sorted(p.expired(115.0)) == sorted(late[2:])  # the retries are fresh
    p.on_failure("ghost", 0)


def test_expired_only_reports_old_requests():
    p = picker(4, window_pieces=1, min_window=1, piece_timeout_s=5.0)
    p.add_parent("A")
    p.add_parent("B")
    p.on_have("A", range(4))
    p.on_have("B", range(4))
    (a,) = [r for r in p.next_requests(0.0) if r[0] == "A"]
    p.on_piece("A", a[1])
    (b,) = [r for r in p.next_requests(3.0) if r[0] == "A"]
    assert p.expired(6.0) == [("B", n) for n in p.parents["B"].outstanding]
    assert set(p.expired(8.5)) == {b, *(("B", n) for n in p.parents["B"].outstanding)}


def test_endgame_duplicates_at_most_once():
    p = picker(3, window_pieces=10)
    for pid in "ABCDE":
        p.add_parent(pid)
        p.on_have(pid, range(3))
    first = p.next_requests(0.0)
    assert len(first) == 3 and len({n for _, n in first}) == 3
    holders = {n: pid for pid, n in first}
    dups = p.next_requests(1.0)  # everything is requested: idle parents duplicate
    assert dups
    for pid, n in dups:
        assert pid != holders[n]
    for _ in range(5):
        p.next_requests(2.0)
    for n, parents in p.requested.items():
        assert len(parents) <= 2
    # the first copy wins and clears every request for it
    pid, n = dups[0]
    p.on_piece(pid, n)
    assert n not in p.requested and all(n not in st.outstanding for st in p.parents.values())


def test_cancel_forgets_without_blame():
    p = picker(2)
    p.add_parent("A")
    p.on_have("A", [0, 1])
    p.next_requests(0.0)
    p.cancel("A", 0)
    assert 0 not in p.parents["A"].outstanding and p.parents["A"].failures == 0
    assert 0 not in p.requested


def test_on_piece_from_elsewhere_and_stats():
    p = picker(3)
    p.add_parent("A")
    p.on_have("A", range(3))
    p.next_requests(0.0)
    p.on_piece("", 0)  # e.g. already in the store under another task
    p.on_piece("A", 1)
    assert p.parents["A"].pieces_received == 1 and p.parents["A"].bytes_received == L
    assert sorted(p.missing()) == [2]


def test_pieces_not_in_the_manifest_are_never_requested():
    p = picker(2)
    p.add_parent("A")
    p.on_have("A", [0, 1, 2, 3])  # HAVE may run ahead of the manifest
    assert sorted(n for _, n in p.next_requests(0.0)) == [0, 1]
    p.add_manifest(manifest(4)[2:])
    assert sorted(n for _, n in p.next_requests(0.0)) == [2, 3]


@pytest.mark.parametrize("seed", range(20))
def test_swarm_loop_terminates_with_every_piece(seed):
    """Parents with random holdings, HAVE increments, slow, lying and vanishing parents, a
    manifest that grows while the download runs: the loop ends holding every piece."""
    rng = random.Random(seed)
    n = rng.randrange(1, 120)
    pieces = manifest(n)
    p = _picker(window_bytes=rng.choice([1, 3, 8]) * L, min_window=rng.choice([1, 2]),
               piece_timeout_s=5.0, rng=random.Random(seed))
    p.add_manifest(pieces[: max(1, n // 2)])
    p.add_parent("seed", seed=True)
    p.on_have("seed", range(n))
    kinds = {}
    for i in range(rng.randrange(0, 6)):
        pid = f"p{i}"
        p.add_parent(pid)
        p.on_have(pid, rng.sample(range(n), rng.randrange(0, n + 1)))
        kinds[pid] = rng.choice(["good", "good", "slow", "liar", "corrupt"])
    inflight: list[tuple[float, str, int]] = []
    now = 0.0
    got: Counter[int] = Counter()
    for step in range(5000):
        if not p.missing() and len(p.manifest) == n:
            break
        if step == 5:
            p.add_manifest(pieces)
        if step == 20 and "p0" in p.parents:
            p.remove_parent("p0")
            inflight = [r for r in inflight if r[1] != "p0"]
        for pid, num in p.expired(now):
            p.on_failure(pid, num)
            inflight = [r for r in inflight if (r[1], r[2]) != (pid, num)]
        for pid, num in p.next_requests(now):
            assert num in p.parents[pid].have and num not in p.have
            kind = kinds.get(pid, "good")
            delay = {"good": 0.5, "slow": 30.0, "liar": 0.5, "corrupt": 0.5}[kind]
            inflight.append((now + delay * rng.uniform(0.5, 1.5), pid, num))
        inflight.sort()
        while inflight and inflight[0][0] <= now:
            _, pid, num = inflight.pop(0)
            if pid not in p.parents or num not in p.parents[pid].outstanding:
                continue  # its request was dropped (timeout, endgame winner)
            kind = kinds.get(pid, "good")
            if kind == "liar":
                p.on_missing(pid, num)
            elif kind == "corrupt":
                p.on_failure(pid, num)
            else:
                got[num] += 1
                p.on_piece(pid, num)
        # one side effect of real life: a parent learns a piece while we download
        if rng.random() < 0.1 and kinds:
            pid = rng.choice(list(kinds))
            if pid in p.parents:
                p.on_have(pid, [rng.randrange(n)])
        now += 0.25
        assert all(len(s) <= 2 for s in p.requested.values())  # one endgame duplicate at most
    assert not p.missing() and p.have == set(range(n))
    assert set(got) == set(range(n))
    assert not p.requested


def test_no_endgame_while_the_manifest_is_still_growing_or_requests_are_young():
    p = picker(3, window_pieces=10, endgame_after_s=1.0)
    p.complete = False  # the source is still reading: "all requested" means "caught up"
    for pid in "AB":
        p.add_parent(pid)
        p.on_have(pid, range(3))
    first = p.next_requests(0.0)
    assert len(first) == 3
    assert p.next_requests(5.0) == []  # no duplicates, however long we wait
    p.complete = True
    assert p.next_requests(0.5) == []  # requests younger than endgame_after_s are left alone
    dups = p.next_requests(1.5)
    assert dups and all(len(p.requested[n]) == 2 for _, n in dups)


def test_endgame_duplicates_a_request_late_by_its_parents_own_pace():
    """Late = ENDGAME_LATE times the holder's usual wait (and endgame_after_s at least): an
    idle parent copies it then, not before."""
    from nodes.picker import ENDGAME_LATE
    p = picker(1, window_pieces=4, endgame_after_s=0.5)
    p.add_parent("slow")
    p.on_have("slow", [0])
    assert p.next_requests(10.0) == [("slow", 0)]
    p.parents["slow"].latency_s = 1.0
    p.add_parent("idle")
    p.on_have("idle", [0])
    assert p.next_requests(10.0 + 0.9 * ENDGAME_LATE) == []
    assert p.next_requests(10.0 + 1.1 * ENDGAME_LATE) == [("idle", 0)]


@pytest.fixture
def seed_moves(monkeypatch):
    """The SEED_MOVE_BEFORE trial on (it is off by default)."""
    monkeypatch.setattr(picker_mod, "SEED_MOVE_BEFORE", 0.75)


def waiting_at_seed(seed_latency_s: float, peer_latency_s: float | None = None, pieces: int = 4):
    """Pieces from 2 on asked of the seed at t=0 (only it had them), then announced by peer P.
    With 4 pieces the download is in its last pieces (SEED_MOVE_MIN) from the start."""
    p = seed_and_peer(pieces, 4, [0, 1])
    at_seed = {n for pid, n in p.next_requests(0.0) if pid == "S"}
    assert at_seed and at_seed <= set(range(2, pieces))
    p.parents["S"].latency_s = seed_latency_s  # the seed's usual wait
    p.parents["P"].latency_s = peer_latency_s
    p.on_have("P", sorted(at_seed))
    return p, at_seed


def past_the_start(p, keep: set[int]) -> None:
    """Half the pieces arrived some other way: the download is past its first seconds."""
    for n in range(len(p.manifest) // 2, len(p.manifest)):
        if n not in keep:
            p.on_piece("elsewhere", n)
    assert p.left_per_mille() < EARLY_LEFT


def test_a_piece_waiting_at_the_seed_stays_there_in_the_middle():
    p, at_seed = waiting_at_seed(5.0, pieces=100)
    past_the_start(p, at_seed)
    assert not [r for r in p.next_requests(1.0) if r[1] in at_seed]
    assert not [r for r in p.next_requests(20.0) if r[1] in at_seed]  # even when overdue


def test_in_the_first_seconds_a_piece_at_the_seed_moves_to_a_peer_that_got_it():
    """The seed holds back a repeat of a piece it has just sent another child (nodes/upload.py):
    a young request asked of it when no other parent held the piece moves to a peer parent
    that announces it since and has sent us a piece (one not heard from may be a slow uplink);
    not one that has waited most of the seed's usual wait; while the seed has sent us nothing,
    only to a peer that would send it within REPEAT_HOLD_S; never once past the first seconds."""
    from dfzmq.wire import REPEAT_HOLD_S
    p, at_seed = waiting_at_seed(5.0, peer_latency_s=0.3, pieces=100)
    moved = [r for r in p.next_requests(1.0) if r[1] in at_seed]
    assert moved and {pid for pid, _ in moved} == {"P"}
    assert all(p.requested[n] == {"S", "P"} for _, n in moved)

    p, at_seed = waiting_at_seed(5.0, pieces=100)  # P has sent us nothing yet
    assert not [r for r in p.next_requests(1.0) if r[1] in at_seed]

    p, at_seed = waiting_at_seed(5.0, peer_latency_s=0.3, pieces=100)
    assert not [r for r in p.next_requests(0.8 * 5.0) if r[1] in at_seed]  # probably next

    p, at_seed = waiting_at_seed(5.0, peer_latency_s=0.3, pieces=100)
    p.parents["S"].latency_s = None
    assert [r for r in p.next_requests(0.5) if r[1] in at_seed]
    p, at_seed = waiting_at_seed(5.0, peer_latency_s=REPEAT_HOLD_S, pieces=100)
    p.parents["S"].latency_s = None
    assert not [r for r in p.next_requests(0.5) if r[1] in at_seed]  # the held copy comes sooner
    p, at_seed = waiting_at_seed(5.0, peer_latency_s=0.3, pieces=100)
    p.parents["S"].latency_s = None
    assert not [r for r in p.next_requests(REPEAT_HOLD_S)  # held no longer: it is on its way
                if r[1] in at_seed]


def test_in_the_last_pieces_a_piece_at_the_seed_moves_when_young_or_overdue():
    """By default only the last pieces move (SEED_MOVE_TAIL): there the seed's queue is what a
    peer waits for. A young request moves to a quicker peer, one that has waited most of the
    seed's usual wait is probably next and stays, and one far beyond it (the seed serving the
    children further behind first) moves again; each piece is asked of one more parent only."""
    from nodes.picker import ENDGAME_LATE
    p, at_seed = waiting_at_seed(5.0)
    assert sorted(n for pid, n in p.next_requests(1.0) if pid == "P") == sorted(at_seed)
    p, at_seed = waiting_at_seed(2.0)
    assert not [r for r in p.next_requests(1.9) if r[1] in at_seed]  # probably next at the seed
    # Overdue, while P is busy with a fresh request of its own (the endgame copies only to a
    # parent with nothing outstanding): 8 pieces, 2 at the seed since t=0 (usual wait 4 s).
    p, at_seed = waiting_at_seed(4.0, peer_latency_s=0.5, pieces=8)
    late = ENDGAME_LATE * 4.0
    for n in list(p.parents["P"].outstanding):
        p.on_piece("P", n, 0.5)
    y1, y2, y3, _ = sorted(set(range(2, 8)) - at_seed)
    p.on_have("P", [y1, y2])
    assert sorted(n for _, n in p.next_requests(late - 0.3)) == [y1, y2]
    for n in (y1, y2):
        p.on_piece("P", n, late - 0.2)  # now in the last 4 pieces
    p.on_have("P", [y3, *sorted(at_seed)])
    assert [n for _, n in p.next_requests(late - 0.1)] == [y3]  # the seed's are probably next
    moved = [n for pid, n in p.next_requests(late + 0.1) if pid == "P"]
    assert moved and set(moved) <= at_seed  # as many as P's measured pace says come sooner
    assert sorted(n for n, ps in p.requested.items() if len(ps) > 1) == sorted(moved)


def test_a_piece_waiting_at_the_seed_is_asked_of_a_peer_that_got_it_since(seed_moves):
    """The seed's queue is every child's: a piece asked of it because nobody else had it is
    asked of a parent that announces it later, while the seed's copy is still far off; the first
    copy wins (the daemon cancels the other at the seed)."""
    p, at_seed = waiting_at_seed(5.0)
    moved = [n for pid, n in p.next_requests(1.0) if pid == "P"]
    assert sorted(moved) == sorted(at_seed)
    n = moved[0]
    assert p.requested[n] == {"S", "P"}
    p.on_piece("P", n, 1.5)
    assert n not in p.requested and n not in p.parents["S"].outstanding


def test_a_piece_about_to_come_from_the_seed_stays_there(seed_moves):
    p, at_seed = waiting_at_seed(2.0)
    assert not [r for r in p.next_requests(1.9) if r[1] in at_seed]  # 0.95 of its usual wait
    requested_once(p)


def test_a_piece_waiting_at_the_seed_is_not_moved_to_a_slower_queue(seed_moves):
    p, at_seed = waiting_at_seed(5.0, peer_latency_s=8.0)  # P's pieces take longer than the seed's
    assert not [r for r in p.next_requests(1.0) if r[1] in at_seed]
    requested_once(p)


def test_kept_order_matches_ranks_and_picks_stay_rarest_first():
    """The sorted order of wanted pieces is kept up to date through HAVEs, arrivals, failures,
    a parent's leaving and a local copy that failed, and each pick still asks every non-seed
    parent for the rarest pieces it holds that nobody was asked for (both ways of walking
    them: a parent holding few pieces, and the seed holding all)."""
    rng = random.Random(7)
    n = 300
    p = Picker(window_bytes=3 * L, rng=random.Random(1))  # manifest still growing: no tail or endgame
    p.add_manifest(manifest(n // 2))
    for i in range(6):
        p.add_parent(f"p{i}", seed=(i == 0))
    p.on_have("p0", list(range(n)))
    for step in range(3000):
        if step == 300:
            p.add_manifest(manifest(n)[n // 2:])
        op = rng.random()
        outstanding = sorted((pid, num) for pid, st in p.parents.items() for num in st.outstanding)
        if op < 0.4:
            p.on_have(f"p{rng.randrange(1, 6)}", rng.sample(range(n), rng.randint(1, 8)))
        elif op < 0.8 and outstanding:
            p.on_piece(*rng.choice(outstanding), now=float(step))
        elif op < 0.85 and outstanding:
            p.on_failure(*rng.choice(outstanding))
        elif op < 0.88 and p.have:
            p.unhave(rng.choice(sorted(p.have)))
        elif op < 0.89:
            pid = f"p{rng.randrange(1, 6)}"
            p.remove_parent(pid)
            p.add_parent(pid)
        before = {pid: set(st.have) for pid, st in p.parents.items()}
        reqs = p.next_requests(float(step))
        assert list(p._order) == sorted((p._rank[m], m) for m in p.manifest if m not in p.have)
        for pid in {pid for pid, _ in reqs} - {"p0"}:
            asked = max(p._rank[m] for q, m in reqs if q == pid)
            unasked = [m for m in before[pid] if m in p.manifest and m not in p.have and m not in p.requested]
            assert all(p._rank[m] > asked for m in unasked), (step, pid)
    assert len(p.have) > n // 2  # the walk got somewhere


def test_in_the_last_pieces_nothing_moves_from_the_seed_to_a_parent_the_tail_found_slow():
    """With half the uplinks slow, moves to them timed out there: only quick parents take them."""
    p, at_seed = waiting_at_seed(20.0, pieces=8)
    for n in set(range(8)) - at_seed:
        p.on_piece("", n)  # the rest came somehow: the last two are at the seed
    p.add_parent("Q")  # quick, but holds none of the seed's pieces
    p.on_have("Q", [0, 1])
    for pid, latency in (("P", 6.0), ("Q", 0.1)):
        st = p.parents[pid]
        st.latency_s, st.rate_bps = latency, L / latency
    slow, quick, _ = p._tail(1.0)
    assert [st.pid for st in slow] == ["P"] and [st.pid for st in quick] == ["Q"]
    assert not [r for r in p.next_requests(1.0) if r[1] in at_seed]
    p.parents["P"].latency_s, p.parents["P"].rate_bps = 0.1, L / 0.1  # quick after all: it may take them
    assert sorted(n for pid, n in p.next_requests(1.0) if pid == "P") == sorted(at_seed)


def test_a_parent_is_dropped_at_its_second_timeout_but_a_busy_seed_is_kept():
    """Each timed-out request is wanted again; a peer parent goes at its second, a seed never
    for timeouts (its queue is every child's: a child ahead waits there)."""
    p = seed_and_peer(8, 4, range(8))
    asked = p.next_requests(0.0)
    at = {pid: [n for q, n in asked if q == pid] for pid in ("S", "P")}
    assert len(at["S"]) >= 1 and len(at["P"]) >= 2
    expired = p.expired(p.piece_timeout_s + 1)
    assert sorted(expired) == sorted(asked)
    drops = []
    for pid, n in expired:
        if p.on_timeout(pid, n):
            drops.append(pid)
            p.remove_parent(pid)  # as the daemon does
    assert drops == ["P"]  # at its second timeout
    assert not p.parents["S"].outstanding and p.parents["S"].failures == len(at["S"])
    assert not p.requested  # every timed-out piece is wanted again...
    again = p.next_requests(p.piece_timeout_s + 2)
    assert again and {pid for pid, _ in again} == {"S"}  # ...of the seed, the one holder left
    assert p.on_timeout("gone", 0) is False
