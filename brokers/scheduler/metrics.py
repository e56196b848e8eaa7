"""The scheduler's Prometheus metrics: what it decided, what it holds, what went wrong.

Values come from the service's Counters (read with one `dict()` call on the HTTP thread) and from
`SchedulerViews.gauges()`, which the service loop rebuilds once per interval and swaps in whole.
"""

from __future__ import annotations

from typing import Iterable

from brokers.scheduler.views import SchedulerViews
from dfzmq.actions import Counters
from dfzmq.metrics import MetricsServer, counter, errors, gauge, prefixed

# What the scheduler told peers, by the message that carried the decision.
DECISIONS = {"PEER_PARENTS": "parents", "BACK_TO_SOURCE": "back_to_source",
             "SEED_TRIGGER": "seed_trigger", "TASK_FAILED": "task_failed"}


class SchedulerMetrics:
    def __init__(self, addr: str, counters: Counters) -> None:
        self.counters = counters
        self.gauges: dict = {}
        self.server = MetricsServer(addr, self.collect)
        self.task_duration = self.server.histogram(
            "dfzmq_scheduler_task_duration_seconds",
            "Time from a task's first registration to its first complete copy.")
        self.url = self.server.url

    def update(self, views: SchedulerViews) -> None:
        """On the service loop: fresh gauges, and the task durations seen since last time."""
        self.gauges = views.gauges()
        while views.durations:
            self.task_duration.observe(views.durations.popleft())

    def collect(self) -> Iterable:
        c = dict(self.counters)
        g = self.gauges
        sent = prefixed(c, "sent.")
        yield counter("dfzmq_scheduler_decisions_total", "Scheduling decisions sent to peers.",
                      {v: sent.get(k, 0) for k, v in DECISIONS.items()}, "decision")
        yield counter("dfzmq_scheduler_back_to_source_total",
                      "Peers sent to read the origin themselves.", c.get("back-to-source", 0))
        yield counter("dfzmq_scheduler_reschedules_total", "Reschedule requests from peers.",
                      c.get("reschedule", 0))
        yield counter("dfzmq_scheduler_parents_blocked_total",
                      "Parents blocked for a task after serving corrupt bytes.",
                      c.get("parent-blocked", 0))
        yield counter("dfzmq_scheduler_hosts_expired_total",
                      "Hosts dropped after `liveness` silent heartbeat intervals.",
                      c.get("host-expired", 0))
        yield counter("dfzmq_scheduler_slow_loop_turns_total",
                      "Service loop turns over a second (logged with where the time went).",
                      c.get("loop.slow-turns", 0))
        yield counter("dfzmq_scheduler_messages_total", "Messages received, by kind.",
                      prefixed(c, "recv."), "kind")
        yield counter("dfzmq_scheduler_errors_total", "Things that went wrong, by kind.",
                      errors(c), "kind")
        if g:
            yield gauge("dfzmq_scheduler_hosts", "Hosts connected, by type.", g["hosts"], "type")
            yield gauge("dfzmq_scheduler_tasks", "Tasks known, by state.", g["tasks"], "state")
            yield gauge("dfzmq_scheduler_peers", "Peers, by state.", g["peers"], "state")
            yield counter("dfzmq_scheduler_reported_bytes_total",
                          "Piece bytes peers reported, by where they came from.",
                          g["report_bytes"], "source")
            yield gauge("dfzmq_scheduler_seq", "Sequence number of the events stream.", g["seq"])

    def close(self) -> None:
        self.server.close()
