"""The scheduler service on real sockets (tcp://127.0.0.1, ephemeral ports), run in a thread.

The manager address points at a port nobody listens on unless a test starts a manager:
a scheduler must serve peers without one.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack
import pytest
import zmq

from dfzmq import wire
from dfzmq.config import ManagerConfig, SchedulerConfig
from tests.conftest import TIMEOUT_S, serving, wait_priorities

IVL = 0.2  # a host silent for IVL*LIVE is dropped: leave room for a loaded machine
LIVE = 10
NO_MANAGER = "127.0.0.1:1"  # nothing listens on port 1

pytestmark = pytest.mark.timeout(30)


def scheduler(manager: str = NO_MANAGER, **kw: Any):
    from brokers.scheduler.service import serve

    cfg = SchedulerConfig(manager=manager, listen="127.0.0.1:0", heartbeat_interval_s=IVL,
                          liveness=LIVE)
    return serving(serve, cfg, **kw)


class Client:
    """A DEALER speaking wire messages, with timeouts instead of sleeps."""

    def __init__(self, ctx: zmq.Context, addr: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(addr)

    def send(self, msg: Any) -> None:
        self.sock.send_multipart(wire.encode(msg))

    def raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, cls: type, timeout_s: float = TIMEOUT_S) -> Any:
        """The next message of type `cls`, skipping others (heartbeats)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000) + 1):
                msg = wire.decode(self.sock.recv_multipart())
                if isinstance(msg, cls):
                    return msg
        raise AssertionError(f"no {cls.__name__} within {timeout_s}s")

    def recv_all(self, classes: set[type], timeout_s: float = TIMEOUT_S) -> dict[type, Any]:
        """One message of each type in `classes`, in whatever order they come."""
        deadline = time.monotonic() + timeout_s
        got: dict[type, Any] = {}
        while (left := deadline - time.monotonic()) > 0 and len(got) < len(classes):
            if self.sock.poll(int(left * 1000) + 1):
                msg = wire.decode(self.sock.recv_multipart())
                if type(msg) in classes:
                    got.setdefault(type(msg), msg)
        missing = [c.__name__ for c in classes if c not in got]
        assert not missing, f"no {missing} within {timeout_s}s"
        return got

    def stats(self) -> dict:
        self.send(wire.StatRequest())
        return self.recv(wire.StatReply).info


def announce(client: Client, host_id: str = "host-a") -> wire.HostAck:
    client.send(wire.HostAnnounce(host_id=host_id, hostname=host_id,
                                  upload_addr="tcp://127.0.0.1:9"))
    return client.recv(wire.HostAck)


def test_announce_register_and_back_to_source(ctx):
    with scheduler(scheduler_id="sched-t") as info:
        assert info["router"].startswith("tcp://127.0.0.1:")
        assert info["pub"].startswith("tcp://127.0.0.1:")
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.subscribe(b"")
        sub.connect(info["pub"])
        c = Client(ctx, info["router"])
        ack = announce(c)
        assert (ack.host_id, ack.heartbeat_interval_s, ack.scheduler_id) == ("host-a", IVL,
                                                                             "sched-t")
        c.send(wire.Heartbeat(sender="host-a"))
        assert c.recv(wire.Heartbeat).sender == "sched-t"
        c.send(wire.PeerRegister(task_id="t" * 64, peer_id="p1", url="http://o/f"))
        bts = c.recv(wire.BackToSource)
        assert (bts.task_id, bts.peer_id) == ("t" * 64, "p1")
        # The events PUB heartbeats, so a subscriber never waits on silence.
        deadline = time.monotonic() + TIMEOUT_S
        seen = None
        while seen is None and time.monotonic() < deadline:
            if sub.poll(100):
                msg = wire.decode(sub.recv_multipart())
                if isinstance(msg, wire.PubHeartbeat):
                    seen = msg
        assert seen is not None and seen.source == "sched-t"
        stats = c.stats()
        assert stats["hosts"] == 1 and stats["peers"]["BackToSource"] == 1
        sub.close(0)


def test_unknown_host_gets_an_error(ctx):
    with scheduler() as info:
        c = Client(ctx, info["router"])
        c.send(wire.Heartbeat(sender="nobody"))
        assert c.recv(wire.Error).code == "unknown-host"


GOOD_FIELDS = msgpack.packb({"host_id": "h", "hostname": "h", "upload_addr": "tcp://x:1"})
BAD_FRAMES = [
    [os.urandom(37)],
    [b""],
    [wire.MAGIC],
    [wire.MAGIC, b"HEARTBEAT"],  # missing fields frame
    [b"DFZ0", b"HEARTBEAT", msgpack.packb({})],  # wrong magic
    [wire.MAGIC, b"NO_SUCH_KIND", msgpack.packb({})],
    [wire.MAGIC, b"HEARTBEAT", b"\xc1\xc1\xc1"],  # not msgpack
    [wire.MAGIC, b"HEARTBEAT", msgpack.packb([1, 2, 3])],  # fields not a map
    [wire.MAGIC, b"HOST_ANNOUNCE", msgpack.packb({"host_id": 5, "hostname": "h",
                                                  "upload_addr": "x"})],  # wrong type
    [wire.MAGIC, b"HOST_ANNOUNCE", msgpack.packb({"hostname": "h"})],  # missing field
    [wire.MAGIC, b"HOST_ANNOUNCE", GOOD_FIELDS, b"stray payload"],  # payload not expected
    [wire.MAGIC, b"PIECE_DATA", msgpack.packb({"task_id": "t", "num": 0, "digest": "d"})],
    [wire.MAGIC, b"PEER_REGISTER", msgpack.packb({"task_id": "t", "peer_id": "p", "url": "u",
                                                  "pieces": [[1, 2]]})],  # short record
    [wire.MAGIC, b"HEARTBEAT", b"\x81"],  # truncated map
]


def test_garbage_frames_are_dropped_and_counted(ctx):
    with scheduler() as info:
        c = Client(ctx, info["router"])
        for frames in BAD_FRAMES:
            c.raw(frames)
        for _ in range(20):
            c.raw([os.urandom(n) for n in (4, 9, 64)])
        # Frames arrive in order on one connection: once this answer is back, every bad
        # frame before it has been seen.
        assert announce(c).host_id == "host-a"
        stats = c.stats()
        assert stats["counters"]["dropped.bad-frame"] == len(BAD_FRAMES) + 20
        assert stats["counters"].get("internal-error", 0) == 0
        c.send(wire.PeerRegister(task_id="t" * 64, peer_id="p1", url="http://o/f"))
        assert c.recv(wire.BackToSource).peer_id == "p1"


def test_two_hosts_get_parents_over_real_sockets(ctx):
    with scheduler() as info:
        a, b = Client(ctx, info["router"]), Client(ctx, info["router"])
        announce(a, "host-a")
        announce(b, "host-b")
        a.send(wire.PeerRegister(task_id="t" * 64, peer_id="pa", url="http://o/f"))
        a.recv(wire.BackToSource)
        a.send(wire.PieceReport("t" * 64, "pa", [wire.PieceInfo(0, 0, 10, "d0")], 10, "origin"))
        b.send(wire.PeerRegister(task_id="t" * 64, peer_id="pb", url="http://o/f"))
        # a's report and b's registration travel on different sockets: either may be first, so
        # the manifest may come before or after the parents. Take both, in any order.
        got = b.recv_all({wire.TaskManifest, wire.PeerParents})
        m = got[wire.TaskManifest]
        assert [p.num for p in m.pieces] == [0] and m.content_length == 10
        parents = got[wire.PeerParents].parents
        assert [(p.peer_id, p.host_id, p.addr) for p in parents] == [
            ("pa", "host-a", "tcp://127.0.0.1:9")]


def test_registers_with_the_manager(ctx, tmp_path):
    manager_service = pytest.importorskip("brokers.manager.service")
    mcfg = ManagerConfig(listen="127.0.0.1:0", data=tmp_path / "manager",
                         heartbeat_interval_s=IVL, liveness=LIVE)
    with serving(manager_service.serve, mcfg) as minfo:
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.subscribe(b"")
        sub.connect(minfo["pub"])
        # Subscribed before the scheduler exists; a PubHeartbeat proves the pipe is up.
        assert any(isinstance(m, wire.PubHeartbeat) for m in _pubs(sub, 1))
        maddr = minfo["router"][len("tcp://"):]
        with scheduler(manager=maddr, scheduler_id="sched-m") as info:
            updates = [m.member for m in _pubs(sub, 60, until="sched-m")
                       if isinstance(m, wire.ClusterUpdate)]
            mine = [m for m in updates if m.member_id == "sched-m"]
            assert mine, "scheduler never showed up at the manager"
            assert mine[-1].addr == info["router"] and mine[-1].events_addr == info["pub"]
            assert mine[-1].role == "scheduler" and mine[-1].state == "up"
            c = Client(ctx, minfo["router"])
            c.send(wire.ListSchedulers())
            listed = c.recv(wire.SchedulerList).schedulers
            assert [s.member_id for s in listed] == ["sched-m"]
        sub.close(0)


def _pubs(sub: zmq.Socket, limit: int, until: str = "") -> list[Any]:
    """Up to `limit` published messages, stopping early at a ClusterUpdate for `until`."""
    got: list[Any] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(got) < limit and (left := deadline - time.monotonic()) > 0:
        if sub.poll(int(left * 1000) + 1):
            msg = wire.decode(sub.recv_multipart())
            got.append(msg)
            if isinstance(msg, wire.ClusterUpdate) and msg.member.member_id == until:
                break
    return got


def test_scheduler_survives_without_manager_and_stops_promptly(ctx):
    with scheduler() as info:
        c = Client(ctx, info["router"])
        announce(c)
        stats = c.stats()
        tried = (stats["counters"].get("sent.manager.MEMBER_REGISTER", 0)
                 + stats["counters"].get("dropped.manager", 0))
        assert tried >= 1
    # serving() asserted that the thread stopped and every socket was closed.


def test_accepted_connections_get_the_low_delay_queue_priority(ctx):
    # Linux gives an accepted connection the listener's TOS but queue priority 0, so without
    # this the scheduler's answers wait behind bulk uploads leaving the same host (issue 3).
    with scheduler() as info:
        c = Client(ctx, info["router"])
        announce(c)
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.connect(info["pub"])
        port, pub_port = (int(info[k].rsplit(":", 1)[1]) for k in ("router", "pub"))
        assert wait_priorities(port, 1) == [6]
        assert wait_priorities(pub_port, 1) == [6]
