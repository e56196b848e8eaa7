"""SchedulerViews next to a real SchedulerCore: snapshots, published deltas, rates, task detail.

Messages go through the wire codec both ways and are routed as the service routes them
(view requests to the views, the rest to the core and then shown to the views).
"""

from __future__ import annotations

from typing import Any

from brokers.scheduler.core import SchedulerCore
from brokers.scheduler.views import SchedulerViews, bitmap, unbitmap
from dfzmq import wire
from dfzmq.actions import Publish, Send
from brokers.scheduler.views import VIEW_REQUESTS

TASK = "ab" * 32
URL = "http://origin.test/big.bin"


def rt(msg: Any) -> Any:
    return wire.decode(wire.encode(msg))


class Harness:
    def __init__(self) -> None:
        self.core = SchedulerCore("sched-1", 1.0, 5)
        self.views = SchedulerViews(self.core, 1.0, "9.9")
        self.now = 0.0
        self.published: list[Any] = []

    def send(self, ident: bytes, msg: Any) -> list[Any]:
        msg = rt(msg)
        if isinstance(msg, VIEW_REQUESTS):
            actions = self.views.handle(ident, msg, self.now)
        else:
            actions = self.core.handle(ident, msg, self.now)
            self.views.observe(msg, actions, self.now)
        self.published += [rt(a.msg) for a in actions if isinstance(a, Publish)]
        return [rt(a.msg) for a in actions if isinstance(a, Send) and a.to == ident]

    def tick(self, dt: float = 1.0) -> list[wire.StateDelta]:
        self.now += dt
        out = [rt(a.msg) for a in self.core.handle_timer(self.now) + self.views.handle_timer(self.now)
               if isinstance(a, Publish)]
        self.published += out
        return [m for m in out if isinstance(m, wire.StateDelta)]

    def host(self, name: str, seed: bool = False) -> bytes:
        ident = name.encode()
        self.send(ident, wire.HostAnnounce(name, name + ".example", f"tcp://{name}:1", seed=seed,
                                           upload_slots=8, version="9.9"))
        return ident


def pieces(nums, length: int = 1000) -> list[wire.PieceInfo]:
    return [wire.PieceInfo(n, n * length, length, f"d{n}") for n in nums]


def test_bitmap_round_trip():
    nums = [0, 1, 2, 7, 8, 63, 64, 1000]
    assert unbitmap(bitmap(nums)) == nums
    assert bitmap([]) == b"" and unbitmap(b"") == []
    assert bitmap([0, 9]) == bytes([1, 2])


def test_snapshot_deltas_rates_and_task_detail():
    h = Harness()
    seed, peer = h.host("seed", seed=True), h.host("peer")
    h.send(seed, wire.PeerRegister(TASK, "seed/p", URL))
    h.send(peer, wire.PeerRegister(TASK, "peer/p", URL))
    first = h.tick()
    assert len(first) == 1
    assert {v.host_id for v in first[0].hosts} == {"seed", "peer"}
    assert [t.task_id for t in first[0].tasks] == [TASK]
    assert not h.tick(), "nothing changed: nothing published but heartbeats"

    # The seed reads 10 pieces from the origin, the peer gets 4 of them from it.
    h.send(seed, wire.PieceReport(TASK, "seed/p", pieces(range(10)), 10_000, "origin"))
    h.send(peer, wire.PieceReport(TASK, "peer/p", pieces([0, 1, 2, 5]), 10_000, "p2p"))
    h.send(seed, wire.HostStats("seed", down_bytes=10_000, origin_bytes=10_000, up_bytes=4_000,
                                pieces_served=4))
    h.send(peer, wire.HostStats("peer", down_bytes=4_000))
    (delta,) = h.tick(2.0)
    task = {t.task_id: t for t in delta.tasks}[TASK]
    assert (task.origin_bytes, task.p2p_bytes, task.content_length) == (10_000, 4_000, 10_000)
    assert task.done_bytes == 14_000 and task.peers == 2
    assert task.rate == 7_000.0  # 14 kB over the 2 s since the last tick
    hosts = {v.host_id: v for v in delta.hosts}
    assert hosts["seed"].up_bytes == 4_000 and hosts["seed"].pieces_served == 4
    assert hosts["seed"].up_rate == 2_000.0 and hosts["peer"].down_rate == 2_000.0
    assert delta.seq == h.core.seq

    # A snapshot carries the same records under the current seq.
    (state,) = h.send(b"admin", wire.StateRequest())
    assert isinstance(state, wire.SchedulerState)
    assert state.seq == h.core.seq and state.scheduler_id == "sched-1" and state.version == "9.9"
    assert {v.host_id for v in state.hosts} == {"seed", "peer"}
    names = [e.name for e in state.events]
    assert names[:2] == ["host-joined", "host-joined"] and "peer-registered" in names
    assert all(e.age_s >= 0 for e in state.events) and state.events[0].age_s == h.now == 4.0

    # Who holds which pieces, by a prefix of the task id.
    (detail,) = h.send(b"admin", wire.TaskRequest(TASK[:8]))
    assert isinstance(detail, wire.TaskDetail)
    held = {p.peer_id: unbitmap(p.bitmap) for p in detail.peers}
    assert held == {"seed/p": list(range(10)), "peer/p": [0, 1, 2, 5]}
    assert {p.peer_id: p.seed for p in detail.peers} == {"seed/p": True, "peer/p": False}

    # The peer finishes: the task-done event gives a duration, the next delta shows it done.
    h.send(seed, wire.PeerDone(TASK, "seed/p", 10_000, "fd", 10))
    assert len(h.views.durations) == 1 and h.views.durations[0] >= 0
    (delta,) = h.tick()
    assert {t.task_id: t for t in delta.tasks}[TASK].complete


def test_gone_hosts_and_tasks_are_published():
    h = Harness()
    peer = h.host("peer")
    h.send(peer, wire.PeerRegister(TASK, "peer/p", URL))
    h.tick()
    h.send(peer, wire.PeerLeave(TASK, "peer/p"))
    (delta,) = h.tick()
    assert delta.gone_tasks == [TASK]
    h.tick(10.0)  # the host stops heartbeating: the core drops it
    gone = [d for d in h.published if isinstance(d, wire.StateDelta) and d.gone_hosts]
    assert gone and gone[-1].gone_hosts == ["peer"]


def test_bad_requests_are_answered_not_raised():
    h = Harness()
    h.host("peer")
    (err,) = h.send(b"admin", wire.TaskRequest("ab"))
    assert isinstance(err, wire.Error) and err.code == "bad-request"
    (err,) = h.send(b"admin", wire.TaskRequest("ffffffff"))
    assert isinstance(err, wire.Error) and err.code == "unknown-task"
    (err,) = h.send(b"stranger", wire.HostStats("peer", up_bytes=1))
    assert isinstance(err, wire.Error) and err.code == "unknown-host"
    assert "peer" not in h.views.host_stats


def test_restarted_daemon_counts_from_zero_without_negative_rates():
    h = Harness()
    peer = h.host("peer")
    h.send(peer, wire.HostStats("peer", down_bytes=50_000))
    h.tick()
    h.send(peer, wire.HostStats("peer", down_bytes=50_000))
    h.tick()
    h.send(peer, wire.HostStats("peer", down_bytes=1_000))  # restarted
    (delta,) = h.tick()
    assert delta.hosts[0].down_rate == 1_000.0


def test_host_stats_feed_the_uplink_that_parent_choice_ranks_by():
    h = Harness()
    seed = h.host("seed", seed=True)
    for k in range(4):
        h.send(seed, wire.HostStats("seed", up_bytes=k * 500_000))
        h.tick(1.0)
    assert abs(h.core.hosts["seed"].uplink_bps - 500_000) < 1
