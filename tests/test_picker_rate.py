"""nodes/picker.py with parents of unequal speed: windows sized from the rate each parent gives
while busy, and the last pieces kept out of a slow parent's queue.

A tiny discrete-event network: each parent serves our requests in order at its own rate
(bytes per second), the way a shaped uplink drains a FIFO. No sockets, no clock."""

from __future__ import annotations

import random

from dfzmq.wire import PieceInfo
from nodes.picker import Picker

PIECE = 128 * 1024


def manifest(n: int) -> list[PieceInfo]:
    return [PieceInfo(i, i * PIECE, PIECE, f"{i:064x}") for i in range(n)]


def simulate(picker: Picker, rates: dict[str, float], n: int, seed_pid: str | None = None,
             max_t: float = 600.0) -> dict:
    """Download n pieces from parents that all hold everything; returns finish time, duplicate
    count, and the longest any piece waited from its first request to its first copy."""
    picker.add_manifest(manifest(n))
    picker.complete = True
    for pid in rates:
        picker.add_parent(pid, seed=pid == seed_pid)
        picker.on_have(pid, range(n))
    busy_until = {pid: 0.0 for pid in rates}
    queue: list[tuple[float, str, int]] = []  # (arrives at, parent, num)
    asked: dict[int, float] = {}  # piece -> when it was first asked for
    now, longest, arrivals = 0.0, 0.0, 0
    while picker.missing() and now < max_t:
        for pid, num in picker.next_requests(now):
            start = max(now, busy_until[pid])
            busy_until[pid] = start + PIECE / rates[pid]
            queue.append((busy_until[pid], pid, num))
            asked.setdefault(num, now)
        queue.sort()
        t, pid, num = queue.pop(0)
        now = t
        arrivals += 1
        if num in picker.have:
            picker.on_duplicate(pid, num)  # the endgame's or a rescue's other copy
            continue
        longest = max(longest, now - asked[num])
        picker.on_piece(pid, num, now)
    assert not picker.missing()
    return {"finish_s": now, "arrivals": arrivals, "duplicates": arrivals - n, "longest_wait_s": longest}


def test_rate_measured_only_while_busy():
    p = Picker(window_bytes=8 * PIECE, window_target_s=1.0)
    p.add_manifest(manifest(4))
    p.add_parent("A")
    p.on_have("A", range(4))
    reqs = p.next_requests(0.0)
    assert len(reqs) == 2  # no rate yet: min_window pieces
    p.on_piece("A", reqs[0][1], 0.5)
    p.on_piece("A", reqs[1][1], 1.0)  # 2 pieces in 1 s of being busy
    assert abs(p.parents["A"].rate_bps - 2 * PIECE) < 0.2 * PIECE
    # Idle for 100 s, then asked again: the idle time is not counted against it.
    p.next_requests(101.0)
    first = next(iter(p.parents["A"].outstanding))
    p.on_piece("A", first, 101.5)
    assert p.parents["A"].rate_bps > 1.5 * PIECE


def test_window_follows_the_parents_rate():
    fast, slow = 40 * PIECE, 2 * PIECE  # bytes per second
    p = Picker(window_bytes=16 * PIECE, window_target_s=1.0, rng=random.Random(1), window_mode="rate")
    simulate(p, {"fast": fast, "slow": slow}, 400)
    assert p.parents["slow"].rate_bps < 3 * PIECE
    assert p._budget(p.parents["fast"]) > 8 * p._budget(p.parents["slow"]) or p.parents["fast"].rate_bps > 10 * slow


def test_rate_sized_windows_finish_near_the_links_sum_and_keep_waits_short():
    """One fast and three slow parents. Fixed 1 MiB windows queue 8 pieces at each slow parent
    (4 s each): the last piece waits behind them. Windows of one second's worth do not."""
    rates = {"f": 24 * PIECE, "s1": 2 * PIECE, "s2": 2 * PIECE, "s3": 2 * PIECE}
    ideal = 300 * PIECE / sum(rates.values())  # 10 s
    fixed = simulate(Picker(window_bytes=8 * PIECE, rng=random.Random(2), endgame_after_s=1.0), rates, 300)
    sized = simulate(Picker(window_bytes=8 * PIECE, window_target_s=1.0, rng=random.Random(2),
                            endgame_after_s=1.0, window_mode="rate"), rates, 300)
    assert sized["longest_wait_s"] < 2.5 < fixed["longest_wait_s"]
    assert sized["finish_s"] < 1.15 * ideal
    assert sized["duplicates"] <= 3


def test_a_parent_is_judged_silent_on_the_piece_timeouts_scale_not_the_heartbeats():
    p = Picker(window_bytes=8 * PIECE, window_target_s=1.0, piece_timeout_s=20.0)
    assert p.silence_allowed_s("A", 4.0) == 20.0
    assert p.silence_allowed_s("A", 15.0) == 30.0  # a long liveness still counts double


def test_a_request_stuck_at_a_starved_parent_is_asked_again_elsewhere(monkeypatch):
    """A parent whose flow to us starves (here: 1/100 of the others' rate) holds requests for
    tens of seconds. The picker asks a parent with room for them again instead of waiting, and
    only for stuck ones: a few duplicates, not a copy of every slow request."""
    import nodes.picker as picker_mod

    rates = {"a": 10 * PIECE, "b": 10 * PIECE, "starved": PIECE / 10}
    ideal = 600 * PIECE / sum(rates.values())  # about 30 s
    rescued = simulate(Picker(window_bytes=8 * PIECE, window_target_s=1.0, rng=random.Random(3),
                              endgame_after_s=1.0), rates, 600)
    monkeypatch.setattr(picker_mod, "RESCUE_FACTOR", 1e9)
    waited = simulate(Picker(window_bytes=8 * PIECE, window_target_s=1.0, rng=random.Random(3),
                             endgame_after_s=1.0), rates, 600)
    assert waited["longest_wait_s"] > 8  # the starved parent's piece: 10 s, or the endgame's copy
    assert rescued["longest_wait_s"] < 5
    assert rescued["finish_s"] < 1.1 * ideal
    assert rescued["duplicates"] <= 6  # the rescue budget: 1% of 600 pieces


def shared_parent(mode: str, seconds: float = 40.0) -> tuple[int, int]:
    """Two children of one parent that serves their requests first come, first served at 8
    pieces/s. Child A starts with an 8-piece window, B with the floor. Pieces each got in the
    second half."""
    rate = 8 * PIECE
    kids = {}
    for name in "AB":
        p = Picker(window_bytes=16 * PIECE, window_target_s=1.0, window_mode=mode, rng=random.Random(4))
        p.add_manifest(manifest(400))
        p.complete = True
        p.add_parent("P")
        p.on_have("P", range(400))
        kids[name] = p
    a = kids["A"].parents["P"]
    a.window, a.rate_bps = 8.0 * PIECE, 8.0 * PIECE  # A's head start, in either mode
    fifo: list[tuple[str, int, float]] = []  # (child, num, asked at)
    now, got = 0.0, {"A": 0, "B": 0}
    while now < seconds:
        for name, p in kids.items():
            fifo += [(name, num, now) for _, num in p.next_requests(now)]
        name, num, _ = fifo.pop(0)
        now += PIECE / rate
        kids[name].on_piece("P", num, now)
        if now > seconds / 2:
            got[name] += 1
    return got["A"], got["B"]


def test_two_children_share_a_parent_evenly_whatever_their_start():
    for mode in ("aimd", "rate"):
        a, b = shared_parent(mode)
        assert 0.7 < a / b < 1.4, (mode, a, b)


def test_rescues_are_capped_at_a_share_of_the_pieces(monkeypatch):
    """Every parent but one starves: rescues stop at RESCUE_BUDGET of the pieces (and the
    endgame, then the timeouts, take over), so duplicates stay bounded."""
    import nodes.picker as picker_mod

    rates = {"a": 10 * PIECE, **{f"s{i}": PIECE / 20 for i in range(6)}}
    p = Picker(window_bytes=8 * PIECE, window_target_s=1.0, rng=random.Random(5), endgame_after_s=1.0,
               piece_timeout_s=1e9)
    got = simulate(p, rates, 400)
    cap = max(picker_mod.RESCUE_MIN, int(picker_mod.RESCUE_BUDGET * 400))
    assert p.rescued == cap
    assert got["duplicates"] <= p.duplicates


def test_a_benched_parent_gets_no_new_requests_until_it_delivers():
    p = Picker(window_bytes=8 * PIECE, window_target_s=1.0, endgame_after_s=1.0, rng=random.Random(6))
    p.add_manifest(manifest(50))
    p.complete = True
    for pid in ("quiet", "ok"):
        p.add_parent(pid)
        p.on_have(pid, range(50))
    first = p.next_requests(0.0)
    at_quiet = [n for pid, n in first if pid == "quiet"]
    for pid, n in first:
        if pid == "ok":
            p.on_piece("ok", n, 0.2)
    p.next_requests(0.2)
    for pid, n in list(p.requested.items()):
        if "ok" in n:
            p.on_piece("ok", pid, 0.4)
    moved = p.next_requests(5.0)  # "quiet" sent nothing for 5 s: its requests go to "ok"
    assert {n for pid, n in moved if pid == "ok"} >= set(at_quiet)
    assert p.parents["quiet"].benched and p._budget(p.parents["quiet"]) == 0
    p.on_duplicate("quiet", at_quiet[0])  # its late copy: alive after all
    assert not p.parents["quiet"].benched


def test_aimd_window_shrinks_to_two_pieces_at_a_parent_that_is_always_late():
    """Two, so that a parent ordering its queue by need always has this child's next request
    when its last piece leaves (AIMD_MIN_PIECES)."""
    p = Picker(window_bytes=8 * PIECE, window_target_s=1.0, rng=random.Random(7))
    p.add_manifest(manifest(80))
    p.add_parent("late")
    p.on_have("late", range(80))
    now = 0.0
    for _ in range(30):
        reqs = p.next_requests(now)
        now += 3.0  # every piece takes three times the target
        for _, num in reqs:
            p.on_piece("late", num, now)
    assert p.parents["late"].window == 2 * PIECE
    assert len(p.next_requests(now)) == 2  # two pieces asked, no more


def test_a_benched_parent_whose_requests_timed_out_is_asked_again():
    # Only "B" holds pieces 30-39. It went quiet with one request in flight (benched); that
    # request timed out. With nothing left outstanding there, the bench must lift, or the
    # download would never ask B again while B stays in the parent list.
    p = Picker(window_bytes=8 * PIECE, window_target_s=1.0, piece_timeout_s=20.0, rng=random.Random(8))
    p.add_manifest(manifest(40))
    p.complete = True
    p.add_parent("A")
    p.on_have("A", range(30))
    p.add_parent("B")
    p.on_have("B", range(40))
    p.parents["B"].benched = True
    p.parents["B"].outstanding[35] = 0.0
    p.requested[35] = {"B"}
    assert all(pid != "B" for pid, _ in p.next_requests(1.0))
    for pid, num in p.expired(21.0):
        p.on_failure(pid, num)
    assert not p.parents["B"].benched
    assert any(pid == "B" for pid, _ in p.next_requests(22.0))



def _last_sources(p: Picker, rates: dict[str, float], n: int, seed_pid: str) -> tuple[dict, list[str]]:
    firsts: list[str] = []
    on_piece = p.on_piece

    def record(pid: str, num: int, now: float | None = None) -> None:
        if num not in p.have:
            firsts.append(pid)
        on_piece(pid, num, now)

    p.on_piece = record  # type: ignore[method-assign]
    return simulate(p, rates, n, seed_pid=seed_pid), firsts


def test_the_last_pieces_are_not_left_in_a_slow_parents_queue():
    """A fast parent, a slow one and the seed. Without the tail rule the last pieces wait in the
    slow parent's queue; with it they go to the fast parent and the seed, whose window opens
    once its upload no longer needs saving for pieces nobody else has."""
    rates = {"fast": 20 * PIECE, "slow": 2 * PIECE, "seed": 10 * PIECE}
    ideal = 200 * PIECE / sum(rates.values())
    kw = dict(window_bytes=16 * PIECE, window_target_s=1.0, endgame_after_s=1.0)
    plain = Picker(rng=random.Random(3), **kw)
    plain._tail = lambda now: ([], [], [])  # type: ignore[method-assign]
    before, _ = _last_sources(plain, rates, 200, "seed")
    after, firsts = _last_sources(Picker(rng=random.Random(3), **kw), rates, 200, "seed")
    assert after["finish_s"] < before["finish_s"] - 0.3
    assert after["finish_s"] < 1.05 * ideal
    assert "slow" not in firsts[-8:] and "seed" in firsts[-8:]
    assert after["duplicates"] <= 2


def _two_parents(left: int, total: int = 100) -> Picker:
    p = Picker(window_bytes=16 * PIECE, window_target_s=1.0)
    p.add_manifest(manifest(total))
    p.complete = True
    for pid, latency in (("fast", 0.1), ("slow", 1.0)):
        p.add_parent(pid)
        p.on_have(pid, range(total))
        st = p.parents[pid]
        st.latency_s, st.rate_bps = latency, PIECE / latency
    p.have.update(range(total - left))
    return p


def names(parents) -> list[str]:
    return [st.pid for st in parents]


def test_no_tail_rule_far_from_the_end_or_without_a_quick_parent():
    assert _two_parents(left=100)._tail(0.0) == ([], [], [])  # 9 s left at 11 pieces a second
    assert _two_parents(left=30)._tail(0.0) == ([], [], [])  # past TAIL_SHARE of the pieces
    p = _two_parents(left=5)
    slow, quick, seeds = p._tail(0.0)
    assert names(slow) == ["slow"] and names(quick) == ["fast"] and seeds == []
    reqs = p.next_requests(0.0)
    assert reqs and {pid for pid, _ in reqs} == {"fast"}  # none for the slow parent
    p.parents["fast"].benched = True  # nobody quick to take its place
    assert p._tail(0.0) == ([], [], [])


def test_a_quick_parent_gone_quiet_is_no_longer_quick():
    """Its requests' age counts: a fast parent silent for 3 s is slower than the slow one, which
    then takes the pieces (without that, they waited for the piece timeout)."""
    p = _two_parents(left=5)
    first = p.next_requests(0.0)
    assert {pid for pid, _ in first} == {"fast"}
    slow, quick, _ = p._tail(3.0)
    assert names(slow) == ["fast"] and names(quick) == ["slow"]
    assert any(pid == "slow" for pid, _ in p.next_requests(3.0))


def test_the_seeds_window_opens_in_the_tail_only():
    p = Picker(window_bytes=16 * PIECE, window_target_s=1.0, min_window=2)
    p.add_manifest(manifest(100))
    p.complete = True
    p.add_parent("seed", seed=True)
    p.add_parent("slow")
    for pid, latency in (("seed", 0.05), ("slow", 2.0)):
        p.on_have(pid, range(100))
        st = p.parents[pid]
        st.latency_s, st.rate_bps = latency, PIECE / latency
    p.parents["seed"].window = 8 * PIECE
    early = p.next_requests(0.0)
    assert [pid for pid, _ in early].count("seed") <= 1  # pieces others hold: not the seed's
    for pid, n in early:
        p.on_piece(pid, n, 0.0)
    p.have.update(range(90))
    late = p.next_requests(0.1)
    assert [pid for pid, _ in late].count("seed") >= 4  # an ordinary parent's window
    assert "slow" not in {pid for pid, _ in late}


def test_a_parents_wait_counts_our_queue_there_at_its_rate():
    p = _two_parents(left=20)
    fast = p.parents["fast"]
    assert p._wait(fast, 0.0) == 0.1  # nothing outstanding: its usual wait
    for n in range(80, 88):
        p._request(fast, n, 0.0)
    assert abs(p._wait(fast, 0.0) - 0.9) < 1e-9  # eight queued and one more, 0.1 s each
