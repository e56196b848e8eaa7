"""The scheduler's socket service: a synchronous poll loop around `SchedulerCore`.

Sockets: a ROUTER for peer daemons (and tools asking for stats), an events PUB one port above
it (ephemeral when the ROUTER's is), and a DEALER to the manager driven by `MemberLink`
(register, heartbeat, reconnect with backoff). The scheduler keeps serving peers while the
manager is away; the manager only tells peers where schedulers are.

This module must never make scheduling decisions (the core does) or crash on remote input:
frames that do not decode are counted (`dropped.bad-frame`) and dropped before the core
sees them. `time.monotonic()` is the only clock; the loop never sleeps longer than 100 ms.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import zmq

from brokers.manager.link import MemberLink
from brokers.scheduler.core import SchedulerCore
from dfzmq import __version__ as _version
from dfzmq import net, wire
from dfzmq.config import SchedulerConfig
from dfzmq.ids import new_id
from dfzmq.service import Counters, StopFlag, decode_plain, decode_routed, dispatch

log = logging.getLogger(__name__)

MAX_POLL_MS = 100
BATCH = 1000  # messages drained per socket per turn, so timers and the other socket get a turn


def serve(cfg: SchedulerConfig, ctx: zmq.Context, stop: StopFlag,
          on_ready: Callable[[dict], None] | None = None,
          scheduler_id: str | None = None) -> None:
    """Run a scheduler until `stop` is set. Raises ConfigError when it cannot listen."""
    sid = scheduler_id or new_id("scheduler")
    counters = Counters()
    core = SchedulerCore(sid, cfg.heartbeat_interval_s, cfg.liveness,
                         max_parents=cfg.max_parents, candidate_parents=cfg.candidate_parents,
                         counters=counters)
    router = net.make_socket(ctx, "scheduler_router")
    pub = net.make_socket(ctx, "events_pub")
    manager: zmq.Socket | None = None
    try:
        bound = net.bind(router, cfg.listen)
        pub_bound = net.bind(pub, net.with_port_offset(net.tcp(cfg.listen), 1))
        host = cfg.advertise or None
        router_addr, pub_addr = net.advertise(bound, host), net.advertise(pub_bound, host)
        link = None
        if cfg.manager:
            link = MemberLink(
                wire.MemberInfo(member_id=sid, role="scheduler", addr=router_addr,
                                events_addr=pub_addr, hostname=_hostname(),
                                version=_version),
                cfg.heartbeat_interval_s, cfg.liveness)
        log.info("scheduler %s serving peers at %s, events at %s, manager %s",
                 sid, router_addr, pub_addr, cfg.manager or "(none)")
        if on_ready is not None:
            on_ready({"router": router_addr, "pub": pub_addr, "scheduler_id": sid})
        manager = _loop(cfg, ctx, stop, core, link, router, pub, counters)
    finally:
        for sock in (router, pub, manager):
            if sock is not None:
                sock.close(linger=0)
        log.info("scheduler %s stopped", sid)


def _loop(cfg: SchedulerConfig, ctx: zmq.Context, stop: StopFlag, core: SchedulerCore,
          link: MemberLink | None, router: zmq.Socket, pub: zmq.Socket,
          counters: Counters) -> zmq.Socket | None:
    """The poll loop; returns the manager socket it holds at the end (for closing)."""
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    manager: zmq.Socket | None = None
    try:
        while not stop:
            now = time.monotonic()
            if link is not None:
                if link.reconnect_due(now) and manager is not None:
                    poller.unregister(manager)
                    manager.close(linger=0)
                    manager = None
                if manager is None and now >= link.retry_at:
                    manager = net.make_socket(ctx, "manager_dealer")
                    manager.connect(net.tcp(cfg.manager))
                    poller.register(manager, zmq.POLLIN)
                    _send_manager(manager, link.start(now), counters)
                if manager is not None:
                    _send_manager(manager, link.on_timer(now), counters)
            if now >= core.next_deadline():
                dispatch(core.handle_timer(now), router, pub, counters)
            deadline = core.next_deadline()
            if link is not None:
                deadline = min(deadline, link.next_deadline())
            timeout_ms = int(min(MAX_POLL_MS, max(0.0, (deadline - time.monotonic()) * 1000)))
            events = dict(poller.poll(timeout_ms))
            if router in events:
                _drain_router(router, pub, core, counters)
            if manager is not None and manager in events and link is not None:
                for _ in range(BATCH):
                    try:
                        frames = manager.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg = decode_plain(frames, counters)
                    if msg is not None:
                        _send_manager(manager, link.on_message(msg, time.monotonic()),
                                      counters)
    except BaseException:
        if manager is not None:
            manager.close(linger=0)
        raise
    return manager


def _drain_router(router: zmq.Socket, pub: zmq.Socket, core: SchedulerCore,
                  counters: Counters) -> None:
    for _ in range(BATCH):
        try:
            frames = router.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        decoded = decode_routed(frames, counters)
        if decoded is None:
            continue
        ident, msg = decoded
        try:
            actions = core.handle(ident, msg, time.monotonic())
        except Exception:
            # The core answers bad requests itself; an exception here is our bug. One peer's
            # message must not take the scheduler (and every download) down with it.
            counters["internal-error"] += 1
            log.exception("scheduler core failed on %s", type(msg).__name__)
            continue
        dispatch(actions, router, pub, counters)


def _send_manager(sock: zmq.Socket, msgs: list[Any], counters: Counters) -> None:
    for msg in msgs:
        try:
            sock.send_multipart(wire.encode(msg), flags=zmq.NOBLOCK)
            counters["sent.manager." + type(msg).KIND.decode()] += 1
        except zmq.Again:
            # Nobody connected yet (or the pipe is full): the link re-sends on its timer.
            counters["dropped.manager"] += 1


def _hostname() -> str:
    import socket

    return socket.gethostname()
