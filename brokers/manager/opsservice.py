"""The manager service's side of cluster operations: `OpsCore` plus its LMDB store, driven
from the manager's poll loop (brokers/manager/service.py) on the same ROUTER and PUB.

Persist first, then talk, as for membership: a follower never sees a seq the store lacks.
A store write that fails is counted and logged; the state stays in memory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lmdb
import zmq

from brokers.manager.ops import OpsCore, PersistOps
from brokers.manager.opsstore import OpsStore
from dfzmq.service import Counters, dispatch

log = logging.getLogger(__name__)


class Ops:
    def __init__(self, data: Path, events_addr: str, counters: Counters) -> None:
        self.store = OpsStore(Path(data) / "ops")
        self.counters = counters
        self.core = OpsCore(self.store.config(), self.store.jobs(), self.store.seq(),
                            events_addr=events_addr, epoch=self.store.epoch(), counters=counters)

    def handles(self, msg: Any) -> bool:
        return self.core.handles(msg)

    def handle(self, ident: bytes, msg: Any, router: zmq.Socket, pub: zmq.Socket) -> None:
        self._apply(self._guard(self.core.handle, ident, msg, time.monotonic(), time.time()), router, pub)

    def tick(self, router: zmq.Socket, pub: zmq.Socket) -> None:
        if time.monotonic() >= self.core.next_deadline():
            self._apply(self._guard(self.core.handle_timer, time.monotonic(), time.time()), router, pub)

    def next_deadline(self) -> float:
        return self.core.next_deadline()

    def close(self) -> None:
        self.store.close()

    def _guard(self, fn, *args) -> list:
        try:
            return fn(*args)
        except Exception:  # a bug here must not take the manager down
            self.counters["internal-error"] += 1  # the schedulers' name too
            log.exception("manager ops failed on %r", args[:2])
            return []

    def _apply(self, actions: list, router: zmq.Socket, pub: zmq.Socket) -> None:
        persist = [a for a in actions if isinstance(a, PersistOps)]
        if persist:
            config = next((a.config for a in reversed(persist) if a.config is not None), None)
            jobs = {a.job.job_id: a.job for a in persist if a.job is not None}
            try:
                drop = [j for a in persist for j in a.drop]
                self.store.write(max(a.seq for a in persist), config, list(jobs.values()), drop)
            except lmdb.Error as e:
                self.counters["error.store"] += 1
                log.error("manager job store write failed (state kept in memory): %s", e)
        dispatch([a for a in actions if not isinstance(a, PersistOps)], router, pub, self.counters)
