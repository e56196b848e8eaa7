"""Parent choice: which peers a downloading peer pulls from, chosen, grown and repaired.

A mixin of `SchedulerCore` (brokers/scheduler/core.py), kept apart so that swarm-speed work
reads and changes parent choice without wading through registration and failure handling.
Pure like the core: no zmq, lmdb, asyncio or clock; `now` is passed in. Scores come from
brokers/scheduler/scoring.py.

Laggards (issue 3): the scheduler sees every peer's progress. A Running peer more than
LAG_FRACTION of the file behind the task's median has drawn a poor set of parents (slow
uplinks, starved flows); each refresh gives it one more parent, up to LAG_EXTRA_PARENTS
beyond max_parents: the candidate whose uplink it would get most of (uplink / (children + 1),
`_best_share`), the best scored while no uplink is measured. Nobody loses a parent
for it, and a peer that caught up keeps what it has until its list is next repaired.

Uplinks (issue 3): every daemon's HostStats carries the piece bytes it has sent so far; the
scheduler keeps each host's upload rate (smoothed over a couple of heartbeats) and the best rate
seen, fading UPLINK_FADE a second, as that host's uplink. Scoring ranks a candidate by the share
of it a new child would get (uplink / (children + 1), brokers/scheduler/scoring.py), so with
half the hosts on slow uplinks a laggard's extra parents are fast ones with room, not whichever
finished peer comes first (lab, N=16, slow half: peers that had drawn five to seven slow
parents reached half the file at 14 s where the others took 7 s). A host not measured yet
scores as the median of those that are.

Starved peers (issue 3): a laggard shows only once it is behind. With the uplinks measured (a
second or two into a download), the scheduler also adds up what each Running peer's parents can
give it (each parent's uplink over its children) and boosts, as a laggard, a peer getting less
than STARVED_FRACTION of the median and not ahead of the median peer: in the lab (N=8, 16 MiB,
slow half) the first peers to register held four 5 Mbit/s parents of six and fell behind from
the start.

Short peers (issue 3): the first peers of a task to register find few candidates (the very
first finds only the source) and used to wait for the next refresh, up to refresh_interval_s,
for the peers that registered after them, pulling from the seed alone meanwhile; in the lab
(N=8, 16 MiB, slow half) the first two reached a quarter of the file at 2.6-3.2 s where the
others took 1.6 s. A peer with fewer than max_parents parents is listed in `Task.short` and
offered the candidates that joined since, FILL_DELAY_S after the first of them; the delay
gathers one wave of registrations into one fill. (Side by side with the code before, the lab
could not tell the difference from run-to-run scatter at N=4-16: README, fourth round.)

Idle uplinks (issue 3): a peer is given parents when it registers and keeps them, so the peers
that register last find every list full and nobody takes them as a parent. In the lab (N=32,
16 MiB, equal 3 Mbit/s links) the last eight registrants had 0-2 children each for the first
half of the run, a quarter of the swarm's upload capacity idle, and every peer's downlink ran at
0.80 of its rate. `_feed_idle` gives a parent host (not the task's source) with more than one
child fewer than the task's average parent host children: the Running peers whose parents give
them least (`_inflows`) get the fastest idle hosts (fewest children first used to hand the
poorest peer a slow host), one new parent each per pass, up to the average less one, and each
peer at most FEED_EXTRA_PARENTS beyond max_parents this way, within the host's upload slots;
children are counted within the task. It runs in every refresh, not in the fill (fed at once,
the first newcomers of a wave took every peer's extra slot), and so also hands the uplinks of
peers whose children finished to the peers still downloading. Like a laggard's
boost it only adds: requests in flight at the old parents stay where they are.

Registration order (issue 3): a newcomer's parents are the best-scored of `candidate_parents`
qualifying peers sampled at random, and in one wave of registrations the best-scored are the
peers with the most free slots: those that registered just before it. The order of
registration became the swarm's shape: in a replay of the lab's N=32 wave, with 15 candidates,
74% of the second half's parents (the seed aside) were in the second half, and a slow half
registering together fed itself. With 8 candidates (the default) the choice is nearly random
but still leaves out the most loaded (51%, at most 10 children per host); in the lab that took
N=32 with the slow half registering first or last from about 1.35 to 1.25 of the bound.
A trial, off by default: counting free slots in steps (`choose_free_steps`; with 3, loads a
third of the slots apart tie and the hash spreads the choice) mixes more (41%) but lets the
first registrants collect the children (up to 11): a gain only where they were the fast hosts,
and more redundant bytes elsewhere (README, "Registration order"). Boosts, the feed and the
fill count exactly either way: they act on measured uplinks and on the children a host has.
"""

from __future__ import annotations

import heapq
import math

from brokers.scheduler import scoring
from brokers.scheduler.model import PARENT_STATES, Action, Host, Peer, PeerEvent, PeerState, Task
from dfzmq import wire
from dfzmq.actions import Send

_P, _R, _S = PeerState.PENDING, PeerState.RUNNING, PeerState.SUCCEEDED
_E = PeerEvent

LAG_FRACTION = 0.05  # of the task's pieces behind the median Running peer
LAG_EXTRA_PARENTS = 3
UPLINK_SMOOTHING = 0.5  # weight of the newest HostStats interval in a host's upload rate
UPLINK_FADE = 0.02  # per second: how fast a host's best upload rate is forgotten
# A Running peer whose parents' uplinks give it less than this share of what the median peer
# gets is starved before it falls behind, and gets a parent more per refresh as a laggard does.
STARVED_FRACTION = 0.7
FILL_DELAY_S = 0.05  # from a new candidate joining a task to filling its short peers
# A peer takes at most this many parents beyond max_parents to give idle uplinks children: the
# fed edges count in the average children a host should have, so without a cap every list
# would grow to the laggards' cap in a stream of registrations.
FEED_EXTRA_PARENTS = 1
# Steps in which a peer's parents at registration (and when its list is repaired) count free
# upload slots; 0 counts them exactly. With 3, hosts up to a third of their slots apart tie and
# the hash of (child, candidate) picks among them (module docstring, "Registration order"): a
# trial, off by default, the scheduler's `choose_free_steps` setting.
CHOOSE_FREE_STEPS = 0


class ParentChoice:
    """Parent choice for `SchedulerCore`, which owns the state these methods read."""

    def note_uplink(self, host: Host, up_bytes: int, now: float) -> None:
        """A host's cumulative piece bytes sent (HostStats): update its uplink estimate."""
        last, host.up_sample = host.up_sample, (now, up_bytes)
        if last is None or now <= last[0] or up_bytes < last[1]:
            return  # first sample, or a restarted daemon's counters: start again
        rate = (up_bytes - last[1]) / (now - last[0])
        host.up_rate = rate if host.up_rate <= 0 else (
            UPLINK_SMOOTHING * rate + (1 - UPLINK_SMOOTHING) * host.up_rate)
        host.uplink_bps = max(host.up_rate, host.uplink_bps * (1 - UPLINK_FADE) ** (now - last[0]))

    def _qualifies(self, child: Peer, cand: Peer, now: float) -> bool:
        return (cand.peer_id != child.peer_id
                and cand.state in PARENT_STATES
                and cand.host_id != child.host_id
                and cand.peer_id not in child.blocklist
                and cand.host_id not in child.blocklist
                and cand.peer_id not in self.tasks[cand.task_id].bad_peers
                and self._alive(cand.host_id, now))

    def _choose_parents(self, child: Peer, task: Task, now: float, keep: list[str]) -> list[str]:
        """Up to max_parents parents: `keep` (still valid), the source, then the best others."""
        cands = [self.peers[pid] for pid in sorted(task.peers)]
        cands = [c for c in cands if self._qualifies(child, c, now)]
        valid = {c.peer_id for c in cands}
        # A laggard keeps the extra parents it was given (up to LAG_EXTRA_PARENTS more): losing
        # one parent must not cost it the healthy ones and their requests in flight.
        cap = max(self.max_parents, min(len(keep), self.max_parents + LAG_EXTRA_PARENTS))
        chosen = [pid for pid in keep if pid in valid][:cap]
        src = task.source_peer
        if (src is not None and not task.complete and src in valid and src not in chosen
                and len(chosen) < self.max_parents):
            # Only the source is sure to get every piece while the task is incomplete.
            chosen.insert(0, src)
        room = self.max_parents - len(chosen)
        rest = [c for c in cands if c.peer_id not in chosen]
        if room <= 0 or not rest:
            return chosen
        # The load limit: a host whose upload slots are all taken gets no more children (the
        # source above is the exception: without it an incomplete task cannot finish).
        rest = [c for c in rest if self._has_room(c.host_id)]
        if not rest:
            return chosen
        if len(rest) > self.candidate_parents:
            rest = self.rng.sample(rest, self.candidate_parents)
        ranked = self._ranked(child, task, rest, self.choose_free_steps)
        return chosen + [c.peer_id for c in ranked[:room]]

    def _has_room(self, host_id: str) -> bool:
        """The load limit: the host has an upload slot free for one more child."""
        return self._children_of_host(host_id) < self.hosts[host_id].info.upload_slots

    def _ranked(self, child: Peer, task: Task, cands: list[Peer],
                free_steps: int = 0) -> list[scoring.Candidate]:
        host = self.hosts[child.host_id]
        return scoring.rank([self._candidate(task, c) for c in cands], child.peer_id,
                            host.info.idc, host.info.location, self.weights, free_steps)

    def _candidate(self, task: Task, peer: Peer) -> scoring.Candidate:
        info = self.hosts[peer.host_id].info
        total = task.piece_count if task.piece_count > 0 else len(task.manifest)
        if peer.state is _S:
            fraction = 1.0
        else:
            fraction = len(peer.pieces) / total if total else 0.0
        return scoring.Candidate(
            peer_id=peer.peer_id, host_id=peer.host_id, pieces_fraction=fraction,
            free_slots=info.upload_slots - self._children_of_host(peer.host_id),
            upload_slots=info.upload_slots, idc=info.idc, location=info.location,
            seed=info.seed, uplink_bps=self.hosts[peer.host_id].uplink_bps)

    def _children_of_host(self, host_id: str) -> int:
        return self._children.get(host_id, 0)

    def _set_parents(self, peer: Peer, parents: dict[str, str]) -> None:
        for h in peer.parents.values():
            self._children[h] -= 1
            if self._children[h] <= 0:
                del self._children[h]
        peer.parents = parents
        for h in parents.values():
            self._children[h] += 1
        task = self.tasks.get(peer.task_id)
        if task is not None:
            if parents and len(parents) < self.max_parents:
                task.short.add(peer.peer_id)
            else:
                task.short.discard(peer.peer_id)

    def _forget_fill(self) -> None:
        for tid in self._fill_tasks:
            task = self.tasks.get(tid)
            if task is not None:
                task.joined.clear()
        self._fill_tasks.clear()

    def _fill_short(self, now: float, out: list[Action]) -> None:
        """Offer the candidates that joined since the last fill to the peers short of parents
        (module docstring). Only the newcomers are scored, so a fill costs short peers times
        newcomers, not a refresh of the whole task: peers that stay short because every host is
        out of upload slots are not searched again on every join."""
        for tid in sorted(self._fill_tasks):
            task = self.tasks.get(tid)
            if task is None:
                continue
            joined, task.joined = task.joined, []
            fresh = [self.peers[p] for p in dict.fromkeys(joined) if p in self.peers]
            if task.failed_reason is not None or not fresh:
                continue
            for pid in sorted(task.short):
                peer = self.peers.get(pid)
                if peer is None or peer.state is not _R:
                    task.short.discard(pid)
                    continue
                room = self.max_parents - len(peer.parents)
                cands = [c for c in fresh if c.peer_id not in peer.parents
                         and self._qualifies(peer, c, now) and self._has_room(c.host_id)]
                if room <= 0 or not cands:
                    continue
                ranked = self._ranked(peer, task, cands)[:room]
                self.counters["parents-filled"] += 1
                self._assign_parents(peer, task, [*peer.parents, *(c.peer_id for c in ranked)], out)
        self._fill_tasks.clear()

    def _assign_parents(self, peer: Peer, task: Task, chosen: list[str],
                        out: list[Action]) -> None:
        self._transition(peer, _E.PARENTS)
        if peer.peer_id in task.waiting:
            task.waiting.remove(peer.peer_id)
        self._set_parents(peer, {pid: self.peers[pid].host_id for pid in chosen})
        peer.seen_version = task.version
        out.append(Send(self.hosts[peer.host_id].ident, self._parents_msg(peer)))

    def _parents_msg(self, peer: Peer) -> wire.PeerParents:
        parents = []
        for pid, hid in peer.parents.items():
            host = self.hosts.get(hid)
            if host is not None:
                parents.append(wire.ParentInfo(pid, hid, host.info.upload_addr, host.info.seed))
        return wire.PeerParents(peer.task_id, peer.peer_id, parents)

    def _refresh_parents(self, now: float, out: list[Action]) -> None:
        """Grow and repair parent lists of downloading peers after the swarm changed."""
        for task in list(self.tasks.values()):
            if task.failed_reason is not None:
                continue
            for pid in sorted(task.peers):
                peer = self.peers.get(pid)
                if peer is None or peer.seen_version == task.version:
                    continue
                if peer.state is _R:
                    self._refresh_running(peer, task, now, out)
                elif peer.state is _P and pid in task.waiting:
                    chosen = self._choose_parents(peer, task, now, keep=[])
                    if chosen:
                        self._assign_parents(peer, task, chosen, out)
                    else:
                        peer.seen_version = task.version
            self._boost_laggards(task, now, out)
            self._feed_idle(task, now, out)

    def _boost_laggards(self, task: Task, now: float, out: list[Action]) -> None:
        """One more parent for each Running peer far behind the others (module docstring)."""
        total = task.piece_count if task.piece_count > 0 else len(task.manifest)
        running = [self.peers[pid] for pid in sorted(task.peers) if self.peers[pid].state is _R]
        if total <= 0 or len(running) < 3:
            return
        held = sorted(len(p.pieces) for p in running)
        median = held[len(held) // 2]
        inflow = self._inflows(running)
        _, kids, average = self._average_children(task, now)
        flows = sorted(inflow.values())
        for peer in running:
            behind = median - len(peer.pieces) >= LAG_FRACTION * total
            starved = (bool(flows) and len(peer.pieces) <= median
                       and inflow[peer.peer_id] < STARVED_FRACTION * flows[len(flows) // 2])
            if not (behind or starved):
                continue
            if len(peer.parents) >= self.max_parents + LAG_EXTRA_PARENTS:
                continue
            cands = [c for c in (self.peers[pid] for pid in sorted(task.peers))
                     if c.peer_id not in peer.parents and self._qualifies(peer, c, now)
                     and self._has_room(c.host_id)]
            # Not a host that already has more than its share of children: every boost would
            # pick the same best-scored host (lab, N=32: one host went from 7 to 22 children in
            # three seconds, and each of them got a 22nd of its uplink).
            light = [c for c in cands if c.peer_id == task.source_peer
                     or kids.get(c.host_id, 0) <= average]
            if not light:
                continue
            best = self._best_share(self._ranked(peer, task, light), len(peer.pieces) / total)
            self.counters["parents-laggard" if behind else "parents-starved"] += 1
            self._assign_parents(peer, task, [*peer.parents, best.peer_id], out)

    def _average_children(self, task: Task, now: float) -> tuple[list[Peer], dict[str, int], float]:
        """The task's possible parents other than its source (and bad peers), each host's
        children in this task, and their mean (other tasks' load must not make this task's
        hosts look idle)."""
        members = [self.peers[pid] for pid in sorted(task.peers)]
        kids: dict[str, int] = {}
        for p in members:
            for h in p.parents.values():
                kids[h] = kids.get(h, 0) + 1
        cands = [p for p in members if p.state in PARENT_STATES and p.peer_id != task.source_peer
                 and p.peer_id not in task.bad_peers and self._alive(p.host_id, now)]
        if not cands:
            return cands, kids, 0.0
        return cands, kids, sum(kids.get(c.host_id, 0) for c in cands) / len(cands)

    def _feed_idle(self, task: Task, now: float, out: list[Action]) -> None:
        """Children for parent hosts with fewer than the task's average (module docstring):
        one child a round to each such host, fewest children first, so that a few of them do
        not take every child with room."""
        if task.failed_reason is not None:
            return
        running = [self.peers[pid] for pid in sorted(task.peers) if self.peers[pid].state is _R]
        if len(running) < 2:
            return
        cands, kids, average = self._average_children(task, now)
        want = {c.peer_id: math.ceil(average) - 1 - kids.get(c.host_id, 0) for c in cands
                if kids.get(c.host_id, 0) + 1 < average and self._has_room(c.host_id)}
        if not want:
            return
        inflow = self._inflows(running, partial=True)
        cap = self.max_parents + FEED_EXTRA_PARENTS
        heap = [(inflow[p.peer_id], len(p.pieces), p.peer_id) for p in running if len(p.parents) < cap]
        heapq.heapify(heap)
        # Fastest first, so the peers whose parents give them least get the fastest idle uplinks
        # (fewest children first, when none is measured yet).
        up = self._uplinks([c.host_id for c in cands])
        idle = sorted((self.peers[pid] for pid in want),
                      key=lambda c: (-up.get(c.host_id, 0.0), kids.get(c.host_id, 0), c.peer_id))
        while idle and heap:
            for cand in list(idle):
                passed = []
                while heap:
                    item = heapq.heappop(heap)
                    child = self.peers[item[2]]
                    if cand.peer_id in child.parents or not self._qualifies(child, cand, now):
                        passed.append(item)
                        continue
                    self.counters["parents-fed"] += 1
                    self._assign_parents(child, task, [*child.parents, cand.peer_id], out)
                    want[cand.peer_id] -= 1  # the child is not pushed back: one new parent a pass
                    break
                else:
                    idle.remove(cand)  # nobody left who could take it
                if (want[cand.peer_id] <= 0 or not self._has_room(cand.host_id)) and cand in idle:
                    idle.remove(cand)
                for item in passed:
                    heapq.heappush(heap, item)

    def _uplinks(self, host_ids: list[str]) -> dict[str, float]:
        """host id -> its measured uplink, the median of the measured ones where it has none
        yet (or is gone); {} when none is measured."""
        rate = {h: host.uplink_bps if (host := self.hosts.get(h)) is not None else 0.0 for h in host_ids}
        known = sorted(r for r in rate.values() if r > 0)
        if not known:
            return {}
        median = known[len(known) // 2]
        return {h: r or median for h, r in rate.items()}

    def _best_share(self, ranked: list[scoring.Candidate], held: float) -> scoring.Candidate:
        """Of `ranked` (best scored first) that hold more of the task than the child (`held`, a
        fraction), the one whose uplink the child would get most of (uplink / (children + 1));
        the best scored while none is measured or none holds more. A boosted peer needs bytes:
        the score's other terms (free slots, pieces) made slow hosts with fewer children win
        (lab, N=32, slow half: a starved peer's first extra parents were slow hosts)."""
        ahead = [c for c in ranked if c.pieces_fraction > held]
        up = self._uplinks([c.host_id for c in ahead])
        if not up:
            return ranked[0]
        return max(ahead, key=lambda c: up[c.host_id] / (self._children_of_host(c.host_id) + 1))

    def _inflows(self, running: list[Peer], partial: bool = False) -> dict[str, float]:
        """peer id -> what its parents' uplinks give it, each parent's measured uplink shared
        by its children (a host not measured yet counts as the median); {} until most of the
        parent hosts are measured, unless `partial` (then with nothing measured every uplink
        counts as 1)."""
        hosts = sorted({h for p in running for h in p.parents.values()})
        up = self._uplinks(hosts)
        measured = sum(1 for h in hosts if h in self.hosts and self.hosts[h].uplink_bps > 0)
        if not partial and (not hosts or 3 * measured < 2 * len(hosts)):
            return {}

        def share(h: str) -> float:
            return up.get(h, 1.0) / max(1, self._children_of_host(h))

        return {p.peer_id: sum(share(h) for h in p.parents.values()) for p in running}

    def _refresh_running(self, peer: Peer, task: Task, now: float, out: list[Action]) -> None:
        valid = [p for p in peer.parents
                 if p in self.peers and self._qualifies(peer, self.peers[p], now)]
        if len(valid) == len(peer.parents) >= self.max_parents:
            peer.seen_version = task.version
            return
        chosen = self._choose_parents(peer, task, now, keep=valid)
        if not chosen:
            self.counters["orphaned"] += 1
            if task.source_peer is None and not task.complete:
                self._make_source(peer, task, now, out, "parents gone")
            else:
                self._back_to_source(peer, task, out, "parents gone")
            return
        if chosen == list(peer.parents):
            peer.seen_version = task.version
            return
        self.counters["parents-updated"] += 1
        self._assign_parents(peer, task, chosen, out)
