"""`dfzmq cache import|export|stat|rm` on a real cluster of processes: a file imported on one
host is exported peer to peer on others and verified by blake3; a missing entry fails fast with
a clear error; rm works locally and cluster-wide."""

from __future__ import annotations

import json
import time

import blake3
import pytest

from tests.clirun import run_cli
from tests.conftest import make_file
from tools.cluster import LocalCluster


@pytest.fixture(scope="module")
def cl(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("cache"), peers=3, seeds=1) as c:
        yield c


def cache(cl: LocalCluster, name: str, *args: str):
    return run_cli("cache", *args, "--daemon", cl.control(name))


def test_import_export_stat(cl, tmp_path):
    data = make_file(tmp_path / "weights.bin", 5 * 1024 * 1024 + 3, seed=3)
    r = cache(cl, "peer1", "import", str(tmp_path / "weights.bin"))
    assert r.returncode == 0, r.stderr
    cid = r.stdout.strip()
    assert cid == blake3.blake3(data).hexdigest()  # the default id is the content's digest

    r = cache(cl, "peer2", "export", cid, "-O", str(tmp_path / "out.bin"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.bin").read_bytes() == data
    assert cl.stat("peer1")["uploaded_bytes"] >= len(data)  # peer to peer, from the importer

    r = cache(cl, "peer3", "stat", cid, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["content_length"] == len(data) and info["held"] is False
    holders = {h["host_id"] for h in info["holders"]}
    assert holders == {cl.stat("peer1")["host_id"], cl.stat("peer2")["host_id"]}
    r = cache(cl, "peer1", "stat", cid)
    assert r.returncode == 0 and f"{len(data)} bytes, held here: yes" in r.stdout


def test_own_id_and_conflicts(cl, tmp_path):
    data = make_file(tmp_path / "a.txt", 1000, seed=4)
    r = cache(cl, "peer2", "import", str(tmp_path / "a.txt"), "--id", "release-1.2.tar")
    assert r.returncode == 0 and r.stdout.strip() == "release-1.2.tar", r.stderr
    # the same id for other content is refused, until removed
    make_file(tmp_path / "b.txt", 1000, seed=5)
    r = cache(cl, "peer2", "import", str(tmp_path / "b.txt"), "--id", "release-1.2.tar")
    assert r.returncode != 0 and "other content" in r.stderr
    # exported on the seed peer too (any host)
    r = cache(cl, "seed0", "export", "release-1.2.tar", "-O", str(tmp_path / "o.txt"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.txt").read_bytes() == data
    # an empty file is a valid entry
    (tmp_path / "empty").write_bytes(b"")
    r = cache(cl, "peer3", "import", str(tmp_path / "empty"), "--id", "empty")
    assert r.returncode == 0, r.stderr
    r = cache(cl, "peer1", "export", "empty", "-O", str(tmp_path / "e"))
    assert r.returncode == 0 and (tmp_path / "e").read_bytes() == b"", r.stderr


def test_missing_entry_fails_fast_and_clearly(cl, tmp_path):
    t0 = time.monotonic()
    r = cache(cl, "peer3", "export", "nobody-has-this", "-O", str(tmp_path / "x"))
    assert r.returncode == 3
    assert "no peer in the cluster holds this cache entry" in r.stderr
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "x").exists()
    r = cache(cl, "peer3", "stat", "nobody-has-this")
    assert r.returncode == 1 and "not in the cluster" in r.stderr


def test_bad_input(cl, tmp_path):
    for args in (["import", str(tmp_path / "nope")], ["import", str(tmp_path), "--id", "x"],
                 ["import", __file__, "--id", "bad id!"], ["export", "a/b", "-O", str(tmp_path / "x")],
                 ["import", __file__, "--id", "ab" * 32]):
        r = cache(cl, "peer1", *args)
        assert r.returncode != 0, args
        assert r.stderr.strip().count("\n") == 0 and "error" in r.stderr, (args, r.stderr)


def test_rm_local_then_cluster_wide(cl, tmp_path):
    data = make_file(tmp_path / "c.bin", 600_000, seed=6)
    cid = cache(cl, "peer1", "import", str(tmp_path / "c.bin")).stdout.strip()
    assert cache(cl, "peer2", "export", cid, "-O", str(tmp_path / "c2")).returncode == 0

    r = cache(cl, "peer2", "rm", cid)
    assert r.returncode == 0 and "removed" in r.stdout, r.stderr
    assert json.loads(cache(cl, "peer2", "stat", cid, "--json").stdout)["held"] is False
    assert cache(cl, "peer2", "rm", cid).returncode == 1  # nothing left here to remove

    r = run_cli("cache", "rm", cid, "--cluster", "--manager", cl.manager_addr)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stderr
    r = cache(cl, "peer3", "export", cid, "-O", str(tmp_path / "c3"))
    assert r.returncode == 3 and "no peer in the cluster holds" in r.stderr
    assert len(data) and not (tmp_path / "c3").exists()


class _Recording:
    """A real PieceStore whose calls note the thread they ran on."""

    def __init__(self, store):
        self.store, self.calls = store, []

    def __getattr__(self, name):
        fn = getattr(self.store, name)
        if not callable(fn):
            return fn

        def call(*a, **kw):
            import threading
            self.calls.append((name, threading.get_ident()))
            return fn(*a, **kw)
        return call


def test_cache_commands_keep_lmdb_off_the_event_loop(tmp_path):
    """import's task record (a write transaction, which waits for the writer thread's GC
    batches), stat's and rm's manifest scans: none on the daemon's event loop thread."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from dfzmq.config import DaemonConfig
    from nodes.ops import DaemonOps
    from nodes.store import PieceStore

    make_file(tmp_path / "f.bin", 300_000, seed=5)
    rec = _Recording(PieceStore(tmp_path / "store"))

    async def main():
        loop_thread = threading.get_ident()
        done = asyncio.get_running_loop().create_future()
        done.set_result({})
        d = SimpleNamespace(cfg=DaemonConfig(), host_id="h", hostname="h", store=rec, tasks={}, _held={},
                            writer=ThreadPoolExecutor(1), gc=SimpleNamespace(note_access=lambda *_: None),
                            require_task=lambda *a: (SimpleNamespace(done=done), False),
                            scheduler_for=lambda tid: None, forget=lambda tid: None)
        ops = DaemonOps(d)
        info = await ops.cache_import(str(tmp_path / "f.bin"), "x1")
        stat = await ops.cache_stat("x1")
        gone = await ops.remove("x1")
        d.writer.shutdown()
        return loop_thread, info, stat, gone

    loop_thread, info, stat, gone = asyncio.run(main())
    assert info["pieces"] >= 1 and stat["held"] and gone["removed"]
    on_loop = [name for name, t in rec.calls if t == loop_thread]
    assert on_loop == [], on_loop
    rec.store.close()
