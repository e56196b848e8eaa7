"""The peer's piece store: the only LMDB user on a peer.

Three databases in one environment:
- `pieces`: blake3 digest (32 raw bytes) -> piece bytes. Content-addressed, so the same bytes
  in two tasks are stored once.
- `manifest`: task id + piece number -> (offset, length, digest) for every piece this peer
  holds. What a peer holds of a task is exactly its manifest entries here.
- `tasks`: task id -> task metadata (url, content length, completeness, file digest, times;
  `accessed`, set by `touch`, is the last time a client or another peer read the task).
- `refs`: blake3 digest -> (reference count, piece length): how many manifest entries point at
  the piece. A piece is deleted exactly when its count reaches zero, so a piece shared by two
  tasks survives the eviction of either. The same database holds two records whose keys are not
  32 bytes long and so cannot be digests: `!usage` (bytes of live piece values, a running counter
  changed in the same transaction as the pieces) and `!schema` (refcounts are complete).
  A store written before `refs` existed is counted once, when it is opened (`_migrate`).

Usage is a counter of piece bytes rather than LMDB page statistics because a quota is given in
bytes of files held: it is the same on every page size, equal to what `dfzmq` downloaded, and
exact to the byte in tests. Page overhead (about 0.1% for MiB-sized pieces), the manifest and
metadata, and LMDB's free list come on top; the data file never shrinks, its freed pages are
reused by later pieces.

Large pieces live in files, not in LMDB (`nodes/piecefiles.py` says why: page-cache double
caching and memory pressure on hosts pulling tens of GB, and on this project's VM 4 CPU-s per
GiB for the fresh page-cache pages LMDB writes into, against 0.2-0.4 s with O_DIRECT).
A piece of `file_threshold` bytes or more (default 1 MiB) is the file `pieces/ab/abcd...` under
the store root; its `pieces` value is a small marker holding its length. Everything else is as
before: manifest, metadata, refs (count + length), usage, dedup, quota and GC do not know where
a piece's bytes are. `piece_files=False` (daemon setting `piece_files = false`) keeps new pieces
in LMDB; pieces already in files stay readable either way, as pieces already inside LMDB do
(the marker or the bytes tells which: no migration).
Crash safety: a piece file is written (temp name + rename) before the transaction that
references it commits, and deleted only after the transaction that drops its last reference
commits; at open, `nodes/storesweep.py` deletes files nothing references and drops markers
whose file is missing with their manifest entries (such a task resumes, it is never "complete
with pieces missing").
Recently stored or read file pieces are kept in memory (`cache_bytes`, default 64 MiB): a
peer's children ask for a piece right after it arrived.

Every write is one short transaction; read buffers never outlive their transaction (callers
get copies). The environment is opened with sync off: a crash of the process loses nothing
(the kernel has the pages); `flush()` is called at task boundaries for power-loss safety.
It must never be opened before a fork, and never hold a transaction across an await.
"""

from __future__ import annotations

import errno
import logging
import os
import mmap
import struct
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import lmdb
import msgpack

from dfzmq.errors import ConfigError, StorageError
from dfzmq.wire import PieceInfo
from nodes.piecefiles import PieceCache, PieceFiles
from nodes.storesweep import migrate_refs, sweep_piece_files

log = logging.getLogger(__name__)

_NUM = struct.Struct(">I")
_REF = struct.Struct(">IQ")  # reference count, piece length
_U64 = struct.Struct(">Q")
DISK = object()  # get_ready: the piece is held in a file that must be read
_USAGE_KEY = b"!usage"
_SCHEMA_KEY = b"!schema"
_SCHEMA = b"1"
DELETE_BATCH = 512  # manifest entries per write transaction in delete_task
_MAX_TASK_KEY = 500  # LMDB's key limit (511) minus the piece number
# The `pieces` value of a piece held as a file: this prefix and its length. An inline piece of
# these very 20 bytes is told apart by its refs record, whose length is then 20.
_FILE_MARK = b"\x00dfzmq-file\x00"
_MARKER_LEN = len(_FILE_MARK) + _U64.size
FILE_THRESHOLD = 1 << 20  # pieces this long or longer go to files (README "Benchmarks": measured)
MIN_FILE_THRESHOLD = 4096
CACHE_BYTES = 64 << 20


def _task_key(task_id: str) -> bytes:
    # Task ids arrive from other peers too: a 64-character id that is not hex is just unknown.
    if len(task_id) == 64:
        try:
            return bytes.fromhex(task_id)
        except ValueError:
            pass
    return task_id.encode()


def _mutable(data: Any) -> bool:
    owner = data.obj if isinstance(data, memoryview) else data
    return isinstance(owner, (bytearray, mmap.mmap))


def _marker(length: int) -> bytes:
    return _FILE_MARK + _U64.pack(length)


def _marked_length(value: Any) -> int | None:
    """The length a `pieces` value claims as a file marker, or None if it is no marker."""
    if len(value) != _MARKER_LEN or bytes(value[:len(_FILE_MARK)]) != _FILE_MARK:
        return None
    length = _U64.unpack(bytes(value[len(_FILE_MARK):]))[0]
    return length if length != _MARKER_LEN else None


class PieceStore:
    def __init__(self, root: Path, map_size: int = 1 << 40, piece_files: bool = True,
                 file_threshold: int = FILE_THRESHOLD, cache_bytes: int = CACHE_BYTES,
                 direct: bool = True) -> None:
        if file_threshold < MIN_FILE_THRESHOLD or cache_bytes < 0:
            raise ConfigError(f"piece_file_threshold must be at least {MIN_FILE_THRESHOLD} bytes and "
                              f"piece_cache_bytes not negative (got {file_threshold}, {cache_bytes})")
        root.mkdir(parents=True, exist_ok=True)
        self.piece_files = piece_files
        self.file_threshold = file_threshold
        self.files = PieceFiles(root / "pieces", direct)
        self.cache = PieceCache(cache_bytes)
        # Serialises what creates or deletes piece files with the transactions that reference
        # them: a file is never deleted between another writer's rename and its commit.
        self._files_lock = threading.RLock()
        self._unlinked = 0  # bumped whenever piece files are deleted (see get)
        self._doomed: list[bytes] = []  # files to delete once the current transaction commits
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
        self.refs_db = self.env.open_db(b"refs")
        migrate_refs(self)
        sweep_piece_files(self)

    def close(self) -> None:
        self.files.sync()
        self.env.sync(True)
        self.env.close()

    def flush(self) -> None:
        self.files.sync()
        self.env.sync(True)

    # -- pieces ---------------------------------------------------------------------------

    def has(self, digest: str) -> bool:
        with self.env.begin(db=self.pieces) as txn:
            return txn.get(bytes.fromhex(digest)) is not None

    def get(self, digest: str) -> bytes | None:
        """The piece's bytes (never a buffer into the store), or None. Reads its file if it is
        held in one and not in memory: from the loop thread, use `get_ready` first."""
        key = bytes.fromhex(digest)
        unlinked = self._unlinked
        data, length = self._lookup(key)
        if data is not DISK:
            return data
        try:
            data = self.files.read(key, length)
        except StorageError as e:  # an I/O error: this piece is unavailable, as if missing
            log.warning("piece %s: %s", digest[:12], e)
            return None
        if data is None:
            log.warning("piece %s: its file is missing or damaged", digest[:12])
            return None
        if self._unlinked == unlinked:  # else it may have been deleted since: not cached again
            self.cache.add(key, data)
        return data

    def get_ready(self, digest: str, view: bool = False) -> Any:
        """The piece's bytes if they come without waiting for the disk (the memory of recent
        pieces, or LMDB), None if it is not held, or `DISK` when its file must be read: then
        call `get` in a thread. Never blocks on I/O, so the loop thread may call it. `view`:
        a piece in memory comes as the buffer it arrived in, uncopied (for a reader that only
        reads it at once, a streaming client)."""
        return self._lookup(bytes.fromhex(digest), view)[0]

    def _lookup(self, key: bytes, view: bool = False) -> tuple[Any, int]:
        data = self.cache.peek(key) if view else self.cache.get(key)
        if data is not None:
            return data, 0
        with self.env.begin(db=self.pieces, buffers=True) as txn:
            buf = txn.get(key)
            if buf is None:
                return None, 0
            length = self._file_length(txn, key, buf)
            if length is None:
                return bytes(buf), 0
        return DISK, length

    def _file_length(self, txn: lmdb.Transaction, key: bytes, value: Any) -> int | None:
        """The piece's length if `value` (its `pieces` value) marks it as held in a file."""
        length = _marked_length(value)
        if length is None:
            return None
        rec = txn.get(key, db=self.refs_db)
        if rec is not None and _REF.unpack(rec)[1] != length:
            return None  # an inline piece whose bytes happen to look like a marker
        return length

    def put(self, task_id: str, info: PieceInfo, data: Any) -> None:
        """Store a verified piece and record it in the task's manifest, atomically.
        A piece kept as a file is written before the transaction that references it; `data`
        may be kept in the cache of recent pieces, so callers must not modify it afterwards
        (received zmq frames and bytes are what callers pass)."""
        key = bytes.fromhex(info.digest)
        size = memoryview(data).nbytes
        as_file = self.piece_files and size >= self.file_threshold
        try:
            with self._files_lock:
                wrote = as_file and self._needs_file(key)
                if wrote:
                    self.files.write(key, data)
                try:
                    with self.env.begin(write=True, buffers=True) as txn:
                        if self._link(txn, task_id, info):
                            delta = self._ref(txn, key, data, as_file)
                            if delta:
                                self._add_usage(txn, delta)
                except BaseException:
                    self._doomed.clear()
                    if wrote:
                        self.files.unlink(key)
                    raise
                self._unlink_doomed()
                if as_file:
                    self.cache.add(key, bytes(data) if _mutable(data) else data)
        except lmdb.MapFullError as e:
            raise StorageError("piece store is full (map_size reached)") from e
        except lmdb.Error as e:
            if isinstance(e, lmdb.DiskError) or "No space" in str(e) or errno.ENOSPC == getattr(e, "errno", 0):
                raise StorageError(f"disk full while storing a piece: {e}") from e
            raise StorageError(f"piece store write failed: {e}") from e

    def adopt(self, task_id: str, info: PieceInfo) -> bool:
        """Record a piece we already hold under another task (dedup). True if it was there."""
        key = bytes.fromhex(info.digest)
        with self._files_lock:
            try:
                with self.env.begin(write=True, buffers=True) as txn:
                    if txn.get(key, db=self.refs_db) is None and not txn.cursor(db=self.pieces).set_key(key):
                        return False
                    if self._link(txn, task_id, info):
                        self._ref(txn, key, None)
            except BaseException:
                self._doomed.clear()
                raise
            self._unlink_doomed()
        return True

    def _needs_file(self, key: bytes) -> bool:
        """True when piece `key` must be written as a file: it is not held, or it is held as a
        file that is missing or of the wrong length (damaged on disk), so that receiving the
        piece again repairs it. One stat, only when the piece is held already (a dedup hit)."""
        with self.env.begin(buffers=True) as txn:
            value = txn.get(key, db=self.pieces)
            if value is None:
                return txn.get(key, db=self.refs_db) is None
            length = self._file_length(txn, key, value)
        if length is None:
            return False  # held inline, in LMDB
        try:
            return os.stat(self.files.path(key)).st_size != length
        except OSError:
            return True

    def _unlink_doomed(self) -> None:
        """After a commit: delete the files of pieces whose last reference it dropped."""
        doomed, self._doomed = self._doomed, []
        if doomed:
            self._unlinked += 1
        for key in doomed:
            self.cache.drop(key)
            self.files.unlink(key)

    # -- reference counts and usage (inside the caller's write transaction) ----------------

    def _link(self, txn: lmdb.Transaction, task_id: str, info: PieceInfo) -> bool:
        """Write the manifest entry. True if it now references a digest it did not before (the
        caller adds a reference); an entry that pointed at another digest drops that one."""
        mkey = _task_key(task_id) + _NUM.pack(info.num)
        old = txn.get(mkey, db=self.manifest_db)
        old = None if old is None else bytes(old)  # a buffer would not survive the put
        txn.put(mkey, msgpack.packb((info.offset, info.length, info.digest)), db=self.manifest_db)
        if old is None:
            return True
        old_digest = msgpack.unpackb(old)[2]
        if old_digest == info.digest:  # the same piece again: referenced already, unless dangling
            return txn.get(bytes.fromhex(old_digest), db=self.refs_db) is None
        freed = self._unref(txn, bytes.fromhex(old_digest))
        if freed:
            self._add_usage(txn, -freed)
        return True

    def _ref(self, txn: lmdb.Transaction, key: bytes, data: Any, as_file: bool = False) -> int:
        """One more reference to the piece `key`, storing `data` if the piece is new (only its
        marker when `as_file`: the caller wrote the file). Returns the bytes added to the store
        (0 when the piece was there already)."""
        rec = txn.get(key, db=self.refs_db)
        if rec is not None:
            count, size = _REF.unpack(rec)
            txn.put(key, _REF.pack(count + 1, size), db=self.refs_db)
            return 0
        cur = txn.cursor(db=self.pieces)
        if cur.set_key(key):  # held without a count (should not happen after _migrate)
            value = cur.value()
            size = _marked_length(value) or len(value)
            added = 0
        else:
            if data is None:
                raise StorageError("internal: a reference to a piece that is not stored")
            size = memoryview(data).nbytes
            txn.put(key, _marker(size) if as_file else data, db=self.pieces)
            added = size
        txn.put(key, _REF.pack(1, size), db=self.refs_db)
        return added

    def _unref(self, txn: lmdb.Transaction, key: bytes) -> int:
        """One reference fewer; the piece is deleted with its last reference. Bytes freed."""
        rec = txn.get(key, db=self.refs_db)
        if rec is None:
            return 0  # a manifest entry whose piece is missing: nothing to free
        count, size = _REF.unpack(rec)
        if count > 1:
            txn.put(key, _REF.pack(count - 1, size), db=self.refs_db)
            return 0
        txn.delete(key, db=self.refs_db)
        value = txn.get(key, db=self.pieces)
        if value is not None and _marked_length(value) == size:
            self._doomed.append(key)  # its file goes once this transaction commits
        txn.delete(key, db=self.pieces)
        return size

    def _add_usage(self, txn: lmdb.Transaction, delta: int) -> None:
        raw = txn.get(_USAGE_KEY, db=self.refs_db)
        usage = _U64.unpack(raw)[0] if raw is not None else 0
        txn.put(_USAGE_KEY, _U64.pack(max(0, usage + delta)), db=self.refs_db)


    # -- garbage collection support (called in the daemon's writer thread) ------------------

    def usage_bytes(self) -> int:
        """Bytes of live piece values (each stored piece counted once, however many tasks hold
        it). O(1): a counter kept in the write transactions, not a scan."""
        with self.env.begin(db=self.refs_db) as txn:
            raw = txn.get(_USAGE_KEY)
        return _U64.unpack(raw)[0] if raw is not None else 0

    def touch(self, task_id: str, when: float | None = None) -> bool:
        """Record that the task was read (by a client or another peer) at `when` (wall clock,
        default now). False if there is no such task."""
        return self.touch_many({task_id: time.time() if when is None else when}) == 1

    def touch_many(self, accessed: dict[str, float]) -> int:
        """`touch` for many tasks in one write transaction; a time older than the recorded one
        is ignored. Returns how many tasks exist and were touched."""
        n = 0
        try:
            with self.env.begin(write=True, db=self.tasks_db) as txn:
                for task_id, when in accessed.items():
                    key = _task_key(task_id)
                    if not 0 < len(key) <= _MAX_TASK_KEY:
                        continue
                    raw = txn.get(key)
                    if raw is None:
                        continue
                    meta = msgpack.unpackb(raw)
                    if when > meta.get("accessed", 0):
                        meta["accessed"] = when
                        txn.put(key, msgpack.packb(meta))
                    n += 1
        except lmdb.Error as e:
            raise StorageError(f"piece store write failed: {e}") from e
        return n

    def task_footprints(self) -> list[tuple[dict[str, Any], int, int]]:
        """(metadata, bytes held, bytes only this task holds) for every task with metadata.
        The last is what deleting the task alone would free now. Reads every manifest entry:
        call it only when something must be evicted."""
        out = []
        with self.env.begin() as txn:
            metas = [msgpack.unpackb(v) for _, v in txn.cursor(db=self.tasks_db)]
            cur = txn.cursor(db=self.manifest_db)
            for meta in metas:
                prefix = _task_key(meta.get("task_id", ""))
                own: dict[bytes, int] = {}
                held = 0
                if 0 < len(prefix) <= _MAX_TASK_KEY and cur.set_range(prefix):
                    for key, value in cur:
                        if not key.startswith(prefix):
                            break
                        if len(key) != len(prefix) + 4:
                            continue
                        _, length, digest = msgpack.unpackb(value)
                        held += length
                        d = bytes.fromhex(digest)
                        own[d] = own.get(d, 0) + 1
                exclusive = 0
                for d, n in own.items():
                    rec = txn.get(d, db=self.refs_db)
                    if rec is not None:
                        count, size = _REF.unpack(rec)
                        if count <= n:
                            exclusive += size
                out.append((meta, held, exclusive))
        return out

    def delete_task(self, task_id: str, batch: int = DELETE_BATCH) -> int:
        """Remove the task's manifest entries, its metadata, and every piece no other task
        references. Returns the bytes freed. Runs as several short write transactions of
        `batch` entries each; the metadata goes with the last one, so a crash in between
        leaves an incomplete task (resumable, and evicted again later), never a complete task
        with pieces missing."""
        prefix = _task_key(task_id)
        if not 0 < len(prefix) <= _MAX_TASK_KEY:
            return 0
        freed = 0
        try:
            while True:
                with self._files_lock:
                    step, last = self._delete_batch(prefix, batch)
                freed += step
                if last:
                    return freed
        except lmdb.Error as e:
            raise StorageError(f"deleting task {task_id[:12]} failed: {e}") from e

    def _delete_batch(self, prefix: bytes, batch: int) -> tuple[int, bool]:
        """One write transaction of delete_task (holding the files lock): bytes freed, and
        whether it was the last one."""
        try:
            with self.env.begin(write=True, buffers=True) as txn:
                cur = txn.cursor(db=self.manifest_db)
                found: list[tuple[bytes, str]] = []
                if cur.set_range(prefix):
                    for key, value in cur:
                        key = bytes(key)
                        if not key.startswith(prefix) or len(found) >= batch:
                            break
                        if len(key) == len(prefix) + 4:
                            found.append((key, msgpack.unpackb(value)[2]))
                step = 0
                for key, digest in found:
                    txn.delete(key, db=self.manifest_db)
                    step += self._unref(txn, bytes.fromhex(digest))
                if step:
                    self._add_usage(txn, -step)
                last = len(found) < batch
                if last:
                    txn.delete(prefix, db=self.tasks_db)
        except BaseException:
            self._doomed.clear()
            raise
        self._unlink_doomed()
        return step, last

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
        return {"pieces": st["entries"], "store_bytes": self.env.info()["last_pgno"] * 4096,
                "piece_cache_bytes": self.cache.bytes, "piece_cache_hits": self.cache.hits,
                "piece_cache_misses": self.cache.misses}
