"""A peer daemon's Prometheus metrics and the traffic summary it sends its schedulers.

Bytes by source (`origin`, `parent`), bytes and pieces served to other peers, task durations
(a histogram, by result), active tasks, limiter waits and errors by kind. Everything is read
from the daemon's own counters: `bytes.<source>` / `pieces.<source>` (nodes/task.py counts
every stored piece), the upload server's totals and the token buckets' waits. The HTTP server
calls `collect()` on its own thread, which only reads ints and copies the Counters with one
`dict()` call; task durations are observed on the event loop when a run ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Iterable

from dfzmq import wire
from dfzmq.metrics import MetricsServer, counter, errors, gauge

if TYPE_CHECKING:
    from nodes.daemon import Daemon
    from nodes.task import TaskRun

PARENT_SOURCES = ("seed", "peer")  # a seed peer is a parent like any other


def traffic(counters: dict) -> dict[str, int]:
    """Bytes and pieces received, by source (origin or parent), from a copy of the counters."""
    return {
        "origin_bytes": counters.get("bytes.origin", 0),
        "parent_bytes": sum(counters.get(f"bytes.{s}", 0) for s in PARENT_SOURCES),
        "origin_pieces": counters.get("pieces.origin", 0),
        "parent_pieces": sum(counters.get(f"pieces.{s}", 0) for s in PARENT_SOURCES),
    }


def host_stats(d: "Daemon") -> wire.HostStats:
    t = traffic(dict(d.counters))
    return wire.HostStats(d.host_id, down_bytes=t["origin_bytes"] + t["parent_bytes"],
                          origin_bytes=t["origin_bytes"], up_bytes=d.upload.bytes_uploaded,
                          pieces_served=d.counters.get("upload.pieces", 0),
                          tasks_active=len(d.tasks))


class DaemonMetrics:
    def __init__(self, d: "Daemon", addr: str) -> None:
        self.d = d
        self.server = MetricsServer(addr, self.collect)
        self.url = self.server.url
        self.task_duration = self.server.histogram(
            "dfzmq_daemon_task_duration_seconds",
            "Time a task ran on this daemon, from start to its end, by result.", ("result",))

    def watch(self, run: "TaskRun") -> None:
        """Observe the run's duration when it ends (on the event loop)."""
        def ended(fut: asyncio.Future) -> None:
            ok = not fut.cancelled() and fut.exception() is None
            self.task_duration.labels("succeeded" if ok else "failed").observe(
                time.monotonic() - started)
        started = time.monotonic()
        run.done.add_done_callback(ended)

    def collect(self) -> Iterable:
        d = self.d
        if getattr(d, "upload", None) is None:
            return  # scraped while the daemon is still starting
        c = dict(d.counters)
        t = traffic(c)
        yield counter("dfzmq_daemon_bytes_total", "Piece bytes received, by source.",
                      {"origin": t["origin_bytes"], "parent": t["parent_bytes"]}, "source")
        yield counter("dfzmq_daemon_pieces_total", "Pieces received and verified, by source.",
                      {"origin": t["origin_pieces"], "parent": t["parent_pieces"]}, "source")
        yield counter("dfzmq_daemon_uploaded_bytes_total", "Piece bytes served to other peers.",
                      d.upload.bytes_uploaded)
        yield counter("dfzmq_daemon_pieces_served_total", "Pieces served to other peers.",
                      c.get("upload.pieces", 0))
        yield counter("dfzmq_daemon_tasks_failed_total", "Tasks that failed on this daemon.",
                      c.get("task.failed", 0))
        yield gauge("dfzmq_daemon_tasks_active", "Tasks downloading now.", len(d.tasks))
        yield gauge("dfzmq_daemon_schedulers_up", "Schedulers this daemon is connected to.",
                    sum(1 for link in list(d.links.values()) if link.alive))
        yield counter("dfzmq_daemon_limiter_wait_seconds_total",
                      "Time transfers waited for a bandwidth limiter, by limiter.",
                      {"upload": d.upload.bucket.waited_s, "download": d.download_bucket.waited_s,
                       "source": d.source_bucket.waited_s}, "limiter")
        yield counter("dfzmq_daemon_errors_total", "Things that went wrong, by kind.",
                      errors(c), "kind")

    def close(self) -> None:
        self.server.close()
