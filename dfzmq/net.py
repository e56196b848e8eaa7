"""The one socket factory: every ZeroMQ socket of dfzmq is made here, named by its role.

It sets linger, high-water marks, MAXMSGSIZE, reconnect intervals, TCP keepalive and, when a
cluster is configured with CURVE keys, encryption. Library code passes its own Context in
(never `Context.instance()`), so tests can create and destroy many services in one process.

CURVE: every server socket (ROUTER, PUB) of a cluster uses the cluster's server key pair;
every client socket (DEALER, SUB) knows the server public key and makes a fresh key pair.
That encrypts every link; authenticating clients (a ZAP handler with an allow list) plugs in
here later without touching the services.
"""

from __future__ import annotations

import dataclasses
import os
import socket as pysocket

import zmq
import zmq.utils.monitor

from dfzmq.errors import ConfigError

# Largest frame a socket accepts: a piece (at most 16 MiB) plus headroom. Bigger frames are
# dropped by libzmq before they reach our code (the peer is disconnected).
MAX_MSG_BYTES = 40 * 1024 * 1024

ROLES: dict[str, int] = {
    # manager
    "manager_router": zmq.ROUTER,
    "manager_pub": zmq.PUB,
    "manager_dealer": zmq.DEALER,
    # scheduler
    "scheduler_router": zmq.ROUTER,
    "scheduler_dealer": zmq.DEALER,
    "events_pub": zmq.PUB,
    "events_sub": zmq.SUB,
    # peer daemon
    "upload_router": zmq.ROUTER,
    "parent_dealer": zmq.DEALER,
    "control_router": zmq.ROUTER,
    "control_dealer": zmq.DEALER,
}

SERVER_TYPES = (zmq.ROUTER, zmq.PUB)

# Control traffic asks IP for low delay (TOS 0x10, what interactive ssh used): requests,
# heartbeats, HAVEs to the scheduler and the TCP acks of our downloads then pass bulk piece
# uploads in any queue that honours it (Linux's pfifo_fast, many routers). A host whose uplink
# is full of uploads otherwise delays its own piece requests and acks by seconds, and its
# downloads crawl (issue 3, measured in the network lab). Piece uploads go in the bulk band
# (nodes/uplink.py BULK_PRIORITY), but for the neediest child of a queuing uplink.
LOW_DELAY_TOS = 0x10
BULK_ROLES = frozenset({"upload_router"})
# The queue priority Linux gives a socket with TOS 0x10 (TC_PRIO_INTERACTIVE): what pfifo_fast
# and prio qdiscs sort by, rather than the TOS byte itself. See AcceptedPriority.
LOW_DELAY_PRIORITY = 6


@dataclasses.dataclass(frozen=True, slots=True)
class Curve:
    """CURVE keys of a cluster (Z85 text). Servers need both; clients need `public` only."""

    public: bytes
    secret: bytes = b""


def make_socket(ctx: zmq.Context, role: str, curve: Curve | None = None) -> zmq.Socket:
    """A socket of `role` (see ROLES) with the house options set."""
    try:
        kind = ROLES[role]
    except KeyError:
        raise ConfigError(f"unknown socket role {role!r}") from None
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_BYTES)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
    if role not in BULK_ROLES:
        sock.setsockopt(zmq.TOS, LOW_DELAY_TOS)
    if kind == zmq.PUB:
        # Monitors that fall behind lose updates rather than stall the publisher.
        sock.setsockopt(zmq.SNDHWM, 10000)
    elif kind == zmq.ROUTER:
        sock.setsockopt(zmq.SNDHWM, 20000)
        sock.setsockopt(zmq.RCVHWM, 20000)
    else:
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.SUBSCRIBE, b"")
    if curve is not None:
        if kind in SERVER_TYPES:
            if not curve.secret:
                raise ConfigError(f"{role}: CURVE server socket needs the secret key")
            sock.curve_secretkey = curve.secret
            sock.curve_publickey = curve.public
            sock.curve_server = True
        else:
            pub, sec = zmq.curve_keypair()
            sock.curve_secretkey = sec
            sock.curve_publickey = pub
            sock.curve_serverkey = curve.public
    return sock


class AcceptedPriority:
    """Gives the TCP connections a server socket accepts the low-delay queue priority.

    Linux sorts a host's outgoing queue (pfifo_fast, prio) by the socket's priority, which
    setting IP_TOS also sets, but an accepted connection inherits only the listener's TOS byte
    and starts at priority 0, and libzmq's own IP_TOS on it, the same value again, changes
    nothing. So the scheduler's and the manager's answers queued behind bulk piece uploads
    leaving the same host: measured in the lab (N=32, 6 Mbit/s origin site), seconds behind
    the seed's data, until daemons gave the scheduler up as silent. A monitor socket reports
    each accepted descriptor, and its priority is set here (0-6 need no privilege).

    A service registers `sockets` with its poller and calls `tend` every turn. The few
    messages before the event is read go at priority 0. Should a connection close and its
    descriptor be reused before the event is read, another socket of this service gets the
    low-delay priority: brokers have no bulk sockets, so that costs nothing."""

    def __init__(self, socks: list[zmq.Socket]) -> None:
        self._watched = list(socks)
        self.sockets = [s.get_monitor_socket(zmq.EVENT_ACCEPTED) for s in socks]

    def tend(self, events: dict | None = None) -> None:
        for mon in self.sockets:
            if events is not None and mon not in events:
                continue
            while True:
                try:
                    frames = mon.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                event = zmq.utils.monitor.parse_monitor_message(frames)
                if event["event"] == zmq.EVENT_ACCEPTED:
                    set_low_delay_priority(event["value"])

    def close(self) -> None:
        self.tend()
        for sock, mon in zip(self._watched, self.sockets):
            stop_monitor(sock, mon)
        self.sockets, self._watched = [], []


def dup_socket(fd: int) -> pysocket.socket:
    """A socket object on a duplicate of ZeroMQ's descriptor `fd` (closing it leaves ZeroMQ's
    open). Raises OSError when `fd` is closed or is not a socket (a reused descriptor)."""
    dup = os.dup(fd)
    try:
        return pysocket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        raise


def stop_monitor(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Stop `sock`'s monitor, then close its reader `monitor`, once the caller has read what was
    waiting (disable_monitor's last event must find room in the pipe). In the other order an
    event after the reader is gone stalls libzmq's I/O thread, every socket of the context."""
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(0)


def set_low_delay_priority(fd: int) -> None:
    """Give the socket behind descriptor `fd` (which stays open) the low-delay priority."""
    try:
        with dup_socket(fd) as sock:
            sock.setsockopt(pysocket.SOL_SOCKET, pysocket.SO_PRIORITY, LOW_DELAY_PRIORITY)
    except OSError:  # gone already, or not a socket (the descriptor was reused)
        pass


async def recv_burst(sock, copy: bool = True, limit: int = 256) -> list[list]:
    """Await one message on an asyncio socket, then take whatever else is already queued without
    awaiting: a future per message costs several times the message itself (measured: 7x on
    small frames), and pieces and HAVEs arrive in bursts."""
    burst = [await sock.recv_multipart(copy=copy)]
    if limit <= 1:
        return burst
    shadow = zmq.Socket.shadow(sock.underlying)  # a plain wrapper of the same socket: cheap
    while len(burst) < limit:
        try:
            burst.append(shadow.recv_multipart(zmq.NOBLOCK, copy=copy))
        except zmq.Again:
            break
    return burst


def tcp(host_port: str) -> str:
    """'HOST:PORT' (or a full endpoint) to a ZeroMQ endpoint. Port 0 means any free port."""
    if "://" in host_port:
        return host_port
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"expected HOST:PORT, got {host_port!r}")
    host = host.strip("[]") or "0.0.0.0"
    return f"tcp://{host}:{'*' if int(port) == 0 else port}"


def bind(sock: zmq.Socket, addr: str) -> str:
    """Bind to `addr` ('HOST:PORT', tcp:// or ipc://) and return the endpoint actually bound."""
    endpoint = tcp(addr)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        raise ConfigError(f"cannot listen on {addr}: {e}") from e
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def advertise(bound: str, host: str | None = None) -> str:
    """The endpoint others should connect to: wildcard hosts are replaced by `host`."""
    if not bound.startswith("tcp://"):
        return bound
    bhost, _, port = bound[len("tcp://") :].rpartition(":")
    if host:
        bhost = host
    elif bhost in ("0.0.0.0", "*", "::", "[::]"):
        bhost = default_host()
    return f"tcp://{bhost}:{port}"


def default_host() -> str:
    """This host's address as others would reach it (best effort, no traffic sent)."""
    try:
        return pysocket.gethostbyname(pysocket.gethostname())
    except OSError:
        return "127.0.0.1"


def tcp_port(endpoint: str) -> int:
    """The port of a bound tcp:// endpoint; 0 for anything else (ipc://, inproc://)."""
    if not endpoint.startswith("tcp://"):
        return 0
    port = endpoint.rpartition(":")[2]
    return int(port) if port.isdigit() else 0


def with_port_offset(endpoint: str, offset: int) -> str:
    """tcp://h:p -> tcp://h:(p+offset); '*' stays '*'. Used for a service's second socket."""
    if not endpoint.startswith("tcp://"):
        return endpoint + f".{offset}"
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if port == "*":
        return endpoint
    return f"tcp://{host}:{int(port) + offset}"
