"""The manager's protocol logic: cluster membership, liveness and the Clone-pattern state.

`ManagerCore` takes decoded messages (with the ROUTER identity of their sender) and `now`,
and returns actions: `Send` (answer one member), `Publish` (a sequenced ClusterUpdate or a
PubHeartbeat on the PUB socket) and `Persist` (write a member record to the store).
The service applies them in that spirit: persist first, then talk.

Decisions worth knowing:
- A member is identified by `member_id`; its current ROUTER identity is what heartbeats map
  back to. A re-registration from a new socket simply moves the mapping.
- Every inbound message from a known identity restores that member's liveness (Paranoid
  Pirate), not only Heartbeat.
- A member silent for `liveness * interval_s` goes "down" and loses its identity mapping, so
  its next heartbeat is answered with Error("unknown-member") and it re-registers (which
  publishes it "up" again). The same happens after a manager restart.
- Members restored from storage that were "up" start "up" with `last_seen = now`: they get
  one liveness window to heartbeat before they expire. Members stored "down" stay "down".
- `seq` counts ClusterUpdates and is persisted with every member record, so it never goes
  backwards across a restart (subscribers drop updates with seq <= their snapshot's).
- MemberLeave is accepted by member id from anyone: without client authentication
  (CURVE + ZAP) an owner check would add no security, and honouring a leave that arrives
  after a manager restart is the useful behaviour.

This module never imports zmq sockets, lmdb, asyncio or a clock: time is the `now` argument.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from dfzmq import wire
from dfzmq.actions import Publish, Send

log = logging.getLogger(__name__)

ROLES = ("scheduler", "seed")
UP, DOWN = "up", "down"
MANAGER_SENDER = "manager"
MAX_ID_LEN = 256  # member ids are store keys (LMDB keys stop at 511 bytes)


@dataclass(frozen=True, slots=True)
class Persist:
    """Write `member` (and the current `seq`) to the manager's store."""

    member: wire.MemberInfo
    seq: int


Action = Send | Publish | Persist


@dataclass(slots=True)
class _Member:
    info: wire.MemberInfo
    last_seen: float
    ident: bytes | None = None


class ManagerCore:
    """Membership of one cluster. See the module docstring for the rules."""

    def __init__(self, cluster_id: str, interval_s: float, liveness: int,
                 members: list[wire.MemberInfo], now: float, *, events_addr: str = "",
                 seq: int = 0, counters: collections.Counter | None = None) -> None:
        assert interval_s > 0 and liveness > 0, (interval_s, liveness)
        self.cluster_id = cluster_id
        self.interval_s = interval_s
        self.liveness = liveness
        self.events_addr = events_addr
        self.seq = seq
        self.counters = counters if counters is not None else collections.Counter()
        self.config: dict[str, Any] = {}  # cluster settings, sent in MemberWelcome (brokers/manager/ops.py)
        self._members: dict[str, _Member] = {}
        self._idents: dict[bytes, str] = {}
        for info in members:
            self._members[info.member_id] = _Member(info, now)
        self._next_pub = now + interval_s
        self._handlers = {
            wire.MemberRegister: self._register,
            wire.Heartbeat: self._heartbeat,
            wire.MemberLeave: self._leave,
            wire.ListSchedulers: self._list,
            wire.SnapshotRequest: self._snapshot,
            wire.StatRequest: self._stat,
        }

    # -- inputs -------------------------------------------------------------------------------

    def handle(self, sender: bytes, msg: Any, now: float) -> list[Action]:
        """Actions answering `msg` from ROUTER identity `sender`."""
        kind = type(msg).KIND.decode()
        self.counters["recv." + kind] += 1
        member_id = self._idents.get(sender)
        if member_id is not None:
            self._members[member_id].last_seen = now
        handler = self._handlers.get(type(msg))
        if handler is None:
            self.counters["error.bad-request"] += 1
            return [Send(sender, wire.Error("bad-request", f"manager does not serve {kind}"))]
        return handler(sender, msg, now)

    def handle_timer(self, now: float) -> list[Action]:
        """Expire silent members and heartbeat the PUB socket."""
        out: list[Action] = []
        window = self.liveness * self.interval_s
        for m in self._members.values():
            if m.info.state == UP and now >= m.last_seen + window:
                log.info("member %s (%s) silent for %.1fs: down",
                         m.info.member_id, m.info.role, now - m.last_seen)
                self.counters["expired"] += 1
                out += self._set(m, dataclasses.replace(m.info, state=DOWN))
        if now >= self._next_pub:
            out.append(Publish(wire.PubHeartbeat(self.seq, source=MANAGER_SENDER)))
            self._next_pub = now + self.interval_s
        return out

    def next_deadline(self) -> float:
        """When `handle_timer` next has work: the PUB heartbeat or the first expiry."""
        window = self.liveness * self.interval_s
        expiries = (m.last_seen + window for m in self._members.values() if m.info.state == UP)
        return min(self._next_pub, min(expiries, default=self._next_pub))

    def stats(self) -> dict[str, Any]:
        up = [m.info for m in self._members.values() if m.info.state == UP]
        return {
            "cluster_id": self.cluster_id,
            "seq": self.seq,
            "members": len(self._members),
            "schedulers_up": sum(1 for i in up if i.role == "scheduler"),
            "seeds_up": sum(1 for i in up if i.role == "seed"),
            "counters": dict(self.counters),
        }

    def members(self) -> list[wire.MemberInfo]:
        return [m.info for m in self._members.values()]

    # -- handlers -----------------------------------------------------------------------------

    def _register(self, sender: bytes, msg: wire.MemberRegister, now: float) -> list[Action]:
        info = msg.member
        if (not 0 < len(info.member_id) <= MAX_ID_LEN or info.role not in ROLES
                or not info.addr):
            self.counters["error.bad-request"] += 1
            return [Send(sender, wire.Error(
                "bad-request", f"register needs member_id, addr and a role in {ROLES}",
                ref=info.member_id[:MAX_ID_LEN]))]
        info = dataclasses.replace(info, state=UP)
        m = self._members.get(info.member_id)
        is_new = m is None
        if m is None:
            m = self._members[info.member_id] = _Member(info, now)
            log.info("member %s (%s) registered at %s", info.member_id, info.role, info.addr)
        m.last_seen = now
        if m.ident is not None and m.ident != sender:
            self._idents.pop(m.ident, None)
        old_owner = self._idents.get(sender)
        if old_owner is not None and old_owner != info.member_id:
            # One socket re-registering as another member: the old one is no longer it.
            self._members[old_owner].ident = None
        m.ident = sender
        self._idents[sender] = info.member_id
        welcome = Send(sender, wire.MemberWelcome(self.cluster_id, self.interval_s, dict(self.config)))
        # A new member, one coming back up, or one with a new address: everyone must know.
        changed = self._set(m, info, force=is_new)
        return [welcome, *changed]

    def _heartbeat(self, sender: bytes, msg: wire.Heartbeat, now: float) -> list[Action]:
        if sender not in self._idents:
            self.counters["error.unknown-member"] += 1
            return [Send(sender, wire.Error("unknown-member", "register first", ref=msg.sender))]
        return [Send(sender, wire.Heartbeat(sender=MANAGER_SENDER))]

    def _leave(self, sender: bytes, msg: wire.MemberLeave, now: float) -> list[Action]:
        m = self._members.get(msg.member_id)
        if m is None:
            return [Send(sender, wire.Error("unknown-member", ref=msg.member_id))]
        log.info("member %s (%s) left", m.info.member_id, m.info.role)
        return self._set(m, dataclasses.replace(m.info, state=DOWN))

    def _list(self, sender: bytes, msg: wire.ListSchedulers, now: float) -> list[Action]:
        up = [m.info for m in self._members.values() if m.info.state == UP]
        return [Send(sender, wire.SchedulerList(
            schedulers=[i for i in up if i.role == "scheduler"],
            seeds=[i for i in up if i.role == "seed"]))]

    def _snapshot(self, sender: bytes, msg: wire.SnapshotRequest, now: float) -> list[Action]:
        return [Send(sender, wire.ClusterSnapshot(self.seq, self.members(), self.events_addr))]

    def _stat(self, sender: bytes, msg: wire.StatRequest, now: float) -> list[Action]:
        return [Send(sender, wire.StatReply(self.stats()))]

    # -- the one place member state changes ---------------------------------------------------

    def _set(self, m: _Member, info: wire.MemberInfo, force: bool = False) -> list[Action]:
        """Store `info` for `m`; if anything changed, publish it under a new seq and persist."""
        if info == m.info and not force:
            return []
        m.info = info
        if info.state == DOWN and m.ident is not None:
            self._idents.pop(m.ident, None)
            m.ident = None
        self.seq += 1
        self.counters["published.update"] += 1
        return [Persist(info, self.seq), Publish(wire.ClusterUpdate(self.seq, info))]
