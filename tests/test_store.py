"""nodes/store.py: the peer's LMDB piece store, on real files in tmp_path."""

from __future__ import annotations

import random

import blake3
import pytest

from dfzmq.wire import PieceInfo
from nodes.store import PieceStore

T1 = "a1" * 32
T2 = "b2" * 32


def piece(num: int, data: bytes, offset: int | None = None) -> PieceInfo:
    return PieceInfo(num, num * len(data) if offset is None else offset, len(data),
                     blake3.blake3(data).hexdigest())


@pytest.fixture
def store(tmp_path):
    s = PieceStore(tmp_path / "store", map_size=64 << 20)
    yield s
    s.close()


def blobs(n: int, size: int = 1000, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(n)]


def test_put_get_has(store):
    data = b"hello piece" * 100
    info = piece(0, data)
    assert not store.has(info.digest) and store.get(info.digest) is None
    store.put(T1, info, data)
    assert store.has(info.digest)
    got = store.get(info.digest)
    assert got == data and type(got) is bytes  # a copy, valid after the transaction
    assert store.manifest(T1) == {0: info}


def test_put_accepts_memoryviews(store):
    data = bytearray(b"x" * 5000)
    info = piece(0, bytes(data))
    store.put(T1, info, memoryview(data))
    assert store.get(info.digest) == bytes(data)


def test_empty_piece(store):
    info = piece(0, b"")
    store.put(T1, info, b"")
    assert store.has(info.digest) and store.get(info.digest) == b""


def test_same_bytes_in_two_tasks_are_stored_once(store):
    shared, own1, own2 = blobs(3)
    store.put(T1, piece(0, shared), shared)
    store.put(T1, piece(1, own1), own1)
    store.put(T2, piece(5, shared, offset=0), shared)
    store.put(T2, piece(6, own2, offset=1000), own2)
    assert store.stats()["pieces"] == 3
    assert set(store.manifest(T1)) == {0, 1}
    assert set(store.manifest(T2)) == {5, 6}
    assert store.manifest(T2)[5] == PieceInfo(5, 0, 1000, piece(0, shared).digest)
    # one piece repeated inside a task (zero pages) is stored once too
    zeros = b"\0" * 1000
    for n in range(10, 20):
        store.put(T1, piece(n, zeros), zeros)
    assert store.stats()["pieces"] == 4
    assert len(store.manifest(T1)) == 12


def test_adopt(store):
    (data,) = blobs(1)
    info = piece(3, data)
    assert store.adopt(T2, info) is False  # not held: nothing recorded
    assert store.manifest(T2) == {}
    store.put(T1, info, data)
    assert store.adopt(T2, info) is True
    assert store.manifest(T2) == {3: info}
    assert store.stats()["pieces"] == 1


def test_manifest_is_per_task_and_ordered(store):
    tasks = [f"{i:02x}" * 32 for i in range(5)]
    data = blobs(40, size=100)
    for k, t in enumerate(tasks):
        for n in random.Random(k).sample(range(8), 8):
            store.put(t, piece(n, data[8 * k + n]), data[8 * k + n])
    for k, t in enumerate(tasks):
        m = store.manifest(t)
        assert list(m) == list(range(8))
        assert all(store.get(p.digest) == data[8 * k + n] for n, p in m.items())
    assert store.manifest("ff" * 32) == {}


def test_short_task_ids_do_not_see_each_other(store):
    """Non-hex task ids are keyed by their text; a prefix of another id is a different task."""
    a, b = blobs(2)
    store.put("abc", piece(0, a), a)
    store.put("abcd", piece(0, b), b)
    store.put("ab", piece(1, b), b)
    assert store.manifest("abc") == {0: piece(0, a)}
    assert store.manifest("abcd") == {0: piece(0, b)}
    assert store.manifest("ab") == {1: piece(1, b)}


def test_large_piece_numbers(store):
    (data,) = blobs(1)
    for n in (0, 255, 256, 65536, 2**24 + 1, 2**32 - 1):
        store.put(T1, PieceInfo(n, n * 7, len(data), piece(0, data).digest), data)
    assert list(store.manifest(T1)) == [0, 255, 256, 65536, 2**24 + 1, 2**32 - 1]


def test_task_metadata(store):
    assert store.get_task(T1) is None
    store.put_task(T1, {"url": "https://x/y", "content_length": 123, "complete": False})
    meta = store.get_task(T1)
    assert meta["url"] == "https://x/y" and meta["content_length"] == 123
    assert meta["task_id"] == T1 and meta["updated"] > 0
    store.put_task(T1, {**meta, "complete": True, "file_digest": "ee" * 32})
    assert store.get_task(T1)["complete"] is True
    store.put_task(T2, {"url": "https://x/z"})
    assert sorted(m["task_id"] for m in store.tasks()) == sorted([T1, T2])


def test_hostile_task_ids_do_not_raise(store):
    """Task ids arrive from other peers (SUBSCRIBE): an odd one is unknown, not a crash."""
    for bad in ["zz" * 32, "", "x" * 64, "é" * 64, "x" * 1000]:
        assert store.manifest(bad) == {}
        assert store.get_task(bad) is None


def test_survives_close_and_reopen(tmp_path):
    root = tmp_path / "store"
    s = PieceStore(root, map_size=64 << 20)
    data = blobs(6, size=70000)
    infos = [piece(n, d) for n, d in enumerate(data)]
    for info, d in zip(infos, data):
        s.put(T1, info, d)
    s.adopt(T2, infos[0])
    s.put_task(T1, {"url": "u", "complete": True, "piece_count": 6})
    s.flush()
    s.close()

    s = PieceStore(root, map_size=64 << 20)
    try:
        assert s.manifest(T1) == dict(enumerate(infos))
        assert s.manifest(T2) == {0: infos[0]}
        assert all(s.get(i.digest) == d for i, d in zip(infos, data))
        assert s.get_task(T1)["piece_count"] == 6
        assert s.stats()["pieces"] == 6 and s.stats()["store_bytes"] > 6 * 70000
    finally:
        s.close()


def test_full_store_raises_storage_error(tmp_path):
    from dfzmq.errors import StorageError

    s = PieceStore(tmp_path / "small", map_size=1 << 20)
    try:
        with pytest.raises(StorageError):
            for n, d in enumerate(blobs(40, size=64 * 1024)):
                s.put(T1, piece(n, d), d)
        # what was stored before the error is still intact
        m = s.manifest(T1)
        assert m and all(s.has(p.digest) for p in m.values())
    finally:
        s.close()
