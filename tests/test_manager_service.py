"""The manager service on real sockets (tcp://127.0.0.1, ephemeral ports), run in a thread."""

from __future__ import annotations

import contextlib
import os
import time

import msgpack
import pytest
import zmq

from brokers.manager.link import MemberLink
from brokers.manager.service import serve
from dfzmq import wire
from dfzmq.config import ManagerConfig
from dfzmq.errors import ConfigError
from tests.conftest import TIMEOUT_S, serving, wait_priorities

IVL = 0.1
LIVE = 3

pytestmark = pytest.mark.timeout(30)


@contextlib.contextmanager
def manager(data, listen="127.0.0.1:0"):
    """Run the manager's serve() in a thread; yield its on_ready dict."""
    cfg = ManagerConfig(listen=listen, data=data, heartbeat_interval_s=IVL, liveness=LIVE)
    with serving(serve, cfg) as info:
        yield info


def dealer(ctx, addr):
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.connect(addr)
    return s


def sub(ctx, addr):
    s = ctx.socket(zmq.SUB)
    s.linger = 0
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(addr)
    return s


def send(sock, msg):
    sock.send_multipart(wire.encode(msg))


def recv(sock, want=object, pred=lambda m: True, timeout_s=TIMEOUT_S):
    """The next message of type `want` matching `pred`, skipping others; fails on timeout."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            msg = wire.decode(sock.recv_multipart())
            if isinstance(msg, want) and pred(msg):
                return msg
    raise AssertionError(f"no {want.__name__} within {timeout_s}s")


def ask(ctx, addr, msg):
    s = dealer(ctx, addr)
    try:
        send(s, msg)
        return recv(s)
    finally:
        s.close(linger=0)


def subscribed(ctx, addr):
    """A SUB that has provably joined: it has seen a PubHeartbeat (no blind sleep)."""
    s = sub(ctx, addr)
    recv(s, wire.PubHeartbeat)
    return s


SCHED = wire.MemberInfo("sched-1", "scheduler", "tcp://127.0.0.1:18910", hostname="h1")


def test_register_publish_list_and_expire(ctx, tmp_path):
    with manager(tmp_path / "m") as m:
        events = subscribed(ctx, m["pub"])
        member = dealer(ctx, m["router"])
        send(member, wire.MemberRegister(SCHED))
        welcome = recv(member, wire.MemberWelcome)
        assert welcome.cluster_id == m["cluster_id"] and welcome.heartbeat_interval_s == IVL
        up = recv(events, wire.ClusterUpdate)
        assert (up.seq, up.member.member_id, up.member.state) == (1, "sched-1", "up")
        lst = ask(ctx, m["router"], wire.ListSchedulers())
        assert [s.member_id for s in lst.schedulers] == ["sched-1"] and lst.seeds == []
        snap = ask(ctx, m["router"], wire.SnapshotRequest())
        assert snap.seq == 1 and snap.events_addr == m["pub"] and snap.members[0].state == "up"
        # Heart-beating keeps it up across several liveness windows...
        t_end = time.monotonic() + 2 * LIVE * IVL
        while time.monotonic() < t_end:
            send(member, wire.Heartbeat("sched-1"))
            assert recv(member, wire.Heartbeat).sender == "manager"
            time.sleep(IVL / 2)  # pacing the member's heartbeats, not waiting for a result
        assert ask(ctx, m["router"], wire.ListSchedulers()).schedulers
        # ...and silence takes it down, announced on the PUB.
        t0 = time.monotonic()
        down = recv(events, wire.ClusterUpdate)
        assert (down.seq, down.member.state) == (2, "down")
        assert time.monotonic() - t0 < LIVE * IVL + 0.5
        assert ask(ctx, m["router"], wire.ListSchedulers()).schedulers == []
        beat = recv(events, wire.PubHeartbeat)
        assert beat.seq == 2 and beat.source == "manager"
        for s in (events, member):
            s.close(linger=0)


GARBAGE = [
    [os.urandom(37)],
    [os.urandom(3), os.urandom(50), os.urandom(9)],
    [b"XXXX", b"HEARTBEAT", msgpack.packb({})],
    [wire.MAGIC, b"NO_SUCH_KIND", msgpack.packb({})],
    [wire.MAGIC, b"HEARTBEAT", b"\xc1\xc1\xc1"],
    [wire.MAGIC, b"HEARTBEAT", msgpack.packb([1, 2])],
    [wire.MAGIC, b"MEMBER_REGISTER", msgpack.packb({"member": "not-a-record"})],
    [wire.MAGIC, b"MEMBER_REGISTER", msgpack.packb({"member": [1, "scheduler", "tcp://h:1"]})],
    [wire.MAGIC, b"MEMBER_LEAVE", msgpack.packb({"member_id": ["x"]})],
    [wire.MAGIC, b"MEMBER_LEAVE", msgpack.packb({})],
    [wire.MAGIC, b"HEARTBEAT", msgpack.packb({}), b"extra payload"],
    [wire.MAGIC],
    [b""],
]


def test_garbage_is_dropped_and_counted(ctx, tmp_path):
    with manager(tmp_path / "m") as m:
        s = dealer(ctx, m["router"])
        for frames in GARBAGE:
            s.send_multipart(frames)
        # A valid request after the garbage on the same connection is still answered.
        send(s, wire.StatRequest())
        info = recv(s, wire.StatReply).info
        assert info["counters"]["dropped.bad-frame"] == len(GARBAGE)
        # A well-formed message the manager does not serve gets an error, not silence.
        send(s, wire.PeerLeave("t", "p"))
        assert recv(s, wire.Error).code == "bad-request"
        send(s, wire.MemberRegister(wire.MemberInfo("x", "peer", "tcp://h:1")))
        assert recv(s, wire.Error).code == "bad-request"
        send(s, wire.MemberRegister(SCHED))
        assert isinstance(recv(s), wire.MemberWelcome)
        s.close(linger=0)


def test_restart_keeps_cluster_and_members(ctx, tmp_path):
    data = tmp_path / "m"
    link = MemberLink(SCHED, IVL, LIVE)
    with manager(data) as m1:
        s = dealer(ctx, m1["router"])
        for msg in link.start(time.monotonic()):
            send(s, msg)
        link.on_message(recv(s, wire.MemberWelcome), time.monotonic())
        assert link.registered and link.cluster_id == m1["cluster_id"]
        seed = dealer(ctx, m1["router"])
        send(seed, wire.MemberRegister(wire.MemberInfo("seed-1", "seed", "tcp://127.0.0.1:1")))
        recv(seed, wire.MemberWelcome)
        send(seed, wire.MemberLeave("seed-1"))
        assert ask(ctx, m1["router"], wire.SnapshotRequest()).seq == 3
        s.close(linger=0)
        seed.close(linger=0)

    with manager(data) as m2:
        assert m2["cluster_id"] == m1["cluster_id"]
        snap = ask(ctx, m2["router"], wire.SnapshotRequest())
        assert snap.seq == 3  # seq never goes backwards, so old subscribers keep applying updates
        assert {(x.member_id, x.state) for x in snap.members} == {
            ("sched-1", "up"), ("seed-1", "down")}
        assert [x.member_id for x in ask(ctx, m2["router"], wire.ListSchedulers()).schedulers] == [
            "sched-1"]
        # The scheduler's next heartbeat is from an identity the new manager never saw:
        # it is told to register again, and does.
        s = dealer(ctx, m2["router"])
        (beat,) = link.on_timer(link.next_deadline())
        send(s, beat)
        err = recv(s, wire.Error)
        assert err.code == "unknown-member"
        (again,) = link.on_message(err, time.monotonic())
        assert not link.registered
        send(s, again)
        link.on_message(recv(s, wire.MemberWelcome), time.monotonic())
        assert link.registered
        send(s, wire.Heartbeat("sched-1"))
        assert recv(s, wire.Heartbeat).sender == "manager"
        s.close(linger=0)


def test_pub_port_is_listen_port_plus_one(ctx, tmp_path):
    for attempt in range(5):  # a free port whose successor is taken is possible, just rare
        probe = ctx.socket(zmq.ROUTER)
        port = probe.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=60000)
        probe.close(linger=0)
        try:
            with manager(tmp_path / f"m{attempt}", listen=f"127.0.0.1:{port}") as m:
                assert m["router"] == f"tcp://127.0.0.1:{port}"
                assert m["pub"] == f"tcp://127.0.0.1:{port + 1}"
            return
        except ConfigError:
            continue
    pytest.fail("no free pair of ports found")


def test_accepted_connections_get_the_low_delay_queue_priority(ctx, tmp_path):
    # The manager's answers share the origin site's uplink with the seed's uploads (issue 3).
    with manager(tmp_path / "m") as m:
        member = dealer(ctx, m["router"])
        send(member, wire.MemberRegister(SCHED))
        recv(member, wire.MemberWelcome)
        assert wait_priorities(int(m["router"].rsplit(":", 1)[1]), 1) == [6]
