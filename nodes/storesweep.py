"""The piece store's checks at open: references counted in a store older than them
(`migrate_refs`), and piece files and LMDB's markers agreeing again after a crash
(`sweep_piece_files`).

A piece file is written before the transaction that references it and deleted after the one
that drops its last reference (nodes/store.py), so a crash can leave two kinds of disagreement:
a file nothing references (the write happened, the commit did not; or the commit happened, the
unlink did not), deleted here; and, after power loss or a hand deleting files, a marker whose file
is missing or has the wrong length: the marker, its refs record and every manifest entry pointing at it are dropped and
the usage counter lowered, so those tasks hold fewer pieces and resume, rather than being
complete with holes. Task metadata (piece_count, complete manifest) is left as it is.

Both run inside `PieceStore.__init__`, before any other user of the store.
"""

from __future__ import annotations

import logging
from typing import Any

import lmdb
import msgpack

from dfzmq.errors import StorageError

log = logging.getLogger(__name__)

# With at least this many piece files missing, and more than half of all, the store refuses to
# open rather than drop them: that is an unmounted or moved directory, not a crash (a crash
# loses only the files written last).
MISSING_REFUSE_MIN = 16


def sweep_piece_files(store: Any) -> None:
    """At open: delete piece files no marker points at (and temporary files of interrupted
    writes); drop markers whose file is missing, with every manifest entry referencing
    them, so their tasks are partial (and resume) rather than complete with holes.
    O(pieces) once per open: a directory listing and a pass over the `pieces` keys (the
    values of inline pieces, on overflow pages, are not read)."""
    from nodes.store import _MARKER_LEN  # the store imports this module

    markers: dict[bytes, int] = {}
    with store.env.begin(buffers=True) as txn:
        for key, value in txn.cursor(db=store.pieces):
            if len(value) != _MARKER_LEN:
                continue
            key = bytes(key)
            length = store._file_length(txn, key, value)
            if length is not None:
                markers[key] = length
    listed: dict[bytes, tuple[Any, int]] = {}
    for path, key, size in store.files.scan():
        if key is not None:
            listed[key] = (path, size)
        elif path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
        else:
            log.warning("piece store: ignoring a stray file %s", path)
    missing: dict[bytes, int] = {}
    for key, length in markers.items():
        found = listed.get(key)
        if found is None or found[1] != length:  # gone, or cut short / grown: damaged
            missing[key] = length
        else:
            del listed[key]
    if len(missing) >= MISSING_REFUSE_MIN and len(missing) > len(markers) // 2:
        raise StorageError(
            f"{len(missing)} of the {len(markers)} piece files the store references are missing "
            f"or damaged in {store.files.root}: is that directory's filesystem mounted? (remove "
            f"the store directory to start empty)")
    for path, _ in listed.values():
        path.unlink(missing_ok=True)
    if listed:
        log.info("piece store: deleted %d piece files nothing referenced or damaged", len(listed))
    if missing:
        _drop_missing(store, missing)


def _drop_missing(store: Any, missing: dict[bytes, int]) -> None:
    from nodes.store import _REF

    digests = {k.hex() for k in missing}
    dropped = 0
    try:
        with store.env.begin(write=True, buffers=True) as txn:
            gone = [bytes(k) for k, v in txn.cursor(db=store.manifest_db)
                    if msgpack.unpackb(v)[2] in digests]
            for k in gone:
                txn.delete(k, db=store.manifest_db)
            freed = 0
            for key in missing:
                rec = txn.get(key, db=store.refs_db)
                if rec is not None:
                    freed += _REF.unpack(rec)[1]
                    txn.delete(key, db=store.refs_db)
                txn.delete(key, db=store.pieces)
            store._add_usage(txn, -freed)
            dropped = len(gone)
    except lmdb.Error as e:
        raise StorageError(f"cannot drop pieces whose files are missing: {e}") from e
    log.warning("piece store: %d piece files were missing; %d manifest entries dropped (those "
                "tasks will fetch the pieces again)", len(missing), dropped)


def migrate_refs(store: Any) -> None:
    """Count references and usage of a store written before `refs` existed (once, at open;
    it reads every manifest entry and every piece's length, so it is O(pieces) one time).
    Pieces that no manifest entry references are deleted: nothing could ever free them."""
    from nodes.store import _REF, _SCHEMA, _SCHEMA_KEY, _U64, _USAGE_KEY  # the store imports us

    with store.env.begin(db=store.refs_db) as txn:
        if txn.get(_SCHEMA_KEY) == _SCHEMA:
            return
    try:
        with store.env.begin(write=True, buffers=True) as txn:
            txn.drop(store.refs_db, delete=False)
            counts: dict[bytes, int] = {}
            for _, value in txn.cursor(db=store.manifest_db):
                d = bytes.fromhex(msgpack.unpackb(bytes(value))[2])
                counts[d] = counts.get(d, 0) + 1
            usage = 0
            orphans = []
            for key, value in txn.cursor(db=store.pieces):
                key = bytes(key)
                count = counts.get(key)
                if count is None:
                    orphans.append(key)
                    continue
                usage += len(value)
                txn.put(key, _REF.pack(count, len(value)), db=store.refs_db)
            for key in orphans:
                txn.delete(key, db=store.pieces)
            txn.put(_USAGE_KEY, _U64.pack(usage), db=store.refs_db)
            txn.put(_SCHEMA_KEY, _SCHEMA, db=store.refs_db)
    except lmdb.Error as e:
        raise StorageError(f"cannot count the piece store's references: {e}") from e
