"""Operators' client side: ask the manager and the schedulers for their state, over ZeroMQ.

Used by every operator command: `AdminConfig` (TOML section [admin]) and `request` serve
`dfzmq config|jobs|preheat|cache` (dfzmq/cli_ops.py) as well. The admin commands
(`dfzmq hosts|tasks|task`) and `dfzmq monitor --once` gather the cluster's state: a
ClusterSnapshot from the manager says which schedulers exist, then each scheduler that is up
is asked for its SchedulerState, all at once, each answer (or its absence) going into a
`MonitorState`. A scheduler that does not answer is reported, not fatal; a manager that does not
answer is an UnavailableError (exit 4).

Each request uses a fresh DEALER (linger 0), so a dead server costs only its timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from dfzmq import net, wire
from dfzmq.config import DEFAULT_MANAGER, load_toml, resolve
from dfzmq.errors import ConfigError, DfzmqError, RemoteProtocolError, UnavailableError
from dfzmq.monitor_state import MonitorState


@dataclass(slots=True)
class AdminConfig:
    """Settings of the operators' commands (flag > DFZMQ_* > TOML [admin] or top level)."""

    manager: str = DEFAULT_MANAGER
    timeout_s: float = 3.0  # per request to the manager and to each scheduler
    curve_public: str = ""
    curve_secret: str = ""


def admin_config(manager: str | None, timeout_s: float | None, config: Path | None) -> AdminConfig:
    """Raises ConfigError."""
    return resolve(AdminConfig, "admin", {"manager": manager, "timeout_s": timeout_s},
                   load_toml(config))


class Refused(DfzmqError):
    """The manager or daemon answered with an error (its wire.Error code in `code`)."""

    def __init__(self, detail: str, code: str = "") -> None:
        super().__init__(detail)
        self.code = code


def request(addr: str, msg: Any, curve: net.Curve | None = None, timeout_s: float = 3.0) -> Any:
    """One request, one answer, for commands that need it: silence (or a malformed answer) is
    an UnavailableError, a wire.Error is raised (ConfigError for bad requests, else Refused)."""
    ctx = zmq.Context()
    try:
        reply = ask(ctx, addr, msg, timeout_s, curve)
    finally:
        ctx.destroy(linger=0)
    if reply is None:
        raise UnavailableError(f"no answer from {net.tcp(addr)} within {timeout_s:.0f}s")
    if isinstance(reply, wire.Error):
        if reply.code == "bad-request":
            raise ConfigError(reply.detail or reply.code)
        raise Refused(reply.detail or reply.code, reply.code)
    return reply


def ask(ctx: zmq.Context, addr: str, msg: Any, timeout_s: float,
        curve: net.Curve | None = None) -> Any | None:
    """One request, one reply (None on timeout or a malformed answer)."""
    return ask_many(ctx, {addr: (addr, msg)}, timeout_s, curve).get(addr)


def ask_many(ctx: zmq.Context, requests: dict[str, tuple[str, Any]], timeout_s: float,
             curve: net.Curve | None = None) -> dict[str, Any]:
    """{key: reply} for requests {key: (addr, msg)} sent in parallel; missing keys timed out."""
    socks: dict[zmq.Socket, str] = {}
    poller = zmq.Poller()
    replies: dict[str, Any] = {}
    try:
        for key, (addr, msg) in requests.items():
            sock = net.make_socket(ctx, "control_dealer", curve)
            sock.connect(net.tcp(addr))
            sock.send_multipart(wire.encode(msg))
            socks[sock] = key
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        waiting = len(socks)
        while waiting:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            for sock, _ in poller.poll(left_ms):
                waiting -= 1
                poller.unregister(sock)
                try:
                    replies[socks[sock]] = wire.decode(sock.recv_multipart())
                except RemoteProtocolError:
                    pass  # a malformed answer counts as none
    finally:
        for sock in socks:
            sock.close(0)
    return replies


def gather(manager: str, curve: net.Curve | None = None, timeout_s: float = 3.0) -> MonitorState:
    """The cluster as the manager and every scheduler that is up describe it now."""
    ctx = zmq.Context()
    try:
        addr = net.tcp(manager)
        state = MonitorState(addr, time.monotonic())
        snap = ask(ctx, addr, wire.SnapshotRequest(), timeout_s, curve)
        if not isinstance(snap, wire.ClusterSnapshot):
            raise UnavailableError(f"manager at {manager} is not answering")
        state.on_manager_snapshot(snap, time.monotonic())
        live = {k: s for k, s in state.schedulers.items() if not s.down}
        replies = ask_many(ctx, {k: (s.addr, wire.StateRequest()) for k, s in live.items()},
                           timeout_s, curve)
        for key, reply in replies.items():
            if isinstance(reply, wire.SchedulerState):
                state.on_scheduler_state(key, reply, time.monotonic())
        return state
    finally:
        ctx.destroy(linger=0)


def find_task(manager: str, ref: str, curve: net.Curve | None = None,
              timeout_s: float = 3.0) -> list[wire.TaskDetail]:
    """Every scheduler's detail of the task `ref` (an id or a unique prefix), most peers first.
    Raises DfzmqError when no scheduler knows it or the prefix is ambiguous."""
    state = gather(manager, curve, timeout_s)
    ctx = zmq.Context()
    try:
        live = {k: s for k, s in state.schedulers.items() if not s.down and s.answered}
        replies = ask_many(ctx, {k: (s.addr, wire.TaskRequest(ref)) for k, s in live.items()},
                           timeout_s, curve)
    finally:
        ctx.destroy(linger=0)
    found = [r for r in replies.values() if isinstance(r, wire.TaskDetail)]
    errors = [r for r in replies.values() if isinstance(r, wire.Error)]
    if not found:
        if any(e.code in ("ambiguous", "bad-request") for e in errors):
            raise DfzmqError(next(e.detail for e in errors if e.code in ("ambiguous", "bad-request")))
        raise DfzmqError(f"no scheduler knows task {ref!r}")
    ids = {d.task.task_id for d in found}
    if len(ids) > 1:
        raise DfzmqError(f"{len(ids)} tasks match {ref!r} on different schedulers")
    return sorted(found, key=lambda d: -d.task.peers)
