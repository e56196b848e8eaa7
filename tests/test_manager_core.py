"""Unit tests of the manager core and the member link, on a fake clock (no sockets)."""

from __future__ import annotations

import math

import pytest

from brokers.manager.core import ManagerCore, Persist
from brokers.manager.link import MAX_BACKOFF_S, MemberLink
from dfzmq import wire
from dfzmq.actions import Publish, Send

IVL = 0.1
LIVE = 3


def sched(n: int = 1, **kw) -> wire.MemberInfo:
    return wire.MemberInfo(f"sched-{n}", "scheduler", f"tcp://10.0.0.{n}:8910", **kw)


def seed(n: int = 1) -> wire.MemberInfo:
    return wire.MemberInfo(f"seed-{n}", "seed", f"tcp://10.0.1.{n}:65000")


def core(members=(), now=0.0, **kw) -> ManagerCore:
    return ManagerCore("cluster-x", IVL, LIVE, list(members), now, events_addr="tcp://m:8901", **kw)


def sends(actions, to=None):
    return [a.msg for a in actions if isinstance(a, Send) and (to is None or a.to == to)]


def updates(actions):
    return [a.msg for a in actions
            if isinstance(a, Publish) and isinstance(a.msg, wire.ClusterUpdate)]


def persisted(actions):
    return [a.member for a in actions if isinstance(a, Persist)]


def test_register_welcomes_publishes_and_persists():
    c = core()
    out = c.handle(b"id1", wire.MemberRegister(sched(1, state="down")), 1.0)
    assert sends(out, b"id1") == [wire.MemberWelcome("cluster-x", IVL, {})]
    (up,) = updates(out)
    assert up.seq == 1 and up.member.member_id == "sched-1" and up.member.state == "up"
    assert persisted(out) == [up.member]
    # Persist comes before the publish, so the store never lags what subscribers saw.
    assert isinstance(out[1], Persist) and isinstance(out[2], Publish)


def test_reregister_publishes_only_on_change():
    c = core()
    c.handle(b"id1", wire.MemberRegister(sched(1)), 1.0)
    out = c.handle(b"id2", wire.MemberRegister(sched(1)), 1.1)  # same member, new socket
    assert sends(out) == [wire.MemberWelcome("cluster-x", IVL, {})]
    assert updates(out) == [] and persisted(out) == []
    # The old identity no longer speaks for the member; the new one does.
    assert sends(c.handle(b"id1", wire.Heartbeat("sched-1"), 1.2))[0].code == "unknown-member"
    assert sends(c.handle(b"id2", wire.Heartbeat("sched-1"), 1.2)) == [wire.Heartbeat("manager")]
    moved = wire.MemberInfo("sched-1", "scheduler", "tcp://10.9.9.9:8910")
    (u,) = updates(c.handle(b"id2", wire.MemberRegister(moved), 1.3))
    assert u.seq == 2 and u.member.addr == "tcp://10.9.9.9:8910"


@pytest.mark.parametrize("info", [
    wire.MemberInfo("x", "peer", "tcp://h:1"),
    wire.MemberInfo("", "seed", "tcp://h:1"),
    wire.MemberInfo("x", "seed", ""),
    wire.MemberInfo("x" * 300, "seed", "tcp://h:1"),
])
def test_register_rejects_bad_members(info):
    c = core()
    out = c.handle(b"id", wire.MemberRegister(info), 1.0)
    assert [m.code for m in sends(out)] == ["bad-request"]
    assert c.members() == [] and c.seq == 0


def test_heartbeat_known_and_unknown():
    c = core()
    assert sends(c.handle(b"who", wire.Heartbeat("sched-1"), 0.5)) == [
        wire.Error("unknown-member", "register first", ref="sched-1")]
    c.handle(b"id1", wire.MemberRegister(sched(1)), 1.0)
    # Heartbeats every interval keep it up far beyond one liveness window.
    t = 1.0
    while t < 5.0:
        t += IVL
        assert sends(c.handle(b"id1", wire.Heartbeat("sched-1"), t)) == [wire.Heartbeat("manager")]
        assert updates(c.handle_timer(t)) == []
    assert c.members()[0].state == "up"


def test_silent_member_expires_then_reregisters():
    c = core()
    c.handle(b"id1", wire.MemberRegister(sched(1)), 1.0)
    assert c.next_deadline() == pytest.approx(IVL)  # the PUB heartbeat comes first
    assert updates(c.handle_timer(1.0 + LIVE * IVL - 0.01)) == []
    out = c.handle_timer(1.0 + LIVE * IVL)
    (down,) = updates(out)
    assert down.seq == 2 and down.member.state == "down"
    assert persisted(out) == [down.member]
    assert updates(c.handle_timer(10.0)) == []  # expires once
    assert sends(c.handle(b"id1", wire.Heartbeat("sched-1"), 10.0))[0].code == "unknown-member"
    (up,) = updates(c.handle(b"id1", wire.MemberRegister(sched(1)), 10.1))
    assert up.seq == 3 and up.member.state == "up"


def test_pub_heartbeat_every_interval_without_bumping_seq():
    c = core()
    c.handle(b"id1", wire.MemberRegister(sched(1)), 0.0)
    beats = []
    t = 0.0
    for _ in range(10):
        t = c.next_deadline()
        for a in c.handle_timer(t):
            if isinstance(a.msg, wire.PubHeartbeat):
                beats.append((t, a.msg))
        c.handle(b"id1", wire.Heartbeat("sched-1"), t)
    assert len(beats) == 10
    assert all(b.seq == 1 and b.source == "manager" for _, b in beats)
    assert [round(t, 6) for t, _ in beats] == [round(IVL * (i + 1), 6) for i in range(10)]


def test_list_schedulers_filters_by_role_and_state():
    c = core()
    c.handle(b"a", wire.MemberRegister(sched(1)), 0.0)
    c.handle(b"b", wire.MemberRegister(sched(2)), 0.0)
    c.handle(b"c", wire.MemberRegister(seed(1)), 0.0)
    c.handle(b"b", wire.MemberLeave("sched-2"), 0.1)
    (lst,) = sends(c.handle(b"anyone", wire.ListSchedulers(), 0.2))
    assert [m.member_id for m in lst.schedulers] == ["sched-1"]
    assert [m.member_id for m in lst.seeds] == ["seed-1"]


def test_leave_publishes_down():
    c = core()
    c.handle(b"a", wire.MemberRegister(sched(1)), 0.0)
    out = c.handle(b"a", wire.MemberLeave("sched-1"), 0.5)
    assert [(u.seq, u.member.state) for u in updates(out)] == [(2, "down")]
    assert persisted(out)[0].state == "down"
    assert sends(c.handle(b"a", wire.MemberLeave("nobody"), 0.6))[0].code == "unknown-member"


def test_snapshot_has_seq_members_and_events_addr():
    c = core()
    c.handle(b"a", wire.MemberRegister(sched(1)), 0.0)
    c.handle(b"b", wire.MemberRegister(seed(1)), 0.0)
    c.handle(b"b", wire.MemberLeave("seed-1"), 0.0)
    (snap,) = sends(c.handle(b"x", wire.SnapshotRequest(), 0.1))
    assert snap.seq == 3 and snap.events_addr == "tcp://m:8901"
    assert {(m.member_id, m.state) for m in snap.members} == {("sched-1", "up"), ("seed-1", "down")}


def test_stats_and_bad_request():
    c = core()
    c.handle(b"a", wire.MemberRegister(sched(1)), 0.0)
    out = c.handle(b"a", wire.HostAnnounce("h", "host", "tcp://h:1"), 0.0)
    assert [m.code for m in sends(out)] == ["bad-request"]
    (reply,) = sends(c.handle(b"z", wire.StatRequest(), 0.0))
    info = reply.info
    assert info["cluster_id"] == "cluster-x" and info["seq"] == 1
    assert info["schedulers_up"] == 1 and info["seeds_up"] == 0
    assert info["counters"]["error.bad-request"] == 1
    wire.encode(reply)  # stats must always be encodable


def test_restored_members_get_one_liveness_window():
    c = core([sched(1), seed(1), sched(2, state="down")], now=100.0, seq=7)
    assert c.seq == 7
    assert c.next_deadline() == pytest.approx(100.0 + IVL)
    (lst,) = sends(c.handle(b"q", wire.ListSchedulers(), 100.0))
    assert [m.member_id for m in lst.schedulers] == ["sched-1"] and len(lst.seeds) == 1
    # sched-1 comes back (new socket, since the manager restarted); seed-1 stays silent.
    assert sends(c.handle(b"new", wire.Heartbeat("sched-1"), 100.1))[0].code == "unknown-member"
    c.handle(b"new", wire.MemberRegister(sched(1)), 100.1)
    t = 100.1
    downs = []
    while t < 100.0 + 2 * LIVE * IVL:
        t += IVL / 2
        c.handle(b"new", wire.Heartbeat("sched-1"), t)
        downs += updates(c.handle_timer(t))
    assert [(u.seq, u.member.member_id, u.member.state) for u in downs] == [(8, "seed-1", "down")]


# ---------------------------------------------------------------------------------------------
# MemberLink


def test_link_registers_then_heartbeats():
    link = MemberLink(sched(1), interval_s=0.5, liveness=3)
    assert link.start(0.0) == [wire.MemberRegister(sched(1))]
    assert link.on_timer(0.1) == []
    assert link.on_timer(0.5) == [wire.MemberRegister(sched(1))]  # no welcome yet: ask again
    link.on_message(wire.MemberWelcome("c1", 0.2, {"k": 1}), 0.6)
    assert link.registered and link.config == {"k": 1} and link.cluster_id == "c1"
    assert link.interval_s == 0.2  # the manager's interval wins
    assert link.on_timer(link.next_deadline()) == [wire.Heartbeat("sched-1")]
    assert link.on_message(wire.Error("unknown-member"), 1.0) == [wire.MemberRegister(sched(1))]
    assert not link.registered
    assert link.on_message(wire.Error("busy"), 1.0) == []


def test_link_reconnect_backoff_doubles_capped_and_resets():
    link = MemberLink(sched(1), interval_s=1.0, liveness=3)
    now = 0.0
    link.start(now)
    link.on_message(wire.MemberWelcome("c1", 1.0), now)
    waits = []
    for _ in range(8):
        assert not link.reconnect_due(now + 2.9)
        now = link.next_deadline()
        while not link.reconnect_due(now):
            link.on_timer(now)
            now = link.next_deadline()
        assert not link.reconnect_due(now)  # says so once
        assert link.on_timer(now + 100) == [] and not link.registered
        waits.append(link.retry_at - now)
        now = link.retry_at
        link.start(now)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    link.on_message(wire.Heartbeat("manager"), now)
    while not link.reconnect_due(now):
        link.on_timer(now)
        now = link.next_deadline()
    assert link.retry_at - now == 1.0
    assert MAX_BACKOFF_S == 30.0


def test_link_leave_goes_quiet():
    link = MemberLink(seed(1), interval_s=1.0, liveness=3)
    link.start(0.0)
    assert link.leave() == [wire.MemberLeave("seed-1")]
    assert link.on_timer(5.0) == [] and not link.reconnect_due(50.0)
    assert link.next_deadline() == math.inf


class FakeNet:
    """One manager core and member links, joined by an in-memory pipe that can be cut."""

    def __init__(self, core: ManagerCore) -> None:
        self.core = core
        self.links: dict[bytes, MemberLink] = {}
        self.up = True
        self.published: list = []

    def to_manager(self, ident: bytes, msgs: list, now: float) -> None:
        for msg in msgs:
            if not self.up:
                continue
            for a in self.core.handle(ident, msg, now):
                self.deliver(a, now)

    def deliver(self, a, now: float) -> None:
        if isinstance(a, Publish):
            self.published.append(a.msg)
        elif isinstance(a, Send) and self.up:
            self.to_manager(a.to, self.links[a.to].on_message(a.msg, now), now)

    def run(self, until: float, now: float) -> float:
        while now < until:
            deadlines = [self.core.next_deadline(),
                         *(k.next_deadline() for k in self.links.values())]
            now = min(until, max(now, min(deadlines)))
            for a in self.core.handle_timer(now):
                self.deliver(a, now)
            for ident, link in list(self.links.items()):
                if link.reconnect_due(now):
                    continue
                if not link.connected and now >= link.retry_at:
                    self.to_manager(ident, link.start(now), now)
                self.to_manager(ident, link.on_timer(now), now)
        return now


def test_fake_net_member_survives_then_expires_then_recovers():
    c = core()
    net = FakeNet(c)
    link = net.links[b"s1"] = MemberLink(sched(1), IVL, LIVE)
    now = net.run(until=5.0, now=0.0)
    assert link.registered and c.members()[0].state == "up"
    net.up = False
    now = net.run(until=now + 2 * LIVE * IVL, now=now)
    assert c.members()[0].state == "down" and not link.registered
    net.up = True
    net.run(until=now + 40 * IVL, now=now)
    assert link.registered and c.members()[0].state == "up"
    states = [u.member.state for u in net.published if isinstance(u, wire.ClusterUpdate)]
    assert states == ["up", "down", "up"]
    seqs = [u.seq for u in net.published if isinstance(u, wire.ClusterUpdate)]
    assert seqs == [1, 2, 3]


@pytest.mark.parametrize("module", ["brokers/manager/core.py", "brokers/manager/link.py"])
def test_sans_io_modules_import_no_io(module):
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).parent.parent / module).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"zmq", "lmdb", "asyncio", "time", "socket", "threading"}
