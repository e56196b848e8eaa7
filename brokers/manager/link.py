"""A member's side of the manager link (schedulers and seed peers): register, heartbeat, reconnect.

Sans-IO, so the scheduler's poll loop and the seed daemon's asyncio loop drive the same logic:
the owner sends what the methods return on its `manager_dealer` socket and feeds every decoded
reply to `on_message`. Paranoid Pirate (ZeroMQ guide): any message from the manager restores
liveness; after `liveness` silent intervals `reconnect_due(now)` turns true once. The owner then
closes the DEALER (linger 0), waits until `retry_at` (doubling from `interval_s`, capped at
`MAX_BACKOFF_S`, reset once the manager answers), opens a fresh DEALER and calls `start(now)`:

    if link.reconnect_due(now):
        sock.close(linger=0); sock = None
    if sock is None and now >= link.retry_at:
        sock = fresh_dealer(); send_all(link.start(now))
    send_all(link.on_timer(now))           # wake again at link.next_deadline()

The heartbeat interval the manager announces in MemberWelcome replaces the local one, since the
manager's expiry is computed from its own interval. This module never touches sockets or clocks.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from dfzmq import wire

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


class MemberLink:
    def __init__(self, member: wire.MemberInfo, interval_s: float, liveness: int) -> None:
        assert interval_s > 0 and liveness > 0, (interval_s, liveness)
        self.member = member
        self.interval_s = interval_s
        self.liveness = liveness
        self.registered = False
        self.config: dict[str, Any] = {}
        self.cluster_id = ""
        self.retry_at = -math.inf  # when the owner may open a fresh socket and start()
        self._connected = False
        self._left = False
        self._last_heard = 0.0
        self._next_beat = math.inf
        self._backoff_s = interval_s

    @property
    def connected(self) -> bool:
        """False between `reconnect_due` and the next `start`: the owner holds no socket."""
        return self._connected

    def start(self, now: float) -> list[Any]:
        """A fresh socket is connected: register (again)."""
        self._connected = True
        self._left = False
        self.registered = False
        self._last_heard = now  # the manager gets a full liveness window to answer
        self._next_beat = now + self.interval_s
        return [wire.MemberRegister(self.member)]

    def on_message(self, msg: Any, now: float) -> list[Any]:
        """Messages to send in answer to `msg` from the manager."""
        if not self._connected or self._left:
            return []
        self._last_heard = now
        self._backoff_s = self.interval_s
        if isinstance(msg, wire.MemberWelcome):
            if not self.registered:
                log.info("registered with manager (cluster %s)", msg.cluster_id)
            self.registered = True
            self.cluster_id = msg.cluster_id
            self.config = dict(msg.config)
            if msg.heartbeat_interval_s > 0 and msg.heartbeat_interval_s != self.interval_s:
                self.interval_s = msg.heartbeat_interval_s
                self._backoff_s = self.interval_s
                self._next_beat = min(self._next_beat, now + self.interval_s)
        elif isinstance(msg, wire.Error):
            if msg.code == "unknown-member":
                log.info("manager does not know us (restarted, or we expired): registering")
                self.registered = False
                return [wire.MemberRegister(self.member)]
            log.warning("manager error %s: %s", msg.code, msg.detail)
        return []

    def on_timer(self, now: float) -> list[Any]:
        """The heartbeat (or, until welcomed, the registration) due at `now`."""
        if not self._connected or self._left or now < self._next_beat:
            return []
        self._next_beat = now + self.interval_s
        if self.registered:
            return [wire.Heartbeat(sender=self.member.member_id)]
        return [wire.MemberRegister(self.member)]

    def reconnect_due(self, now: float) -> bool:
        """True once when the manager has been silent for `liveness` intervals."""
        if not self._connected or self._left:
            return False
        if now < self._last_heard + self.liveness * self.interval_s:
            return False
        log.warning("manager silent for %.1fs: reconnecting in %.1fs",
                    now - self._last_heard, self._backoff_s)
        self._connected = False
        self.registered = False
        self.retry_at = now + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, MAX_BACKOFF_S)
        self._next_beat = math.inf
        return True

    def next_deadline(self) -> float:
        """The next heartbeat, liveness check or (while disconnected) the retry time."""
        if self._left:
            return math.inf
        if not self._connected:
            return self.retry_at
        return min(self._next_beat, self._last_heard + self.liveness * self.interval_s)

    def leave(self) -> list[Any]:
        """Say goodbye; the link then stays silent until `start` is called again."""
        self._left = True
        self.registered = False
        return [wire.MemberLeave(self.member.member_id)]
