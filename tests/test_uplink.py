"""nodes/uplink.py: a parent's uplink measured from its own TCP connections, and shared by need
once it queues (issue 3). The policy is pure; the meter and the upload server run on real
sockets over loopback, with a child that stops reading to make the parent's kernel queue grow."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import zmq
import zmq.asyncio

from dfzmq import wire
from dfzmq.service import Counters
from nodes import uplink, uploadq
from nodes.picker import Picker
from nodes.uploadq import ChildQueues, InFlight
from nodes.uplink import UplinkMeter, UplinkPolicy
from tests.conftest import TIMEOUT_S
from tests.test_upload_cancel import TASK, _store_pieces, _upload_server, run_then_close

MiB = 1 << 20


def test_policy_leaves_a_link_that_does_not_queue_alone():
    p = UplinkPolicy()
    for _ in range(10):  # 100 MB/s delivered, 1 MB queued: 10 ms of the link
        d = p.sample(acked=100 * MiB, queued=MiB, dt=1.0, piece_len=4 * MiB)
    assert (d.sndbuf, d.inflight_total) == (0, 0) and not p.congested
    # 200 MB/s with 100 MB queued over eight busy children: a CPU-bound loopback swarm, whose
    # buffers would not shrink anyway (25 MB each), is not a slow link either.
    for _ in range(5):
        d = p.sample(acked=200 * MiB, queued=100 * MiB, dt=1.0, piece_len=4 * MiB, busy=8, active=8)
    assert (d.sndbuf, d.inflight_total) == (0, 0) and not p.congested


def test_policy_shrinks_buffers_and_caps_pieces_while_the_link_queues_then_lets_go():
    p = UplinkPolicy()
    # 300 kB/s delivered (2.5 Mbit/s) and 2 MB in the kernel: seven seconds of the link, in two
    # samples running (one could be a burst just written).
    d = p.sample(acked=300_000, queued=2_000_000, dt=1.0, piece_len=64 << 10)
    assert not p.congested and (d.sndbuf, d.inflight_total) == (0, 0)
    d = p.sample(acked=300_000, queued=2_000_000, dt=1.0, piece_len=64 << 10)
    assert p.congested
    assert d.sndbuf == max(uplink.SNDBUF_MIN, int(300_000 * uplink.SNDBUF_S))
    assert d.inflight_total == 2  # 0.2 s of the link is less than a piece: never below two
    slow = UplinkPolicy()  # 75 kB/s (0.6 Mbit/s) and ten queuing children: not one each
    for _ in range(2):
        d = slow.sample(acked=75_000, queued=800_000, dt=1.0, piece_len=64 << 10, busy=10, active=10)
    assert d.inflight_total == 2  # ten 64 KiB pieces would take 8.7 s: the neediest go first
    fast = UplinkPolicy()
    for _ in range(2):  # five children queue: the buffers share SNDBUF_S of the link
        d = fast.sample(acked=10_000_000, queued=5_000_000, dt=1.0, piece_len=64 << 10, busy=5, active=5)
    assert d.sndbuf == int(10_000_000 * uplink.SNDBUF_S / 5)
    assert d.inflight_total == int(10_000_000 * uplink.INFLIGHT_S / (64 << 10))
    # The queue drains (demand fell): after CALM_SAMPLES the buffers double, and double again,
    # until they are the kernel's business again.
    before = d
    for _ in range(uplink.CALM_SAMPLES):
        d = fast.sample(acked=10_000_000, queued=0, dt=1.0, piece_len=64 << 10, busy=0, active=5)
    assert d.sndbuf == 2 * before.sndbuf and d.inflight_total == 2 * before.inflight_total
    for _ in range(20 * uplink.CALM_SAMPLES):
        d = fast.sample(acked=10_000_000, queued=0, dt=1.0, piece_len=64 << 10)
    assert (d.sndbuf, d.inflight_total) == (0, 0) and not fast.congested


def test_an_origin_reader_starts_capped_until_its_first_sample():
    """`start`: small buffers and START_INFLIGHT pieces before any measurement; the first sample
    lifts the cap at once where the link keeps up, keeps it (sized by the rate) where it queues,
    and a parent measured already, or capped, is left as it is."""
    p = UplinkPolicy()
    d = p.start()
    assert d is not None and (d.sndbuf, d.inflight_total) == (uplink.SNDBUF_MIN, uplink.START_INFLIGHT)
    assert p.congested and p.start() is None
    # 100 MB/s delivered, little queued: the link is not the limit, lifted on the first sample.
    d = p.sample(acked=100 * MiB, queued=MiB, dt=1.0, piece_len=64 << 10, busy=4, active=4)
    assert d.sndbuf == uplink.SNDBUF_RESTORE and d.inflight_total == 0 and not p.congested
    assert p.start() is None  # a fast link: not capped at the start again for a while
    for _ in range(uplink.HOLD_OFF_SAMPLES):
        p.sample(acked=100 * MiB, queued=MiB, dt=1.0, piece_len=64 << 10)
    assert p.start() is not None  # a new wave, much later: capped until measured again

    slow = UplinkPolicy()
    slow.sample(acked=20_000, queued=0, dt=1.0, piece_len=64 << 10)  # subscriptions, HAVEs
    assert slow.start() is not None  # control traffic is not a measured uplink
    d = slow.sample(acked=0, queued=0, dt=1.0, piece_len=64 << 10)  # nothing asked yet
    assert slow.provisional and (d.sndbuf, d.inflight_total) == (uplink.SNDBUF_MIN, uplink.START_INFLIGHT)
    # 750 kB/s (6 Mbit/s): capped as at the start for START_S of traffic, then sized by the
    # rate as a queuing link is (a piece per child sending).
    for _ in range(int(uplink.START_S) - 1):
        d = slow.sample(acked=750_000, queued=64 << 10, dt=1.0, piece_len=64 << 10, busy=2, active=20)
        assert slow.provisional and d.inflight_total == uplink.START_INFLIGHT
    d = slow.sample(acked=750_000, queued=64 << 10, dt=1.0, piece_len=64 << 10, busy=20, active=20)
    assert slow.congested and not slow.provisional
    assert d.sndbuf == uplink.SNDBUF_MIN and d.inflight_total == 20

    # 4 MB/s under the cap (a 50 Mbit/s seed, two pieces behind small buffers): a 64 KiB piece
    # leaves in 16 ms, within START_PIECE_S. Lifted; the ordinary policy decides from here, and
    # `start` stays off for a while (a new piece of the wave must not cap it again).
    quick = UplinkPolicy()
    quick.start()
    d = quick.sample(acked=1_000_000, queued=32 << 10, dt=uplink.START_POLL_S, piece_len=64 << 10, busy=2, active=8)
    assert (d.sndbuf, d.inflight_total) == (uplink.SNDBUF_RESTORE, 0) and not quick.congested
    assert quick.start() is None and quick.hold_off == 0
    for _ in range(uplink.HOLD_OFF_SAMPLES):
        quick.sample(acked=1_000_000, queued=0, dt=uplink.START_POLL_S, piece_len=64 << 10, busy=0, active=8)
    assert quick.start() is not None
    # The same rate with 512 KiB pieces (128 ms each): the wave's order matters, capped.
    big = UplinkPolicy()
    big.start()
    d = big.sample(acked=1_000_000, queued=32 << 10, dt=uplink.START_POLL_S, piece_len=512 << 10, busy=2, active=8)
    assert big.provisional and d.inflight_total == uplink.START_INFLIGHT

    # The same 750 kB/s at the real cadence while capped (START_POLL_S): still capped until
    # START_S of traffic, then sized by the rate; never lifted for want of samples meanwhile.
    paced = UplinkPolicy()
    paced.start()
    per = uplink.START_POLL_S
    for _ in range(round(uplink.START_S / per) - 1):
        d = paced.sample(acked=int(750_000 * per), queued=64 << 10, dt=per, piece_len=64 << 10, busy=2, active=20)
        assert paced.provisional and d.inflight_total == uplink.START_INFLIGHT
    d = paced.sample(acked=int(750_000 * per), queued=64 << 10, dt=per, piece_len=64 << 10, busy=20, active=20)
    assert paced.congested and not paced.provisional and d.inflight_total == 20

    # Before the first piece, the children's subscriptions and HAVEs are all that is acked:
    # no piece has shown the link fast, whatever their rate.
    early = UplinkPolicy()
    early.start()
    for piece_len, acked in ((0, 3000), (64 << 10, 30_000)):
        d = early.sample(acked=acked, queued=0, dt=per, piece_len=piece_len)
        assert early.provisional and d.inflight_total == uplink.START_INFLIGHT

    idle = UplinkPolicy()  # capped, and nothing ever measured: lifted after START_WAIT_S
    idle.start()
    for _ in range(int(uplink.START_WAIT_S) - 1):
        assert idle.sample(acked=0, queued=0, dt=1.0, piece_len=64 << 10).inflight_total == uplink.START_INFLIGHT
    assert idle.sample(acked=0, queued=0, dt=1.0, piece_len=64 << 10).inflight_total == 0
    assert not idle.provisional


def test_one_child_that_stops_reading_is_not_a_slow_uplink():
    p = UplinkPolicy()
    for _ in range(5):  # 4 MB queued, all on one of four connections
        d = p.sample(acked=1_000_000, queued=4_000_000, dt=1.0, piece_len=MiB, busy=1, active=4)
    assert not p.congested and (d.sndbuf, d.inflight_total) == (0, 0)
    for _ in range(2):  # the same queue spread over three of them: the link is the limit
        d = p.sample(acked=1_000_000, queued=4_000_000, dt=1.0, piece_len=MiB, busy=3, active=4)
    assert p.congested and d.inflight_total == 2


def test_a_congested_parent_serves_the_child_furthest_behind_first():
    q = ChildQueues(inflight=2, total=1)
    first = wire.PieceRequest(TASK, 0, "d0", left=100)
    assert q.admit(b"ahead", first)
    flight = InFlight(first)
    flight.tracker = type("T", (), {"done": False})()
    q.sent(b"ahead", flight)
    waiting = [(b"ahead", wire.PieceRequest(TASK, 1, "d1", left=100)),
               (b"old", wire.PieceRequest(TASK, 2, "d2")),  # a child that does not say: last
               (b"behind", wire.PieceRequest(TASK, 3, "d3", left=900)),
               (b"middle", wire.PieceRequest(TASK, 4, "d4", left=500))]
    for ident, r in waiting:
        assert not q.admit(ident, r)
    order = []
    for _ in waiting:
        flight.tracker.done = True
        (ident, r), = q.release_all()
        order.append(ident)
        flight = InFlight(r)
        flight.tracker = type("T", (), {"done": False})()
        q.sent(ident, flight)
    # A child that does not say (an older daemon) counts as furthest behind: never starved.
    assert order == [b"old", b"behind", b"middle", b"ahead"]


def test_a_child_ahead_waits_longer_but_is_never_starved():
    """The furthest-behind child asks again the moment it is served; the one far ahead still
    gets its turn once its request has waited (AGE_PER_S)."""
    q = ChildQueues(inflight=2, total=1)
    now = 0.0
    ahead = wire.PieceRequest(TASK, 0, "d0", left=100)
    assert q.admit(b"seed-ish", wire.PieceRequest(TASK, 99, "x", left=0), now)
    flight = InFlight(wire.PieceRequest(TASK, 99, "x", left=0))
    flight.tracker = type("T", (), {"done": False})()
    q.sent(b"seed-ish", flight)
    assert not q.admit(b"ahead", ahead, now)
    served_ahead_at = None
    for i in range(1000):  # a piece leaves every 0.1 s
        now += 0.1
        assert not q.admit(b"behind", wire.PieceRequest(TASK, 100 + i, "d", left=900), now) or True
        flight.tracker.done = True
        (ident, r), = q.release_all(now)
        flight = InFlight(r)
        flight.tracker = type("T", (), {"done": False})()
        q.sent(ident, flight)
        if ident == b"ahead":
            served_ahead_at = now
            break
    assert served_ahead_at is not None
    assert served_ahead_at <= (900 - 100) / uploadq.AGE_PER_S + 1.0
    assert uploadq.need(-1) == 1000 and uploadq.need(2**63) == 1000 and uploadq.need(-5) == 1000


def test_picker_says_how_much_of_the_task_is_left():
    p = Picker()
    assert p.left_per_mille() == 1000  # no manifest yet
    p.add_manifest([wire.PieceInfo(n, n * 10, 10, f"d{n}") for n in range(8)])
    p.add_parent("a")
    for n in range(6):
        p.on_piece("a", n)
    assert p.left_per_mille() == 250


def _stalled_child(ctx: zmq.Context, addr: str) -> zmq.Socket:
    """A DEALER that reads nothing, with a small receive buffer: what the parent sends it
    queues in the parent's kernel, as behind a slow link."""
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.RCVBUF, 64 << 10)
    d.setsockopt(zmq.RCVHWM, 1)
    d.connect(addr)
    return d


def _metered_router(ctx: zmq.Context) -> tuple[zmq.Socket, UplinkMeter, int]:
    """A ROUTER on loopback with an UplinkMeter, as the upload server sets one up."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    meter = UplinkMeter(router)
    meter.port = router.bind_to_random_port("tcp://127.0.0.1")
    return router, meter, meter.port


def test_meter_finds_the_connections_measures_the_queue_and_sets_small_send_buffers():
    ctx = zmq.Context()
    router, meter, port = _metered_router(ctx)
    child = _stalled_child(ctx, f"tcp://127.0.0.1:{port}")
    try:
        child.send(b"hello")
        assert router.poll(int(TIMEOUT_S * 1000))
        ident, _ = router.recv_multipart()
        assert meter.poll(time.monotonic(), 1 << 20) is None  # the first poll sets baselines
        assert len(meter.conns) == 1
        fd = next(iter(meter.conns))
        for _ in range(16):  # 16 MiB for a child that reads nothing
            router.send_multipart([ident, os.urandom(MiB)], copy=False)
        deadline = time.monotonic() + TIMEOUT_S
        decision = None
        # The child read its receive buffer's worth at once, then nothing: the delivered rate
        # falls each second, and with it the buffer the policy wants (applied at the next poll
        # once it is small enough to be worth taking from the kernel's autotuning).
        while time.monotonic() < deadline and not (meter.policy.congested
                                                   and meter.policy.sndbuf <= uplink.SNDBUF_MAX):
            time.sleep(0.3)
            decision = meter.poll(time.monotonic(), 1 << 20)
        assert meter.policy.congested and decision is not None
        assert decision.sndbuf >= uplink.SNDBUF_MIN and decision.inflight_total >= 2
        with socket.socket(fileno=os.dup(fd)) as s:
            autotuned = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        meter.poll(time.monotonic(), 1 << 20)  # applies the decision to the connection
        with socket.socket(fileno=os.dup(fd)) as s:
            now = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert now <= 2 * max(decision.sndbuf, meter.policy.sndbuf) < autotuned
        child.close(0)
        deadline = time.monotonic() + TIMEOUT_S
        while meter.conns and time.monotonic() < deadline:
            time.sleep(0.1)
            meter.poll(time.monotonic(), 1 << 20)
        assert meter.conns == {}  # the disconnect forgets it, and its descriptor is never touched
    finally:
        child.close(0)
        meter.close()
        router.close(0)
        ctx.term()


def test_upload_server_caps_pieces_in_flight_once_its_uplink_queues(tmp_path):
    """A real UploadServer over a real store: a child asks for pieces and stops reading; the
    server's kernel queue grows, and within seconds the in-flight cap is on."""
    store, held = _store_pieces(tmp_path, count=24, size=MiB)

    async def main():
        counters = Counters()
        async with _upload_server(store, held, counters, children=0) as (server, _):
            child = _stalled_child(server.sock.context, server.addr)
            child = zmq.asyncio.Socket.from_socket(child)
            try:
                for n in range(24):
                    await child.send_multipart(wire.encode(wire.PieceRequest(TASK, n, held[n].digest, 500)))
                deadline = time.monotonic() + TIMEOUT_S
                while server.queues.total == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                    await child.send_multipart(wire.encode(wire.Heartbeat("child")))
                assert server.queues.total >= 2, (dict(counters), server.uplink.policy.__dict__)
                assert counters["upload.uplink-congested-s"] >= 1
                assert server.queues.waiting  # the rest wait in the parent, cancellable
            finally:
                child.close(0)

    run_then_close(main, store)


def test_upload_server_reading_the_origin_starts_capped_and_serves(tmp_path):
    """A real UploadServer told that it read pieces from the origin starts with the in-flight
    cap on and small buffers on a child's connection accepted then; the child gets every piece."""
    import nodes.upload as upload_mod

    store, held = _store_pieces(tmp_path, count=6, size=64 << 10)
    upload_mod.WAVE_CHILDREN, wave = 2, upload_mod.WAVE_CHILDREN

    async def main():
        counters = Counters()
        async with _upload_server(store, held, counters, children=2) as (server, [child, other]):
            await child.send_multipart(wire.encode(wire.Subscribe(TASK, "child")))
            assert isinstance(wire.decode(await child.recv_multipart()), wire.Have)
            for n in range(6):
                server.on_piece(TASK, n, from_origin=True)
            assert server.queues.total == 0  # one child is not a wave
            await other.send_multipart(wire.encode(wire.Subscribe(TASK, "other")))
            assert isinstance(wire.decode(await other.recv_multipart()), wire.Have)
            assert server.queues.total == uplink.START_INFLIGHT and server.uplink.policy.provisional
            assert server._meter_every() == uplink.START_POLL_S  # measured soon, to be lifted soon
            for n in range(6):
                await child.send_multipart(wire.encode(wire.PieceRequest(TASK, n, held[n].digest, 1000)))
            got = set()
            while len(got) < 6:
                if not await child.poll(int(TIMEOUT_S * 1000)):
                    break
                msg = wire.decode(await child.recv_multipart())
                if isinstance(msg, wire.Have):  # origin pieces revealed meanwhile
                    continue
                assert isinstance(msg, wire.PieceData)
                got.add(msg.num)
            assert got == set(range(6))
            server.uplink.drain_events()
            assert server.uplink.conns and all(c.sndbuf == uplink.SNDBUF_MIN for c in server.uplink.conns.values())
            # A kernel where the uplink turns out unmeasurable: the start cap must not stay.
            server.uplink.broken = True
            server._meter_uplink(time.monotonic())
            assert server.queues.total == 0

    try:
        run_then_close(main, store)
    finally:
        upload_mod.WAVE_CHILDREN = wave


def test_policy_keeps_the_cap_on_the_queue_it_made_short_and_lifts_a_cap_that_costs_throughput():
    p = UplinkPolicy()
    for _ in range(2):
        p.sample(acked=300_000, queued=2_000_000, dt=1.0, piece_len=64 << 10, busy=6, active=6)
    assert p.congested
    # Capped, the kernel holds about 0.2 s of the link: still queuing by the calm threshold.
    for _ in range(10):
        d = p.sample(acked=300_000, queued=60_000 + 70_000, dt=1.0, piece_len=64 << 10, busy=6, active=6)
    # A piece for each of the six queuing children: six drain in 1.3 s (< INFLIGHT_MAX_S).
    assert p.congested and d.inflight_total == 6
    # Children whose own downlinks were the limit: under the cap they take half what they did.
    lifted = None
    for i in range(10):
        d = p.sample(acked=100_000, queued=2_000_000, dt=1.0, piece_len=64 << 10, busy=6, active=6)
        if d.inflight_total == 0:
            lifted = i
            break
    assert lifted is not None and d.sndbuf == uplink.SNDBUF_RESTORE and not p.congested
    for _ in range(uplink.HOLD_OFF_SAMPLES - 1):  # not capped again for a while
        d = p.sample(acked=100_000, queued=2_000_000, dt=1.0, piece_len=64 << 10, busy=6, active=6)
        assert d.inflight_total == 0


def test_meter_touches_no_descriptor_that_is_not_its_connection_and_switches_off_without_tcp_info(monkeypatch):
    ctx = zmq.Context()
    router, meter, port = _metered_router(ctx)
    child = ctx.socket(zmq.DEALER)
    child.setsockopt(zmq.LINGER, 0)
    child.connect(f"tcp://127.0.0.1:{port}")
    try:
        child.send(b"hello")
        assert router.poll(int(TIMEOUT_S * 1000))
        router.recv_multipart()
        meter.poll(time.monotonic(), 1 << 20)
        (fd, conn), = meter.conns.items()
        conn.peer = ("192.0.2.1", 9)  # as if ZeroMQ closed it and the number went to another socket
        meter.policy.sndbuf = uplink.SNDBUF_MIN
        with socket.socket(fileno=os.dup(fd)) as s:
            before = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        meter.poll(time.monotonic(), 1 << 20)
        assert meter.conns == {}
        with socket.socket(fileno=os.dup(fd)) as s:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == before  # untouched
        # A kernel without the tcp_info this reads (not Linux, or older than 4.1): off, quietly.
        meter.drain_events()
        meter.conns[fd] = uplink._Conn(("127.0.0.1", 0))
        with socket.socket(fileno=os.dup(fd)) as s:
            meter.conns[fd].peer = s.getpeername()
        monkeypatch.setattr(uplink, "TCPI_BYTES_ACKED", 4096)
        assert meter.poll(time.monotonic(), 1 << 20) is None and meter.broken
        assert meter.poll(time.monotonic(), 1 << 20) is None
    finally:
        child.close(0)
        meter.close()
        router.close(0)
        ctx.term()


def test_meter_close_returns_with_monitor_events_unread():
    """disable_monitor sends one last event into the monitor pipe: close reads what waits first."""
    import threading
    ctx = zmq.Context()
    router, meter, port = _metered_router(ctx)
    for _ in range(50):
        with socket.create_connection(("127.0.0.1", port)):
            pass
    closer = threading.Thread(target=meter.close, daemon=True)
    closer.start()
    closer.join(TIMEOUT_S)
    try:
        assert not closer.is_alive()
    finally:
        router.close(0)
        ctx.term()


def test_upload_server_reads_its_monitor_all_the_time(tmp_path):
    """Connections that never speak ZeroMQ (probes, a child with the wrong key) each leave two
    monitor events; unread, about a thousand of them would block libzmq's I/O thread, and with
    it every socket of the daemon. A real child is still served after 1200 of them."""
    store, held = _store_pieces(tmp_path, count=1, size=64 << 10)

    async def main():
        counters = Counters()
        async with _upload_server(store, held, counters, children=0) as (server, _):
            port = server.uplink.port
            assert port > 0

            def probe():
                for _ in range(1200):
                    with socket.create_connection(("127.0.0.1", port)):
                        pass

            await asyncio.to_thread(probe)
            child = zmq.asyncio.Socket.from_socket(server.sock.context.socket(zmq.DEALER))
            child.setsockopt(zmq.LINGER, 0)
            child.connect(server.addr)
            try:
                await child.send_multipart(wire.encode(wire.PieceRequest(TASK, 0, held[0].digest, 1000)))
                assert await child.poll(int(TIMEOUT_S * 1000)), "the daemon's I/O thread is stuck"
                reply = wire.decode(await child.recv_multipart())
                assert isinstance(reply, wire.PieceData) and reply.num == 0
            finally:
                child.close(0)
            deadline = time.monotonic() + TIMEOUT_S
            while len(server.uplink.conns) > 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert len(server.uplink.conns) <= 1  # the probes came and went

    run_then_close(main, store)


def _priority(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as s:
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY)


def test_meter_puts_child_connections_in_the_bulk_band_and_sets_one_apart_on_request():
    """Read back from the kernel: an accepted child connection's queue priority is the bulk
    band's; `set_priority` moves it, and never touches a descriptor that is not one of ours."""
    ctx = zmq.Context()
    router, meter, port = _metered_router(ctx)
    child = ctx.socket(zmq.DEALER)
    child.setsockopt(zmq.LINGER, 0)
    child.connect(f"tcp://127.0.0.1:{port}")
    other = socket.socket()
    try:
        child.send(b"hello")
        assert router.poll(int(TIMEOUT_S * 1000))
        frames = router.recv_multipart(copy=False)
        fd = frames[0].get(zmq.SRCFD)  # what the upload server learns each child's connection by
        meter.drain_events()
        assert fd in meter.conns and _priority(fd) == uplink.BULK_PRIORITY
        conn = meter.conns[fd]
        assert meter.set_priority(fd, conn, uplink.NEEDY_PRIORITY) and _priority(fd) == uplink.NEEDY_PRIORITY
        assert meter.set_priority(fd, conn, uplink.BULK_PRIORITY) and _priority(fd) == uplink.BULK_PRIORITY
        # Another connection's record on the same descriptor (a reuse after a new accept): untouched.
        assert not meter.set_priority(fd, uplink._Conn(conn.peer), uplink.NEEDY_PRIORITY)
        assert _priority(fd) == uplink.BULK_PRIORITY
        # A descriptor the meter recorded but that is not its connection (reused by something else).
        meter.conns[other.fileno()] = stale = uplink._Conn(("192.0.2.1", 1))
        assert not meter.set_priority(other.fileno(), stale, uplink.NEEDY_PRIORITY)
        assert _priority(other.fileno()) == 0 and other.fileno() not in meter.conns
    finally:
        other.close()
        child.close(0)
        meter.close()
        router.close(0)
        ctx.term()


def test_a_capped_upload_server_puts_its_neediest_childs_bytes_first(tmp_path):
    """Three children with requests waiting at a capped uplink: the connection of the one that
    lacks most of the task (by MARK_MARGIN beyond the median) goes to the best-effort band, the
    others stay in the bulk band; the mark moves when another child is further behind, and is
    taken away when the cap is lifted."""
    import nodes.upload as upload_mod

    store, held = _store_pieces(tmp_path, count=13, size=MiB)

    async def main():
        counters = Counters()
        async with _upload_server(store, held, counters, children=0) as (server, _):
            server._meter_every = lambda: 3600.0  # the cap stays as the test sets it
            # Children that read nothing: their pieces stay in the socket, the rest wait.
            children = [zmq.asyncio.Socket.from_socket(_stalled_child(server.sock.context, server.addr))
                        for _ in range(3)]
            try:
                names = ["far", "mid", "near"]
                for name, child in zip(names, children):
                    await child.send_multipart(wire.encode(wire.Subscribe(TASK, name)))
                    assert isinstance(wire.decode(await child.recv_multipart()), wire.Have)
                server.queues.total = 1  # the uplink queues: one piece in the socket at a time
                server.uplink.drain_events()
                server.uplink._resize(4096)  # small buffers: a piece stays in the socket, the rest wait
                ident = {sub.peer_id: i for i, sub in server.subs[TASK].items()}

                def band(name: str) -> int:
                    return _priority(server._fd[ident[name]][0])

                async def ask(child, n: int, left: int) -> None:
                    await child.send_multipart(wire.encode(wire.PieceRequest(TASK, n, held[n].digest, left)))

                lefts = {"far": 800, "mid": 500, "near": 500 - upload_mod.MARK_MARGIN + 1}
                for k, (name, child) in enumerate(zip(names, children)):
                    for n in range(3 * k, 3 * k + 3):
                        await ask(child, n, lefts[name])
                deadline = time.monotonic() + TIMEOUT_S
                while server._marked is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert server._marked == ident["far"], server.queues.needs()
                assert [band(n) for n in names] == [uplink.NEEDY_PRIORITY, uplink.BULK_PRIORITY, uplink.BULK_PRIORITY]
                await ask(children[1], 9, 900)  # "mid" now lacks the most
                deadline = time.monotonic() + TIMEOUT_S
                while server._marked != ident["mid"] and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert [band(n) for n in names] == [uplink.BULK_PRIORITY, uplink.NEEDY_PRIORITY, uplink.BULK_PRIORITY]
                # Not marked within MARK_MARGIN of the median: "mid" nearly done, "far" MARK_MARGIN - 1
                # ahead of "near".
                await ask(children[1], 10, 0)
                await ask(children[0], 11, lefts["near"] + upload_mod.MARK_MARGIN - 1)
                deadline = time.monotonic() + TIMEOUT_S
                while server._marked is not None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert server._marked is None and {band(n) for n in names} == {uplink.BULK_PRIORITY}
                await ask(children[0], 12, lefts["near"] + upload_mod.MARK_MARGIN)
                deadline = time.monotonic() + TIMEOUT_S
                while server._marked is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert server._marked == ident["far"] and band("far") == uplink.NEEDY_PRIORITY
                # A marked child gone silent goes back to the bulk band as it is forgotten.
                far_fd = server._fd[ident["far"]][0]
                server.expire(time.monotonic() + 2 * server.subscriber_ttl_s)
                assert server._marked is None and _priority(far_fd) == uplink.BULK_PRIORITY
                server.queues.total = 0  # the cap lifted: nobody first
                server._mark_neediest()
                assert counters["upload.marked"] == counters["upload.unmarked"] >= 3  # every mark undone
            finally:
                for child in children:
                    child.close(0)

    run_then_close(main, store)
