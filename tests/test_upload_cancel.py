"""PIECE_CANCEL and the upload server's per-child send queues (issue 3: redundant bytes).

The queue logic is pure (nodes/uploadq.py) and tested with fake trackers; the server is tested
on real sockets: a real UploadServer over a real LMDB piece store, a child DEALER that asks for
pieces and cancels some. The parent's upload limit holds its first two pieces (in flight, not yet
in the socket) long enough for the rest to wait in its queue, where a cancel reaches them; a
child's ZeroMQ I/O thread reads whatever reaches the socket, so only the limiter makes this
deterministic on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import msgpack
import zmq
import zmq.asyncio

from dfzmq import wire
from dfzmq.service import Counters
from nodes.limits import TokenBucket
from nodes.source import digest
from nodes.store import PieceStore
from nodes.upload import UploadServer
from nodes.uploadq import ChildQueues, InFlight
from tests.conftest import TIMEOUT_S

TASK = "ab" * 32


class Tracker:
    def __init__(self) -> None:
        self.done = False


def req(n: int, task: str = TASK) -> wire.PieceRequest:
    return wire.PieceRequest(task, n, f"{n:064x}")


def sent(q: ChildQueues, ident: bytes, r: wire.PieceRequest) -> Tracker:
    f = InFlight(r)
    f.tracker = Tracker()
    q.sent(ident, f)
    return f.tracker


def test_two_in_the_socket_the_rest_wait_in_order():
    q = ChildQueues(inflight=2)
    t = [sent(q, b"c", r) for r in (req(0), req(1)) if q.admit(b"c", r)]
    assert len(t) == 2
    assert not q.admit(b"c", req(2)) and not q.admit(b"c", req(3))
    assert q.admit(b"other", req(9))  # another child has its own room
    assert q.release(b"c") == []  # nothing written into the kernel yet
    t[0].done = True
    assert [r.num for r in q.release(b"c")] == [2]
    sent(q, b"c", req(2))  # the caller marks what it sent
    assert q.release(b"c") == []  # 1 and 2 in the socket


def test_cancel_removes_waiting_and_token_waiting_requests_only():
    q = ChildQueues(inflight=2)
    in_socket = InFlight(req(0))
    in_socket.tracker = Tracker()
    waiting_tokens = InFlight(req(1))  # handed to the upload limiter, no tracker yet
    for f in (in_socket, waiting_tokens):
        assert q.admit(b"c", f.req)
        q.sent(b"c", f)
    for n in (2, 3, 4):
        assert not q.admit(b"c", req(n))
    removed = q.cancel(b"c", TASK, {0, 1, 3, 7})
    assert sorted(r.num for r in removed) == [1, 3]  # 0 is in the socket; 7 was never asked
    assert waiting_tokens.cancelled and waiting_tokens.done and not in_socket.done
    assert [r.num for r in q.release(b"c")] == [2]  # the cancelled flight freed its room
    assert q.cancel(b"c", "other-task", {4}) == []


def test_drop_on_unsubscribe_and_on_leaving():
    q = ChildQueues(inflight=1)
    assert q.admit(b"c", req(0))
    sent(q, b"c", req(0))
    assert not q.admit(b"c", req(1, "t1")) and not q.admit(b"c", req(2))
    assert q.drop(b"c", "t1") == 1
    assert [r.num for r in q.waiting[b"c"]] == [2]
    assert q.drop(b"c") == 1
    assert b"c" not in q.waiting and b"c" not in q.sending


# -- on real sockets -----------------------------------------------------------------------------


def _store_pieces(tmp_path, count: int, size: int) -> tuple[PieceStore, dict[int, wire.PieceInfo]]:
    store = PieceStore(tmp_path / "store", map_size=1 << 30)
    held = {}
    for n in range(count):
        data = bytes([n]) * 16 + os.urandom(size - 16)
        info = wire.PieceInfo(n, n * size, size, digest(data))
        store.put(TASK, info, data)
        held[n] = info
    return store, held


@contextlib.asynccontextmanager
async def _upload_server(store, held, counters, children: int = 1, **kw):
    """A real UploadServer over `store` and `children` DEALERs connected to it."""
    ctx = zmq.asyncio.Context()
    server = UploadServer(ctx, store, "tcp://127.0.0.1:0", "127.0.0.1", lambda t: held if t == TASK else {},
                          counters, **kw)
    run = asyncio.create_task(server.run())
    socks = []
    for _ in range(children):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.addr)
        socks.append(sock)
    try:
        yield server, socks
    finally:
        for sock in socks:
            sock.close(0)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        server.close()
        ctx.term()


def run_then_close(main, store) -> None:
    """asyncio.run(main()), then close the store whatever happened."""
    try:
        asyncio.run(main())
    finally:
        store.close()


async def _recv(sock, timeout_s: float = TIMEOUT_S):
    if not await sock.poll(int(timeout_s * 1000)):
        return None
    return wire.decode(await sock.recv_multipart())


def test_cancelled_requests_are_never_sent(tmp_path):
    """An upload limit of 1 MiB/s holds 1 MiB pieces for about a second each before they reach
    the socket: the first two of a child are in flight (waiting for tokens: still cancellable),
    the rest wait in its queue."""
    size = 1 << 20
    store, held = _store_pieces(tmp_path, 6, size)
    counters = Counters()

    async def main() -> None:
        async with _upload_server(store, held, counters, bucket=TokenBucket(1 << 20)) as (server, [child]):
            for n in range(6):
                await child.send_multipart(wire.encode(wire.PieceRequest(TASK, n, held[n].digest)))
            await child.send_multipart(wire.encode(wire.PieceCancel(TASK, [0, 2, 3, 5])))
            got = []
            while True:
                msg = await _recv(child, 1.5 if len(got) >= 2 else TIMEOUT_S * 3)
                if msg is None:
                    break
                assert isinstance(msg, wire.PieceData)
                assert digest(bytes(msg.data)) == held[msg.num].digest
                got.append(msg.num)
            assert counters["upload.queued"] == 4, dict(counters)  # two in flight, four waited here
            # 0 waited for tokens and 2, 3 and 5 in the queue: none of them was sent.
            assert got == [1, 4], got
            assert counters["upload.cancelled"] == 4
            assert counters["upload.cancelled-bytes"] == 4 * size
            assert counters["upload.cancel-too-late"] == 0
            assert server.bytes_uploaded == 2 * size

    run_then_close(main, store)


def test_malformed_cancel_is_dropped_and_counted_and_the_server_goes_on(tmp_path):
    store, held = _store_pieces(tmp_path, 3, 64 * 1024)
    counters = Counters()

    async def main() -> None:
        async with _upload_server(store, held, counters) as (server, [child]):
            bad = [
                [wire.MAGIC, b"PIECE_CANCEL", msgpack.packb({"task_id": TASK, "nums": ["x"]})],
                [wire.MAGIC, b"PIECE_CANCEL", msgpack.packb({"task_id": TASK})],
                [wire.MAGIC, b"PIECE_CANCEL", msgpack.packb({"task_id": TASK, "nums": 5})],
                [wire.MAGIC, b"PIECE_CANCEL", b"\xc1garbage"],
            ]
            for frames in bad:
                await child.send_multipart(frames)
            await child.send_multipart(wire.encode(wire.PieceCancel(TASK, [1])))  # nothing to cancel
            await child.send_multipart(wire.encode(wire.PieceRequest(TASK, 2, held[2].digest)))
            msg = await _recv(child)
            assert isinstance(msg, wire.PieceData) and msg.num == 2
            assert counters["dropped.bad-frame"] == len(bad)
            assert counters["upload.cancel-too-late"] == 1 and counters["upload.cancelled"] == 0

    run_then_close(main, store)


def test_a_global_cap_serves_the_oldest_request_first_whoever_asked():
    q = ChildQueues(inflight=2, total=2)
    a0, a1, b0, c0 = req(0), req(1), req(2), req(3)
    assert q.admit(b"a", a0)
    ta = sent(q, b"a", a0)
    assert q.admit(b"b", b0)
    tb = sent(q, b"b", b0)
    assert not q.admit(b"a", a1)  # the parent's socket is full: a1 waits, then c0
    assert not q.admit(b"c", c0)
    assert q.release_all() == []
    tb.done = True
    assert q.release_all() == [(b"a", a1)]  # oldest first, although b's piece made the room
    sent(q, b"a", a1)
    ta.done = True
    assert q.release_all() == [(b"c", c0)]
    assert not q.waiting and not q._arrived


def test_piece_files_are_read_off_the_loop_and_a_cancel_stops_a_read(tmp_path):
    """Pieces held in files and not in memory are read in reader threads: while one read is
    stuck on a slow disk, the loop goes on serving, and a cancel that arrives during the read
    keeps its bytes off the wire."""
    import threading

    size = 1 << 20
    store = PieceStore(tmp_path / "store", map_size=1 << 30, file_threshold=size, cache_bytes=0)
    held = {}
    for n in range(3):
        data = bytes([n]) * 16 + os.urandom(size - 16)
        held[n] = wire.PieceInfo(n, n * size, size, digest(data))
        store.put(TASK, held[n], data)
    counters = Counters()
    disk = threading.Event()
    real_get = store.get
    reads = []

    def slow_get(d: str):
        reads.append(d)
        if d == held[0].digest:
            assert disk.wait(TIMEOUT_S * 3)  # a disk that takes its time for piece 0
        return real_get(d)

    store.get = slow_get

    async def main() -> None:
        async with _upload_server(store, held, counters, children=2) as (server, [a, b]):
            try:
                await _exercise(server, a, b)
            finally:
                disk.set()  # never leave a reader thread stuck (close waits for them)

    async def _exercise(server, a, b) -> None:
        await a.send_multipart(wire.encode(wire.PieceRequest(TASK, 0, held[0].digest)))
        await b.send_multipart(wire.encode(wire.PieceRequest(TASK, 1, held[1].digest)))
        msg = await _recv(b)  # served while piece 0's read is stuck
        assert isinstance(msg, wire.PieceData) and msg.num == 1
        assert digest(bytes(msg.data)) == held[1].digest
        # A child asking and cancelling over and over: a cancelled read keeps its slot
        # until it ends, so at most the child's two slots' worth of reads ever start.
        for _ in range(10):
            await a.send_multipart(wire.encode(wire.PieceRequest(TASK, 0, held[0].digest)))
            await a.send_multipart(wire.encode(wire.PieceCancel(TASK, [0])))
        for _ in range(100):  # the cancels reached the server
            if counters["upload.cancelled"] >= 11:
                break
            await asyncio.sleep(0.02)
        assert counters["upload.cancelled"] == 11
        disk.set()
        await a.send_multipart(wire.encode(wire.PieceRequest(TASK, 2, held[2].digest)))
        msg = await _recv(a)
        assert isinstance(msg, wire.PieceData) and msg.num == 2  # not 0: it was cancelled
        assert await _recv(a, 0.5) is None
        assert reads.count(held[0].digest) <= 2, len(reads)
        # Reads: 0, 1 (the other child), one repeat of 0 in the second slot, then 2; the
        # other nine repeats waited in the queue, where their cancels removed them (2 may
        # have waited too, for the two cancelled reads to end).
        assert counters["upload.disk-reads"] == 4 and counters["upload.queued"] >= 9
        assert counters["upload.cancelled-reading"] == 2
        assert server.bytes_uploaded == 2 * size

    run_then_close(main, store)


def test_a_child_that_subscribes_while_pieces_are_hidden_gets_its_share_of_them(tmp_path):
    """Super-seeding: pieces read from the origin are shown to one child before everyone. A child
    that subscribes after they were read used to see none of them, so late children all asked
    the seed for the few pieces revealed to everyone (lab, N=32: 21 of 32 asked for piece 0)."""
    store, held = _store_pieces(tmp_path, 10, 64 * 1024)
    counters = Counters()

    async def main() -> None:
        async with _upload_server(store, held, counters, children=3, reveal_delay_s=30.0) as (server, socks):
            for n in range(10):
                server.on_piece(TASK, n, from_origin=True)  # nobody subscribed yet: all hidden
            seen = []
            for sock in socks:
                await sock.send_multipart(wire.encode(wire.Subscribe(TASK, f"child-{len(seen)}")))
                msg = await _recv(sock)
                assert isinstance(msg, wire.Have)
                seen.append(set(msg.nums))
            assert [len(s) for s in seen] == [10, 5, 4]  # a share: hidden / subscribers, rounded up
            assert not seen[1] & seen[2]  # the fewest shown first: the late ones differ
            server.on_complete(TASK)
            for sock, before in zip(socks, seen):
                msg = await _recv(sock)
                assert isinstance(msg, wire.Have) and msg.complete
                assert before | set(msg.nums) == set(range(10)) and not before & set(msg.nums)

    run_then_close(main, store)


# -- repeats of a piece read from the origin, held back ---------------------------------------------


async def _recv_data(sock, timeout_s: float = TIMEOUT_S):
    """The next message that is not a HAVE (hidden origin pieces are revealed meanwhile)."""
    while True:
        msg = await _recv(sock, timeout_s)
        if not isinstance(msg, wire.Have):
            return msg


def test_held_requests_come_due_in_order_and_a_cancel_or_drop_removes_them():
    q = ChildQueues(inflight=2)
    q.hold(b"a", req(0), 2.0)
    q.hold(b"b", req(0), 1.0)
    q.hold(b"b", req(5, "t1"), 3.0)
    q.hold(b"c", req(4), 1.5)
    assert q.due(0.5) == []
    assert [r.num for r in q.cancel(b"c", TASK, {4})] == [4]
    assert q.due(2.0) == [(b"b", req(0)), (b"a", req(0))]  # the earlier hold first
    assert list(q.held) == [b"b"]
    assert q.drop(b"b", "t1") == 1 and not q.held


def test_a_repeat_of_an_origin_piece_is_held_back_for_a_child_that_starts(tmp_path):
    """The parent read pieces 0-3 from the origin. Child A asks for 0, child B then asks for 0
    too (a repeat, early in B's download) and for 1: 1 comes at once, 0 is held back. B gets 0
    elsewhere and cancels it here: it never costs a byte. Child C, a repeat near the end of
    its download, is not held. A held repeat nobody cancels goes out once its hold is over."""
    import nodes.upload as upload_mod

    size = 64 * 1024
    store, held = _store_pieces(tmp_path, 4, size)
    counters = Counters()
    upload_mod.WAVE_CHILDREN, wave = 4, upload_mod.WAVE_CHILDREN  # these four children are a wave

    async def ask(sock, n: int, left: int) -> None:
        await sock.send_multipart(wire.encode(wire.PieceRequest(TASK, n, held[n].digest, left)))

    async def main() -> None:
        async with _upload_server(store, held, counters, children=4) as (server, [a, b, c, d]):
            for n in range(4):
                server.on_piece(TASK, n, from_origin=True)
            assert server.queues.total == 0  # no wave yet: nothing held, nothing capped
            for i, sock in enumerate((a, b, c, d)):
                await sock.send_multipart(wire.encode(wire.Subscribe(TASK, f"child-{i}")))
                assert isinstance(await _recv(sock), wire.Have)
            assert server.queues.total > 0  # the wave, reading the origin: capped from the start
            await ask(a, 0, 1000)
            msg = await _recv_data(a)
            assert isinstance(msg, wire.PieceData) and msg.num == 0
            await ask(b, 0, 1000)
            await ask(b, 1, 1000)
            msg = await _recv_data(b)
            assert isinstance(msg, wire.PieceData) and msg.num == 1  # the fresh piece, at once
            assert counters["upload.repeats-held"] == 1
            await b.send_multipart(wire.encode(wire.PieceCancel(TASK, [0])))
            await ask(c, 0, 50)  # far along its download: served as ever
            msg = await _recv_data(c)
            assert isinstance(msg, wire.PieceData) and msg.num == 0
            await ask(d, 0, 990)  # held, and nobody cancels it: it goes out when due
            msg = await _recv_data(d, wire.REPEAT_HOLD_S + TIMEOUT_S)
            assert isinstance(msg, wire.PieceData) and msg.num == 0
            assert digest(bytes(msg.data)) == held[0].digest
            assert await _recv_data(b, 0.3) is None  # B's cancelled repeat never came
            assert counters["upload.repeats-held"] == 2
            assert counters["upload.repeats-released"] == 1
            assert counters["upload.cancelled"] == 1
            assert server.bytes_uploaded == 4 * size  # A's 0, B's 1, C's 0, D's 0

    try:
        run_then_close(main, store)
    finally:
        upload_mod.WAVE_CHILDREN = wave


def test_held_repeats_go_out_as_soon_as_the_start_cap_is_lifted(tmp_path):
    """A repeat is held only while the uplink is capped: once the cap goes (here the uplink
    turns out unmeasurable; in the lab, a fast link's first sample), the held one is sent at
    once, not when its hold would have ended."""
    import nodes.upload as upload_mod

    size = 64 * 1024
    store, held = _store_pieces(tmp_path, 2, size)
    counters = Counters()
    upload_mod.WAVE_CHILDREN, wave = 2, upload_mod.WAVE_CHILDREN

    async def main() -> None:
        async with _upload_server(store, held, counters, children=2) as (server, [a, b]):
            for n in range(2):
                server.on_piece(TASK, n, from_origin=True)
            for i, sock in enumerate((a, b)):
                await sock.send_multipart(wire.encode(wire.Subscribe(TASK, f"child-{i}")))
                assert isinstance(await _recv(sock), wire.Have)
            assert server.queues.total > 0
            await a.send_multipart(wire.encode(wire.PieceRequest(TASK, 0, held[0].digest, 1000)))
            assert (await _recv_data(a)).num == 0
            await b.send_multipart(wire.encode(wire.PieceRequest(TASK, 0, held[0].digest, 1000)))
            assert await _recv_data(b, 0.3) is None and counters["upload.repeats-held"] == 1
            server.uplink.broken = True
            server._meter_uplink(time.monotonic())
            assert server.queues.total == 0
            msg = await _recv_data(b, 0.5)  # well before its hold (REPEAT_HOLD_S) would end
            assert isinstance(msg, wire.PieceData) and msg.num == 0
            assert counters["upload.repeats-released"] == 1

    try:
        run_then_close(main, store)
    finally:
        upload_mod.WAVE_CHILDREN = wave
