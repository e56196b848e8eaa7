"""The scheduler's brain: hosts, tasks, peers and pieces, and who downloads from whom.

Sans-IO, as h11 and aioquic: `SchedulerCore.handle(sender, msg, now)` and `handle_timer(now)`
return `Send` / `Publish` actions, `next_deadline()` says when to call the timer again.
This module must never import zmq, lmdb, asyncio or a clock, and must never raise on remote
input: a request that does not fit the model is counted and answered with `wire.Error`.

Model, all in memory and rebuilt from peer announcements after a restart:
- hosts: one per daemon, addressed by the ROUTER identity of its DEALER (several peers of
  different tasks share it); a host silent for `liveness * interval_s` is dropped with its peers.
- tasks: URL and request fields, the manifest {num: PieceInfo} cut by whoever reads the origin,
  completion, the source peer (the one reading the origin), failure.
- peers: one per (task, host), with a state from Dragonfly's peer states, the piece numbers
  held, current parents and a blocklist. State changes go through `TRANSITIONS` only.

Decisions worth knowing:
- Any non-source peer's report may add manifest entries the scheduler does not know yet: after
  a scheduler restart the manifest is rebuilt from whatever the peers re-announce. Entries that
  contradict a known digest are ignored and counted (`piece-mismatch`).
- Parent lists are only grown or repaired, never reshuffled: a Running peer keeps its valid
  parents; the periodic refresh adds new ones while it has fewer than `max_parents` and
  replaces those that left. A peer short of parents (the first to register found few
  candidates) is offered new candidates within FILL_DELAY_S of their joining, not at the
  next refresh (parents.py, `_fill_short`); a candidate with fewer children than its task's
  parent hosts have on average is added to the lists of the peers its uplink would help most
  (`_feed_idle`) at every refresh. A refresh only repairs lists in tasks whose
  set of possible parents changed since the peer was last served (`Task.version`), so it
  stays cheap on big swarms.
- A peer whose parents all vanished and who has no candidate left goes back to source,
  as does a Reschedule with nothing left: a download never fails only because P2P did.
- Seed hosts are chosen per task by rendezvous hashing, so tasks spread over seeds.
- A task that failed at the origin answers TaskFailed for `failed_ttl_s`, then is forgotten so
  a fixed origin can be retried.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
from typing import Any

from brokers.scheduler import scoring
from brokers.scheduler.model import (  # noqa: F401 (the model's names, re-exported)
    DOWNLOADING_STATES, PARENT_STATES, TRANSITIONS, Action, Host, Peer, PeerEvent, PeerState, Refused, Task)
from brokers.scheduler.parents import CHOOSE_FREE_STEPS, FILL_DELAY_S, ParentChoice
from dfzmq import wire
from dfzmq.actions import Publish, Send
from dfzmq.ids import rendezvous, short

log = logging.getLogger(__name__)

_P, _R, _B, _S, _F, _L = (PeerState.PENDING, PeerState.RUNNING, PeerState.BACK_TO_SOURCE,
                          PeerState.SUCCEEDED, PeerState.FAILED, PeerState.LEAVE)
_E = PeerEvent


class SchedulerCore(ParentChoice):
    def __init__(self, scheduler_id: str, interval_s: float, liveness: int,
                 max_parents: int = 6, candidate_parents: int = 8,
                 seed_timeout_s: float = 5.0, refresh_interval_s: float = 1.0,
                 failed_ttl_s: float = 60.0, counters: collections.Counter | None = None,
                 weights: scoring.Weights = scoring.DEFAULT_WEIGHTS,
                 rng: random.Random | None = None,
                 choose_free_steps: int = CHOOSE_FREE_STEPS) -> None:
        self.scheduler_id = scheduler_id
        self.interval_s = interval_s
        self.liveness = liveness
        self.max_parents = max_parents
        self.candidate_parents = candidate_parents
        self.seed_timeout_s = seed_timeout_s
        self.refresh_interval_s = refresh_interval_s
        self.failed_ttl_s = failed_ttl_s
        self.weights = weights
        self.choose_free_steps = choose_free_steps  # 0: parents chosen by exact free slots
        # Shared with the service (its Counters) so STAT_REQUEST shows both sides' counts.
        self.counters = counters if counters is not None else collections.Counter()
        self.rng = rng or random.Random(0)
        self.hosts: dict[str, Host] = {}
        self.idents: dict[bytes, str] = {}
        self.tasks: dict[str, Task] = {}
        self.peers: dict[str, Peer] = {}
        self.seq = 0
        # Children assigned per parent host (for free upload slots), kept by _set_parents.
        self._children: collections.Counter[str] = collections.Counter()
        self._next_pub = 0.0
        self._next_refresh = 0.0
        self._fill_tasks: set[str] = set()  # tasks with short peers that new candidates joined
        self._fill_at: float | None = None
        self._handlers = {
            wire.Heartbeat: self._on_heartbeat,
            wire.PeerRegister: self._on_peer_register,
            wire.PieceReport: self._on_piece_report,
            wire.PeerDone: self._on_peer_done,
            wire.PeerFailed: self._on_peer_failed,
            wire.Reschedule: self._on_reschedule,
            wire.PeerLeave: self._on_peer_leave,
        }

    # -----------------------------------------------------------------------------------------
    # Entry points

    def handle(self, sender: bytes, msg: Any, now: float) -> list[Action]:
        """Actions answering one decoded message from the ROUTER identity `sender`."""
        out: list[Action] = []
        self.counters["recv." + type(msg).__name__] += 1
        try:
            if isinstance(msg, wire.HostAnnounce):
                self._on_host_announce(sender, msg, now, out)
            elif isinstance(msg, wire.StatRequest):
                out.append(Send(sender, wire.StatReply(info=self.stats())))
            elif isinstance(msg, wire.SnapshotRequest):
                out.append(Send(sender, wire.StatReply(info={**self.stats(),
                                                              "snapshot": self.snapshot()})))
            else:
                host = self.hosts.get(self.idents.get(sender, ""))
                if host is None:
                    raise Refused("unknown-host", "announce your host first")
                host.last_seen = now
                handler = self._handlers.get(type(msg))
                if handler is None:
                    raise Refused("bad-request", f"{type(msg).__name__} is not a scheduler request")
                handler(host, msg, now, out)
        except Refused as e:
            self.counters["refused." + e.code] += 1
            log.debug("refused %s from %r: %s %s", type(msg).__name__, sender, e.code, e.detail)
            out.append(Send(sender, wire.Error(code=e.code, detail=e.detail, ref=e.ref)))
        self._schedule_fill(now)
        return out

    def _schedule_fill(self, now: float) -> None:
        if self._fill_tasks and self._fill_at is None:
            self._fill_at = now + FILL_DELAY_S

    def handle_timer(self, now: float) -> list[Action]:
        """Expire hosts, seeds and failures; refresh parent lists; heartbeat the PUB socket."""
        out: list[Action] = []
        try:
            self._reap_hosts(now, out)
            for task in [t for t in self.tasks.values() if t.seed_deadline is not None]:
                if now >= task.seed_deadline:
                    self._seed_timed_out(task, now, out)
            for task in [t for t in self.tasks.values() if t.failed_reason is not None]:
                if now - task.failed_at >= self.failed_ttl_s:
                    self._forget_failure(task)
            if now >= self._next_refresh:
                self._next_refresh = now + self.refresh_interval_s
                self._fill_at = None
                self._forget_fill()  # the refresh looks at every candidate
                self._refresh_parents(now, out)
            elif self._fill_at is not None and now >= self._fill_at:
                self._fill_at = None
                self._fill_short(now, out)
            self._schedule_fill(now)  # candidates that joined during this tick
        except Refused:
            # Timers only apply transitions the table allows; reaching this is our bug.
            # Keep serving rather than take the whole swarm down with us.
            self.counters["internal-error"] += 1
            log.exception("scheduler timer hit an invalid transition")
        if now >= self._next_pub:
            self._next_pub = now + self.interval_s
            out.append(Publish(wire.PubHeartbeat(seq=self.seq, source=self.scheduler_id)))
        return out

    def next_deadline(self) -> float:
        deadline = min(self._next_pub, self._next_refresh)
        if self._fill_at is not None:
            deadline = min(deadline, self._fill_at)
        for task in self.tasks.values():
            if task.seed_deadline is not None:
                deadline = min(deadline, task.seed_deadline)
        return deadline

    def stats(self) -> dict[str, Any]:
        by_state = collections.Counter(p.state.value for p in self.peers.values())
        return {
            "scheduler_id": self.scheduler_id,
            "seq": self.seq,
            "hosts": len(self.hosts),
            "tasks": len(self.tasks),
            "peers": {s.value: by_state.get(s.value, 0) for s in PeerState},
            "counters": dict(self.counters),
            "settings": {"max_parents": self.max_parents, "candidate_parents": self.candidate_parents,
                         **{"weight_" + k: v for k, v in dataclasses.asdict(self.weights).items()}},
        }

    def snapshot(self) -> dict[str, Any]:
        """The whole model as plain data (for monitors and debugging)."""
        return {
            "hosts": [
                {"host_id": h.host_id, "hostname": h.info.hostname, "seed": h.info.seed,
                 "upload_addr": h.info.upload_addr, "idc": h.info.idc,
                 "location": h.info.location, "peers": len(h.peers),
                 "upload_slots": h.info.upload_slots}
                for h in self.hosts.values()
            ],
            "tasks": [
                {"task_id": t.task_id, "url": t.url, "complete": t.complete,
                 "content_length": t.content_length, "pieces": len(t.manifest),
                 "piece_count": t.piece_count, "source_peer": t.source_peer or "",
                 "failed": t.failed_reason or "",
                 "peers": [
                     {"peer_id": p.peer_id, "host_id": p.host_id, "state": p.state.value,
                      "pieces": len(p.pieces), "parents": list(p.parents)}
                     for p in (self.peers[pid] for pid in sorted(t.peers))
                 ]}
                for t in self.tasks.values()
            ],
        }

    # -----------------------------------------------------------------------------------------
    # Hosts

    def _on_host_announce(self, sender: bytes, msg: wire.HostAnnounce, now: float,
                          out: list[Action]) -> None:
        if not msg.host_id:
            raise Refused("bad-request", "empty host id")
        old_id = self.idents.get(sender)
        if old_id is not None and old_id != msg.host_id:
            # Another daemon now speaks through this identity; the old host expires on its own.
            old = self.hosts.get(old_id)
            if old is not None and old.ident == sender:
                old.ident = b""
        host = self.hosts.get(msg.host_id)
        if host is None:
            host = self.hosts[msg.host_id] = Host(msg.host_id, sender, msg, now)
            self._publish(out, "host-joined", host_id=msg.host_id, hostname=msg.hostname,
                          seed=msg.seed)
        else:
            # A reconnecting daemon gets a new identity; its peers stay.
            if host.ident != sender:
                self.idents.pop(host.ident, None)
            host.ident, host.info, host.last_seen = sender, msg, now
        self.idents[sender] = msg.host_id
        out.append(Send(sender, wire.HostAck(host_id=msg.host_id,
                                             heartbeat_interval_s=self.interval_s,
                                             scheduler_id=self.scheduler_id)))

    def _on_heartbeat(self, host: Host, msg: wire.Heartbeat, now: float,
                      out: list[Action]) -> None:
        out.append(Send(host.ident, wire.Heartbeat(sender=self.scheduler_id)))

    def _alive(self, host_id: str, now: float) -> bool:
        host = self.hosts.get(host_id)
        return host is not None and now - host.last_seen <= self.liveness * self.interval_s

    def _reap_hosts(self, now: float, out: list[Action]) -> None:
        for host in [h for h in self.hosts.values() if not self._alive(h.host_id, now)]:
            log.info("host %s silent for %.1fs: dropping it and %d peers",
                     host.host_id, now - host.last_seen, len(host.peers))
            self.counters["host-expired"] += 1
            del self.hosts[host.host_id]
            if self.idents.get(host.ident) == host.host_id:
                del self.idents[host.ident]
            for pid in sorted(host.peers):
                peer = self.peers.get(pid)
                if peer is not None:
                    self._remove_peer(peer, now, out)
            self._publish(out, "host-left", host_id=host.host_id)

    # -----------------------------------------------------------------------------------------
    # Peers: registration and scheduling

    def _on_peer_register(self, host: Host, msg: wire.PeerRegister, now: float,
                          out: list[Action]) -> None:
        if msg.state not in ("pending", "running", "source", "succeeded"):
            raise Refused("bad-request", f"unknown peer state {msg.state!r}", msg.task_id)
        if not msg.task_id or not msg.peer_id:
            raise Refused("bad-request", "empty task or peer id", msg.task_id)
        task = self.tasks.get(msg.task_id)
        old = self.peers.get(msg.peer_id)
        if old is not None:
            if old.task_id != msg.task_id or old.host_id != host.host_id:
                raise Refused("bad-request", f"peer id {msg.peer_id} is in use", msg.task_id)
            if old.state in (_P, _R, _B) and msg.state != "succeeded" and task is not None:
                # A retried registration: record what it holds and repeat our decision.
                self._record_pieces(task, old, msg.pieces, msg.content_length, out, msg.meta)
                self._repeat_decision(old, task, host, out)
                return
            self._remove_peer(old, now, out, quiet=True)
            task = self.tasks.get(msg.task_id)
        if task is not None and task.failed_reason is not None and msg.state != "succeeded":
            out.append(Send(host.ident, wire.TaskFailed(msg.task_id, task.failed_reason)))
            return
        if task is None:
            task = self.tasks[msg.task_id] = Task(msg.task_id, msg.url, dict(msg.headers),
                                                  msg.tag, msg.application)
        peer = self.peers[msg.peer_id] = Peer(msg.peer_id, msg.task_id, host.host_id)
        task.peers.add(peer.peer_id)
        host.peers.add(peer.peer_id)
        self._publish(out, "peer-registered", task_id=task.task_id, peer_id=peer.peer_id,
                      host_id=host.host_id, state=msg.state)

        if msg.state == "succeeded":
            self._register_finished(task, peer, msg, out)
            # A triggered seed that already held the task answers this way: whoever waited
            # for it gets it as a parent now.
            if task.complete:
                task.seed_deadline = None
                waiting, task.waiting = list(task.waiting), []
                for pid in waiting:
                    other = self.peers.get(pid)
                    if other is not None and other.state is _P:
                        self._schedule(other, task, now, out)
            return
        if msg.pieces or msg.content_length >= 0 or msg.meta:
            self._record_pieces(task, peer, msg.pieces, msg.content_length, out, msg.meta)
        if task.manifest or task.content_length >= 0 or task.complete:
            out.append(Send(host.ident, self._manifest_msg(task, sorted_pieces(task))))
        if msg.state == "source" and task.source_peer is None and not task.complete:
            # A peer that was reading the origin when we restarted keeps doing so: no seed
            # trigger, no second read of the origin.
            self._make_source(peer, task, now, out, "re-announced source")
            return
        self._schedule(peer, task, now, out)

    def _register_finished(self, task: Task, peer: Peer, msg: wire.PeerRegister,
                           out: list[Action]) -> None:
        """A peer re-announces a task it holds whole (typically after a scheduler restart)."""
        task.failed_reason = None  # someone has the content, whatever the origin says now
        self._transition(peer, _E.SUCCEED)
        _learn_meta(task, msg.meta)
        # A claim of "everything" with no manifest cannot complete the task for others.
        if not task.complete and (msg.pieces or msg.content_length == 0):
            for p in msg.pieces:
                task.manifest.setdefault(p.num, p)
            task.complete = True
            task.content_length = msg.content_length
            task.file_digest = msg.file_digest
            task.piece_count = len(msg.pieces)
            self._push(task, peer.peer_id, self._manifest_msg(task, sorted_pieces(task)), out)
        peer.pieces = set(task.manifest)

    def _repeat_decision(self, peer: Peer, task: Task, host: Host, out: list[Action]) -> None:
        if task.manifest or task.content_length >= 0:
            out.append(Send(host.ident, self._manifest_msg(task, sorted_pieces(task))))
        if peer.state is _R:
            out.append(Send(host.ident, self._parents_msg(peer)))
        elif peer.state is _B:
            out.append(Send(host.ident, wire.BackToSource(task.task_id, peer.peer_id,
                                                          "registration repeated")))

    def _schedule(self, peer: Peer, task: Task, now: float, out: list[Action],
                  reason: str = "") -> None:
        """Give a peer parents, or a seed to wait for, or the origin."""
        host = self.hosts[peer.host_id]
        if task.failed_reason is not None:
            self._fail_peer(peer, task.failed_reason, out)
            return
        incomplete_without_source = task.source_peer is None and not task.complete
        if incomplete_without_source and host.info.seed:
            self._make_source(peer, task, now, out, "seed peer")
            return
        chosen = self._choose_parents(peer, task, now, keep=[])
        if chosen:
            self._assign_parents(peer, task, chosen, out)
            return
        if incomplete_without_source:
            if task.seed_deadline is not None:
                self._wait_for_seed(peer, task)
                return
            if not task.seed_triggered:
                seed = self._pick_seed(task, peer.host_id, now)
                if seed is not None:
                    task.seed_triggered = True
                    task.seed_deadline = now + self.seed_timeout_s
                    self.counters["seed-trigger"] += 1
                    out.append(Send(seed.ident, wire.SeedTrigger(
                        task.task_id, task.url, dict(task.headers), task.tag, task.application)))
                    self._publish(out, "seed-triggered", task_id=task.task_id,
                                  host_id=seed.host_id)
                    self._wait_for_seed(peer, task)
                    return
            self._make_source(peer, task, now, out, reason or "first peer of the task")
            return
        # A source exists (or the task is complete) but none of the holders can serve this
        # peer (blocklisted, same host): the origin is still up, so it reads the origin.
        self._back_to_source(peer, task, out, reason or "no parent available")

    def _wait_for_seed(self, peer: Peer, task: Task) -> None:
        self._transition(peer, _E.WAIT)
        if peer.peer_id not in task.waiting:
            task.waiting.append(peer.peer_id)

    def _pick_seed(self, task: Task, exclude_host: str, now: float) -> Host | None:
        if not task.url.lower().startswith(("http://", "https://")):
            return None  # file:// is the asking host's own disk: never a seed's (nor cache://)
        seeds = [h.host_id for h in self.hosts.values()
                 if h.info.seed and h.host_id != exclude_host and self._alive(h.host_id, now)]
        if not seeds:
            return None
        return self.hosts[rendezvous(task.task_id, sorted(seeds))[0]]

    def _seed_timed_out(self, task: Task, now: float, out: list[Action]) -> None:
        task.seed_deadline = None
        if task.source_peer is not None or task.complete:
            return
        self.counters["seed-timeout"] += 1
        log.info("task %s: seed did not register within %.1fs", short(task.task_id),
                 self.seed_timeout_s)
        for pid in list(task.waiting):
            peer = self.peers.get(pid)
            if peer is not None and self._alive(peer.host_id, now):
                self._make_source(peer, task, now, out, "seed timed out")
                return

    def _make_source(self, peer: Peer, task: Task, now: float, out: list[Action],
                     reason: str) -> None:
        """`peer` reads the origin for the task; whoever waited for a source gets it as parent."""
        task.source_peer = peer.peer_id
        task.seed_deadline = None
        self._back_to_source(peer, task, out, reason)
        waiting = [pid for pid in task.waiting if pid != peer.peer_id]
        task.waiting.clear()
        for pid in waiting:
            other = self.peers.get(pid)
            if other is not None and other.state is _P:
                self._schedule(other, task, now, out)

    def _back_to_source(self, peer: Peer, task: Task, out: list[Action], reason: str) -> None:
        self._transition(peer, _E.BACK_TO_SOURCE)
        self._set_parents(peer, {})
        if peer.peer_id in task.waiting:
            task.waiting.remove(peer.peer_id)
        self.counters["back-to-source"] += 1
        out.append(Send(self.hosts[peer.host_id].ident,
                        wire.BackToSource(task.task_id, peer.peer_id, reason)))
        self._publish(out, "back-to-source", task_id=task.task_id, peer_id=peer.peer_id,
                      reason=reason)

    def _lost_source(self, task: Task, now: float, out: list[Action]) -> None:
        """The source peer of the task is gone: hand its role to the Running peer furthest on."""
        task.source_peer = None
        if task.complete or task.failed_reason is not None:
            return
        running = [p for p in (self.peers[pid] for pid in task.peers)
                   if p.state is _R and self._alive(p.host_id, now)]
        if not running:
            return  # the peers' own Reschedule sends one of them to the origin
        best = max(running, key=lambda p: (len(p.pieces), p.peer_id))
        self.counters["source-handover"] += 1
        self._make_source(best, task, now, out, "source peer lost")

    # -----------------------------------------------------------------------------------------
    # Progress, completion, failure, departure

    def _require_peer(self, host: Host, task_id: str, peer_id: str) -> tuple[Peer, Task]:
        peer = self.peers.get(peer_id)
        if peer is None or peer.task_id != task_id or peer.host_id != host.host_id:
            raise Refused("unknown-task", f"peer {peer_id} is not registered for this task",
                          task_id)
        return peer, self.tasks[task_id]

    def _on_piece_report(self, host: Host, msg: wire.PieceReport, now: float,
                         out: list[Action]) -> None:
        peer, task = self._require_peer(host, msg.task_id, msg.peer_id)
        self._transition(peer, _E.PIECES)
        self._record_pieces(task, peer, msg.pieces, msg.content_length, out, msg.meta)

    def _record_pieces(self, task: Task, peer: Peer, pieces: list[wire.PieceInfo],
                       content_length: int, out: list[Action], meta: dict[str, str] | None = None) -> None:
        """Note what `peer` holds; relay manifest entries new to the scheduler to the others."""
        new = []
        for p in pieces:
            known = task.manifest.get(p.num)
            if known is None:
                task.manifest[p.num] = p
                new.append(p)
            elif known.digest != p.digest:
                self.counters["piece-mismatch"] += 1
                continue
            peer.pieces.add(p.num)
        length_new = content_length >= 0 and task.content_length != content_length
        if length_new:
            task.content_length = content_length
        meta_new = _learn_meta(task, meta)
        if new or length_new or meta_new:
            self._push(task, peer.peer_id, self._manifest_msg(task, new), out)

    def _on_peer_done(self, host: Host, msg: wire.PeerDone, now: float,
                      out: list[Action]) -> None:
        peer, task = self._require_peer(host, msg.task_id, msg.peer_id)
        self._transition(peer, _E.SUCCEED)
        self._set_parents(peer, {})
        if peer.peer_id in task.waiting:
            task.waiting.remove(peer.peer_id)
        _learn_meta(task, msg.meta)
        if task.source_peer == peer.peer_id or not task.complete:
            task.complete = True
            task.content_length = msg.content_length
            task.file_digest = msg.file_digest
            task.piece_count = msg.piece_count
            task.seed_deadline = None
            self._push(task, peer.peer_id, self._manifest_msg(task, []), out)
            self._publish(out, "task-done", task_id=task.task_id, peer_id=peer.peer_id,
                          content_length=msg.content_length, piece_count=msg.piece_count)
        peer.pieces = set(task.manifest)
        self._publish(out, "peer-done", task_id=task.task_id, peer_id=peer.peer_id,
                      host_id=host.host_id)

    def _on_peer_failed(self, host: Host, msg: wire.PeerFailed, now: float,
                        out: list[Action]) -> None:
        peer, task = self._require_peer(host, msg.task_id, msg.peer_id)
        self._transition(peer, _E.FAIL)
        self._set_parents(peer, {})
        if peer.peer_id in task.waiting:
            task.waiting.remove(peer.peer_id)
        self._publish(out, "peer-failed", task_id=task.task_id, peer_id=peer.peer_id,
                      reason=msg.reason, code=msg.code)
        if msg.code == "source" and not task.complete:
            # (A complete task is still served peer to peer, whatever the origin says now.)
            self._fail_task(task, msg.reason, now, out)
        elif task.source_peer == peer.peer_id:
            self._lost_source(task, now, out)

    def _fail_task(self, task: Task, reason: str, now: float, out: list[Action]) -> None:
        """The origin refused: every peer still downloading fails with the same reason."""
        log.info("task %s failed at the origin: %s", short(task.task_id), reason)
        self.counters["task-failed"] += 1
        task.failed_reason, task.failed_at = reason, now
        task.source_peer, task.seed_deadline = None, None
        task.waiting.clear()
        for pid in sorted(task.peers):
            other = self.peers[pid]
            if other.state in DOWNLOADING_STATES:
                self._fail_peer(other, reason, out)
        self._publish(out, "task-failed", task_id=task.task_id, reason=reason)

    def _fail_peer(self, peer: Peer, reason: str, out: list[Action]) -> None:
        self._transition(peer, _E.FAIL)
        self._set_parents(peer, {})
        out.append(Send(self.hosts[peer.host_id].ident, wire.TaskFailed(peer.task_id, reason)))

    def _forget_failure(self, task: Task) -> None:
        """After failed_ttl_s a failed task may be tried again: drop its failed peers."""
        for pid in sorted(task.peers):
            peer = self.peers[pid]
            if peer.state is _F:
                self._drop_record(peer)
        task.failed_reason = None
        task.seed_triggered = False
        if not task.peers:
            del self.tasks[task.task_id]

    def _on_reschedule(self, host: Host, msg: wire.Reschedule, now: float,
                       out: list[Action]) -> None:
        peer, task = self._require_peer(host, msg.task_id, msg.peer_id)
        self._transition(peer, _E.RESCHEDULE)
        peer.blocklist.update(msg.blocklist)
        self.counters["reschedule"] += 1
        fresh_bad = set(msg.bad) - task.bad_peers
        if fresh_bad:
            # Corrupt bytes are not a slow link: no child of this task gets that parent again
            # (the next refresh also takes it out of current parent lists).
            task.bad_peers |= fresh_bad
            task.version += 1
            self.counters["parent-blocked"] += len(fresh_bad)
            for bad in sorted(fresh_bad):
                self._publish(out, "parent-blocked", task=task.task_id, peer=bad, by=peer.peer_id)
        if task.failed_reason is not None:
            self._fail_peer(peer, task.failed_reason, out)
            return
        if task.source_peer == peer.peer_id and not task.complete:
            self._back_to_source(peer, task, out, "you are the source")
            return
        if task.manifest or task.content_length >= 0:
            # Incremental manifest pushes can be lost (a full queue): resend the whole of it.
            out.append(Send(host.ident, self._manifest_msg(task, sorted_pieces(task))))
        # The parents the peer did not block keep serving it: a parent dropped for two timed out
        # requests used to cost the peer every other parent too, with their requests in flight
        # and the laggard's extra ones (lab, N=32, 512 MiB, slow half: one peer handed six fresh
        # parents five times in a run fell 20-45 s behind the other 31). A stalled peer, whose
        # parents all gave nothing, starts afresh.
        keep = [] if msg.reason == wire.RESCHEDULE_STALLED else list(peer.parents)
        chosen = self._choose_parents(peer, task, now, keep=keep)
        if chosen:
            self._assign_parents(peer, task, chosen, out)
        elif task.source_peer is None and not task.complete:
            self._make_source(peer, task, now, out, "no parent can serve")
        else:
            self._back_to_source(peer, task, out, "no parent can serve")

    def _on_peer_leave(self, host: Host, msg: wire.PeerLeave, now: float,
                       out: list[Action]) -> None:
        peer, _ = self._require_peer(host, msg.task_id, msg.peer_id)
        self._remove_peer(peer, now, out)

    def _remove_peer(self, peer: Peer, now: float, out: list[Action],
                     quiet: bool = False) -> None:
        """Forget a peer. Its children notice at the next refresh (their list is repaired)."""
        task = self.tasks.get(peer.task_id)
        self._transition(peer, _E.LEAVE)
        self._drop_record(peer)
        if task is None:
            return
        if not quiet:
            self._publish(out, "peer-left", task_id=task.task_id, peer_id=peer.peer_id)
        if task.source_peer == peer.peer_id:
            self._lost_source(task, now, out)
        if not task.peers and task.failed_reason is None:
            del self.tasks[task.task_id]

    def _drop_record(self, peer: Peer) -> None:
        self._set_parents(peer, {})
        self.peers.pop(peer.peer_id, None)
        host = self.hosts.get(peer.host_id)
        if host is not None:
            host.peers.discard(peer.peer_id)
        task = self.tasks.get(peer.task_id)
        if task is not None:
            task.peers.discard(peer.peer_id)
            if peer.peer_id in task.waiting:
                task.waiting.remove(peer.peer_id)
            task.version += 1

    # -----------------------------------------------------------------------------------------
    # Helpers

    def _transition(self, peer: Peer, event: PeerEvent) -> None:
        """Apply `event` to the peer's state; a miss is the remote side's protocol error."""
        nxt = TRANSITIONS.get((peer.state, event))
        if nxt is None:
            self.counters["protocol-error"] += 1
            raise Refused("bad-state", f"peer {peer.peer_id} is {peer.state.value}, "
                          f"cannot {event.value}", peer.task_id)
        if (peer.state in PARENT_STATES) != (nxt in PARENT_STATES):
            task = self.tasks.get(peer.task_id)
            if task is not None:
                task.version += 1
                if task.short and nxt in PARENT_STATES:
                    task.joined.append(peer.peer_id)
                    self._fill_tasks.add(task.task_id)
        peer.state = nxt

    def _push(self, task: Task, except_peer: str, msg: Any, out: list[Action]) -> None:
        """Send `msg` to every other peer of the task that is still downloading."""
        for pid in sorted(task.peers):
            other = self.peers[pid]
            if pid != except_peer and other.state in DOWNLOADING_STATES:
                host = self.hosts.get(other.host_id)
                if host is not None:
                    out.append(Send(host.ident, msg))

    @staticmethod
    def _manifest_msg(task: Task, pieces: list[wire.PieceInfo]) -> wire.TaskManifest:
        return wire.TaskManifest(task.task_id, pieces, task.content_length, task.complete,
                                 task.file_digest, task.piece_count, task.meta)

    def _publish(self, out: list[Action], name: str, **fields: Any) -> None:
        self.seq += 1
        out.append(Publish(wire.Event(seq=self.seq, name=name, fields=fields)))


def sorted_pieces(task: Task) -> list[wire.PieceInfo]:
    return [task.manifest[n] for n in sorted(task.manifest)]


def _learn_meta(task: Task, meta: dict[str, str] | None) -> bool:
    """Keep the origin metadata (headers a proxy replays) first reported for a task; later
    reports do not change it. True when it is new (so it is relayed to the task's peers)."""
    if not meta or task.meta:
        return False
    task.meta = dict(list(meta.items())[:16])  # a handful of headers; bounded whatever is sent
    return True
