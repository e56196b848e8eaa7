"""Every message dfzmq sends, and their encoding to ZeroMQ multipart frames.

Frames: `[b"DFZ1", kind, msgpack({field: value})]` followed by one raw frame per payload field
(piece bytes are never packed into msgpack). ROUTER sockets see an identity frame before these;
`split_routed` separates it.

Decoding validates every field's type and size against the dataclass annotation and raises
`RemoteProtocolError` (never anything else) on any deviation, so a service loop can count and
drop bad frames. Unknown extra keys are ignored (newer senders may add optional fields);
missing keys take the field default or fail.

This module is pure: no sockets, no clock, no logging.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import msgpack

from dfzmq.errors import LocalProtocolError, RemoteProtocolError

MAGIC = b"DFZ1"
MAX_STR = 64 * 1024
MAX_BYTES = 64 * 1024 * 1024
MAX_LIST = 1_000_000
MAX_FIELDS_BYTES = 32 * 1024 * 1024


class Payload(bytes):
    """Annotation marker: this field travels as its own raw frame (any bytes-like value)."""


REGISTRY: dict[bytes, type] = {}


def message(kind: str):
    """Class decorator: a frozen, slotted dataclass registered under `kind`."""

    def wrap(cls):
        cls = dataclass(frozen=True, slots=True)(cls)
        k = kind.encode()
        if k in REGISTRY:
            raise LocalProtocolError(f"duplicate message kind {kind}")
        cls.KIND = k
        hints = typing.get_type_hints(cls)
        cls._fields = tuple((f.name, hints[f.name], f) for f in dataclasses.fields(cls))
        cls._payloads = tuple(name for name, tp, _ in cls._fields if tp is Payload)
        REGISTRY[k] = cls
        return cls

    return wrap


def record(cls):
    """A nested record (frozen, slotted dataclass) encoded as a positional list."""
    cls = dataclass(frozen=True, slots=True)(cls)
    hints = typing.get_type_hints(cls)
    cls._fields = tuple((f.name, hints[f.name], f) for f in dataclasses.fields(cls))
    cls._record = True
    return cls


# ---------------------------------------------------------------------------------------------
# Validation


def _fail(path: str, want: str, got: Any) -> typing.NoReturn:
    raise RemoteProtocolError(f"{path}: expected {want}, got {type(got).__name__}")


def _check(value: Any, tp: Any, path: str) -> Any:
    """Validate (and lightly convert) a decoded value against annotation `tp`."""
    if tp is Any:
        return value
    # Fast paths for the hot messages (HAVE, PIECE_REQUEST, PIECE_DATA: several per piece per
    # daemon): plain values of the exact type need no typing introspection. Same checks as below.
    vt = type(value)
    if vt is tp and (vt is int or (vt is str and len(value) <= MAX_STR)):
        return value
    if vt is list and tp == _LIST_INT and len(value) <= MAX_LIST and all(type(v) is int for v in value):
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, path)
            except RemoteProtocolError as e:
                errors.append(str(e))
        raise RemoteProtocolError("; ".join(errors) or f"{path}: bad value")
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, "bool", value)
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(path, "int", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, "float", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, "str", value)
        if len(value) > MAX_STR:
            raise RemoteProtocolError(f"{path}: string too long ({len(value)})")
        return value
    if tp is bytes:
        if not isinstance(value, (bytes, bytearray)):
            _fail(path, "bytes", value)
        if len(value) > MAX_BYTES:
            raise RemoteProtocolError(f"{path}: bytes too long ({len(value)})")
        return bytes(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(path, "list", value)
        if len(value) > MAX_LIST:
            raise RemoteProtocolError(f"{path}: list too long ({len(value)})")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_check(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, "dict", value)
        if len(value) > MAX_LIST:
            raise RemoteProtocolError(f"{path}: dict too large")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {
            _check(k, key_tp, f"{path}.key"): _check(v, val_tp, f"{path}[{k!r}]")
            for k, v in value.items()
        }
    if getattr(tp, "_record", False):
        if not isinstance(value, (list, tuple)) or len(value) < len(
            [f for f in tp._fields if _required(f[2])]
        ):
            _fail(path, f"{tp.__name__} record", value)
        kwargs = {}
        for i, (name, ftp, f) in enumerate(tp._fields):
            if i < len(value):
                kwargs[name] = _check(value[i], ftp, f"{path}.{name}")
        return tp(**kwargs)
    raise LocalProtocolError(f"{path}: unsupported annotation {tp!r}")


_LIST_INT = list[int]


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _plain(value: Any) -> Any:
    """Records to positional lists, recursively, for msgpack."""
    if getattr(type(value), "_record", False):
        return [_plain(getattr(value, name)) for name, _, _ in type(value)._fields]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# Encoding


def encode(msg: Any) -> list[Any]:
    """Frames for `msg`: magic, kind, packed fields, then payload frames (bytes-like, uncopied)."""
    cls = type(msg)
    if getattr(cls, "KIND", None) is None or REGISTRY.get(cls.KIND) is not cls:
        raise LocalProtocolError(f"not a wire message: {cls.__name__}")
    fields = {name: _plain(getattr(msg, name)) for name, tp, _ in cls._fields if tp is not Payload}
    try:
        packed = msgpack.packb(fields, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise LocalProtocolError(f"{cls.__name__}: cannot encode: {e}") from e
    return [MAGIC, cls.KIND, packed, *(getattr(msg, name) for name in cls._payloads)]


def decode(frames: list[Any]) -> Any:
    """The message in `frames` (bytes, memoryviews or zmq.Frame). Raises RemoteProtocolError."""
    if len(frames) < 3:
        raise RemoteProtocolError(f"too few frames ({len(frames)})")
    magic, kind, packed = (_bytes(f) for f in frames[:3])
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad magic {magic[:8]!r}")
    cls = REGISTRY.get(kind)
    if cls is None:
        raise RemoteProtocolError(f"unknown message kind {kind[:32]!r}")
    if len(packed) > MAX_FIELDS_BYTES:
        raise RemoteProtocolError("fields frame too large")
    try:
        raw = msgpack.unpackb(
            packed,
            raw=False,
            strict_map_key=False,
            max_str_len=MAX_STR,
            max_bin_len=MAX_BYTES,
            max_array_len=MAX_LIST,
            max_map_len=MAX_LIST,
        )
    except Exception as e:  # msgpack raises many types on hostile input
        raise RemoteProtocolError(f"{kind.decode(errors='replace')}: bad msgpack: {e}") from e
    if not isinstance(raw, dict):
        raise RemoteProtocolError(f"{cls.__name__}: fields are not a map")
    payloads = frames[3:]
    if len(payloads) != len(cls._payloads):
        raise RemoteProtocolError(
            f"{cls.__name__}: expected {len(cls._payloads)} payload frames, got {len(payloads)}"
        )
    kwargs: dict[str, Any] = {}
    pi = 0
    for name, tp, f in cls._fields:
        if tp is Payload:
            kwargs[name] = _buffer(payloads[pi])
            pi += 1
        elif name in raw:
            kwargs[name] = _check(raw[name], tp, f"{cls.__name__}.{name}")
        elif _required(f):
            raise RemoteProtocolError(f"{cls.__name__}: missing field {name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RemoteProtocolError(f"{cls.__name__}: {e}") from e


def _bytes(frame: Any) -> bytes:
    if isinstance(frame, bytes):
        return frame
    if hasattr(frame, "bytes"):  # zmq.Frame
        return frame.bytes
    return bytes(frame)


def _buffer(frame: Any) -> Any:
    """Payload frames stay zero-copy: a zmq.Frame becomes its memoryview."""
    if hasattr(frame, "buffer"):
        return frame.buffer
    return frame


def split_routed(frames: list[Any]) -> tuple[bytes, list[Any]]:
    """(identity, message frames) of what a ROUTER received. Raises RemoteProtocolError."""
    if len(frames) < 2:
        raise RemoteProtocolError("routed message without identity")
    return _bytes(frames[0]), frames[1:]


# ---------------------------------------------------------------------------------------------
# Records

# The lengths a daemon cuts pieces within (nodes/source.py): below 64 KiB per-piece overhead
# dominates, above 16 MiB memory per transfer does. Settings that bound piece lengths
# (`max_piece_length`, dfzmq/settings.py) are checked against the same limits.
MIN_PIECE = 64 * 1024
MAX_PIECE = 16 * 1024 * 1024


@record
class PieceInfo:
    """One piece of a task's manifest. Lengths vary; never assume they are equal."""

    num: int
    offset: int
    length: int
    digest: str  # blake3 hex of the piece bytes; also its key in every piece store


@record
class MemberInfo:
    """A manager-registered member (scheduler or seed peer)."""

    member_id: str
    role: str  # "scheduler" | "seed"
    addr: str  # ROUTER endpoint others connect to (tcp://host:port)
    events_addr: str = ""  # PUB endpoint, where the member has one
    hostname: str = ""
    version: str = ""
    state: str = "up"  # "up" | "down"
    idc: str = ""
    location: str = ""


@record
class ParentInfo:
    """A parent the scheduler hands to a peer."""

    peer_id: str
    host_id: str
    addr: str  # the parent's upload ROUTER endpoint
    seed: bool = False


# ---------------------------------------------------------------------------------------------
# Common to every DEALER/ROUTER pair


@message("HEARTBEAT")
class Heartbeat:
    """Liveness, sent both ways on every DEALER/ROUTER pair. Any inbound frame restores liveness."""

    sender: str = ""


@message("ERROR")
class Error:
    """Answer to a request that could not be served. `code` is machine-readable."""

    code: str  # e.g. "bad-request", "unknown-host", "unknown-task", "busy"
    detail: str = ""
    ref: str = ""  # what it refers to (a task id, a request id)


# ---------------------------------------------------------------------------------------------
# Manager: ROUTER (requests, keepalives) and PUB (cluster changes)


@message("MEMBER_REGISTER")
class MemberRegister:
    """A scheduler or seed peer joins (or re-joins) the cluster. Answered with MemberWelcome."""

    member: MemberInfo


@message("MEMBER_WELCOME")
class MemberWelcome:
    cluster_id: str
    heartbeat_interval_s: float
    config: dict[str, Any] = field(default_factory=dict)  # cluster-wide settings


@message("MEMBER_LEAVE")
class MemberLeave:
    member_id: str


@message("LIST_SCHEDULERS")
class ListSchedulers:
    """Asked by peers (and anyone) to learn which schedulers and seed peers are up."""


@message("SCHEDULER_LIST")
class SchedulerList:
    schedulers: list[MemberInfo]
    seeds: list[MemberInfo] = field(default_factory=list)


@message("SNAPSHOT_REQUEST")
class SnapshotRequest:
    """Clone pattern: ask a publisher for its state; apply PUB updates with seq > snapshot.seq."""


@message("CLUSTER_SNAPSHOT")
class ClusterSnapshot:
    seq: int
    members: list[MemberInfo]
    events_addr: str = ""


@message("CLUSTER_UPDATE")
class ClusterUpdate:
    """Published on the manager's PUB: a member came up or went down."""

    seq: int
    member: MemberInfo


@message("PUB_HEARTBEAT")
class PubHeartbeat:
    """Published every interval on every PUB so that silence means failure."""

    seq: int
    source: str = ""


# ---------------------------------------------------------------------------------------------
# Scheduler <-> peer daemon (peer DEALER -> scheduler ROUTER)


@message("HOST_ANNOUNCE")
class HostAnnounce:
    """A daemon introduces its host (on connect, and again whenever asked). Answer: HostAck."""

    host_id: str
    hostname: str
    upload_addr: str
    seed: bool = False
    idc: str = ""
    location: str = ""  # country|province|city|zone|cluster
    upload_slots: int = 16
    version: str = ""


@message("HOST_ACK")
class HostAck:
    host_id: str
    heartbeat_interval_s: float
    scheduler_id: str = ""


@message("PEER_REGISTER")
class PeerRegister:
    """A peer wants (or, with state="succeeded", already holds) a task.

    The scheduler answers with TaskManifest (what it knows of the pieces) and then either
    PeerParents or BackToSource. A peer re-announcing after a scheduler restart sends its
    stored manifest in `pieces` and `state` "succeeded" or "running".
    """

    task_id: str
    peer_id: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    tag: str = ""
    application: str = ""
    state: str = "pending"  # "pending" | "running" | "succeeded"
    pieces: list[PieceInfo] = field(default_factory=list)
    content_length: int = -1
    file_digest: str = ""
    # Origin response headers a proxy replays (content-type, etag, ...; "status" once known).
    meta: dict[str, str] = field(default_factory=dict)


@message("PEER_PARENTS")
class PeerParents:
    """The scheduler's current choice of parents for a peer (the whole list, not a delta)."""

    task_id: str
    peer_id: str
    parents: list[ParentInfo]


@message("BACK_TO_SOURCE")
class BackToSource:
    """The peer itself should read the origin (no parent can serve, or it is the first)."""

    task_id: str
    peer_id: str
    reason: str = ""


@message("SEED_TRIGGER")
class SeedTrigger:
    """Scheduler -> seed peer host: register for this task and go back to source."""

    task_id: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    tag: str = ""
    application: str = ""


@message("TASK_MANIFEST")
class TaskManifest:
    """Scheduler -> peers of a task: manifest entries (incremental), authoritative digests.

    `content_length` is -1 until known; `complete` is set once the back-to-source peer
    has cut every piece, with `file_digest` the blake3 of the whole file.
    """

    task_id: str
    pieces: list[PieceInfo]
    content_length: int = -1
    complete: bool = False
    file_digest: str = ""
    piece_count: int = -1
    # Origin response headers a proxy replays (content-type, etag, ...; "status" once known).
    meta: dict[str, str] = field(default_factory=dict)


@message("TASK_FAILED")
class TaskFailed:
    """Scheduler -> peers: the origin itself failed (404, ...): every peer fails with `reason`."""

    task_id: str
    reason: str
    code: str = "source"


@message("PIECE_REPORT")
class PieceReport:
    """Peer -> scheduler: pieces the peer now holds (verified). From the back-to-source peer,
    these define the manifest. `content_length` is sent once it is known."""

    task_id: str
    peer_id: str
    pieces: list[PieceInfo]
    content_length: int = -1
    source: str = ""  # "origin", or the parent peer id the pieces came from
    # Origin response headers a proxy replays (content-type, etag, ...; "status" once known).
    meta: dict[str, str] = field(default_factory=dict)


@message("PEER_DONE")
class PeerDone:
    task_id: str
    peer_id: str
    content_length: int
    file_digest: str
    piece_count: int
    # Origin response headers a proxy replays (content-type, etag, ...; "status" once known).
    meta: dict[str, str] = field(default_factory=dict)


@message("PEER_FAILED")
class PeerFailed:
    """Peer -> scheduler. `code` "source" means the origin refused: the task fails everywhere."""

    task_id: str
    peer_id: str
    reason: str
    code: str = ""


@message("RESCHEDULE")
class Reschedule:
    """Peer -> scheduler: my parents cannot serve; here are the ones to avoid."""

    task_id: str
    peer_id: str
    blocklist: list[str] = field(default_factory=list)
    reason: str = ""  # RESCHEDULE_STALLED: no parent gave anything, start afresh
    bad: list[str] = field(default_factory=list)  # parents that sent bytes failing verification


RESCHEDULE_STALLED = "stalled"


@message("PEER_LEAVE")
class PeerLeave:
    task_id: str
    peer_id: str


# ---------------------------------------------------------------------------------------------
# Peer <-> peer: a child's DEALER to a parent's upload ROUTER (the direct pipe)


@message("SUBSCRIBE")
class Subscribe:
    """Child -> parent: tell me what you hold of this task, and every piece you get from now on."""

    task_id: str
    peer_id: str


@message("UNSUBSCRIBE")
class Unsubscribe:
    task_id: str


@message("HAVE")
class Have:
    """Parent -> child: piece numbers the parent holds (all of them first, then increments)."""

    task_id: str
    nums: list[int]
    complete: bool = False


@message("PIECE_REQUEST")
class PieceRequest:
    task_id: str
    num: int
    digest: str
    # Per mille of the task the child still lacks (-1: not said, an older child). A parent whose
    # uplink is the bottleneck serves the child furthest behind first (nodes/uplink.py).
    left: int = -1


# A download lacking at least this much of its task, per mille, is in its first seconds: a
# parent that read the piece from the origin holds back a repeat of it for a child this early
# (nodes/upload.py), and the child asks a peer that has got it since (nodes/picker.py).
EARLY_LEFT = 900
REPEAT_HOLD_S = 2.0  # such a repeat waits until this long after the piece was first asked for


@message("PIECE_DATA")
class PieceData:
    """Parent -> child: one piece. The child verifies `data` against the manifest digest."""

    task_id: str
    num: int
    digest: str
    data: Payload


@message("PIECE_MISSING")
class PieceMissing:
    task_id: str
    num: int
    reason: str = ""  # "missing" | "busy"


# ---------------------------------------------------------------------------------------------
# Peer <-> peer: cancelling requests (issue 3, redundant bytes)


@message("PIECE_CANCEL")
class PieceCancel:
    """Child -> parent: forget these requests of mine if their bytes have not left yet (the child
    gave up on them: timed out, or the piece came from another parent). Bytes already handed to
    the socket still come; the child drops them as duplicates."""

    task_id: str
    nums: list[int]


# ---------------------------------------------------------------------------------------------
# Local client -> daemon control socket


@message("DOWNLOAD")
class Download:
    """Client -> daemon: fetch `url` and write it to `output` (a path on the daemon's host).

    Answered by DownloadProgress messages and one DownloadResult.
    """

    request_id: str
    url: str
    output: str
    digest: str = ""  # "sha256:HEX" or "blake3:HEX", verified over the whole file
    headers: dict[str, str] = field(default_factory=dict)
    tag: str = ""
    application: str = ""


@message("DOWNLOAD_PROGRESS")
class DownloadProgress:
    request_id: str
    done_bytes: int
    total_bytes: int  # -1 while unknown


@message("DOWNLOAD_RESULT")
class DownloadResult:
    request_id: str
    ok: bool
    error: str = ""
    code: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


@message("STAT_REQUEST")
class StatRequest:
    """Ask a daemon or broker for its counters and state (for tests, the demo and tools)."""


@message("STAT_REPLY")
class StatReply:
    info: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Events published by schedulers (for monitors)


@message("EVENT")
class Event:
    seq: int
    name: str  # "peer-registered", "task-done", "back-to-source", ...
    fields: dict[str, Any] = field(default_factory=dict)



# ---------------------------------------------------------------------------------------------
# Cluster operations (issue 6 part B): cluster-wide settings, jobs (preheat, cache removal),
# the local cache. The manager keeps settings and jobs in its LMDB and publishes every change
# on its PUB with a sequence number of their own (`seq` below counts these updates only):
# followers (daemons, seeds, schedulers) take a SyncState snapshot over the ROUTER, then apply
# ConfigUpdate / JobUpdate with a higher seq, and ask again now and then in case one was lost.


@record
class JobInfo:
    """A manager job: what to do, on which hosts, and how far each host got."""

    job_id: str
    kind: str  # "preheat" | "cache-rm"
    urls: list[str]
    scope: str  # "seeds" | "all"
    state: str  # "running" | "succeeded" | "failed"
    created: float  # wall-clock seconds (time.time())
    finished: float = 0.0
    hosts: dict[str, str] = field(default_factory=dict)  # host id -> pending|running|succeeded|failed
    errors: dict[str, str] = field(default_factory=dict)  # host id -> one-line error
    headers: dict[str, str] = field(default_factory=dict)  # for the origin (a registry token)
    tag: str = ""
    application: str = ""
    hostnames: dict[str, str] = field(default_factory=dict)  # host id -> hostname
    note: str = ""  # what the user asked for, e.g. the image reference
    # url -> "sha256:HEX" where the content digest is the task's identity (registry blobs, as
    # the registry mirror names them: the same blob through any registry is one task)
    digests: dict[str, str] = field(default_factory=dict)


@message("SYNC_REQUEST")
class SyncRequest:
    """Follower -> manager: my snapshot, please. Also says the host is alive (jobs of scope
    "all" go to the hosts that asked recently)."""

    host_id: str
    role: str  # "daemon" | "seed" | "scheduler"
    hostname: str = ""


@message("SYNC_STATE")
class SyncState:
    seq: int
    config: dict[str, Any]
    jobs: list[JobInfo] = field(default_factory=list)  # running jobs only
    events_addr: str = ""  # the manager's PUB, where updates follow
    epoch: str = ""  # the manager's ops store's creation id: a new one restarts the seq


@message("CONFIG_UPDATE")
class ConfigUpdate:
    """Published: the whole current set of cluster settings (small, so never a delta)."""

    seq: int
    config: dict[str, Any]
    epoch: str = ""  # as in SyncState


@message("JOB_UPDATE")
class JobUpdate:
    """Published: a job was created or changed."""

    seq: int
    job: JobInfo


@message("CONFIG_GET")
class ConfigGet:
    """CLI -> manager. Answered with ConfigState."""


@message("CONFIG_SET")
class ConfigSet:
    """CLI -> manager: set (or with `unset`, remove) one cluster setting. Answered with
    ConfigState, or Error("bad-request") naming what is wrong."""

    key: str
    value: Any = None
    unset: bool = False


@message("CONFIG_STATE")
class ConfigState:
    seq: int
    config: dict[str, Any]


@message("JOB_CREATE")
class JobCreate:
    """CLI -> manager. Answered with JobState, or Error."""

    kind: str
    urls: list[str]
    scope: str = "seeds"
    headers: dict[str, str] = field(default_factory=dict)
    tag: str = ""
    application: str = ""
    note: str = ""
    digests: dict[str, str] = field(default_factory=dict)


@message("JOB_GET")
class JobGet:
    job_id: str


@message("JOB_LIST")
class JobList:
    limit: int = 100


@message("JOB_STATE")
class JobState:
    job: JobInfo


@message("JOB_LIST_REPLY")
class JobListReply:
    jobs: list[JobInfo]


@message("JOB_REPORT")
class JobReport:
    """Daemon -> manager: how its part of a job went (sent again until the job says so)."""

    job_id: str
    host_id: str
    state: str  # "running" | "succeeded" | "failed"
    error: str = ""
    hostname: str = ""


# Local client -> daemon control socket: the cache (like Dragonfly's dfcache). Export is a
# plain DOWNLOAD of the cache URL (cache:///ID).


@message("CACHE_IMPORT")
class CacheImport:
    """Store the file at `path` (on the daemon's host) under `cache_id` ("" = its blake3)."""

    request_id: str
    path: str
    cache_id: str = ""


@message("CACHE_STAT")
class CacheStat:
    request_id: str
    cache_id: str


@message("CACHE_REMOVE")
class CacheRemove:
    request_id: str
    cache_id: str


@message("CACHE_RESULT")
class CacheResult:
    request_id: str
    ok: bool
    error: str = ""
    info: dict[str, Any] = field(default_factory=dict)


# Admin and monitor (issue 6 part A): scheduler state for `dfzmq hosts|tasks|task` and the
# monitor. Snapshot over the ROUTER (StateRequest -> SchedulerState), then StateDelta and Event
# on the scheduler's PUB under the same `seq` (Clone pattern).


@record
class HostView:
    """One host as its scheduler sees it. Byte counts come from the peers' piece reports."""

    host_id: str
    hostname: str
    seed: bool = False
    idc: str = ""
    location: str = ""
    version: str = ""
    upload_addr: str = ""
    peers: int = 0  # tasks this host takes part in
    upload_slots: int = 0
    children: int = 0  # children the scheduler gave it (its load against upload_slots)
    down_bytes: int = 0  # reported pieces it received (from the origin and from parents)
    up_bytes: int = 0  # reported pieces other peers received from it
    pieces_served: int = 0
    down_rate: float = 0.0  # bytes/s over the scheduler's last view interval
    up_rate: float = 0.0


@record
class TaskView:
    task_id: str
    url: str
    content_length: int = -1
    piece_count: int = -1  # -1 until the task is complete
    pieces_known: int = 0  # manifest entries known so far
    complete: bool = False
    failed: str = ""
    peers: int = 0
    downloading: int = 0  # Pending or Running
    back_to_source: int = 0
    done: int = 0  # Succeeded
    done_bytes: int = 0  # bytes held, summed over peers
    origin_bytes: int = 0  # reported pieces read from the origin
    p2p_bytes: int = 0  # reported pieces received from parents
    rate: float = 0.0  # aggregate download rate of its peers, bytes/s
    source_peer: str = ""


@record
class PeerView:
    """One peer of a task: who holds which pieces. `bitmap` bit n (LSB first) = piece n held."""

    peer_id: str
    host_id: str
    hostname: str = ""
    state: str = ""
    held: int = 0  # pieces held
    bitmap: bytes = b""
    parent_ids: list[str] = field(default_factory=list)  # its current parents' peer ids
    seed: bool = False


@record
class EventView:
    """A recent scheduler event, as kept for snapshots (the live ones come as Event)."""

    seq: int
    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    age_s: float = 0.0  # how long before the snapshot it happened


@message("STATE_REQUEST")
class StateRequest:
    """Admin/monitor -> scheduler ROUTER: the whole view (answered with SchedulerState)."""


@message("SCHEDULER_STATE")
class SchedulerState:
    seq: int  # apply PUB updates (StateDelta, Event) with a greater seq
    scheduler_id: str
    hosts: list[HostView]
    tasks: list[TaskView]
    version: str = ""
    interval_s: float = 1.0  # how often StateDelta and PubHeartbeat are published
    events: list[EventView] = field(default_factory=list)  # the most recent, oldest first


@message("STATE_DELTA")
class StateDelta:
    """Published on the scheduler's PUB about once per interval when anything changed."""

    seq: int
    source: str  # scheduler id
    hosts: list[HostView] = field(default_factory=list)  # new or changed, whole records
    tasks: list[TaskView] = field(default_factory=list)
    gone_hosts: list[str] = field(default_factory=list)
    gone_tasks: list[str] = field(default_factory=list)


@message("TASK_REQUEST")
class TaskRequest:
    """Admin -> scheduler: one task by id or unique id prefix. Answer: TaskDetail or Error."""

    task_id: str


@message("TASK_DETAIL")
class TaskDetail:
    scheduler_id: str
    task: TaskView
    peers: list[PeerView]


@message("HOST_STATS")
class HostStats:
    """Daemon -> each scheduler, with its heartbeats: cumulative traffic of the host (counters
    only grow; a restarted daemon starts again from zero)."""

    host_id: str
    down_bytes: int = 0  # pieces received, from the origin and from parents
    origin_bytes: int = 0
    up_bytes: int = 0  # piece bytes sent to other peers
    pieces_served: int = 0
    tasks_active: int = 0
