"""dfzmq/net.py marks control sockets low-delay (IP TOS 0x10) and leaves piece uploads best
effort, so a host whose uplink is full of uploads still gets its requests and acks out."""

from __future__ import annotations

import zmq

from dfzmq import net


def test_control_sockets_ask_for_low_delay_and_uploads_do_not():
    ctx = zmq.Context()
    try:
        for role in net.ROLES:
            sock = net.make_socket(ctx, role)
            try:
                want = 0 if role in net.BULK_ROLES else net.LOW_DELAY_TOS
                assert sock.getsockopt(zmq.TOS) == want, role
            finally:
                sock.close(0)
        assert "upload_router" in net.BULK_ROLES and "parent_dealer" not in net.BULK_ROLES
    finally:
        ctx.term()


def test_accepted_priority_closed_leaves_the_context_working():
    """After close(), a connection to the watched socket must not stall libzmq's I/O thread
    (a monitor still writing into a pipe nobody reads): another pair on the context still talks."""
    ctx = zmq.Context()
    watched = ctx.socket(zmq.ROUTER)
    late = []
    try:
        accepted = net.AcceptedPriority([watched])
        port = watched.bind_to_random_port("tcp://127.0.0.1")
        accepted.close()
        assert accepted.sockets == []
        for _ in range(3):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(f"tcp://127.0.0.1:{port}")
            late.append(d)
        c1, c2 = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        late += [c1, c2]
        p = c1.bind_to_random_port("tcp://127.0.0.1")
        c2.connect(f"tcp://127.0.0.1:{p}")  # a TCP pair: its traffic goes through the I/O thread
        c2.send(b"still alive")
        assert c1.poll(10000), "the I/O thread stalled after AcceptedPriority.close()"
        assert c1.recv() == b"still alive"
    finally:
        for s in (*late, watched):
            s.close(0)
        ctx.term()
