"""Storage garbage collection: the pure policy (nodes/gc.py), and the store's reference counts,
usage counter and deletes on real LMDB files in tmp_path."""

from __future__ import annotations

import random

import blake3
import lmdb
import msgpack
import pytest

from dfzmq.config import DaemonConfig, resolve
from dfzmq.errors import ConfigError
from dfzmq.wire import PieceInfo
from nodes.gc import GarbageCollector, TaskUsage, choose_victims
from nodes.store import PieceStore

T1, T2, T3 = "a1" * 32, "b2" * 32, "c3" * 32
NOW = 1_700_000_000.0


def piece(num: int, data: bytes) -> PieceInfo:
    return PieceInfo(num, num * len(data), len(data), blake3.blake3(data).hexdigest())


def blobs(n: int, size: int = 1000, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(n)]


@pytest.fixture
def store(tmp_path):
    s = PieceStore(tmp_path / "store", map_size=256 << 20)
    yield s
    s.close()


def scanned_usage(s: PieceStore) -> int:
    """The truth the counter must match: every stored piece's length, by a full scan."""
    with s.env.begin(db=s.pieces, buffers=True) as txn:
        return sum(len(v) for _, v in txn.cursor())


def fill(s: PieceStore, task_id: str, data: list[bytes], complete: bool = True) -> None:
    s.put_task(task_id, {"url": f"https://x/{task_id[:4]}", "complete": complete, "piece_count": len(data)})
    for n, d in enumerate(data):
        s.put(task_id, piece(n, d), d)


# -- policy -------------------------------------------------------------------------------


def tu(tid: str, size: int, age_s: float) -> TaskUsage:
    return TaskUsage(tid, size, NOW - age_s, True)


def test_under_high_watermark_nothing_goes():
    tasks = [tu("a", 40, 100), tu("b", 40, 50)]
    assert choose_victims(tasks, 80, 100, 0.9, 0.7, 0, NOW, set()) == []
    assert choose_victims(tasks, 90, 100, 0.9, 0.7, 0, NOW, set()) == []  # at high is not above it


def test_above_high_evicts_lru_until_under_low():
    tasks = [tu("new", 20, 10), tu("old", 20, 300), tu("mid", 20, 200), tu("older", 20, 400), tu("x", 15, 5)]
    # 95 > 90: down to 70 or less, oldest first: 95 - 20 = 75 is not enough, 75 - 20 = 55 is
    assert choose_victims(tasks, 95, 100, 0.9, 0.7, 0, NOW, set()) == ["older", "old"]
    assert choose_victims(tasks, 89, 100, 0.85, 0.7, 0, NOW, set()) == ["older"]  # 69
    assert choose_victims(tasks, 99, 100, 0.9, 0.2, 0, NOW, set()) == ["older", "old", "mid", "new"]


def test_no_quota_means_no_quota_eviction():
    tasks = [tu("a", 10**12, 10**6)]
    assert choose_victims(tasks, 10**12, 0, 0.9, 0.7, 0, NOW, set()) == []


def test_in_use_is_never_a_victim():
    tasks = [tu("busy", 90, 10**6), tu("idle", 5, 1)]
    got = choose_victims(tasks, 95, 100, 0.9, 0.7, 60, NOW, {"busy"})
    assert got == ["idle"]  # not enough to reach low, but the busy one stays whatever it costs
    assert choose_victims([tu("busy", 90, 10**6)], 95, 100, 0.9, 0.7, 60, NOW, {"busy"}) == []


def test_ttl_expired_always_go_even_under_quota():
    tasks = [tu("stale", 1, 3601), tu("fresh", 1, 3599), tu("stale-busy", 1, 10**5)]
    assert choose_victims(tasks, 3, 100, 0.9, 0.7, 3600, NOW, {"stale-busy"}) == ["stale"]
    assert choose_victims(tasks, 3, 0, 0.9, 0.7, 3600, NOW, set()) == ["stale-busy", "stale"]
    assert choose_victims(tasks, 3, 100, 0.9, 0.7, 0, NOW, set()) == []  # ttl 0 keeps forever


def test_ttl_victims_count_toward_the_quota():
    tasks = [tu("stale", 30, 5000), tu("a", 10, 100), tu("b", 10, 50)]
    # 95 - 30 (expired) = 65 <= 70: nothing else has to go
    assert choose_victims(tasks, 95, 100, 0.9, 0.7, 3600, NOW, set()) == ["stale"]
    assert choose_victims(tasks, 95, 100, 0.9, 0.7, 0, NOW, set()) == ["stale"]  # LRU picks it too
    tasks = [tu("stale", 5, 5000), tu("a", 10, 100), tu("b", 10, 50)]
    assert choose_victims(tasks, 95, 100, 0.9, 0.7, 3600, NOW, set()) == ["stale", "a", "b"]


def test_lru_ties_are_deterministic():
    tasks = [tu("b", 10, 100), tu("a", 10, 100), tu("c", 10, 100)]
    assert choose_victims(tasks, 100, 100, 0.9, 0.85, 0, NOW, set()) == ["a", "b"]


def test_config_fields_resolve_with_units():
    cfg = resolve(DaemonConfig, "daemon", {}, {"daemon": {"disk-quota": "10GiB", "task-ttl-s": "1.5"}},
                  env={"DFZMQ_GC_HIGH_WATERMARK": "0.8"})
    assert cfg.disk_quota == 10 * 1024**3 and cfg.task_ttl_s == 1.5 and cfg.gc_high_watermark == 0.8
    assert cfg.gc_low_watermark == 0.7 and cfg.gc_interval_s == 30.0
    defaults = DaemonConfig()
    assert defaults.disk_quota == 0 and defaults.task_ttl_s == 0


def test_bad_watermarks_are_config_errors(store):
    with pytest.raises(ConfigError):
        GarbageCollector(store, DaemonConfig(disk_quota=100, gc_high_watermark=0.5, gc_low_watermark=0.6))
    with pytest.raises(ConfigError):
        GarbageCollector(store, DaemonConfig(disk_quota=100, gc_high_watermark=1.5))


# -- store: refcounts, usage, delete -------------------------------------------------------


def test_shared_pieces_survive_deleting_one_of_two_tasks(store):
    shared = blobs(3, seed=1)
    own1, own2 = blobs(2, seed=2)
    fill(store, T1, shared + [own1])
    store.put_task(T2, {"complete": True, "piece_count": 4})
    for n, d in enumerate(shared):
        assert store.adopt(T2, piece(n, d))
    store.put(T2, piece(3, own2), own2)
    assert store.usage_bytes() == 5 * 1000 == scanned_usage(store)

    assert store.delete_task(T1) == 1000  # only own1 was T1's alone
    assert store.get_task(T1) is None and store.manifest(T1) == {}
    assert store.get(piece(3, own1).digest) is None
    m2 = store.manifest(T2)
    assert len(m2) == 4 and all(store.get(p.digest) is not None for p in m2.values())
    assert store.usage_bytes() == 4000 == scanned_usage(store)

    assert store.delete_task(T2) == 4000
    assert store.usage_bytes() == 0 == scanned_usage(store) and store.stats()["pieces"] == 0
    assert store.delete_task(T2) == 0  # gone already: nothing, no error


def test_piece_repeated_within_a_task_is_freed_with_it(store):
    zeros = b"\0" * 4096
    fill(store, T1, [zeros] * 10)
    fill(store, T2, [zeros] * 2)
    assert store.usage_bytes() == 4096
    assert store.delete_task(T1) == 0  # T2 still holds the zero page
    assert store.has(piece(0, zeros).digest)
    assert store.delete_task(T2) == 4096 and store.usage_bytes() == 0


def test_usage_is_exact_across_put_adopt_delete_and_reopen(tmp_path):
    root = tmp_path / "store"
    rng = random.Random(7)
    pool = [rng.randbytes(rng.randrange(1, 70000)) for _ in range(30)]
    s = PieceStore(root, map_size=256 << 20)
    tasks = [f"{i:02x}" * 32 for i in range(6)]
    try:
        for step in range(300):
            t = rng.choice(tasks)
            op = rng.random()
            d = rng.choice(pool)
            if op < 0.55:
                s.put(t, piece(rng.randrange(20), d), d)  # also overwrites entries with new digests
            elif op < 0.8:
                s.adopt(t, piece(rng.randrange(20), d))
            elif op < 0.85:
                s.put(t, piece(0, d), d)
                s.put(t, piece(0, d), d)  # the same piece twice is one reference
            else:
                s.delete_task(t, batch=3)
            assert s.usage_bytes() == scanned_usage(s), step
            if step % 100 == 99:
                s.close()
                s = PieceStore(root, map_size=256 << 20)
                assert s.usage_bytes() == scanned_usage(s)
        for t in tasks:
            s.delete_task(t, batch=4)
        assert s.usage_bytes() == 0 and s.stats()["pieces"] == 0
    finally:
        s.close()


def test_delete_frees_bytes_in_small_batches(store):
    data = blobs(50, size=3000, seed=3)
    fill(store, T1, data)
    fill(store, T2, blobs(5, seed=4))
    before = store.usage_bytes()
    assert before == 50 * 3000 + 5 * 1000
    assert store.delete_task(T1, batch=7) == 50 * 3000
    assert store.usage_bytes() == 5000 == scanned_usage(store)
    assert len(store.manifest(T2)) == 5 and store.get_task(T2) is not None


def test_store_written_before_refcounts_is_counted_on_open(tmp_path):
    """A store from before `refs` existed: pieces and manifests only. Opening it counts them."""
    root = tmp_path / "store"
    shared, own1, own2, orphan = blobs(4, size=2000, seed=5)
    root.mkdir()
    env = lmdb.open(str(root / "store.lmdb"), map_size=64 << 20, max_dbs=4, subdir=True)
    pieces, manifest, tasks = (env.open_db(n) for n in (b"pieces", b"manifest", b"tasks"))
    with env.begin(write=True) as txn:
        for tid, items in ((T1, [shared, own1]), (T2, [shared, own2])):
            txn.put(bytes.fromhex(tid), msgpack.packb({"task_id": tid, "complete": True, "updated": 1.0}), db=tasks)
            for n, d in enumerate(items):
                info = piece(n, d)
                txn.put(bytes.fromhex(info.digest), d, db=pieces)
                txn.put(bytes.fromhex(tid) + n.to_bytes(4, "big"),
                        msgpack.packb((info.offset, info.length, info.digest)), db=manifest)
        txn.put(bytes.fromhex(piece(0, orphan).digest), orphan, db=pieces)  # nobody's piece
    env.close()

    s = PieceStore(root, map_size=64 << 20)
    try:
        assert s.usage_bytes() == 3 * 2000 == scanned_usage(s)  # the orphan is dropped
        assert s.delete_task(T1) == 2000
        assert s.get(piece(0, shared).digest) == shared  # T2 still has it
        assert s.delete_task(T2) == 4000 and s.usage_bytes() == 0
    finally:
        s.close()


def test_touch_records_last_access(store):
    fill(store, T1, blobs(1))
    assert store.touch(T1, when=NOW) is True
    assert store.get_task(T1)["accessed"] == NOW
    assert store.touch(T1, when=NOW - 10) is True  # older: ignored
    assert store.get_task(T1)["accessed"] == NOW
    assert store.touch(T3) is False and store.get_task(T3) is None  # no task: not created
    assert store.touch("x" * 1000) is False


# -- the collector over a real store ----------------------------------------------------------


def gc_for(store, **kw) -> GarbageCollector:
    return GarbageCollector(store, DaemonConfig(**kw))


def set_access(store, tid: str, when: float) -> None:
    meta = store.get_task(tid)
    store.put_task(tid, meta)
    with store.env.begin(write=True, db=store.tasks_db) as txn:  # pin "updated" for the test
        txn.put(bytes.fromhex(tid), msgpack.packb({**store.get_task(tid), "updated": when, "accessed": when}))


def test_collector_brings_usage_under_low_and_spares_in_use(store):
    tids = [f"{i:02x}" * 32 for i in range(10)]
    for i, tid in enumerate(tids):
        fill(store, tid, blobs(10, size=10_000, seed=100 + i))  # 100 kB each, 1 MB total
        set_access(store, tid, NOW - 1000 + i)  # tids[0] is the least recently used
    shared = blobs(1, size=10_000, seed=999)[0]
    for tid in tids[:3]:  # one piece shared by the three oldest
        store.put(tid, piece(50, shared), shared)
    assert store.usage_bytes() == 1_010_000
    busy = {tids[0], tids[4]}
    gc = gc_for(store, disk_quota=1_000_000, gc_high_watermark=0.9, gc_low_watermark=0.5)
    res = gc.collect(NOW, busy)

    assert store.usage_bytes() <= 500_000 == 0.5 * gc.quota
    assert res["usage_after"] == store.usage_bytes() == scanned_usage(store)
    assert res["freed_bytes"] == 1_010_000 - store.usage_bytes()
    assert not busy & set(res["evicted"])
    assert all(store.get_task(t) is not None and len(store.manifest(t)) == 11 for t in (tids[0],))
    assert len(store.manifest(tids[4])) == 10
    assert all(store.get(p.digest) is not None for t in busy for p in store.manifest(t).values())
    # least recently used first, and no more than needed
    assert res["evicted"] == [t for t in tids if t not in busy][: len(res["evicted"])]
    assert store.usage_bytes() > 500_000 - 110_000

    again = gc.collect(NOW, busy)  # under the high watermark now: a quiet round
    assert again["evicted"] == [] and again["freed_bytes"] == 0


def test_collector_ttl_and_noted_accesses(store):
    for i, tid in enumerate((T1, T2, T3)):
        fill(store, tid, blobs(2, seed=200 + i))
        set_access(store, tid, NOW - 7200)
    gc = gc_for(store, task_ttl_s=3600)
    gc.note_access(T2, when=NOW - 60)  # read recently: written down by collect
    res = gc.collect(NOW, {T3})
    assert res["evicted"] == [T1]
    assert store.get_task(T1) is None and store.get_task(T2)["accessed"] == NOW - 60
    assert store.get_task(T3) is not None  # expired, but in use
    assert store.usage_bytes() == 4000 == scanned_usage(store)


def test_collector_rechecks_in_use_before_each_delete(store):
    """A task that starts while the round runs (a live view of running tasks) is spared."""
    for i, tid in enumerate((T1, T2)):
        fill(store, tid, blobs(5, seed=300 + i))
        set_access(store, tid, NOW - 100 + i)

    class StartsDuringRound(set):
        calls = 0

        def __contains__(self, tid):
            self.calls += 1
            return tid == T2 and self.calls > 2  # not in use when planned, in use at delete time

    gc = gc_for(store, disk_quota=10_000, gc_high_watermark=0.5, gc_low_watermark=0.1)
    res = gc.collect(NOW, StartsDuringRound())
    assert res["evicted"] == [T1] and res["spared_in_use"] == [T2]
    assert len(store.manifest(T2)) == 5


def test_disabled_collector_does_nothing(store):
    fill(store, T1, blobs(3))
    set_access(store, T1, 0.0)
    res = gc_for(store).collect(NOW, set())
    assert res["evicted"] == [] and store.usage_bytes() == 3000
