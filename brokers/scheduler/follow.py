"""The scheduler's follower of cluster settings: the same Clone-pattern client as the daemon's
(brokers/manager/follow.py), on sockets of its own inside the scheduler's poll loop.

What it applies to the core (dfzmq/settings.py keys of role "scheduler"): parent scoring
weights, `max_parents` and `candidate_parents`. Each is the cluster's value when set, else the
scheduler's own (its config, or the built-in default for weights). The core reads them at the
next decision; nothing already decided is reshuffled. Never makes a scheduling decision.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import zmq

from brokers.manager.follow import Follower
from brokers.scheduler import scoring
from brokers.scheduler.core import SchedulerCore
from dfzmq import net, settings, wire
from dfzmq.service import Counters, decode_plain

log = logging.getLogger(__name__)


class SettingsFollower:
    def __init__(self, core: SchedulerCore, manager: str, ctx: zmq.Context, poller: zmq.Poller,
                 counters: Counters, curve: net.Curve | None = None) -> None:
        self.core, self.manager, self.ctx, self.poller = core, manager, ctx, poller
        self.counters, self.curve = counters, curve
        self.local = {"max_parents": core.max_parents, "candidate_parents": core.candidate_parents,
                      "weights": core.weights}
        self.follower = Follower(core.scheduler_id, "scheduler")
        self.dealer: zmq.Socket | None = None
        self.sub: zmq.Socket | None = None
        self.sub_addr = ""

    def next_deadline(self) -> float:
        return self.follower.next_deadline()

    def tend(self, events: dict, now: float) -> None:
        """Call once per loop turn with the poller's events."""
        for sock in (self.dealer, self.sub):
            if sock is not None and sock in events:
                self._drain(sock)
        if self.dealer is not None and self.follower.silent(now):
            self._close("dealer")
        if self.dealer is None:
            self.dealer = net.make_socket(self.ctx, "manager_dealer", self.curve)
            self.dealer.connect(net.tcp(self.manager))
            self.poller.register(self.dealer, zmq.POLLIN)
        self._send(self.follower.on_timer(now))
        addr = self.follower.events_addr
        if addr and addr != self.sub_addr:
            self._close("sub")
            self.sub_addr = addr
            self.sub = net.make_socket(self.ctx, "events_sub", self.curve)
            self.sub.connect(addr)
            self.poller.register(self.sub, zmq.POLLIN)
            self._send([wire.SyncRequest(self.core.scheduler_id, "scheduler")])

    def _drain(self, sock: zmq.Socket) -> None:
        for _ in range(100):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            msg = decode_plain(frames, self.counters)
            if msg is None:
                continue
            changed, _ = self.follower.on_message(msg, time.monotonic(), sock is self.dealer)
            if changed:
                self.apply(self.follower.config)

    def apply(self, cluster: dict[str, Any]) -> None:
        c = settings.valid(cluster, "scheduler")
        core = self.core
        core.max_parents = c.get("max_parents", self.local["max_parents"])
        core.candidate_parents = c.get("candidate_parents", self.local["candidate_parents"])
        base: scoring.Weights = self.local["weights"]
        core.weights = dataclasses.replace(base, **{
            f.name: c.get("weight_" + f.name, getattr(base, f.name)) for f in dataclasses.fields(base)})
        log.info("cluster settings applied: max_parents=%d candidate_parents=%d weights=%s",
                 core.max_parents, core.candidate_parents, core.weights)

    def _send(self, msgs: list) -> None:
        for m in msgs:
            try:
                self.dealer.send_multipart(wire.encode(m), flags=zmq.NOBLOCK)
            except zmq.Again:
                self.counters["dropped.manager"] += 1

    def _close(self, which: str) -> None:
        sock = getattr(self, which)
        if sock is not None:
            self.poller.unregister(sock)
            sock.close(linger=0)
            setattr(self, which, None)

    def close(self) -> None:
        self._close("dealer")
        self._close("sub")
