"""Large pieces as files beside LMDB (nodes/piecefiles.py, nodes/store.py): real files, real
LMDB, real O_DIRECT; a crash is a real process dying halfway through a put; the end-to-end
tests run a real cluster with a real origin, `dfzmq fetch` and curl through the proxy."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import blake3
import pytest

from dfzmq.errors import ConfigError, StorageError
from dfzmq.wire import PieceInfo
from nodes.gc import GarbageCollector
from nodes.store import _MARKER_LEN, PieceStore, _marker
from tests.conftest import make_file
from tools.cluster import LocalCluster, free_port
from tools.origin import Origin

T1, T2 = "11" * 32, "22" * 32
TH = 64 * 1024  # the threshold these stores use
SHM = Path("/dev/shm")
REPO = Path(__file__).resolve().parent.parent


def piece(num: int, data: bytes, offset: int | None = None) -> PieceInfo:
    return PieceInfo(num, num * len(data) if offset is None else offset, len(data), blake3.blake3(data).hexdigest())


def open_store(root: Path, **kw) -> PieceStore:
    kw.setdefault("file_threshold", TH)
    return PieceStore(root, map_size=64 << 20, **kw)


def files(root: Path) -> list[Path]:
    d = root / "pieces"
    return sorted(p for p in d.rglob("*") if p.is_file()) if d.is_dir() else []


def scanned_usage(s: PieceStore) -> int:
    """Every stored piece's length by a full scan: a file piece counts its file's length."""
    total = 0
    with s.env.begin(db=s.pieces, buffers=True) as txn:
        for key, value in txn.cursor():
            if len(value) == _MARKER_LEN and bytes(value) == _marker(s.files.path(bytes(key)).stat().st_size):
                total += s.files.path(bytes(key)).stat().st_size
            else:
                total += len(value)
    return total


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "store", cache_bytes=0)  # every get reads the file
    yield s
    s.close()


@pytest.mark.parametrize("size", [TH - 1, TH, TH + 1, TH + 4096, 3 * TH + 123, 1 << 20, (1 << 20) + 1])
def test_roundtrip_around_the_threshold(store, tmp_path, size):
    data = random.Random(size).randbytes(size)
    info = piece(0, data)
    store.put(T1, info, memoryview(data))
    assert store.has(info.digest) and store.get(info.digest) == data
    assert store.manifest(T1) == {0: info}
    assert store.usage_bytes() == size == scanned_usage(store)
    held = files(tmp_path / "store")
    if size >= TH:
        assert [p.name for p in held] == [info.digest] and held[0].stat().st_size == size
        assert store.files.direct_bytes + store.files.buffered_bytes == size
    else:
        assert held == []


def test_cache_serves_recent_pieces_and_stays_bounded(tmp_path):
    s = open_store(tmp_path / "s", cache_bytes=3 * TH)
    try:
        blobs = [random.Random(i).randbytes(TH) for i in range(5)]
        for n, b in enumerate(blobs):
            s.put(T1, piece(n, b), b)
        assert s.cache.bytes <= 3 * TH
        hits = s.cache.hits
        assert s.get(piece(4, blobs[4]).digest) == blobs[4] and s.cache.hits == hits + 1
        assert s.get(piece(0, blobs[0]).digest) == blobs[0]  # evicted: read from its file
        assert s.cache.misses >= 1
    finally:
        s.close()


def test_dedup_refcount_and_file_deleted_with_last_reference(store, tmp_path):
    shared, own = random.Random(1).randbytes(TH * 2), random.Random(2).randbytes(TH)
    store.put(T1, piece(0, shared), shared)
    store.put(T1, piece(1, own, offset=len(shared)), own)
    store.put(T2, piece(7, shared, offset=0), shared)
    assert len(files(tmp_path / "store")) == 2
    assert store.usage_bytes() == len(shared) + len(own)
    d = piece(0, shared).digest
    assert store.adopt("33" * 32, piece(0, shared)) is True
    assert store.delete_task(T1) == len(own)  # the shared piece is still referenced twice
    assert [p.name for p in files(tmp_path / "store")] == [d] and store.get(d) == shared
    assert store.delete_task("33" * 32) == 0 and store.get(d) == shared
    assert store.delete_task(T2) == len(shared)
    assert files(tmp_path / "store") == [] and store.get(d) is None and not store.has(d)
    assert store.usage_bytes() == 0 == scanned_usage(store)


def test_replacing_a_manifest_entry_deletes_the_unreferenced_file(store, tmp_path):
    a, b = random.Random(3).randbytes(TH), random.Random(4).randbytes(TH)
    store.put(T1, piece(0, a), a)
    store.put(T1, PieceInfo(0, 0, TH, piece(0, b).digest), b)
    assert [p.name for p in files(tmp_path / "store")] == [piece(0, b).digest]
    assert store.usage_bytes() == TH


def test_gc_quota_evicts_file_pieces(tmp_path):
    s = open_store(tmp_path / "s")
    try:
        for k, tid in enumerate((T1, T2)):
            blobs = [random.Random(10 * k + n).randbytes(TH) for n in range(4)]
            s.put_task(tid, {"url": f"https://x/{k}", "complete": True, "piece_count": 4, "accessed": k})
            for n, b in enumerate(blobs):
                s.put(tid, piece(n, b), b)
        cfg = types.SimpleNamespace(disk_quota=6 * TH, gc_high_watermark=0.9, gc_low_watermark=0.7,
                                    task_ttl_s=0, gc_interval_s=30)
        out = GarbageCollector(s, cfg).collect(now=1e9, in_use=set())
        assert out["evicted"] == [T1] and out["freed_bytes"] == 4 * TH
        assert s.usage_bytes() == 4 * TH == scanned_usage(s) and len(files(tmp_path / "s")) == 4
    finally:
        s.close()


def test_pieces_in_lmdb_and_in_files_both_read_whatever_the_setting(tmp_path):
    big, small = random.Random(5).randbytes(2 * TH), random.Random(6).randbytes(3 * TH)
    s = open_store(tmp_path / "s", piece_files=False)
    s.put(T1, piece(0, small), small)  # into LMDB
    s.close()
    assert files(tmp_path / "s") == []
    s = open_store(tmp_path / "s", cache_bytes=0)
    s.put(T1, piece(1, big), big)  # into a file
    assert s.get(piece(0, small).digest) == small and s.get(piece(1, big).digest) == big
    s.close()
    s = open_store(tmp_path / "s", piece_files=False, cache_bytes=0)
    try:
        assert s.get(piece(0, small).digest) == small and s.get(piece(1, big).digest) == big
        assert len(s.manifest(T1)) == 2 and s.usage_bytes() == len(small) + len(big)
    finally:
        s.close()


def test_an_inline_piece_that_looks_like_a_marker_is_its_bytes(store):
    fake = _marker(TH)
    assert len(fake) == _MARKER_LEN
    store.put(T1, piece(0, fake), fake)
    assert store.get(piece(0, fake).digest) == fake


def test_reopen_sweeps_orphans_and_drops_pieces_whose_file_is_missing(tmp_path):
    root = tmp_path / "s"
    blobs = [random.Random(20 + n).randbytes(TH + n) for n in range(3)]
    s = open_store(root)
    s.put_task(T1, {"url": "u", "complete": True, "piece_count": 3})
    for n, b in enumerate(blobs):
        s.put(T1, piece(n, b), b)
    s.close()
    gone = s.files.path(bytes.fromhex(piece(1, blobs[1]).digest))
    gone.unlink()
    orphan = s.files.path(bytes(32))
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x" * 5000)
    tmp = gone.parent / (gone.name + ".123-4.tmp")
    tmp.write_bytes(b"partial")
    s = open_store(root, cache_bytes=0)
    try:
        assert not orphan.exists() and not tmp.exists()
        assert sorted(s.manifest(T1)) == [0, 2]  # a partial task: it resumes, never complete with holes
        assert s.get_task(T1)["piece_count"] == 3
        assert not s.has(piece(1, blobs[1]).digest)
        assert s.usage_bytes() == len(blobs[0]) + len(blobs[2]) == scanned_usage(s)
        s.put(T1, piece(1, blobs[1]), blobs[1])  # fetched again
        assert s.get(piece(1, blobs[1]).digest) == blobs[1]
    finally:
        s.close()


CRASH = textwrap.dedent("""
    import os, random, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    import blake3
    from nodes.store import PieceStore
    from dfzmq.wire import PieceInfo
    b0, b1 = random.Random(30).randbytes({th}), random.Random(31).randbytes({th} + 7)
    s = PieceStore(Path({root!r}), map_size=64 << 20, file_threshold={th})
    s.put({tid!r}, PieceInfo(0, 0, len(b0), blake3.blake3(b0).hexdigest()), b0)
    def die(*a, **k):
        os._exit(3)  # the process dies inside the transaction, after the file was renamed
    s._link = die
    s.put({tid!r}, PieceInfo(1, len(b0), len(b1), blake3.blake3(b1).hexdigest()), b1)
""")


def test_a_crash_between_file_and_commit_leaves_no_orphan(tmp_path):
    root = tmp_path / "s"
    b0 = random.Random(30).randbytes(TH)
    script = CRASH.format(repo=str(REPO), root=str(root), th=TH, tid=T1)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert len(files(root)) == 2  # the second piece's file exists, nothing references it
    s = open_store(root, cache_bytes=0)
    try:
        assert [p.name for p in files(root)] == [piece(0, b0).digest]
        assert s.manifest(T1) == {0: piece(0, b0)} and s.get(piece(0, b0).digest) == b0
        assert s.usage_bytes() == len(b0)
    finally:
        s.close()


def test_o_direct_refused_falls_back_to_plain_files(tmp_path, o_direct_refused):
    s = open_store(tmp_path / "s", cache_bytes=0)
    try:
        data = random.Random(7).randbytes(2 * TH + 3)
        s.put(T1, piece(0, data), data)
        assert not s.files.direct and s.files.buffered_bytes == len(data) and s.files.direct_bytes == 0
        assert s.get(piece(0, data).digest) == data
    finally:
        s.close()


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm on this host")
def test_store_on_tmpfs(tmp_path):
    root = Path(os.path.realpath(SHM)) / f"dfzmq-test-{os.getpid()}-{tmp_path.name}"
    try:
        s = open_store(root, cache_bytes=0)
        data = random.Random(8).randbytes(3 * TH + 4097)
        s.put(T1, piece(0, data), data)
        assert s.get(piece(0, data).digest) == data and len(files(root)) == 1
        assert s.delete_task(T1) == len(data) and files(root) == []
        s.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_disk_full_is_a_one_line_storage_error_and_leaves_no_temp(tmp_path, small_tmpfs):
    small = small_tmpfs
    s = PieceStore(tmp_path / "lmdb-elsewhere", map_size=64 << 20, file_threshold=TH)
    s.files.root = small / "pieces"  # the LMDB file elsewhere, the piece files on the full disk
    ok = random.Random(9).randbytes(TH)
    s.put(T1, piece(0, ok), ok)
    big = random.Random(10).randbytes(2 << 20)
    with pytest.raises(StorageError, match="disk full") as e:
        s.put(T1, piece(1, big), big)
    assert "\n" not in str(e.value)
    assert [p.name for p in (small / "pieces").rglob("*") if p.is_file()] == [piece(0, ok).digest]
    assert sorted(s.manifest(T1)) == [0] and s.usage_bytes() == TH and s.get(piece(0, ok).digest) == ok
    s.close()


# -- end to end: a real cluster whose daemons keep pieces of 64 KiB and more in files ----------

SIZE = 6 * 1024 * 1024 + 777  # 64 KiB pieces: 97 of them, the last one short


def test_fetch_and_proxy_end_to_end_with_piece_files(tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is needed (make test installs it)")
    www = tmp_path / "www"
    www.mkdir()
    want = make_file(www / "f.bin", SIZE, seed=41)
    proxy = f"127.0.0.1:{free_port()}"
    every = {"DFZMQ_PIECE_FILE_THRESHOLD": str(TH), "DFZMQ_PIECE_CACHE_BYTES": str(TH)}
    env = {"seed0": dict(every), "peer1": dict(every),
           "peer2": {**every, "DFZMQ_PROXY_LISTEN": proxy, "DFZMQ_PROXY_RULES": r"\.bin$"}}
    with Origin(www) as origin, LocalCluster(tmp_path / "c", peers=2, daemon_env=env) as c:
        url = origin.url("f.bin")
        r = c.fetch("peer1", url, tmp_path / "one.out")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "one.out").read_bytes() == want
        clean = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "no_proxy", "all_proxy")}
        r = subprocess.run(["curl", "-sSf", "-x", f"http://{proxy}", "-o", str(tmp_path / "two.out"), url],
                           capture_output=True, text=True, env=clean, timeout=60)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "two.out").read_bytes() == want
        assert origin.stats()["total_bytes"] <= SIZE * 1.01  # the origin was read once
    for name in ("seed0", "peer1", "peer2"):
        held = files(tmp_path / "c" / name)
        # Every whole piece is a file (the random file has no repeats); the 777-byte tail, under
        # the threshold, stays in LMDB.
        assert len(held) == SIZE // TH, name
        assert sum(p.stat().st_size for p in held) == SIZE - SIZE % TH


def test_a_damaged_file_reads_as_missing(store, tmp_path):
    data = random.Random(11).randbytes(TH + 5)
    info = piece(0, data)
    store.put(T1, info, data)
    path = store.files.path(bytes.fromhex(info.digest))
    os.truncate(path, TH)  # shorter than the piece: never served as if whole
    assert store.get(info.digest) is None
    path.write_bytes(data + b"x")  # longer
    assert store.get(info.digest) is None
    path.write_bytes(data)
    assert store.get(info.digest) == data


def test_settings_out_of_range_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="piece_file_threshold"):
        PieceStore(tmp_path / "a", map_size=64 << 20, file_threshold=1000)
    with pytest.raises(ConfigError, match="piece_cache_bytes"):
        PieceStore(tmp_path / "b", map_size=64 << 20, cache_bytes=-1)
    r = subprocess.run([sys.executable, "-m", "dfzmq", "daemon", "--data", str(tmp_path / "d")],
                       env={**os.environ, "PYTHONPATH": str(REPO), "DFZMQ_PIECE_FILE_THRESHOLD": "100"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "piece_file_threshold must be at least 4096" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_truncated_file_is_dropped_at_open_and_a_put_of_the_piece_repairs_it(tmp_path):
    root = tmp_path / "s"
    blobs = [random.Random(40 + n).randbytes(TH + 100 * n) for n in range(3)]
    s = open_store(root, cache_bytes=0)
    s.put_task(T1, {"url": "u", "complete": True, "piece_count": 3})
    for n, b in enumerate(blobs):
        s.put(T1, piece(n, b), b)
    s.close()
    short = s.files.path(bytes.fromhex(piece(1, blobs[1]).digest))
    os.truncate(short, 0)  # power loss: the name is there, the length is not
    s = open_store(root, cache_bytes=0)
    try:
        assert sorted(s.manifest(T1)) == [0, 2]  # resumable, not complete with a hole
        assert not short.exists()
        assert s.usage_bytes() == len(blobs[0]) + len(blobs[2])
        # Damaged while the store is open: receiving the piece again (here, under another
        # task) rewrites the file instead of trusting the marker.
        other = s.files.path(bytes.fromhex(piece(2, blobs[2]).digest))
        os.truncate(other, 10)
        assert s.get(piece(2, blobs[2]).digest) is None
        s.put(T2, piece(0, blobs[2], offset=0), blobs[2])
        assert s.get(piece(2, blobs[2]).digest) == blobs[2]
        other.unlink()
        s.put(T2, piece(0, blobs[2], offset=0), blobs[2])
        assert s.get(piece(2, blobs[2]).digest) == blobs[2]
    finally:
        s.close()


def test_a_missing_pieces_directory_refuses_to_open_instead_of_dropping_everything(tmp_path):
    root = tmp_path / "s"
    s = open_store(root)
    blobs = [random.Random(60 + n).randbytes(TH) for n in range(20)]
    for n, b in enumerate(blobs):
        s.put(T1, piece(n, b), b)
    s.close()
    (root / "pieces").rename(tmp_path / "elsewhere")  # an unmounted or moved filesystem
    with pytest.raises(StorageError, match="20 of the 20 piece files .* mounted"):
        open_store(root)
    (tmp_path / "elsewhere").rename(root / "pieces")
    s = open_store(root, cache_bytes=0)
    try:
        assert sorted(s.manifest(T1)) == list(range(20))  # nothing was dropped
        assert all(s.get(piece(n, b).digest) == b for n, b in enumerate(blobs))
    finally:
        s.close()


@pytest.mark.parametrize("size", [(4 << 20) - 1, 4 << 20, (4 << 20) + 1, (9 << 20) + 4097])
def test_pieces_longer_than_the_bounce_buffer(tmp_path, size):
    from nodes import piecefiles

    s = open_store(tmp_path / "s", cache_bytes=0)
    try:
        data = random.Random(size).randbytes(size)
        info = piece(0, data)
        s.put(T1, info, data)
        path = s.files.path(bytes.fromhex(info.digest))
        assert path.stat().st_size == size
        assert s.get(info.digest) == data
        assert len(s.files._local.buf) == piecefiles.BOUNCE_BYTES  # bounded, whatever the piece
        with open(path, "ab") as f:
            f.write(b"x")  # one byte too long
        assert s.get(info.digest) is None
    finally:
        s.close()


def test_a_piece_deleted_while_a_reader_reads_its_file_is_not_cached_again(tmp_path):
    s = open_store(tmp_path / "s", cache_bytes=1 << 20)
    try:
        data = random.Random(70).randbytes(TH)
        info = piece(0, data)
        s.put(T1, info, data)
        s.cache.drop(bytes.fromhex(info.digest))
        read = s.files.read

        def read_then_task_deleted(key, length):
            got = read(key, length)
            s.delete_task(T1)  # the writer thread, between the reader's lookup and its cache.add
            return got

        s.files.read = read_then_task_deleted
        assert s.get(info.digest) == data  # the bytes it read are right (named by digest)
        s.files.read = read
        assert not s.has(info.digest) and s.get(info.digest) is None  # but nothing serves them now
    finally:
        s.close()


def test_get_ready_never_reads_a_file(store):
    from nodes.store import DISK

    small, big = random.Random(80).randbytes(TH - 1), random.Random(81).randbytes(TH)
    store.put(T1, piece(0, small), small)
    store.put(T1, piece(1, big, offset=TH - 1), big)
    assert store.get_ready(piece(0, small).digest) == small  # inline in LMDB
    assert store.get_ready(piece(1, big).digest) is DISK  # a file, and the cache is off here
    assert store.get_ready("ab" * 32) is None
    assert store.get(piece(1, big).digest) == big
