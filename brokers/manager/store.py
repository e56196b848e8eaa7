"""The manager's durable state in LMDB: the cluster id, the member records, the update seq.

Layout: one environment at the data dir with two named databases.
- `meta`: b"cluster_id" (generated once, then kept forever), b"seq" (last ClusterUpdate seq).
- `members`: member_id -> msgpack map of MemberInfo fields (a map, not a list, so records
  written by an older or newer manager still load; unknown keys are ignored).

Transactions are short and never span a network call. Open the store after any fork
(LMDB environments must not cross a fork). This module never touches sockets or clocks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import lmdb
import msgpack

from dfzmq import wire
from dfzmq.errors import StorageError

log = logging.getLogger(__name__)

MAP_SIZE = 1 << 32  # address space, not disk: 4 GiB is far beyond any member table
_FIELDS = tuple(f.name for f in dataclasses.fields(wire.MemberInfo))


def open_env(path: Path, map_size: int, what: str) -> lmdb.Environment:
    """The manager's LMDB environment at `path` (made if missing); StorageError naming `what`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        return lmdb.open(str(path), map_size=map_size, max_dbs=4, subdir=True)
    except (OSError, lmdb.Error) as e:
        raise StorageError(f"cannot open {what} at {path}: {e}") from e


def load_records(env: lmdb.Environment, db, cls: type, what: str) -> list:
    """Every msgpack'd `cls` record in `db` (fields it does not know are ignored, so an older or
    newer manager's records load); a record that does not load is logged and skipped."""
    names = {f.name for f in dataclasses.fields(cls)}
    with env.begin(db=db) as txn:
        rows = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    out = []
    for key, value in rows:
        try:
            fields = msgpack.unpackb(value, raw=False)
            out.append(cls(**{k: v for k, v in fields.items() if k in names}))
        except (ValueError, TypeError, AttributeError, msgpack.UnpackException) as e:
            log.warning("skipping unreadable %s record %r: %s", what, key, e)
    return out


class ManagerStore:
    def __init__(self, path: Path, map_size: int = MAP_SIZE) -> None:
        self._env = open_env(path, map_size, "manager store")
        self._meta = self._env.open_db(b"meta")
        self._members = self._env.open_db(b"members")
        self.cluster_id = self._require_cluster_id()

    def _require_cluster_id(self) -> str:
        with self._env.begin(write=True, db=self._meta) as txn:
            raw = txn.get(b"cluster_id")
            if raw is None:
                raw = f"cluster-{os.urandom(8).hex()}".encode()
                txn.put(b"cluster_id", raw)
                log.info("new cluster id %s", raw.decode())
            return bytes(raw).decode()

    def seq(self) -> int:
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(b"seq")
            return int(bytes(raw).decode()) if raw is not None else 0

    def members(self) -> list[wire.MemberInfo]:
        """Every stored member; a record that does not load is logged and skipped."""
        return load_records(self._env, self._members, wire.MemberInfo, "member")

    def put_member(self, member: wire.MemberInfo, seq: int) -> None:
        """Store one member record and the seq that announced it, atomically."""
        self.put_members([(member, seq)])

    def put_members(self, items: list[tuple[wire.MemberInfo, int]]) -> None:
        if not items:
            return
        with self._env.begin(write=True) as txn:
            for member, _ in items:
                value = msgpack.packb({f: getattr(member, f) for f in _FIELDS}, use_bin_type=True)
                txn.put(member.member_id.encode(), value, db=self._members)
            txn.put(b"seq", str(max(seq for _, seq in items)).encode(), db=self._meta)

    def close(self) -> None:
        self._env.close()
