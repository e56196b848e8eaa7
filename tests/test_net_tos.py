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
