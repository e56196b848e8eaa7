"""dfzmq/net.py on real sockets: endpoints, and recv_burst never loses a wake-up."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import zmq
import zmq.asyncio

from dfzmq import net
from dfzmq.errors import ConfigError


def test_endpoints():
    assert net.tcp("127.0.0.1:0") == "tcp://127.0.0.1:*"
    assert net.tcp(":8900") == "tcp://0.0.0.0:8900"
    assert net.tcp("ipc:///x") == "ipc:///x"
    with pytest.raises(ConfigError):
        net.tcp("nohost")
    assert net.advertise("tcp://0.0.0.0:5", "10.0.0.1") == "tcp://10.0.0.1:5"
    assert net.with_port_offset("tcp://h:10", 1) == "tcp://h:11"
    assert net.tcp_port("tcp://0.0.0.0:42241") == 42241 and net.tcp_port("tcp://[::1]:7") == 7
    assert net.tcp_port("ipc:///tmp/x.sock") == 0


def test_recv_burst_takes_queued_messages_and_never_stalls():
    async def main() -> tuple[int, float, int]:
        ctx = zmq.asyncio.Context()
        router = net.make_socket(ctx, "upload_router")
        addr = net.bind(router, "127.0.0.1:0")
        dealer = net.make_socket(ctx, "parent_dealer")
        dealer.connect(addr)
        rng = random.Random(1)
        n, got, worst, biggest = 2000, 0, 0.0, 0

        async def send() -> None:
            for _ in range(n):
                await dealer.send_multipart([str(time.monotonic()).encode()])
                if rng.random() < 0.3:  # bursts and pauses, so some receives find an empty queue
                    await asyncio.sleep(rng.random() * 0.003)

        sender = asyncio.create_task(send())
        try:
            while got < n:
                burst = await asyncio.wait_for(net.recv_burst(router), 5.0)
                now = time.monotonic()
                biggest = max(biggest, len(burst))
                for frames in burst:
                    worst = max(worst, now - float(frames[1]))
                    got += 1
        finally:
            sender.cancel()
            router.close(0)
            dealer.close(0)
            ctx.term()
        return got, worst, biggest

    got, worst, biggest = asyncio.run(main())
    assert got == 2000
    assert biggest > 1  # queued messages were taken without awaiting
    assert worst < 2.0  # no lost wake-up (a stall would show as seconds)
