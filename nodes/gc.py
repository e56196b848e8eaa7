"""Storage garbage collection for the peer's piece store: disk quota with watermarks, task TTL.

Policy (`choose_victims`, pure: no store, no clock):
- a task in use (a download running in this daemon) is never a victim;
- a task not read for longer than `ttl_s` (when `ttl_s` > 0) is always a victim;
- when usage is above `high * quota`, the least recently used tasks not in use go next, oldest
  first, until usage is at or below `low * quota` (hysteresis: one eviction round, then quiet
  until usage climbs past the high watermark again).
"Finished" means not running here: a complete task, or a partial one whose download failed or
was abandoned (it would resume from what is held; it is fair game like any idle task).

`GarbageCollector.collect` applies the policy to a `PieceStore`. It is synchronous and must run
in the daemon's writer thread, the only thread that writes pieces, so that no piece write of a
task can interleave with its deletion. It must never:
- evict a task in use (`in_use` is checked again right before each deletion, so a live view
  such as `daemon.tasks.keys()` also protects a task that starts while the round runs);
- touch files that are not dfzmq's: it deletes only LMDB records through the store, never a
  path on disk, and usage counts only the store's piece bytes (not outputs written for clients,
  not other programs' files on the same disk);
- delete a piece another task still references (the store's reference counts decide).

Times are wall-clock seconds (`time.time()`): access times are stored with the task and must
mean the same after a restart, which a monotonic clock cannot give.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from dfzmq.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TaskUsage:
    task_id: str
    bytes: int  # what evicting this task alone frees now (pieces no other task references)
    last_access: float  # wall clock: the latest of the last read (touch) and the last write
    complete: bool = False


def choose_victims(tasks: list[TaskUsage], usage: int, quota: int, high: float, low: float,
                   ttl_s: float, now: float, in_use: Container[str]) -> list[str]:
    """Task ids to evict, least recently used first. See the module docstring for the rules."""
    idle = sorted((t for t in tasks if t.task_id not in in_use), key=lambda t: (t.last_access, t.task_id))
    victims: list[str] = []
    projected = usage
    rest: list[TaskUsage] = []
    for t in idle:
        if ttl_s > 0 and now - t.last_access > ttl_s:
            victims.append(t.task_id)
            projected -= t.bytes
        else:
            rest.append(t)
    if quota > 0 and usage > high * quota:
        target = low * quota
        for t in rest:  # already oldest first
            if projected <= target:
                break
            victims.append(t.task_id)
            projected -= t.bytes
    # TTL victims are older than every task they passed over, so one sort keeps LRU order.
    order = {t.task_id: (t.last_access, t.task_id) for t in idle}
    return sorted(victims, key=order.__getitem__)


def task_usages(store: Any, with_bytes: bool) -> list[TaskUsage]:
    """Every task in the store as the policy sees it; bytes only when asked (a manifest scan)."""
    if with_bytes:
        rows = [(meta, exclusive) for meta, _, exclusive in store.task_footprints()]
    else:
        rows = [(meta, 0) for meta in store.tasks()]
    return [
        TaskUsage(meta.get("task_id", ""), exclusive,
                  max(float(meta.get("accessed", 0) or 0), float(meta.get("updated", 0) or 0)),
                  bool(meta.get("complete")))
        for meta, exclusive in rows
        if meta.get("task_id")
    ]


class GarbageCollector:
    """Keeps a `PieceStore` under its quota and evicts tasks past their TTL.

    Thread use: `note_access` from any thread (the event loop, on each piece read); `collect`
    only in the daemon's writer thread. It never evicts a task in use and never deletes
    anything but the store's own records (see the module docstring).
    """

    MAX_ROUNDS = 4  # re-plan when shared pieces made the estimate short; bounded

    def __init__(self, store: Any, cfg: Any) -> None:
        self.store = store
        self.quota = int(cfg.disk_quota)
        self.high = float(cfg.gc_high_watermark)
        self.low = float(cfg.gc_low_watermark)
        self.ttl_s = float(cfg.task_ttl_s)
        self.interval_s = float(cfg.gc_interval_s)
        if self.quota < 0 or self.ttl_s < 0:
            raise ConfigError("disk_quota and task_ttl_s must not be negative")
        if not 0 < self.low <= self.high <= 1:
            raise ConfigError(f"gc watermarks must satisfy 0 < low <= high <= 1, got low={self.low} "
                              f"high={self.high}")
        if self.interval_s <= 0:
            raise ConfigError("gc_interval_s must be positive")
        self._lock = threading.Lock()
        self._accessed: dict[str, float] = {}
        self.evicted_total = 0
        self.freed_total = 0

    @property
    def enabled(self) -> bool:
        return self.quota > 0 or self.ttl_s > 0

    def note_access(self, task_id: str, when: float | None = None) -> None:
        """Remember a read of the task (cheap, any thread); `collect` writes these down in one
        transaction, so serving a piece never costs a write transaction of its own."""
        when = time.time() if when is None else when
        with self._lock:
            if when > self._accessed.get(task_id, 0.0):
                self._accessed[task_id] = when

    def flush_accesses(self) -> int:
        """Writer thread: store the access times noted since the last call."""
        with self._lock:
            pending, self._accessed = self._accessed, {}
        return self.store.touch_many(pending) if pending else 0

    def collect(self, now: float, in_use: Container[str]) -> dict[str, Any]:
        """One collection round (writer thread). `now` is wall-clock seconds; `in_use` holds
        the ids of tasks running in this daemon (better a live view such as
        `daemon.tasks.keys()`, re-checked before each deletion). Returns what was evicted."""
        self.flush_accesses()
        usage = before = self.store.usage_bytes()
        evicted: list[str] = []
        spared: list[str] = []
        freed = 0
        if self.enabled:
            high = self.high
            for _ in range(self.MAX_ROUNDS):
                over = self.quota > 0 and usage > high * self.quota
                if not over and self.ttl_s <= 0:
                    break
                usages = task_usages(self.store, with_bytes=over)
                by_id = {t.task_id: t for t in usages}
                victims = choose_victims(usages, usage, self.quota, high, self.low, self.ttl_s, now, in_use)
                progress = False
                for tid in victims:
                    expired = self.ttl_s > 0 and now - by_id[tid].last_access > self.ttl_s
                    if not expired and usage <= self.low * self.quota:
                        continue  # the quota is met; only TTL victims still go
                    if tid in in_use:  # started since the plan was made
                        spared.append(tid)
                        continue
                    got = self.store.delete_task(tid)
                    log.info("evicted task %s: %d bytes freed (%s)", tid[:12], got,
                             "ttl" if expired else "quota")
                    evicted.append(tid)
                    freed += got
                    usage = self.store.usage_bytes()
                    progress = True
                if not progress:
                    break
                # Still above low (pieces shared among victims were counted for none of them):
                # plan again against the low watermark.
                high = self.low
        self.evicted_total += len(evicted)
        self.freed_total += freed
        return {"evicted": evicted, "freed_bytes": freed, "usage_before": before, "usage_after": usage,
                "quota": self.quota, "spared_in_use": spared}
