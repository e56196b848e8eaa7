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

import importlib.metadata
import logging
import socket
import time
from typing import Any, Callable

import zmq

from brokers.manager.link import MemberLink
from brokers.scheduler.follow import SettingsFollower  # cluster settings from the manager
from brokers.scheduler.core import SchedulerCore
from brokers.scheduler.views import VIEW_REQUESTS, SchedulerViews
from dfzmq import net, wire
from dfzmq.config import SchedulerConfig
from dfzmq.ids import new_id
from dfzmq.service import Counters, StopFlag, decode_plain, decode_routed, dispatch

log = logging.getLogger(__name__)

MAX_POLL_MS = 100
BATCH = 1000  # messages drained per socket per turn, so timers and the other socket get a turn
# A turn of the loop (timers, one poll, one drain) longer than this is logged with where the
# time went: hosts drop a scheduler after `liveness` silent seconds, and an operator must be
# able to tell a scheduler that computed (core, views), one that was not given the CPU (the
# poll returned late) and a quiet network (neither).
SLOW_TURN_S = 1.0


def serve(cfg: SchedulerConfig, ctx: zmq.Context, stop: StopFlag,
          on_ready: Callable[[dict], None] | None = None,
          scheduler_id: str | None = None, *, curve: net.Curve | None = None) -> None:
    """Run a scheduler until `stop` is set. Raises ConfigError when it cannot listen."""
    sched = _Scheduler(cfg, ctx, scheduler_id or new_id("scheduler"), curve)
    try:
        addrs = sched.bind()
        log.info("scheduler %s serving peers at %s, events at %s, manager %s",
                 sched.core.scheduler_id, addrs["router"], addrs["pub"],
                 cfg.manager or "(none)")
        if cfg.metrics:
            from brokers.scheduler.metrics import SchedulerMetrics
            sched.metrics = SchedulerMetrics(cfg.metrics, sched.counters)
            addrs["metrics"] = sched.metrics.url
        if on_ready is not None:
            on_ready(addrs)
        sched.run(stop)
    finally:
        sched.close()
        log.info("scheduler %s stopped", sched.core.scheduler_id)


class _Scheduler:
    """The sockets, the core and the manager link of one running scheduler."""

    def __init__(self, cfg: SchedulerConfig, ctx: zmq.Context, scheduler_id: str,
                 curve: net.Curve | None = None) -> None:
        self.cfg, self.ctx, self.curve = cfg, ctx, curve
        self.counters = Counters()
        self.core = SchedulerCore(scheduler_id, cfg.heartbeat_interval_s, cfg.liveness,
                                  max_parents=cfg.max_parents,
                                  candidate_parents=cfg.candidate_parents,
                                  choose_free_steps=cfg.choose_free_steps,
                                  counters=self.counters)
        self.views = SchedulerViews(self.core, cfg.heartbeat_interval_s, _version())
        self.metrics = None
        self.poller = zmq.Poller()
        self.router = net.make_socket(ctx, "scheduler_router", curve)
        self.pub = net.make_socket(ctx, "events_pub", curve)
        self.accepted = net.AcceptedPriority([self.router, self.pub])  # before the first accept
        self.manager: zmq.Socket | None = None
        self.link: MemberLink | None = None
        self.settings: SettingsFollower | None = None  # cluster settings from the manager

    def bind(self) -> dict[str, str]:
        bound = net.bind(self.router, self.cfg.listen)
        pub_bound = net.bind(self.pub, net.with_port_offset(net.tcp(self.cfg.listen), 1))
        host = self.cfg.advertise or None
        addrs = {"router": net.advertise(bound, host), "pub": net.advertise(pub_bound, host),
                 "scheduler_id": self.core.scheduler_id}
        self.poller.register(self.router, zmq.POLLIN)
        for mon in self.accepted.sockets:
            self.poller.register(mon, zmq.POLLIN)
        if self.cfg.manager:
            member = wire.MemberInfo(member_id=self.core.scheduler_id, role="scheduler",
                                     addr=addrs["router"], events_addr=addrs["pub"],
                                     hostname=socket.gethostname(), version=_version())
            self.link = MemberLink(member, self.cfg.heartbeat_interval_s, self.cfg.liveness)
            self.settings = SettingsFollower(self.core, self.cfg.manager, self.ctx, self.poller,
                                             self.counters, self.curve)
        return addrs

    def run(self, stop: StopFlag) -> None:
        while not stop:
            now = time.monotonic()
            self._tend_manager(now)
            if now >= self.core.next_deadline():
                actions = self.core.handle_timer(now)
                self.views.observe(None, actions, now)
                dispatch(actions, self.router, self.pub, self.counters)
            t_core = time.monotonic()
            if now >= self.views.next_deadline():
                try:
                    dispatch(self.views.handle_timer(now), self.router, self.pub, self.counters)
                    if self.metrics is not None:
                        self.metrics.update(self.views)
                except Exception:  # what operators see must never stop the scheduling
                    self.counters["internal-error"] += 1
                    log.exception("scheduler views failed")
            deadline = min(self.core.next_deadline(), self.views.next_deadline())
            if self.link is not None:
                deadline = min(deadline, self.link.next_deadline())
            t_views = time.monotonic()
            wait_ms = int(min(MAX_POLL_MS, max(0.0, (deadline - t_views) * 1000)) + 1)
            events = dict(self.poller.poll(wait_ms))
            t_poll = time.monotonic()
            handled = self._drain_router() if self.router in events else 0
            if self.manager is not None and self.manager in events:
                self._drain_manager()
            if self.settings is not None:
                self.settings.tend(events, time.monotonic())
            self.accepted.tend(events)
            end = time.monotonic()
            if end - now > SLOW_TURN_S:
                self._slow_turn(end - now, t_core - now, t_views - t_core,
                                t_poll - t_views - wait_ms / 1000, end - t_poll, handled)

    def _slow_turn(self, total: float, core: float, views: float, late: float,
                   drain: float, handled: int) -> None:
        self.counters["loop.slow-turns"] += 1
        self.counters["loop.slow-ms"] += int(total * 1000)
        log.warning("scheduler loop turn took %.2fs: timers %.2fs, views %.2fs, poll %.2fs "
                    "past its timeout, %d messages %.2fs", total, core, views, max(0.0, late),
                    handled, drain)

    def _tend_manager(self, now: float) -> None:
        """Paranoid Pirate towards the manager: heartbeat, and a fresh socket when it is silent."""
        link = self.link
        if link is None:
            return
        if link.reconnect_due(now) and self.manager is not None:
            self.poller.unregister(self.manager)
            self.manager.close(linger=0)
            self.manager = None
        if self.manager is None and now >= link.retry_at:
            self.manager = net.make_socket(self.ctx, "manager_dealer", self.curve)
            self.manager.connect(net.tcp(self.cfg.manager))
            self.poller.register(self.manager, zmq.POLLIN)
            self._send_manager(link.start(now))
        if self.manager is not None:
            self._send_manager(link.on_timer(now))

    def _drain_router(self) -> int:
        """Handle up to BATCH waiting messages; returns how many were read."""
        for n in range(BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return n
            decoded = decode_routed(frames, self.counters)
            if decoded is None:
                continue
            ident, msg = decoded
            now = time.monotonic()
            try:
                if isinstance(msg, VIEW_REQUESTS):
                    actions = self.views.handle(ident, msg, now)
                else:
                    actions = self.core.handle(ident, msg, now)
                    self.views.observe(msg, actions, now)
            except Exception:
                # The core answers bad requests itself; an exception here is our bug. One
                # peer's message must not take the scheduler (and every download) down.
                self.counters["internal-error"] += 1
                log.exception("scheduler core failed on %s", type(msg).__name__)
                continue
            dispatch(actions, self.router, self.pub, self.counters)
        return BATCH

    def _drain_manager(self) -> None:
        assert self.manager is not None and self.link is not None
        for _ in range(BATCH):
            try:
                frames = self.manager.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = decode_plain(frames, self.counters)
            if msg is not None:
                self._send_manager(self.link.on_message(msg, time.monotonic()))

    def _send_manager(self, msgs: list[Any]) -> None:
        assert self.manager is not None
        for msg in msgs:
            try:
                self.manager.send_multipart(wire.encode(msg), flags=zmq.NOBLOCK)
                self.counters["sent.manager." + type(msg).KIND.decode()] += 1
            except zmq.Again:
                # Not connected yet, or the pipe is full: the link repeats itself on its timer.
                self.counters["dropped.manager"] += 1

    def close(self) -> None:
        self.accepted.close()
        if self.settings is not None:
            self.settings.close()
        if self.link is not None and self.manager is not None and self.link.registered:
            # A goodbye spares the manager a liveness timeout; a short linger lets it leave.
            self._send_manager(self.link.leave())
            self.manager.close(linger=200)
            self.manager = None
        for sock in (self.router, self.pub, self.manager):
            if sock is not None:
                sock.close(linger=0)
        if self.metrics is not None:
            self.metrics.close()


def _version() -> str:
    try:
        return importlib.metadata.version("dfzmq")
    except importlib.metadata.PackageNotFoundError:
        return ""
