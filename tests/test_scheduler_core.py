"""SchedulerCore on a fake network and a fake clock (h11's ConnectionPair idea, scaled to a swarm).

Every message goes through dfzmq.wire's encoder and decoder on its way in and out, so the
codec is exercised too. Fake hosts are scripted: a test sends what a daemon would and
asserts what the scheduler answers.
"""

from __future__ import annotations

from typing import Any

import pytest

from brokers.scheduler import parents as parents_mod
from brokers.scheduler import scoring
from brokers.scheduler.core import PeerState, SchedulerCore
from dfzmq import wire
from dfzmq.actions import Publish, Send

INTERVAL_S = 1.0
LIVENESS = 3
TASK = "t" * 64
URL = "http://origin.test/file.bin"


def roundtrip(msg: Any) -> Any:
    return wire.decode(wire.encode(msg))


def pieces(nums) -> list[wire.PieceInfo]:
    return [wire.PieceInfo(n, n * 100, 100, f"digest-{n}") for n in nums]


class FakeHost:
    """A scripted daemon: one host, at most one peer per task."""

    def __init__(self, net: FakeNet, name: str, seed: bool = False, idc: str = "",
                 location: str = "", slots: int = 16) -> None:
        self.net, self.host_id, self.ident = net, name, name.encode()
        self.inbox: list[Any] = []
        self.alive = True  # heartbeats while the clock advances
        self.last_beat = net.now
        self.info = wire.HostAnnounce(host_id=name, hostname=name,
                                      upload_addr=f"tcp://{name}:6000", seed=seed, idc=idc,
                                      location=location, upload_slots=slots)

    def peer(self, task: str = TASK) -> str:
        return f"{self.host_id}:{task[:6]}"

    def send(self, msg: Any) -> None:
        self.net.send(self, msg)

    def announce(self) -> None:
        self.send(self.info)

    def register(self, task: str = TASK, **kw: Any) -> None:
        self.send(wire.PeerRegister(task_id=task, peer_id=self.peer(task), url=URL, **kw))

    def report(self, nums, content_length: int = -1, source: str = "origin",
               task: str = TASK) -> None:
        self.send(wire.PieceReport(task, self.peer(task), pieces(nums), content_length, source))

    def done(self, n: int, task: str = TASK) -> None:
        self.send(wire.PeerDone(task, self.peer(task), n * 100, "file-digest", n))

    def take(self, cls: type | None = None) -> list[Any]:
        """Messages received (heartbeat answers aside), removed from the inbox."""
        got = [m for m in self.inbox if cls is None or isinstance(m, cls)]
        self.inbox = [m for m in self.inbox if m not in got]
        return [m for m in got if not isinstance(m, wire.Heartbeat)]

    def one(self, cls: type) -> Any:
        got = self.take(cls)
        assert len(got) == 1, (self.host_id, cls.__name__, got, self.inbox)
        return got[0]

    def parents(self) -> list[str]:
        """Parent peer ids from the latest PeerParents (which must be there)."""
        return [p.peer_id for p in self.take(wire.PeerParents)[-1].parents]


class FakeNet:
    def __init__(self, **core_kw: Any) -> None:
        self.now = 1000.0
        self.core = SchedulerCore("sched-1", INTERVAL_S, LIVENESS, **core_kw)
        self.hosts: dict[bytes, FakeHost] = {}
        self.events: list[Any] = []
        self.strays: list[Any] = []  # sends to identities nobody holds

    def host(self, name: str, **kw: Any) -> FakeHost:
        h = self.hosts[name.encode()] = FakeHost(self, name, **kw)
        h.announce()
        ack = h.one(wire.HostAck)
        assert ack.host_id == name and ack.scheduler_id == "sched-1"
        return h

    def send(self, host: FakeHost, msg: Any) -> None:
        self.route(self.core.handle(host.ident, roundtrip(msg), self.now))

    def route(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, Send):
                target = self.hosts.get(a.to)
                (target.inbox if target else self.strays).append(roundtrip(a.msg))
            else:
                assert isinstance(a, Publish)
                self.events.append(roundtrip(a.msg))

    def advance(self, seconds: float, step: float = 0.25) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for h in self.hosts.values():
                if h.alive and self.now - h.last_beat >= INTERVAL_S:
                    h.last_beat = self.now
                    h.send(wire.Heartbeat(sender=h.host_id))
            for _ in range(100):
                if self.core.next_deadline() > self.now:
                    break
                self.route(self.core.handle_timer(self.now))
            else:
                raise AssertionError("timer deadline does not advance")

    def event_names(self) -> list[str]:
        return [e.name for e in self.events if isinstance(e, wire.Event)]

    def state(self, host: FakeHost, task: str = TASK) -> PeerState:
        return self.core.peers[host.peer(task)].state


# ---------------------------------------------------------------------------------------------
# Seeds and the source peer


def test_first_peer_triggers_seed_and_waiters_get_the_seed_as_parent():
    net = FakeNet()
    seed, a, b = net.host("seed", seed=True), net.host("a"), net.host("b")
    a.register()
    trig = seed.one(wire.SeedTrigger)
    assert (trig.task_id, trig.url) == (TASK, URL)
    assert a.take() == [] and net.state(a) is PeerState.PENDING
    b.register()
    assert b.take() == [] and seed.take() == []  # one trigger per task

    seed.register()
    assert seed.one(wire.BackToSource).peer_id == seed.peer()
    assert net.core.tasks[TASK].source_peer == seed.peer()
    pa, pb = a.one(wire.PeerParents), b.one(wire.PeerParents)
    assert pa.parents[0].peer_id == seed.peer() and pa.parents[0].seed
    assert pa.parents[0].addr == "tcp://seed:6000"
    assert [p.peer_id for p in pb.parents][0] == seed.peer()
    assert a.peer() in [p.peer_id for p in pb.parents]  # waiters meet each other early
    assert net.state(a) is net.state(b) is PeerState.RUNNING
    assert "seed-triggered" in net.event_names()
    seqs = [e.seq for e in net.events if isinstance(e, wire.Event)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_without_a_seed_the_first_peer_goes_back_to_source():
    net = FakeNet()
    a, b = net.host("a"), net.host("b")
    a.register()
    assert a.one(wire.BackToSource).peer_id == a.peer()
    assert net.state(a) is PeerState.BACK_TO_SOURCE
    b.register()
    assert b.parents() == [a.peer()]


def test_seed_that_never_registers_times_out():
    net = FakeNet(seed_timeout_s=2.0)
    seed, a, b = net.host("seed", seed=True), net.host("a"), net.host("b")
    a.register()
    b.register()
    seed.one(wire.SeedTrigger)
    net.advance(1.0)
    assert a.take() == [] and b.take() == []
    net.advance(1.5)
    assert a.one(wire.BackToSource)
    assert b.parents() == [a.peer()]
    # The seed shows up late: it is an ordinary peer now.
    seed.register()
    assert seed.take(wire.BackToSource) == []
    assert a.peer() in seed.parents()


def test_peer_on_a_seed_host_becomes_the_source_of_an_unsourced_task():
    net = FakeNet()
    seed = net.host("seed", seed=True)
    seed.register()
    assert seed.one(wire.BackToSource)
    assert net.core.tasks[TASK].source_peer == seed.peer()


# ---------------------------------------------------------------------------------------------
# Parents over time, manifests, completion


def test_later_peers_get_earlier_ones_and_earlier_ones_get_updated_lists():
    net = FakeNet()
    a, b, c, d = (net.host(n) for n in "abcd")
    a.register()
    a.one(wire.BackToSource)
    b.register()
    assert b.parents() == [a.peer()]
    c.register()
    assert c.parents() == [a.peer(), b.peer()]  # the source first
    net.advance(1.5)
    assert set(b.parents()) == {a.peer(), c.peer()}  # c joined after b: b learns of it
    d.register()
    d.take()
    net.advance(1.5)
    assert set(b.parents()) == {a.peer(), c.peer(), d.peer()}
    assert a.take(wire.PeerParents) == []  # the source needs none
    net.advance(1.5)
    assert b.take(wire.PeerParents) == []  # nothing changed: no resend


def test_max_parents_is_respected_and_source_always_included():
    net = FakeNet(max_parents=3)
    hosts = [net.host(f"h{i}") for i in range(8)]
    hosts[0].register()
    for h in hosts[1:]:
        h.register()
    for h in hosts[1:]:  # as chosen at registration
        parents = h.parents()
        assert len(parents) <= 3 and parents[0] == hosts[0].peer()
        assert h.peer() not in parents
    net.advance(2.0)  # refreshes: the feed may give a peer one parent beyond max_parents
    for h in hosts[1:]:
        parents = list(net.core.peers[h.peer()].parents)
        assert len(parents) <= 3 + parents_mod.FEED_EXTRA_PARENTS and parents[0] == hosts[0].peer()
        assert h.peer() not in parents


def late_share(net: FakeNet, hosts: list, late: set[str]) -> float:
    """Of the late hosts' parents (the source aside), the share that are late hosts too."""
    edges = [hid for h in hosts if h.host_id in late
             for hid in net.core.peers[h.peer()].parents.values() if hid != hosts[0].host_id]
    return sum(hid in late for hid in edges) / len(edges)


@pytest.mark.parametrize("candidates, steps, low, high, most", [
    (15, 0, 0.7, 1.0, 8),   # the old default: a clique by registration order, load even
    (8, 0, 0.0, 0.6, 10),   # the default: mixed, load nearly as even
    (15, 3, 0.0, 0.5, 11),  # the choose_free_steps trial: mixed, the first registrants loaded
])
def test_a_wave_of_registrations_does_not_take_registration_order_for_the_swarms_shape(
        candidates, steps, low, high, most):
    """The lab's N=32 wave, slow half registering last. With the best 5 of 15 sampled candidates
    by exact free slots, every newcomer takes the peers that registered just before it (the
    fewest children), so three quarters of the second half's parents are in the second half (in
    the lab, the slow half fed itself). Of 8 candidates, the best 5 are nearly a random choice
    that still leaves out the most loaded; counting free slots in steps, the hash spreads the
    choice among hosts a few children apart: both mix the halves about as well as interleaved
    halves are (0.44 in this swarm), the steps at the cost of a less even load."""
    net = FakeNet(candidate_parents=candidates, choose_free_steps=steps)
    hosts = [net.host(f"h{i}", slots=32) for i in range(33)]
    hosts[0].register()
    hosts[0].report(range(256), content_length=25600)
    for h in hosts[1:]:
        h.register()
        net.advance(0.02, step=0.02)
    net.advance(2.0)
    second_half = {h.host_id for h in hosts[17:]}
    assert low < late_share(net, hosts, second_half) <= high
    kids = [net.core._children_of_host(h.host_id) for h in hosts[1:]]
    assert min(kids) >= 1  # nobody left without children
    assert max(kids) <= most  # ~5 children per host on average


def test_piece_reports_relay_new_manifest_entries():
    net = FakeNet()
    a, b, c = net.host("a"), net.host("b"), net.host("c")
    a.register()
    b.register()
    c.register()
    for h in (a, b, c):
        h.take()
    a.report([0, 1], content_length=300)
    for h in (b, c):
        m = h.one(wire.TaskManifest)
        assert [p.num for p in m.pieces] == [0, 1] and m.content_length == 300
        assert not m.complete
    assert a.take() == []
    a.report([0, 1, 2])
    assert [p.num for p in b.one(wire.TaskManifest).pieces] == [2]
    c.take()
    b.report([0], source=a.peer())  # nothing new: nothing relayed
    assert a.take() == [] and c.take() == []
    assert net.core.peers[b.peer()].pieces == {0}

    d = net.host("d")
    d.register()
    first, *rest = d.take()
    assert isinstance(first, wire.TaskManifest) and [p.num for p in first.pieces] == [0, 1, 2]
    assert isinstance(rest[-1], wire.PeerParents)


def test_source_done_completes_the_manifest():
    net = FakeNet()
    a, b, c = net.host("a"), net.host("b"), net.host("c")
    a.register()
    b.register()
    c.register()
    a.report([0, 1, 2], content_length=300)
    for h in (a, b, c):
        h.take()
    a.done(3)
    for h in (b, c):
        m = h.one(wire.TaskManifest)
        assert m.complete and m.pieces == [] and m.file_digest == "file-digest"
        assert m.piece_count == 3 and m.content_length == 300
    assert net.state(a) is PeerState.SUCCEEDED
    assert "task-done" in net.event_names() and "peer-done" in net.event_names()
    d = net.host("d")
    d.register()
    m = d.one(wire.TaskManifest)
    assert m.complete and len(m.pieces) == 3
    assert a.peer() in d.parents()


def test_origin_failure_fails_the_task_everywhere_until_forgotten():
    net = FakeNet(failed_ttl_s=60.0)
    a, b, c = net.host("a"), net.host("b"), net.host("c")
    a.register()
    b.register()
    c.register()
    for h in (a, b, c):
        h.take()
    a.send(wire.PeerFailed(TASK, a.peer(), "HTTP 404", code="source"))
    for h in (b, c):
        assert h.one(wire.TaskFailed).reason == "HTTP 404"
        assert net.state(h) is PeerState.FAILED
    assert a.take() == []
    d = net.host("d")
    d.register()
    assert d.one(wire.TaskFailed).reason == "HTTP 404"
    net.advance(61.0)
    d.register()
    assert d.one(wire.BackToSource)  # the origin may be fixed: try again


def test_source_failing_for_its_own_reasons_hands_over_the_role():
    net = FakeNet()
    a, b, c = net.host("a"), net.host("b"), net.host("c")
    a.register()
    b.register()
    c.register()
    b.report([0, 1], source=a.peer())
    c.report([0], source=a.peer())
    for h in (a, b, c):
        h.take()
    a.send(wire.PeerFailed(TASK, a.peer(), "disk full", code="storage"))
    assert b.one(wire.BackToSource)  # furthest along
    assert net.core.tasks[TASK].source_peer == b.peer()
    assert c.take(wire.TaskFailed) == []


def test_reschedule_with_every_parent_blocked_goes_back_to_source():
    net = FakeNet()
    a, b, c = net.host("a"), net.host("b"), net.host("c")
    a.register()
    b.register()
    c.register()
    c.take()
    c.send(wire.Reschedule(TASK, c.peer(), blocklist=[b.peer()], reason="slow"))
    assert c.parents() == [a.peer()]
    c.send(wire.Reschedule(TASK, c.peer(), blocklist=[a.peer()], reason="corrupt"))
    assert c.one(wire.BackToSource).reason
    assert net.state(c) is PeerState.BACK_TO_SOURCE
    assert net.core.tasks[TASK].source_peer == a.peer()  # c reads the origin for itself


def test_reschedule_keeps_the_parents_not_blocked_unless_stalled():
    net = FakeNet(max_parents=3)
    hosts = [net.host(f"h{i}") for i in range(8)]
    for h in hosts:
        h.register()
    child = hosts[-1]
    before = list(net.core.peers[child.peer()].parents)
    assert len(before) == 3
    slow = before[1]
    child.send(wire.Reschedule(TASK, child.peer(), blocklist=[slow], reason="parents dead or too slow"))
    after = child.parents()
    # the two healthy parents stay (in flight requests and all), one fresh one takes the slot
    assert after[:2] == [p for p in before if p != slow] and len(after) == 3 and slow not in after
    # a stalled peer's parents all gave nothing: with none blocked it still gets a fresh draw,
    # not the same three (eight candidates, the source first: 6 others for 2 places, 200 tries)
    fresh = set()
    for _ in range(200):
        child.send(wire.Reschedule(TASK, child.peer(), reason=wire.RESCHEDULE_STALLED))
        fresh.add(tuple(child.parents()))
    assert len(fresh) > 1
    kept = set()
    for _ in range(20):
        child.send(wire.Reschedule(TASK, child.peer(), reason="parents dead or too slow"))
        kept.add(tuple(child.parents()))
    assert len(kept) == 1


def test_peer_leave_repairs_children_lists():
    net = FakeNet()
    a, b, c = net.host("a"), net.host("b"), net.host("c")
    a.register()
    b.register()
    c.register()
    net.advance(1.5)
    for h in (a, b, c):
        h.take()
    b.send(wire.PeerLeave(TASK, b.peer()))
    net.advance(1.5)
    assert c.parents() == [a.peer()]
    assert b.peer() not in net.core.peers


def test_silent_host_is_dropped_and_its_source_role_handed_over():
    net = FakeNet()
    a, b, c = net.host("a"), net.host("b"), net.host("c")
    a.register()
    b.register()
    c.register()
    b.report([0, 1, 2], content_length=300, source=a.peer())
    net.advance(1.5)
    for h in (a, b, c):
        h.take()
    a.alive = False
    net.advance(LIVENESS * INTERVAL_S + 1.5)
    assert net.core.stats()["hosts"] == 2
    assert a.peer() not in net.core.peers
    assert b.one(wire.BackToSource).reason == "source peer lost"
    assert c.parents() == [b.peer()]
    assert "host-left" in net.event_names()


def test_pub_heartbeat_every_interval():
    net = FakeNet()
    net.advance(3.0)
    beats = [e for e in net.events if isinstance(e, wire.PubHeartbeat)]
    assert 3 <= len(beats) <= 4 and all(b.source == "sched-1" for b in beats)


# ---------------------------------------------------------------------------------------------
# Restarts and bad input


def test_unknown_host_is_answered_with_error():
    net = FakeNet()
    stranger = FakeHost(net, "stranger")
    net.hosts[stranger.ident] = stranger
    stranger.send(wire.Heartbeat(sender="x"))
    assert stranger.one(wire.Error).code == "unknown-host"
    stranger.register()
    assert stranger.one(wire.Error).code == "unknown-host"
    stranger.send(wire.StatRequest())  # tools need no host
    assert stranger.one(wire.StatReply).info["hosts"] == 0


def test_reannounced_succeeded_peer_serves_new_peers_after_restart():
    net = FakeNet()
    seed, a, b = net.host("seed", seed=True), net.host("a"), net.host("b")
    a.register(state="succeeded", pieces=pieces(range(4)), content_length=400,
               file_digest="file-digest")
    assert a.take() == [] and net.state(a) is PeerState.SUCCEEDED
    b.register()
    m = b.one(wire.TaskManifest)
    assert m.complete and len(m.pieces) == 4 and m.file_digest == "file-digest"
    assert b.parents() == [a.peer()]
    assert seed.take() == [] and net.core.counters["back-to-source"] == 0


def test_reannounced_succeeded_peer_without_manifest_does_not_complete_the_task():
    net = FakeNet()
    a, b = net.host("a"), net.host("b")
    a.register(state="succeeded", content_length=400)
    assert not net.core.tasks[TASK].complete
    b.register()
    assert b.take(wire.TaskManifest) == [] and b.parents() == [a.peer()]


def test_reannounced_running_peer_restores_the_manifest():
    net = FakeNet()
    a, b = net.host("a"), net.host("b")
    a.register(state="running", pieces=pieces([0, 1]), content_length=400)
    assert a.one(wire.BackToSource)  # nobody else knows more: it continues from the origin
    b.register()
    m = b.one(wire.TaskManifest)
    assert [p.num for p in m.pieces] == [0, 1] and m.content_length == 400


def test_repeated_registration_repeats_the_decision():
    net = FakeNet()
    a, b = net.host("a"), net.host("b")
    a.register()
    b.register()
    b.take()
    b.register()
    assert b.parents() == [a.peer()]
    assert net.core.stats()["peers"]["Running"] == 1


def test_invalid_transitions_and_unknown_peers_are_errors_not_crashes():
    net = FakeNet()
    a, b = net.host("a"), net.host("b")
    a.register()
    a.report([0])
    a.done(1)
    a.take()
    a.report([1])
    err = a.one(wire.Error)
    assert err.code == "bad-state" and err.ref == TASK
    a.send(wire.Reschedule(TASK, a.peer()))
    assert a.one(wire.Error).code == "bad-state"
    b.send(wire.PeerDone(TASK, a.peer(), 100, "x", 1))  # someone else's peer
    assert b.one(wire.Error).code == "unknown-task"
    b.send(wire.PieceData(TASK, 0, "d", b"x"))  # not a scheduler request
    assert b.one(wire.Error).code == "bad-request"
    b.register(state="bogus")
    assert b.one(wire.Error).code == "bad-request"
    stats = net.core.stats()
    assert stats["counters"]["protocol-error"] == 2
    assert stats["peers"]["Succeeded"] == 1


def test_host_reconnecting_with_a_new_identity_keeps_its_peers():
    net = FakeNet()
    a, b = net.host("a"), net.host("b")
    a.register()
    del net.hosts[a.ident]
    a.ident = b"a-reconnected"
    net.hosts[a.ident] = a
    a.announce()
    a.take()
    b.register()
    assert b.parents() == [a.peer()]
    net.core.handle(b"a", wire.Heartbeat(), net.now)  # the old identity is gone
    assert net.core.idents.get(b"a") is None


# ---------------------------------------------------------------------------------------------
# A whole swarm


class SwarmHost(FakeHost):
    """A fake daemon that follows the scheduler: cuts pieces when sent to the origin,
    copies one piece per parent per tick otherwise, and reports everything."""

    N = 24

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.manifest: set[int] = set()
        self.piece_count = -1
        self.parent_ids: list[str] = []
        self.source = False
        self.held: set[int] = set()
        self.finished = False
        self.max_parents_seen = 0

    def react(self) -> None:
        for m in self.take():
            if isinstance(m, wire.SeedTrigger):
                self.register(m.task_id)
            elif isinstance(m, wire.TaskManifest):
                self.manifest |= {p.num for p in m.pieces}
                if m.complete:
                    self.piece_count = m.piece_count
            elif isinstance(m, wire.PeerParents):
                self.parent_ids = [p.peer_id for p in m.parents]
                self.max_parents_seen = max(self.max_parents_seen, len(self.parent_ids))
            elif isinstance(m, wire.BackToSource):
                self.source = True

    def work(self, swarm: dict[str, SwarmHost], origin_reads: list[int]) -> None:
        if self.finished:
            return
        if self.source:
            for num in range(self.N):
                if num not in self.held:
                    origin_reads.append(num)
                    self.held.add(num)
                    self.report([num], content_length=self.N * 100)
                    break
            if len(self.held) == self.N:
                self.finished = True
                self.done(self.N)
            return
        for pid in self.parent_ids:
            parent = swarm[pid]
            have = sorted((parent.held & self.manifest) - self.held)
            if have:
                self.held.add(have[0])
                self.report([have[0]], source=pid)
        if self.piece_count > 0 and len(self.held) == self.piece_count:
            self.finished = True
            self.done(self.N)


def test_a_dozen_hosts_finish_with_one_origin_read_per_piece():
    net = FakeNet(max_parents=4)
    swarm: dict[str, SwarmHost] = {}
    for i in range(12):
        h = SwarmHost(net, f"h{i:02d}", seed=(i == 0))
        net.hosts[h.ident] = h
        h.announce()
        h.take()
        swarm[h.peer()] = h
    hosts = list(swarm.values())
    origin_reads: list[int] = []
    for h in hosts[1:4]:
        h.register()
    for tick in range(200):
        if tick == 3:
            for h in hosts[4:]:  # latecomers
                h.register()
        for h in hosts:
            h.react()
            h.work(swarm, origin_reads)
        net.advance(0.25)
        if all(h.finished for h in hosts):
            break
    assert all(h.finished for h in hosts), [(h.host_id, len(h.held)) for h in hosts]
    assert sorted(origin_reads) == list(range(SwarmHost.N))  # the origin is read once
    assert hosts[0].source and not any(h.source for h in hosts[1:])
    assert all(h.max_parents_seen >= 2 for h in hosts[1:])
    stats = net.core.stats()
    assert stats["peers"]["Succeeded"] == 12 and stats["tasks"] == 1
    assert stats["counters"].get("protocol-error", 0) == 0
    assert not net.core._children or all(v >= 0 for v in net.core._children.values())


# ---------------------------------------------------------------------------------------------
# Scoring


def cand(pid: str, **kw: Any) -> scoring.Candidate:
    base = dict(peer_id=pid, host_id=pid, pieces_fraction=0.0, free_slots=16, upload_slots=16)
    return scoring.Candidate(**{**base, **kw})


def test_location_affinity_counts_leading_fields():
    assert scoring.location_affinity("cn|zj|hz|z1|c1", "cn|zj|hz|z2|c1") == pytest.approx(0.6)
    assert scoring.location_affinity("cn|zj", "us|zj") == 0.0
    assert scoring.location_affinity("", "") == 0.0


def test_rank_prefers_pieces_free_slots_and_affinity_deterministically():
    cs = [cand("empty"), cand("full", pieces_fraction=1.0),
          cand("busy", pieces_fraction=1.0, free_slots=0),
          cand("near", idc="idc1", location="cn|zj|hz")]
    ranked = [c.peer_id for c in scoring.rank(cs, "child", "idc1", "cn|zj|hz")]
    assert ranked[0] == "full" and ranked[-1] == "empty"
    assert ranked.index("near") < ranked.index("empty")
    assert ranked == [c.peer_id for c in scoring.rank(list(reversed(cs)), "child", "idc1",
                                                       "cn|zj|hz")]
    ties = [cand(f"p{i}") for i in range(6)]
    firsts = {scoring.rank(ties, f"child{j}")[0].peer_id for j in range(12)}
    assert len(firsts) > 1  # equal candidates spread over children


def test_rank_prefers_the_bigger_share_of_a_measured_uplink():
    """uplink / (children + 1): a fast host with room first, a fast host crowded with children
    below a quiet slow one only when the share says so; unmeasured hosts count as the median."""
    fast = cand("fast", pieces_fraction=1.0, uplink_bps=3_000_000, free_slots=12)  # 600k each
    slow = cand("slow", pieces_fraction=1.0, uplink_bps=300_000)  # more free slots, 300k
    crowded = cand("crowded", pieces_fraction=1.0, uplink_bps=1_500_000, free_slots=0)  # 16 children
    unknown = cand("unknown", pieces_fraction=1.0)
    ranked = [c.peer_id for c in scoring.rank([slow, crowded, unknown, fast], "child")]
    assert ranked[0] == "fast"  # though "slow" has more free slots
    assert ranked.index("slow") < ranked.index("crowded")  # 300k alone beats 1.5M over 17
    shares = scoring.uplink_shares([slow, crowded, unknown, fast])
    assert shares["fast"] == 1.0 and shares["unknown"] == shares["slow"]  # median of three known
    # Nobody measured: the term decides nothing (the order is the one without it).
    plain = [cand(f"p{i}", pieces_fraction=i / 10) for i in range(5)]
    assert scoring.uplink_shares(plain) == {}
    assert [c.peer_id for c in scoring.rank(plain, "child")] == ["p4", "p3", "p2", "p1", "p0"]


def test_host_uplink_is_its_smoothed_upload_rate_and_fades_slowly():
    net = FakeNet()
    h = net.host("h")
    host = net.core.hosts["h"]
    net.core.note_uplink(host, 0, 100.0)
    assert host.uplink_bps == 0.0  # one sample is no rate
    for i in range(1, 6):
        net.core.note_uplink(host, i * 1_000_000, 100.0 + i)
    assert host.uplink_bps == pytest.approx(1_000_000)
    for i in range(6, 16):  # the host goes idle: the rate drops, the uplink fades slowly
        net.core.note_uplink(host, 5_000_000, 100.0 + i)
    assert host.up_rate < 1_000 and 0.75e6 < host.uplink_bps < 0.85e6
    net.core.note_uplink(host, 10, 117.0)  # a restarted daemon: counters start again
    net.core.note_uplink(host, 10, 118.0)
    assert 0.7e6 < host.uplink_bps < 0.85e6
    assert h.take() == []


def test_a_file_url_never_makes_a_seed_read_its_own_disk():
    """file:// (or any non-HTTP) task: the peer that asked reads it itself; no SeedTrigger, so
    a remote registration cannot make a seed read a local file and serve it over P2P."""
    net = FakeNet()
    seed, a = net.host("seed", seed=True), net.host("a")
    a.send(wire.PeerRegister(task_id=TASK, peer_id=a.peer(), url="file:///etc/hostname"))
    assert seed.take(wire.SeedTrigger) == []
    assert a.one(wire.BackToSource).peer_id == a.peer()
