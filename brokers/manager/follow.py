"""A follower of the manager's cluster operations (settings and jobs): the Clone pattern's
client side, sans-IO so the daemon's asyncio loop and the scheduler's poll loop share it.

The owner sends what `on_timer` returns on a DEALER to the manager, connects a SUB to
`events_addr` once known, and feeds every decoded message from either socket to `on_message`,
which says whether the settings changed and which jobs arrived. A snapshot (SyncState) is asked
for at once and then every `interval_s`: that repairs an update lost on the PUB (slow joiner,
high-water mark, manager restart) and tells the manager this host is alive. Updates and
snapshots are applied only if newer than the settings already applied (`config_seq`), within
one `epoch` (the manager's ops store's creation id): a manager whose store was wiped starts
again at seq 0 under a new epoch, and its settings replace the old ones whatever their seq.
`silent()` says when the manager has not answered for `liveness` intervals: the owner then
opens a fresh DEALER (Paranoid Pirate), keeping what it applied meanwhile.
This module never touches sockets or clocks.
"""

from __future__ import annotations

from typing import Any

from dfzmq import wire

SYNC_INTERVAL_S = 5.0


class Follower:
    def __init__(self, host_id: str, role: str, hostname: str = "",
                 interval_s: float = SYNC_INTERVAL_S, liveness: int = 3) -> None:
        self.host_id, self.role, self.hostname = host_id, role, hostname
        self.interval_s = interval_s
        self.liveness = liveness
        self.config: dict[str, Any] = {}
        self.config_seq = -1
        self.epoch = ""
        self.events_addr = ""
        self.synced = False  # a snapshot has been applied
        self._next_sync = 0.0
        self._last_heard: float | None = None

    def on_timer(self, now: float) -> list[Any]:
        if now < self._next_sync:
            return []
        self._next_sync = now + self.interval_s
        if self._last_heard is None:
            self._last_heard = now
        return [wire.SyncRequest(self.host_id, self.role, self.hostname)]

    def next_deadline(self) -> float:
        return self._next_sync

    def silent(self, now: float) -> bool:
        """True once the manager has not answered the DEALER for `liveness` intervals; the
        owner reopens it (and the next on_timer asks at once)."""
        if self._last_heard is None or now - self._last_heard < self.liveness * self.interval_s:
            return False
        self._last_heard = None
        self._next_sync = 0.0
        return True

    def on_message(self, msg: Any, now: float, from_dealer: bool = True) -> tuple[bool, list[wire.JobInfo]]:
        """(settings changed, jobs naming this host) after `msg`."""
        if from_dealer:
            self._last_heard = now
        if isinstance(msg, wire.SyncState):
            self.events_addr = msg.events_addr or self.events_addr
            self.synced = True
            changed = self._apply(msg.seq, msg.config, msg.epoch)
            return changed, [j for j in msg.jobs if self.host_id in j.hosts]
        if isinstance(msg, wire.ConfigUpdate):
            return self._apply(msg.seq, msg.config, msg.epoch), []
        if isinstance(msg, wire.JobUpdate):
            return False, [msg.job] if self.host_id in msg.job.hosts else []
        if isinstance(msg, wire.JobState):
            return False, [msg.job] if self.host_id in msg.job.hosts else []
        return False, []

    def _apply(self, seq: int, config: dict[str, Any], epoch: str = "") -> bool:
        if epoch != self.epoch:  # another store: its seq counts from its own start
            self.epoch = epoch
            self.config_seq = -1
        if seq < self.config_seq:
            return False
        self.config_seq = seq
        if config == self.config:
            return False
        self.config = dict(config)
        return True
