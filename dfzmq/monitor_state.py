"""What an operator's client knows of a cluster, built from snapshots and PUB updates. Pure.

`MonitorState` follows the Clone pattern of DESIGN.md for the manager (ClusterSnapshot, then
ClusterUpdate) and for each scheduler (SchedulerState, then StateDelta and Event on its events
PUB). Its `on_*` methods take decoded messages and `now` (monotonic seconds) and return what the
caller (the live monitor's socket loop, or the one-shot admin commands) should do next:
`Need("snapshot", key)` to ask a publisher for a fresh snapshot, `Need("watch", key)` /
`Need("unwatch", key)` to start or stop following a scheduler the manager announced or lost.

Rules:
- Updates that arrive before a stream's snapshot wait; once it arrives, those with a greater seq
  are applied in order. An update or heartbeat past the next seq means something was lost
  (a slow subscriber's queue overflowed): ask for a snapshot again, apply nothing stale.
- A heartbeat whose seq is lower than ours, well after the snapshot, means the publisher
  restarted (a scheduler's seq starts at 0 again): ask for a snapshot.
- A stream is "silent" when nothing (not even a heartbeat) came for `silence_s` or three of its
  intervals: the monitor says so plainly rather than show old numbers as if they were live.
- The same host is known to every scheduler (a daemon talks to all of them): `hosts()` merges
  them, summing what is per scheduler (peers, children) and taking traffic from the freshest.
  A task normally lives on one scheduler; after a failover the record with more peers wins.

This module never imports zmq or reads a clock.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dfzmq import wire

MANAGER = "manager"
EVENTS_KEPT = 200
RESTART_GRACE_S = 2.0  # lower seqs this soon after a snapshot are stale messages, not a restart


@dataclass(frozen=True, slots=True)
class Need:
    what: str  # "snapshot" | "watch" | "unwatch"
    key: str  # MANAGER or a scheduler id


@dataclass(frozen=True, slots=True)
class EventLine:
    at: float
    source: str  # "manager" or a scheduler id
    name: str
    fields: dict[str, Any]


@dataclass(slots=True)
class Stream:
    key: str
    addr: str  # ROUTER endpoint (snapshots)
    events_addr: str = ""  # PUB endpoint
    interval_s: float = 1.0
    since: float = 0.0  # when we started following it
    seq: int | None = None  # None until a snapshot is applied
    snapshot_at: float = 0.0
    last_heard: float | None = None
    pending: list[Any] = field(default_factory=list)
    down: bool = False  # the manager says this member is down
    answered: bool = False  # a snapshot ever arrived
    last_event_seq: int = -1  # events up to this seq are in the tail already


class MonitorState:
    def __init__(self, manager_addr: str, now: float, silence_s: float = 3.0) -> None:
        self.silence_s = silence_s
        self.manager = Stream(MANAGER, manager_addr, since=now)
        self.members: dict[str, wire.MemberInfo] = {}
        self.schedulers: dict[str, Stream] = {}
        self.sched_hosts: dict[str, dict[str, wire.HostView]] = {}
        self.sched_tasks: dict[str, dict[str, wire.TaskView]] = {}
        self.gone_hosts: dict[str, str] = {}  # host id -> hostname, hosts no scheduler knows now
        self.events: collections.deque[EventLine] = collections.deque(maxlen=EVENTS_KEPT)
        self.counters: collections.Counter[str] = collections.Counter()
        self.now = now

    # -- the manager ------------------------------------------------------------------------

    def on_manager_snapshot(self, msg: wire.ClusterSnapshot, now: float) -> list[Need]:
        self.now = now
        s = self.manager
        s.seq, s.snapshot_at, s.last_heard, s.answered = msg.seq, now, now, True
        if msg.events_addr:
            s.events_addr = msg.events_addr
        self.members = {m.member_id: m for m in msg.members}
        needs = self._sync_schedulers()
        pending, s.pending = s.pending, []
        for m in sorted(pending, key=lambda m: m.seq):
            needs += self.on_manager_pub(m, now)
        return needs

    def on_manager_pub(self, msg: Any, now: float) -> list[Need]:
        self.now = now
        s = self.manager
        s.last_heard = now
        verdict = self._sequence(s, msg, now)
        if verdict != "apply":
            return [Need("snapshot", MANAGER)] if verdict == "resync" else []
        info = msg.member
        old = self.members.get(info.member_id)
        self.members[info.member_id] = info
        if old is None or old.state != info.state:
            self._event(now, MANAGER, f"{info.role}-{info.state}",
                        {"member": info.member_id, "addr": info.addr, "version": info.version})
        return self._sync_schedulers()

    def _sync_schedulers(self) -> list[Need]:
        needs = []
        for m in self.members.values():
            if m.role != "scheduler":
                continue
            st = self.schedulers.get(m.member_id)
            if m.state == "up":
                if st is None or st.down or st.addr != m.addr:
                    self.schedulers[m.member_id] = Stream(m.member_id, m.addr, m.events_addr,
                                                          since=self.now)
                    needs.append(Need("watch", m.member_id))
            elif st is not None and not st.down:
                st.down = True
                # Its peers moved to another scheduler; what it said is no longer true.
                self.sched_hosts.pop(m.member_id, None)
                self.sched_tasks.pop(m.member_id, None)
                needs.append(Need("unwatch", m.member_id))
        return needs

    # -- schedulers -------------------------------------------------------------------------

    def on_scheduler_state(self, key: str, msg: wire.SchedulerState, now: float) -> list[Need]:
        self.now = now
        s = self.schedulers.get(key)
        if s is None:
            s = self.schedulers[key] = Stream(key, "", since=now)
        s.seq, s.snapshot_at, s.last_heard, s.answered = msg.seq, now, now, True
        s.interval_s = msg.interval_s or s.interval_s
        before = set().union(*(h.keys() for h in self.sched_hosts.values()))
        self.sched_hosts[key] = {h.host_id: h for h in msg.hosts}
        self.sched_tasks[key] = {t.task_id: t for t in msg.tasks}
        self._note_gone(before)
        # Recent history from the snapshot (what happened before we listened, or while we
        # were resyncing), without repeating what the stream already showed.
        for e in msg.events:
            if e.seq > s.last_event_seq:
                self._event(now - e.age_s, key, e.name, dict(e.fields))
                s.last_event_seq = e.seq
        needs: list[Need] = []
        pending, s.pending = s.pending, []
        for m in sorted(pending, key=lambda m: m.seq):
            needs += self.on_scheduler_pub(key, m, now)
        return needs

    def on_scheduler_pub(self, key: str, msg: Any, now: float) -> list[Need]:
        self.now = now
        s = self.schedulers.get(key)
        if s is None or s.down:
            self.counters["ignored"] += 1
            return []
        s.last_heard = now
        verdict = self._sequence(s, msg, now)
        if verdict != "apply":
            return [Need("snapshot", key)] if verdict == "resync" else []
        if isinstance(msg, wire.StateDelta):
            before = set().union(*(h.keys() for h in self.sched_hosts.values()))
            hosts = self.sched_hosts.setdefault(key, {})
            tasks = self.sched_tasks.setdefault(key, {})
            for h in msg.hosts:
                hosts[h.host_id] = h
                self.gone_hosts.pop(h.host_id, None)
            for t in msg.tasks:
                tasks[t.task_id] = t
            for hid in msg.gone_hosts:
                hosts.pop(hid, None)
            for tid in msg.gone_tasks:
                tasks.pop(tid, None)
            self._note_gone(before)
        elif isinstance(msg, wire.Event) and msg.seq > s.last_event_seq:
            self._event(now, key, msg.name, dict(msg.fields))
            s.last_event_seq = msg.seq
        return []

    def _note_gone(self, before: set[str]) -> None:
        """Hosts no live scheduler knows any more are remembered as gone (for the counts)."""
        known: dict[str, wire.HostView] = {}
        for hosts in self.sched_hosts.values():
            known.update(hosts)
        for hid in before - set(known):
            self.gone_hosts[hid] = hid
        for hid in known:
            self.gone_hosts.pop(hid, None)

    def _sequence(self, s: Stream, msg: Any, now: float) -> str:
        """'apply', 'skip' or 'resync' for an update or heartbeat on stream `s`."""
        seq = getattr(msg, "seq", None)
        if not isinstance(seq, int):
            self.counters["unexpected"] += 1
            return "skip"
        if s.seq is None:
            if not isinstance(msg, wire.PubHeartbeat):
                s.pending.append(msg)
            return "skip"
        heartbeat = isinstance(msg, wire.PubHeartbeat)
        if seq <= s.seq:
            if heartbeat and seq < s.seq and now - s.snapshot_at > RESTART_GRACE_S:
                self.counters["restarted"] += 1
                s.last_event_seq = -1  # a new incarnation numbers its events from 0 again
                return self._resync(s, None)
            if not heartbeat:
                self.counters["stale"] += 1
            return "skip"
        if heartbeat or seq > s.seq + 1:
            self.counters["gap"] += 1
            return self._resync(s, None if heartbeat else msg)
        s.seq = seq
        self.counters["applied"] += 1
        return "apply"

    def _resync(self, s: Stream, keep: Any) -> str:
        s.seq = None
        s.pending = [keep] if keep is not None else []
        return "resync"

    def _event(self, at: float, source: str, name: str, fields: dict[str, Any]) -> None:
        self.events.append(EventLine(at, source, name, fields))
        if len(self.events) > 1 and self.events[-2].at > at:
            # History from a snapshot may be older than lines already shown: keep time order.
            self.events = collections.deque(sorted(self.events, key=lambda e: e.at),
                                            maxlen=EVENTS_KEPT)

    # -- what is true now -------------------------------------------------------------------

    def silent(self, now: float) -> list[tuple[str, float]]:
        """(stream key, seconds) for every followed stream that has been quiet too long."""
        out = []
        for s in [self.manager, *self.schedulers.values()]:
            if s.down:
                continue
            limit = max(self.silence_s, 3 * s.interval_s)
            heard = s.last_heard if s.last_heard is not None else s.since
            if now - heard > limit:
                out.append((s.key, now - heard))
        return out

    def hosts(self) -> list[wire.HostView]:
        merged: dict[str, wire.HostView] = {}
        for hosts in self.sched_hosts.values():
            for h in hosts.values():
                m = merged.get(h.host_id)
                if m is None:
                    merged[h.host_id] = h
                    continue
                fresh = h if h.down_bytes + h.up_bytes > m.down_bytes + m.up_bytes else m
                merged[h.host_id] = dataclasses.replace(
                    fresh, peers=m.peers + h.peers, children=m.children + h.children)
        return list(merged.values())

    def tasks(self) -> list[wire.TaskView]:
        merged: dict[str, wire.TaskView] = {}
        for tasks in self.sched_tasks.values():
            for t in tasks.values():
                m = merged.get(t.task_id)
                if m is None or t.peers > m.peers:
                    merged[t.task_id] = t
        return list(merged.values())

    def members_by_role(self, role: str) -> list[wire.MemberInfo]:
        return sorted((m for m in self.members.values() if m.role == role),
                      key=lambda m: m.member_id)
