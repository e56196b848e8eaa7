"""The manager's cluster operations: cluster-wide settings, jobs (preheat, cache removal), and
the followers that carry them out. Pure, like `ManagerCore`: messages and `now` (monotonic)
plus `wall` (time.time(), for the created/finished times users read) in, actions out.

Clone pattern (ZeroMQ guide): every change bumps `seq` (a counter of its own, persisted) and is
published (ConfigUpdate, JobUpdate); a follower asks for a SyncState snapshot over the ROUTER
and applies updates whose seq is higher. Followers also ask again every few seconds, which
repairs a lost update and doubles as their presence: the manager knows which daemons and seed
peers are alive from these requests, without them having to register as members.

Decisions worth knowing:
- Jobs reach daemons from the manager directly (the PUB and the snapshots every daemon follows
  for settings anyway), not through schedulers and SeedTrigger: the manager then knows every
  host a job is for and hears from each, and the scheduler core stays a scheduler. A daemon
  carries out a preheat as a normal download into its store, so the scheduler still decides
  who reads the origin (one seed) and who gets pieces from whom.
- A job names its hosts when it is created: the seed peers (scope "seeds") or every daemon
  (scope "all") that asked for a snapshot within `presence_s`. A host that joins later is
  not part of it; with no host in scope, creation fails (no empty job that "succeeds").
- A job is done when every host reported succeeded or failed; it succeeded only if all did.
  A host silent for `presence_s` while its part is open fails that part ("host gone").
- After a manager restart, hosts get one presence window to ask again before their open
  parts fail: presence is not stored, and jobs are. A job asked for before any host checked in
  (two sync intervals after the start) is refused as "starting", which the CLI retries.
- The newest MAX_JOBS jobs are kept; older finished ones are dropped when a job is created.
- Reports are idempotent: a daemon re-sends its result until the job shows it, and a report
  for a host that already finished, or for a finished job, changes nothing.
- Settings are validated here (dfzmq/settings.py) so `config set` of a bad key or value fails
  at once, with the manager's one-line reason.

This module never imports zmq, lmdb, asyncio or a clock.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from brokers.manager.follow import SYNC_INTERVAL_S
from dfzmq import settings, wire
from dfzmq.actions import Publish, Send
from dfzmq.errors import ConfigError
from dfzmq.ids import new_id

log = logging.getLogger(__name__)

KINDS = ("preheat", "cache-rm")
SCOPES = ("seeds", "all")
TERMINAL = ("succeeded", "failed")
MAX_URLS = 10_000
MAX_JOBS = 1000
PRESENCE_S = 20.0  # a follower asks every SYNC_INTERVAL_S (5 s); four misses and it is gone
STARTUP_S = 2 * SYNC_INTERVAL_S  # after a start, hosts check in within this: "starting", not "no-hosts"


@dataclass(frozen=True, slots=True)
class PersistOps:
    """Write the settings (when not None) and/or a job, with the current seq."""

    seq: int
    config: dict[str, Any] | None = None
    job: wire.JobInfo | None = None
    drop: tuple[str, ...] = ()  # job ids to delete


@dataclass(slots=True)
class _Follower:
    role: str
    hostname: str
    last_seen: float


class OpsCore:
    HANDLES = (wire.SyncRequest, wire.ConfigGet, wire.ConfigSet, wire.JobCreate, wire.JobGet,
               wire.JobList, wire.JobReport)

    def __init__(self, config: dict[str, Any], jobs: list[wire.JobInfo], seq: int,
                 events_addr: str = "", presence_s: float = PRESENCE_S,
                 counters: collections.Counter | None = None,
                 make_id: Callable[[], str] = lambda: new_id("job"), epoch: str = "") -> None:
        self.config = dict(config)
        self.jobs: dict[str, wire.JobInfo] = {j.job_id: j for j in jobs}
        self.seq = seq
        self.events_addr = events_addr
        self.epoch = epoch  # the store's creation id, sent with seq (see follow.py)
        self.presence_s = presence_s
        self.counters = counters if counters is not None else collections.Counter()
        self.make_id = make_id
        self.followers: dict[str, _Follower] = {}
        self._next_check = 0.0
        self._born: float | None = None  # first timer call: hosts' grace window starts

    def handles(self, msg: Any) -> bool:
        return isinstance(msg, self.HANDLES)

    # -- inputs -------------------------------------------------------------------------------

    def handle(self, sender: bytes, msg: Any, now: float, wall: float) -> list:
        self.counters["recv." + type(msg).KIND.decode()] += 1  # one family with membership requests
        if isinstance(msg, wire.SyncRequest):
            return self._sync(sender, msg, now)
        if isinstance(msg, wire.ConfigGet):
            return [Send(sender, wire.ConfigState(self.seq, dict(self.config)))]
        if isinstance(msg, wire.ConfigSet):
            return self._config_set(sender, msg)
        if isinstance(msg, wire.JobCreate):
            return self._create(sender, msg, now, wall)
        if isinstance(msg, wire.JobGet):
            job = self.jobs.get(msg.job_id)
            if job is None:
                return [Send(sender, wire.Error("unknown-job", f"no job {msg.job_id!r}", ref=msg.job_id[:256]))]
            return [Send(sender, wire.JobState(job))]
        if isinstance(msg, wire.JobList):
            newest = sorted(self.jobs.values(), key=lambda j: j.created, reverse=True)
            return [Send(sender, wire.JobListReply(newest[:max(0, msg.limit)]))]
        if isinstance(msg, wire.JobReport):
            return self._report(sender, msg, now, wall)
        return []

    def handle_timer(self, now: float, wall: float) -> list:
        """Fail the open parts of hosts that stopped asking for snapshots."""
        if self._born is None:
            self._born = now
        if now < self._next_check:
            return []
        self._next_check = now + 1.0
        for host_id in [h for h, f in self.followers.items() if now - f.last_seen > 10 * self.presence_s]:
            del self.followers[host_id]  # long gone (or never real): forget
        out: list = []
        for job in [j for j in self.jobs.values() if j.state == "running"]:
            gone = {h: "host gone (no contact with the manager)" for h, st in job.hosts.items()
                    if st not in TERMINAL and not self._present(h, now)}
            if gone:
                out += self._update(job, {h: "failed" for h in gone}, gone, wall)
        return out

    def next_deadline(self) -> float:
        return self._next_check

    # -- handlers -----------------------------------------------------------------------------

    def _present(self, host_id: str, now: float) -> bool:
        f = self.followers.get(host_id)
        if f is None:
            return self._born is None or now - self._born <= self.presence_s
        return now - f.last_seen <= self.presence_s

    def _sync(self, sender: bytes, msg: wire.SyncRequest, now: float) -> list:
        if msg.host_id and len(msg.host_id) <= 256 and msg.role in ("daemon", "seed", "scheduler"):
            self.followers[msg.host_id] = _Follower(msg.role, msg.hostname[:256], now)
        mine = [j for j in self.jobs.values() if j.state == "running" and msg.host_id in j.hosts]
        return [Send(sender, wire.SyncState(self.seq, dict(self.config), mine, self.events_addr, self.epoch))]

    def _config_set(self, sender: bytes, msg: wire.ConfigSet) -> list:
        key = msg.key.replace("-", "_")
        try:
            if msg.unset:
                if key not in settings.KEYS:
                    settings.parse(key, None)  # raises the unknown-key error
                value = None
            else:
                value = settings.parse(key, msg.value)
        except ConfigError as e:
            self.counters["ops.error.bad-setting"] += 1
            return [Send(sender, wire.Error("bad-request", str(e), ref=msg.key[:256]))]
        new = dict(self.config)
        if value is None:
            new.pop(key, None)
        else:
            new[key] = value
        out: list = []
        if new != self.config:
            self.config = new
            self.seq += 1
            log.info("cluster setting %s = %s", key, "(unset)" if value is None else value)
            out += [PersistOps(self.seq, config=dict(new)), Publish(wire.ConfigUpdate(self.seq, dict(new), self.epoch))]
        out.append(Send(sender, wire.ConfigState(self.seq, dict(self.config))))
        return out

    def _create(self, sender: bytes, msg: wire.JobCreate, now: float, wall: float) -> list:
        def refuse(detail: str) -> list:
            self.counters["ops.error.bad-job"] += 1
            return [Send(sender, wire.Error("bad-request", detail))]

        if msg.kind not in KINDS:
            return refuse(f"unknown job kind {msg.kind!r} (known: {', '.join(KINDS)})")
        if msg.scope not in SCOPES:
            return refuse(f"unknown scope {msg.scope!r} (use seeds or all)")
        if not msg.urls or len(msg.urls) > MAX_URLS:
            return refuse(f"a job needs 1 to {MAX_URLS} URLs")
        # Never file://: the manager is reachable over the network, and a preheat of a local
        # path would make every seed read its own disk and serve the file over P2P.
        want = ("cache",) if msg.kind == "cache-rm" else ("http", "https")
        for url in msg.urls:
            if urlsplit(url).scheme.lower() not in want:
                return refuse(f"not a {'/'.join(want)} URL: {url[:200]!r}")
        roles = ("seed",) if msg.scope == "seeds" else ("seed", "daemon")
        hosts = sorted(h for h, f in self.followers.items() if f.role in roles and self._present(h, now))
        if not hosts and self._born is not None and now - self._born < STARTUP_S:
            self.counters["ops.error.starting"] += 1
            return [Send(sender, wire.Error(
                "starting", f"the manager started {now - self._born:.0f}s ago and hosts have not checked in "
                            f"yet (every {SYNC_INTERVAL_S:.0f}s); try again"))]
        if not hosts:
            self.counters["ops.error.no-hosts"] += 1
            who = "seed peer" if msg.scope == "seeds" else "daemon"
            return [Send(sender, wire.Error(
                "no-hosts", f"no {who} has been in touch with the manager in the last {self.presence_s:.0f}s"))]
        job = wire.JobInfo(
            job_id=self.make_id(), kind=msg.kind, urls=list(msg.urls), scope=msg.scope,
            state="running", created=wall, hosts={h: "pending" for h in hosts},
            headers=dict(msg.headers), tag=msg.tag, application=msg.application,
            hostnames={h: self.followers[h].hostname for h in hosts}, note=msg.note[:1024],
            digests={u: d for u, d in msg.digests.items() if u in msg.urls})
        self.jobs[job.job_id] = job
        drop = self._prune()
        self.seq += 1
        log.info("job %s: %s of %d URL(s) on %d host(s)", job.job_id, job.kind, len(job.urls), len(hosts))
        return [PersistOps(self.seq, job=job, drop=drop), Publish(wire.JobUpdate(self.seq, job)),
                Send(sender, wire.JobState(job))]

    def _prune(self) -> tuple[str, ...]:
        if len(self.jobs) <= MAX_JOBS:
            return ()
        finished = sorted((j for j in self.jobs.values() if j.state != "running"), key=lambda j: j.created)
        drop = tuple(j.job_id for j in finished[:len(self.jobs) - MAX_JOBS])
        for job_id in drop:
            del self.jobs[job_id]
        return drop

    def _report(self, sender: bytes, msg: wire.JobReport, now: float, wall: float) -> list:
        job = self.jobs.get(msg.job_id)
        if job is None:
            return [Send(sender, wire.Error("unknown-job", f"no job {msg.job_id!r}", ref=msg.job_id[:256]))]
        f = self.followers.get(msg.host_id)
        if f is not None:
            f.last_seen = now
        out: list = []
        current = job.hosts.get(msg.host_id)
        if (job.state == "running" and current is not None and current not in TERMINAL
                and msg.state in ("running", *TERMINAL) and msg.state != current):
            errors = {msg.host_id: msg.error[:1024]} if msg.state == "failed" else {}
            out += self._update(job, {msg.host_id: msg.state}, errors, wall)
        out.append(Send(sender, wire.JobState(self.jobs[job.job_id])))
        return out

    def _update(self, job: wire.JobInfo, states: dict[str, str], errors: dict[str, str],
                wall: float) -> list:
        hosts = {**job.hosts, **states}
        done = all(s in TERMINAL for s in hosts.values())
        job = dataclasses.replace(
            job, hosts=hosts, errors={**job.errors, **errors},
            state=("succeeded" if all(s == "succeeded" for s in hosts.values()) else "failed") if done else "running",
            finished=wall if done else 0.0)
        self.jobs[job.job_id] = job
        if done:
            log.info("job %s %s", job.job_id, job.state)
        self.seq += 1
        return [PersistOps(self.seq, job=job), Publish(wire.JobUpdate(self.seq, job))]
