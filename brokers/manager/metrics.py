"""The manager's Prometheus metrics: members by role and state, requests, published updates.

Member gauges are rebuilt by the service loop (`update`, once per timer turn) and swapped in
whole; counters are read with one `dict()` call on the HTTP thread.
"""

from __future__ import annotations

import collections
from typing import Iterable

from brokers.manager.core import ROLES, ManagerCore
from prometheus_client.core import GaugeMetricFamily

from dfzmq.actions import Counters
from dfzmq.metrics import MetricsServer, counter, errors, gauge, prefixed


class ManagerMetrics:
    def __init__(self, addr: str, counters: Counters) -> None:
        self.counters = counters
        self.members: dict[str, int] = {}
        self.seq = 0
        self.server = MetricsServer(addr, self.collect)
        self.url = self.server.url

    def update(self, core: ManagerCore) -> None:
        by = collections.Counter(f"{m.role}/{m.state}" for m in core.members())
        self.members = {f"{r}/{s}": by.get(f"{r}/{s}", 0) for r in ROLES for s in ("up", "down")}
        self.seq = core.seq

    def collect(self) -> Iterable:
        c = dict(self.counters)
        members = self.members
        fam = GaugeMetricFamily("dfzmq_manager_members", "Registered members, by role and state.",
                                labels=["role", "state"])
        for key, n in sorted(members.items()):
            role, state = key.split("/")
            fam.add_metric([role, state], n)
        yield fam
        yield counter("dfzmq_manager_messages_total", "Messages received, by kind.",
                      prefixed(c, "recv."), "kind")
        yield counter("dfzmq_manager_cluster_updates_total",
                      "Membership changes published (ClusterUpdate).", c.get("published.update", 0))
        yield counter("dfzmq_manager_members_expired_total",
                      "Members declared down after missing heartbeats.", c.get("expired", 0))
        yield counter("dfzmq_manager_errors_total", "Things that went wrong, by kind.",
                      errors(c), "kind")
        yield gauge("dfzmq_manager_seq", "Sequence number of the cluster update stream.", self.seq)

    def close(self) -> None:
        self.server.close()
