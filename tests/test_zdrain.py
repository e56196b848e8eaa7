"""nodes/zdrain.py on real sockets: no message is left behind by ZeroMQ's edge-like FD.

Ping-pong over TCP between two Drains, each answering from its callback (a send while the
other side's next message may already be arriving: the case where a send consumes the FD's
signal), plus messages queued before the Drain existed and a burst larger than one pass.
"""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from nodes.zdrain import Drain, plain_context
from tests.conftest import TIMEOUT_S


def test_ping_pong_and_bursts_lose_nothing():
    async def main() -> None:
        actx = zmq.asyncio.Context()
        ctx = plain_context(actx)
        a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        for s in (a, b):
            s.setsockopt(zmq.LINGER, 0)
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        early = 5
        for i in range(early):  # queued before any Drain: the FD will not signal them again
            b.send_multipart([b"early", str(i).encode()])
        await asyncio.sleep(0.2)
        rounds = 2000
        got_a: list[bytes] = []
        got_b: list[bytes] = []
        done = asyncio.Event()
        da: Drain
        db: Drain

        def on_a(frames):
            got_a.append(frames[0])
            if frames[0] == b"ping":
                da.send([b"pong", frames[1]])

        def on_b(frames):
            got_b.append(frames[0])
            n = int(frames[1])
            if n + 1 < rounds:
                db.send([b"ping", str(n + 1).encode()])
            else:
                done.set()

        da = Drain(a, on_a, limit=3)  # small passes: a burst spans several loop turns
        db = Drain(b, on_b)
        db.send([b"ping", b"0"])
        try:
            await asyncio.wait_for(done.wait(), TIMEOUT_S * 10)
            assert got_a.count(b"early") == early
            assert got_a.count(b"ping") == rounds and got_b.count(b"pong") == rounds
            for i in range(300):  # a burst while nobody answers
                b.send_multipart([b"burst", str(i).encode()])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + TIMEOUT_S
            while got_a.count(b"burst") < 300 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert got_a.count(b"burst") == 300
        finally:
            da.close()
            db.close()
            a.close(0)
            b.close(0)
            actx.term()

    asyncio.run(main())


def test_a_failing_callback_is_reported_and_receiving_goes_on():
    async def main() -> None:
        actx = zmq.asyncio.Context()
        ctx = plain_context(actx)
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        a.bind("inproc://drain-errors")
        b.connect("inproc://drain-errors")
        seen, errors = [], []

        def on(frames):
            seen.append(frames[0])
            if frames[0] == b"bad":
                raise ValueError("boom")

        d = Drain(a, on, on_error=errors.append)
        try:
            for m in (b"ok1", b"bad", b"ok2"):
                b.send(m)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + TIMEOUT_S
            while len(seen) < 3 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert seen == [b"ok1", b"bad", b"ok2"]
            assert len(errors) == 1 and isinstance(errors[0], ValueError)
        finally:
            d.close()
            a.close(0)
            b.close(0)
            actx.term()

    asyncio.run(main())


def test_first_frame_comes_as_a_frame_naming_its_connection_and_the_rest_as_bytes():
    """The upload server learns each child's connection from its messages' first frame
    (ZMQ_SRCFD); the other frames stay plain copies (cheaper than tracked frames when small)."""
    async def main():
        ctx = zmq.asyncio.Context()
        router = plain_context(ctx).socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer = plain_context(ctx).socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        got: asyncio.Queue = asyncio.Queue()
        drain = Drain(router, got.put_nowait, first_frame=True)
        try:
            dealer.send_multipart([b"a", b"bc"])
            frames = await asyncio.wait_for(got.get(), TIMEOUT_S)
            assert isinstance(frames[0], zmq.Frame) and frames[0].get(zmq.SRCFD) > 0
            assert frames[1:] == [b"a", b"bc"]
        finally:
            drain.close()
            dealer.close(0)
            router.close(0)
            ctx.term()

    asyncio.run(main())
