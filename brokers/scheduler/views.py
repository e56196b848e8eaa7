"""What a scheduler shows operators: state snapshots, published deltas and traffic accounting.

`SchedulerViews` sits next to `SchedulerCore` and reads its model; it never changes a
scheduling decision. Sans-IO like the core: `handle(sender, msg, now)` answers admin and
monitor requests (StateRequest -> SchedulerState, TaskRequest -> TaskDetail) and records
HostStats from daemons; `observe(msg, actions, now)` is shown each message the core handled
and what the core answered (piece reports give per-task origin / P2P bytes, "task-done" events
give task durations); `handle_timer(now)` publishes a StateDelta on the events PUB about once
per `interval_s` when anything changed.

The Clone pattern (DESIGN.md): snapshots and deltas share the core's `seq` with its events, so a
monitor that subscribes first, then asks for a snapshot, applies every update with a greater
seq, and asks again when it sees a gap (a PubHeartbeat or update past the next seq).

Decisions worth knowing:
- Deltas carry whole records of the hosts and tasks that changed since the last delta, never
  field diffs: a monitor that missed one just takes the next. Rates change every interval for
  busy hosts, so deltas carry busy hosts and tasks only; an idle cluster publishes nothing
  but heartbeats.
- Host traffic comes from the daemons' own counters (HostStats, sent with heartbeats);
  per-task origin and P2P bytes from piece reports (which say "origin" or "p2p").
  Rates are differences over the last interval, so one busy second shows as one busy second.
- A task id in TaskRequest may be a unique prefix (the short ids tables show).
- A snapshot carries the last EVENTS_KEPT events with their age, so a monitor that starts late
  (or prints one frame) still shows what just happened; the service shows `observe` the timer's
  actions too, so expiries (host-left) are among them.

This module must never import zmq, lmdb, asyncio or a clock.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from brokers.scheduler.core import DOWNLOADING_STATES, PeerState, SchedulerCore
from dfzmq import wire
from dfzmq.actions import Publish, Send

MIN_PREFIX = 4  # a TaskRequest prefix shorter than this is refused (it would match too much)
EVENTS_KEPT = 50  # recent events a snapshot carries, so a new monitor has some history
VIEW_REQUESTS = (wire.StateRequest, wire.TaskRequest, wire.HostStats)


@dataclass(slots=True)
class _TaskTraffic:
    origin_bytes: int = 0
    p2p_bytes: int = 0
    first_seen: float = 0.0
    done_at: float | None = None


@dataclass(slots=True)
class _Tick:
    """Cumulative counters at the last tick, to turn them into rates."""

    at: float = 0.0
    host: dict[str, tuple[int, int]] = field(default_factory=dict)  # host -> (down, up)
    task: dict[str, int] = field(default_factory=dict)  # task -> origin + p2p bytes


def bitmap(nums: set[int] | list[int]) -> bytes:
    """Piece numbers as a bitmap, bit n (LSB first in each byte) set when piece n is held."""
    if not nums:
        return b""
    out = bytearray(max(nums) // 8 + 1)
    for n in nums:
        if n >= 0:
            out[n >> 3] |= 1 << (n & 7)
    return bytes(out)


def unbitmap(data: bytes) -> list[int]:
    return [i * 8 + b for i, byte in enumerate(data) if byte for b in range(8) if byte >> b & 1]


class SchedulerViews:
    def __init__(self, core: SchedulerCore, interval_s: float, version: str = "") -> None:
        self.core = core
        self.interval_s = interval_s
        self.version = version
        self.host_stats: dict[str, wire.HostStats] = {}
        self.traffic: dict[str, _TaskTraffic] = {}
        # Task durations (first registration -> done), drained by the metrics endpoint.
        self.durations: collections.deque[float] = collections.deque(maxlen=1000)
        self.recent: collections.deque[tuple[float, wire.Event]] = collections.deque(maxlen=EVENTS_KEPT)
        self.report_bytes: collections.Counter[str] = collections.Counter()  # "origin" / "p2p"
        self._rates_host: dict[str, tuple[float, float]] = {}
        self._rates_task: dict[str, float] = {}
        self._last = _Tick()
        self._published_hosts: dict[str, wire.HostView] = {}
        self._published_tasks: dict[str, wire.TaskView] = {}
        self._next_tick = 0.0

    # -- requests ---------------------------------------------------------------------------

    def handle(self, sender: bytes, msg: Any, now: float) -> list[Send]:
        counters = self.core.counters
        counters["recv." + type(msg).__name__] += 1
        if isinstance(msg, wire.StateRequest):
            return [Send(sender, self.state(now))]
        if isinstance(msg, wire.TaskRequest):
            return [Send(sender, self.task_detail(msg.task_id))]
        if isinstance(msg, wire.HostStats):
            host = self.core.hosts.get(self.core.idents.get(sender, ""))
            if host is None or host.host_id != msg.host_id:
                counters["refused.unknown-host"] += 1
                return [Send(sender, wire.Error("unknown-host", "announce your host first"))]
            host.last_seen = max(host.last_seen, now)
            self.host_stats[msg.host_id] = msg
            self.core.note_uplink(host, msg.up_bytes, now)
            return []
        return [Send(sender, wire.Error("bad-request", f"{type(msg).__name__} is not a view"))]

    def observe(self, msg: Any, actions: list, now: float) -> None:
        """Account for a message the core has just handled (None for a timer turn), and for
        what it answered."""
        if isinstance(msg, wire.PeerRegister) and msg.task_id in self.core.tasks:
            self.traffic.setdefault(msg.task_id, _TaskTraffic(first_seen=now))
        elif isinstance(msg, wire.PieceReport):
            peer = self.core.peers.get(msg.peer_id)
            if peer is not None and peer.task_id == msg.task_id:
                t = self.traffic.setdefault(msg.task_id, _TaskTraffic(first_seen=now))
                n = sum(p.length for p in msg.pieces)
                if msg.source == "origin":
                    t.origin_bytes += n
                    self.report_bytes["origin"] += n
                else:
                    t.p2p_bytes += n
                    self.report_bytes["p2p"] += n
        for a in actions:
            if isinstance(a, Publish) and isinstance(a.msg, wire.Event):
                self.recent.append((now, a.msg))
            if (isinstance(a, Publish) and isinstance(a.msg, wire.Event)
                    and a.msg.name == "task-done"):
                t = self.traffic.get(str(a.msg.fields.get("task_id", "")))
                if t is not None and t.done_at is None:
                    t.done_at = now
                    self.durations.append(now - t.first_seen)

    # -- views ------------------------------------------------------------------------------

    def host_view(self, host_id: str) -> wire.HostView:
        h = self.core.hosts[host_id]
        st = self.host_stats.get(host_id)
        down_rate, up_rate = self._rates_host.get(host_id, (0.0, 0.0))
        return wire.HostView(
            host_id=host_id, hostname=h.info.hostname, seed=h.info.seed, idc=h.info.idc,
            location=h.info.location, version=h.info.version, upload_addr=h.info.upload_addr,
            peers=len(h.peers), upload_slots=h.info.upload_slots,
            children=self.core._children.get(host_id, 0),
            down_bytes=st.down_bytes if st else 0, up_bytes=st.up_bytes if st else 0,
            pieces_served=st.pieces_served if st else 0,
            down_rate=down_rate, up_rate=up_rate)

    def task_view(self, task_id: str) -> wire.TaskView:
        t = self.core.tasks[task_id]
        peers = [self.core.peers[p] for p in t.peers if p in self.core.peers]
        states = collections.Counter(p.state for p in peers)
        done_bytes = 0
        manifest = t.manifest
        for p in peers:
            if p.state is PeerState.SUCCEEDED and t.content_length >= 0:
                done_bytes += t.content_length
            elif p.pieces:  # only what it holds is looked at: this runs every interval
                done_bytes += sum(manifest[n].length for n in p.pieces if n in manifest)
        tr = self.traffic.get(task_id)
        return wire.TaskView(
            task_id=task_id, url=t.url, content_length=t.content_length,
            piece_count=t.piece_count, pieces_known=len(t.manifest), complete=t.complete,
            failed=t.failed_reason or "", peers=len(peers),
            downloading=sum(states[s] for s in DOWNLOADING_STATES),
            back_to_source=states[PeerState.BACK_TO_SOURCE],
            done=states[PeerState.SUCCEEDED], done_bytes=done_bytes,
            origin_bytes=tr.origin_bytes if tr else 0, p2p_bytes=tr.p2p_bytes if tr else 0,
            rate=self._rates_task.get(task_id, 0.0), source_peer=t.source_peer or "")

    def state(self, now: float) -> wire.SchedulerState:
        return wire.SchedulerState(
            seq=self.core.seq, scheduler_id=self.core.scheduler_id,
            hosts=[self.host_view(h) for h in sorted(self.core.hosts)],
            tasks=[self.task_view(t) for t in sorted(self.core.tasks)],
            version=self.version, interval_s=self.interval_s,
            events=[wire.EventView(e.seq, e.name, dict(e.fields), round(max(0.0, now - at), 3))
                    for at, e in self.recent])

    def task_detail(self, ref: str) -> Any:
        if ref in self.core.tasks:
            task_id = ref
        else:
            if len(ref) < MIN_PREFIX:
                return wire.Error("bad-request", f"task id prefix too short: {ref!r}", ref[:64])
            matches = [t for t in self.core.tasks if t.startswith(ref)]
            if len(matches) != 1:
                code = "unknown-task" if not matches else "ambiguous"
                return wire.Error(code, f"{len(matches)} tasks match {ref!r}", ref[:64])
            task_id = matches[0]
        t = self.core.tasks[task_id]
        peers = []
        for pid in sorted(t.peers):
            p = self.core.peers.get(pid)
            if p is None:
                continue
            host = self.core.hosts.get(p.host_id)
            held = set(t.manifest) if p.state is PeerState.SUCCEEDED else p.pieces
            peers.append(wire.PeerView(
                peer_id=pid, host_id=p.host_id, hostname=host.info.hostname if host else "",
                state=p.state.value, held=len(held), bitmap=bitmap(held),
                parent_ids=sorted(p.parents), seed=bool(host and host.info.seed)))
        return wire.TaskDetail(self.core.scheduler_id, self.task_view(task_id), peers)

    # -- the published stream ---------------------------------------------------------------

    def next_deadline(self) -> float:
        return self._next_tick

    def handle_timer(self, now: float) -> list[Publish]:
        """Rates over the last interval, and a StateDelta of what changed since the last one."""
        if now < self._next_tick:
            return []
        self._next_tick = now + self.interval_s
        self._update_rates(now)
        for tid in [t for t in self.traffic if t not in self.core.tasks]:
            del self.traffic[tid]
        for hid in [h for h in self.host_stats if h not in self.core.hosts]:
            del self.host_stats[hid]
        hosts = {h: self.host_view(h) for h in self.core.hosts}
        tasks = {t: self.task_view(t) for t in self.core.tasks}
        changed_h = [v for h, v in hosts.items() if self._published_hosts.get(h) != v]
        changed_t = [v for t, v in tasks.items() if self._published_tasks.get(t) != v]
        gone_h = sorted(set(self._published_hosts) - set(hosts))
        gone_t = sorted(set(self._published_tasks) - set(tasks))
        self._published_hosts, self._published_tasks = hosts, tasks
        if not (changed_h or changed_t or gone_h or gone_t):
            return []
        self.core.seq += 1
        self.core.counters["published.delta"] += 1
        return [Publish(wire.StateDelta(self.core.seq, self.core.scheduler_id, changed_h,
                                        changed_t, gone_h, gone_t))]

    def _update_rates(self, now: float) -> None:
        last = self._last
        dt = now - last.at if last.at else 0.0
        tick = _Tick(at=now)
        for hid in self.core.hosts:
            st = self.host_stats.get(hid)
            cur = (st.down_bytes, st.up_bytes) if st else (0, 0)
            tick.host[hid] = cur
            prev = last.host.get(hid)
            if prev == cur:
                self._rates_host[hid] = (0.0, 0.0)  # idle: the common case, kept cheap
            elif dt > 0 and prev is not None:
                # A restarted daemon counts from zero again: its rate restarts too.
                self._rates_host[hid] = tuple(  # type: ignore[assignment]
                    round(max(0, c - p if c >= p else c) / dt, 1) for c, p in zip(cur, prev))
            else:
                self._rates_host[hid] = (0.0, 0.0)
        for tid in self.core.tasks:
            tr = self.traffic.get(tid)
            cur_t = tr.origin_bytes + tr.p2p_bytes if tr else 0
            tick.task[tid] = cur_t
            prev_t = last.task.get(tid)
            self._rates_task[tid] = (round(max(0, cur_t - prev_t) / dt, 1)
                                     if dt > 0 and prev_t is not None else 0.0)
        for gone in set(self._rates_host) - set(self.core.hosts):
            del self._rates_host[gone]
        for gone in set(self._rates_task) - set(self.core.tasks):
            del self._rates_task[gone]
        self._last = tick

    # -- for /metrics -----------------------------------------------------------------------

    def gauges(self) -> dict[str, Any]:
        """Plain numbers for the metrics endpoint, built on the loop thread."""
        peers = collections.Counter(p.state.value for p in self.core.peers.values())
        tasks = collections.Counter(
            "failed" if t.failed_reason else "complete" if t.complete else "running"
            for t in self.core.tasks.values())
        seeds = sum(1 for h in self.core.hosts.values() if h.info.seed)
        return {
            "hosts": {"seed": seeds, "peer": len(self.core.hosts) - seeds},
            "tasks": {s: tasks.get(s, 0) for s in ("running", "complete", "failed")},
            "peers": {s.value: peers.get(s.value, 0) for s in PeerState},
            "report_bytes": {s: self.report_bytes.get(s, 0) for s in ("origin", "p2p")},
            "seq": self.core.seq,
        }
