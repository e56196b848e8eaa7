"""The peer's piece store: the only LMDB user on a peer.

Three databases in one environment:
- `pieces`: blake3 digest (32 raw bytes) -> piece bytes. Content-addressed, so the same bytes
  in two tasks are stored once.
- `manifest`: task id + piece number -> (offset, length, digest) for every piece this peer
  holds. What a peer holds of a task is exactly its manifest entries here.
- `tasks`: task id -> task metadata (url, content length, completeness, file digest, times).

Every write is one short transaction; read buffers never outlive their transaction (callers
get copies). The environment is opened with sync off: a crash of the process loses nothing
(the kernel has the pages); `flush()` is called at task boundaries for power-loss safety.
It must never be opened before a fork, and never hold a transaction across an await.
"""

from __future__ import annotations

import errno
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import lmdb
import msgpack

from dfzmq.errors import StorageError
from dfzmq.wire import PieceInfo

_NUM = struct.Struct(">I")
_MAX_TASK_KEY = 500  # LMDB's key limit (511) minus the piece number


def _task_key(task_id: str) -> bytes:
    # Task ids arrive from other peers too: a 64-character id that is not hex is just unknown.
    if len(task_id) == 64:
        try:
            return bytes.fromhex(task_id)
        except ValueError:
            pass
    return task_id.encode()


class PieceStore:
    def __init__(self, root: Path, map_size: int = 1 << 40) -> None:
        root.mkdir(parents=True, exist_ok=True)
        try:
            self.env = lmdb.open(
                str(root / "store.lmdb"),
                map_size=map_size,
                max_dbs=4,
                sync=False,
                metasync=False,
                readahead=False,
                max_readers=256,
            )
        except lmdb.Error as e:
            raise StorageError(f"cannot open piece store in {root}: {e}") from e
        self.pieces = self.env.open_db(b"pieces")
        self.manifest_db = self.env.open_db(b"manifest")
        self.tasks_db = self.env.open_db(b"tasks")

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()

    def flush(self) -> None:
        self.env.sync(True)

    # -- pieces ---------------------------------------------------------------------------

    def has(self, digest: str) -> bool:
        with self.env.begin(db=self.pieces) as txn:
            return txn.get(bytes.fromhex(digest)) is not None

    def get(self, digest: str) -> bytes | None:
        """A copy of the piece bytes, or None."""
        with self.env.begin(db=self.pieces, buffers=True) as txn:
            buf = txn.get(bytes.fromhex(digest))
            return None if buf is None else bytes(buf)

    def put(self, task_id: str, info: PieceInfo, data: Any) -> None:
        """Store a verified piece and record it in the task's manifest, atomically."""
        key = bytes.fromhex(info.digest)
        try:
            with self.env.begin(write=True) as txn:
                if txn.get(key, db=self.pieces) is None:
                    txn.put(key, data, db=self.pieces)
                txn.put(
                    _task_key(task_id) + _NUM.pack(info.num),
                    msgpack.packb((info.offset, info.length, info.digest)),
                    db=self.manifest_db,
                )
        except lmdb.MapFullError as e:
            raise StorageError("piece store is full (map_size reached)") from e
        except lmdb.Error as e:
            if isinstance(e, lmdb.DiskError) or "No space" in str(e) or errno.ENOSPC == getattr(e, "errno", 0):
                raise StorageError(f"disk full while storing a piece: {e}") from e
            raise StorageError(f"piece store write failed: {e}") from e

    def adopt(self, task_id: str, info: PieceInfo) -> bool:
        """Record a piece we already hold under another task (dedup). True if it was there."""
        key = bytes.fromhex(info.digest)
        with self.env.begin(write=True) as txn:
            if txn.get(key, db=self.pieces) is None:
                return False
            txn.put(
                _task_key(task_id) + _NUM.pack(info.num),
                msgpack.packb((info.offset, info.length, info.digest)),
                db=self.manifest_db,
            )
        return True

    # -- manifests and task metadata ------------------------------------------------------

    def manifest(self, task_id: str) -> dict[int, PieceInfo]:
        """Every piece of the task this peer holds, by number."""
        prefix = _task_key(task_id)
        out: dict[int, PieceInfo] = {}
        if not 0 < len(prefix) <= _MAX_TASK_KEY:
            return out  # no such task could have been stored (LMDB keys are 1..511 bytes)
        with self.env.begin(db=self.manifest_db) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix):
                return out
            for key, value in cur:
                if not key.startswith(prefix) or len(key) != len(prefix) + 4:
                    break
                (num,) = _NUM.unpack(key[len(prefix):])
                offset, length, digest = msgpack.unpackb(value)
                out[num] = PieceInfo(num, offset, length, digest)
        return out

    def get_task(self, task_id: str) -> dict[str, Any] | None:
        key = _task_key(task_id)
        if not 0 < len(key) <= _MAX_TASK_KEY:
            return None
        with self.env.begin(db=self.tasks_db) as txn:
            raw = txn.get(key)
        return None if raw is None else msgpack.unpackb(raw)

    def put_task(self, task_id: str, meta: dict[str, Any]) -> None:
        meta = {**meta, "task_id": task_id, "updated": time.time()}
        try:
            with self.env.begin(write=True, db=self.tasks_db) as txn:
                txn.put(_task_key(task_id), msgpack.packb(meta))
        except lmdb.Error as e:
            raise StorageError(f"piece store write failed: {e}") from e

    def tasks(self) -> Iterator[dict[str, Any]]:
        with self.env.begin(db=self.tasks_db) as txn:
            metas = [msgpack.unpackb(v) for _, v in txn.cursor()]
        yield from metas

    def stats(self) -> dict[str, int]:
        with self.env.begin(db=self.pieces) as txn:
            st = txn.stat(self.pieces)
        return {"pieces": st["entries"], "store_bytes": self.env.info()["last_pgno"] * 4096}
