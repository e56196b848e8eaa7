"""The scheduler's model: peer states and their transition table, hosts, tasks and peers.

Plain data shared by the core (brokers/scheduler/core.py) and parent choice
(brokers/scheduler/parents.py). Never imports zmq, lmdb, asyncio or a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dfzmq import wire
from dfzmq.actions import Publish, Send

Action = Send | Publish


class PeerState(enum.Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    BACK_TO_SOURCE = "BackToSource"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    LEAVE = "Leave"


class PeerEvent(enum.Enum):
    PARENTS = "parents"  # the scheduler handed it parents
    BACK_TO_SOURCE = "back-to-source"  # the scheduler sent it to the origin
    WAIT = "wait"  # waiting for a triggered seed
    PIECES = "pieces"  # it reported pieces
    RESCHEDULE = "reschedule"  # it asked for new parents
    SUCCEED = "succeed"  # it holds the whole task
    FAIL = "fail"
    LEAVE = "leave"


_P, _R, _B, _S, _F, _L = (PeerState.PENDING, PeerState.RUNNING, PeerState.BACK_TO_SOURCE,
                          PeerState.SUCCEEDED, PeerState.FAILED, PeerState.LEAVE)
_E = PeerEvent

TRANSITIONS: dict[tuple[PeerState, PeerEvent], PeerState] = {
    (_P, _E.PARENTS): _R, (_R, _E.PARENTS): _R, (_B, _E.PARENTS): _R,
    (_P, _E.BACK_TO_SOURCE): _B, (_R, _E.BACK_TO_SOURCE): _B, (_B, _E.BACK_TO_SOURCE): _B,
    (_P, _E.WAIT): _P,
    (_P, _E.PIECES): _P, (_R, _E.PIECES): _R, (_B, _E.PIECES): _B,
    (_P, _E.RESCHEDULE): _P, (_R, _E.RESCHEDULE): _R, (_B, _E.RESCHEDULE): _B,
    (_P, _E.SUCCEED): _S, (_R, _E.SUCCEED): _S, (_B, _E.SUCCEED): _S, (_S, _E.SUCCEED): _S,
    (_P, _E.FAIL): _F, (_R, _E.FAIL): _F, (_B, _E.FAIL): _F, (_F, _E.FAIL): _F,
    **{(s, _E.LEAVE): _L for s in PeerState if s is not _L},
}

# States in which a peer can serve pieces to others.
PARENT_STATES = frozenset({_R, _B, _S})
# States in which a peer still wants pieces (and so wants manifest updates).
DOWNLOADING_STATES = frozenset({_P, _R})


class Refused(Exception):
    """A request that cannot be served; `handle` answers it with wire.Error."""

    def __init__(self, code: str, detail: str, ref: str = "") -> None:
        super().__init__(detail)
        self.code, self.detail, self.ref = code, detail, ref


@dataclass(slots=True)
class Host:
    host_id: str
    ident: bytes
    info: wire.HostAnnounce
    last_seen: float
    peers: set[str] = field(default_factory=set)
    # Upload rate, from the cumulative up_bytes of the daemon's HostStats (parents.note_uplink):
    # the last sample, its smoothed rate, and the best smoothed rate seen, fading slowly.
    up_sample: tuple[float, int] | None = None
    up_rate: float = 0.0
    uplink_bps: float = 0.0


@dataclass(slots=True)
class Task:
    task_id: str
    url: str
    headers: dict[str, str]
    tag: str
    application: str
    manifest: dict[int, wire.PieceInfo] = field(default_factory=dict)
    content_length: int = -1
    complete: bool = False
    file_digest: str = ""
    piece_count: int = -1
    source_peer: str | None = None
    failed_reason: str | None = None
    failed_at: float = 0.0
    seed_triggered: bool = False
    seed_deadline: float | None = None  # set while a triggered seed has not registered
    waiting: list[str] = field(default_factory=list)  # peers waiting for the seed
    peers: set[str] = field(default_factory=set)
    version: int = 0  # bumped whenever the set of possible parents changes
    # Running peers holding fewer than max_parents parents (the first to register found few
    # candidates): filled within FILL_DELAY_S of a new candidate, not at the next refresh.
    short: set[str] = field(default_factory=set)
    joined: list[str] = field(default_factory=list)  # candidates new since the last fill (while short)
    bad_peers: set[str] = field(default_factory=set)  # served corrupt bytes: never a parent again
    meta: dict[str, str] = field(default_factory=dict)  # origin headers proxies replay (issue 4)


@dataclass(slots=True)
class Peer:
    peer_id: str
    task_id: str
    host_id: str
    state: PeerState = PeerState.PENDING
    pieces: set[int] = field(default_factory=set)
    parents: dict[str, str] = field(default_factory=dict)  # parent peer id -> its host id
    blocklist: set[str] = field(default_factory=set)
    seen_version: int = -1  # Task.version when its parents were last decided
