"""Peer-level faults on real processes: a parent that serves corrupt bytes, one killed
mid-transfer, one that stalls (SIGSTOP); and bandwidth limits that hold. In every case the
output is complete and correct, and the origin is not read again."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from dfzmq import wire
from dfzmq.cli import fetch_via_daemon
from tests.conftest import make_file
from tools.cluster import LocalCluster

pytestmark = pytest.mark.timeout(180)


def _fetch_in_thread(c: LocalCluster, peer: str, url: str, out) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        req = wire.Download(f"iso-{peer}", url, str(out))
        try:
            result["stats"] = fetch_via_daemon(c.control(peer), req, lambda d, t: None)
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, result


def test_corrupt_parent_is_detected_blocked_and_reported(tmp_path, origin, www, outdir):
    data = make_file(www / "corrupt.bin", 4 * 1024 * 1024, seed=31)
    env = {"peer1": {"DFZMQ_TEST_CORRUPT_UPLOADS": "1"}}  # peer1 flips a byte of every piece it sends
    with LocalCluster(tmp_path / "c", peers=3, daemon_env=env) as c:
        url = origin.url("corrupt.bin")
        assert c.fetch("peer1", url, outdir / "p1.bin").returncode == 0
        r = c.fetch("peer2", url, outdir / "p2.bin")
        assert r.returncode == 0, r.stderr
        assert (outdir / "p2.bin").read_bytes() == data
        st = c.stat("peer2")
        assert st["counters"].get("parent.bad-piece", 0) >= 1  # it did meet the bad parent
        # the scheduler no longer hands the corrupt parent to anyone for this task
        r = c.fetch("peer3", url, outdir / "p3.bin")
        assert r.returncode == 0, r.stderr
        assert (outdir / "p3.bin").read_bytes() == data
        assert c.stat("peer3")["counters"].get("parent.bad-piece", 0) == 0
        assert origin.bytes_served("corrupt.bin") == len(data)


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_parent_killed_or_stalled_mid_transfer(tmp_path, origin, www, outdir, fault):
    size = 12 * 1024 * 1024
    data = make_file(www / f"{fault}.bin", size, seed=32)
    # peer1 uploads slowly so that peer2 is mid-transfer when peer1 dies or freezes.
    env = {"peer1": {"DFZMQ_UPLOAD_RATE": str(2 * 1024 * 1024)}}
    with LocalCluster(tmp_path / "c", peers=2, daemon_env=env) as c:
        url = origin.url(f"{fault}.bin")
        assert c.fetch("peer1", url, outdir / "p1.bin").returncode == 0
        t, result = _fetch_in_thread(c, "peer2", url, outdir / "p2.bin")
        deadline = time.monotonic() + 20  # strike once peer1 is really serving peer2
        while (c.stat("peer1", 0.5) or {}).get("uploaded_bytes", 0) == 0:
            assert time.monotonic() < deadline, "peer1 never uploaded"
            time.sleep(0.02)
        proc = c.procs["peer1"]
        proc.signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        try:
            t.join(90)
        finally:
            proc.signal(signal.SIGCONT)
        assert "stats" in result, (result, c.tail("peer2"))
        assert (outdir / "p2.bin").read_bytes() == data
        assert result["stats"]["peer_bytes"] > 0  # it really was getting bytes from peer1
        # peer2 told its parents which requests it gave up on (timed out at peer1, or the
        # piece came from another parent first): PIECE_CANCEL, so queued bytes are not sent.
        assert (c.stat("peer2") or {}).get("counters", {}).get("msg.out.PIECE_CANCEL", 0) > 0
        assert origin.bytes_served(f"{fault}.bin") == size


def test_upload_limit_holds(tmp_path, origin, www, outdir):
    size = 6 * 1024 * 1024
    rate = 3 * 1024 * 1024
    data = make_file(www / "limited.bin", size, seed=33)
    # The seed is the only parent and uploads at 3 MiB/s: 6 MiB cannot arrive much faster than 2 s.
    env = {"seed0": {"DFZMQ_UPLOAD_RATE": str(rate)}}
    with LocalCluster(tmp_path / "c", peers=1, daemon_env=env) as c:
        t0 = time.monotonic()
        r = c.fetch("peer1", origin.url("limited.bin"), outdir / "l.bin")
        elapsed = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert (outdir / "l.bin").read_bytes() == data
        # A loose bound that still fails if the limit is ignored (loopback does this in << 1 s).
        assert elapsed >= 0.8 * (size - rate / 4) / rate, elapsed
        assert c.stat("seed0")["limiter_wait_s"]["upload"] > 0


def _kill_while_all_fetch(c: LocalCluster, origin, name: str, data: bytes, victim: str, outdir) -> None:
    """Every peer fetches `name` from a slow origin; `victim` is SIGKILLed once a quarter of the
    file has left the origin; every peer must still end with the right bytes."""
    url = origin.url(name)
    origin.set_rate(2 * 1024 * 1024)
    try:
        threads = [_fetch_in_thread(c, p, url, outdir / f"{p}.{name}") for p in c.peers]
        deadline = time.monotonic() + 20
        while origin.bytes_served(name) < len(data) // 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        c.procs[victim].signal(signal.SIGKILL)
        for t, _ in threads:
            t.join(120)
    finally:
        origin.set_rate(None)
    for (_, result), p in zip(threads, c.peers):
        assert "stats" in result, (result, c.tail(p))
        assert (outdir / f"{p}.{name}").read_bytes() == data


# -- service level ------------------------------------------------------------------------------


def test_manager_down_cluster_keeps_working_and_rejoins(tmp_path, origin, www, outdir):
    from tools.cluster import request

    data = make_file(www / "nomgr.bin", 1_500_000, seed=34)
    with LocalCluster(tmp_path / "c", peers=2) as c:
        c.procs["manager"].signal(signal.SIGKILL)
        c.procs["manager"].popen.wait()
        results = c.fetch_all(c.peers, origin.url("nomgr.bin"), outdir)
        assert all("error" not in r for r in results.values()), results
        assert all((outdir / f"{p}.out").read_bytes() == data for p in c.peers)
        assert origin.bytes_served("nomgr.bin") == len(data)  # still one origin read, P2P
        c.procs["manager"].start(c.env())
        deadline = time.monotonic() + 30
        while True:  # the scheduler notices, re-registers, and is listed again
            reply = request(f"tcp://{c.manager_addr}", wire.ListSchedulers(), 0.5)
            if isinstance(reply, wire.SchedulerList) and reply.schedulers and reply.seeds:
                break
            assert time.monotonic() < deadline, "scheduler and seed never rejoined the manager"
            time.sleep(0.2)


def test_two_schedulers_share_tasks_and_survive_one_dying(tmp_path, origin, www, outdir):
    from dfzmq import ids
    from tools.cluster import request

    with LocalCluster(tmp_path / "c", peers=2, schedulers=2) as c:
        # Names chosen so that rendezvous gives each scheduler some (random member ids and
        # ports would otherwise put all of a handful of files on one scheduler now and then).
        members = sorted(m.member_id for m in request(f"tcp://{c.manager_addr}", wire.ListSchedulers(), 2.0).schedulers)
        assert len(members) == 2, members
        names: list[str] = []
        owners: set[str] = set()
        for i in range(64):
            name = f"multi{i}.bin"
            owner = ids.rendezvous(ids.task_id(origin.url(name)), members)[0]
            if len(names) < 6 or owner not in owners:
                names.append(name)
                owners.add(owner)
            if len(names) >= 6 and len(owners) == 2:
                break
        files = {name: make_file(www / name, 300_000 + i, seed=40 + i) for i, name in enumerate(names)}
        for name, data in files.items():
            r = c.fetch("peer1", origin.url(name), outdir / name)
            assert r.returncode == 0, r.stderr
            assert (outdir / name).read_bytes() == data
        per_scheduler = [request(f"tcp://{a}", wire.StatRequest(), 2.0).info["tasks"] for a in c.scheduler_addrs]
        assert all(n > 0 for n in per_scheduler), per_scheduler  # rendezvous spread the tasks
        # Now a slow download, and its scheduler dies in the middle of it.
        size = 6 * 1024 * 1024
        data = make_file(www / "failover.bin", size, seed=49)
        url = origin.url("failover.bin")
        listed = request(f"tcp://{c.manager_addr}", wire.ListSchedulers(), 2.0).schedulers
        owner_id = ids.rendezvous(ids.task_id(url), sorted(m.member_id for m in listed))[0]
        owner_addr = next(m.addr for m in listed if m.member_id == owner_id)
        owner = next(n for n, a in zip(["scheduler0", "scheduler1"], c.scheduler_addrs) if owner_addr.endswith(a))
        _kill_while_all_fetch(c, origin, "failover.bin", data, owner, outdir)
        assert origin.bytes_served("failover.bin") < 2 * size


def test_seed_down_mid_download_peers_finish(tmp_path, origin, www, outdir):
    size = 6 * 1024 * 1024
    data = make_file(www / "seeddown.bin", size, seed=35)
    with LocalCluster(tmp_path / "c", peers=2) as c:
        _kill_while_all_fetch(c, origin, "seeddown.bin", data, "seed0", outdir)


# -- task level ---------------------------------------------------------------------------------


def test_disk_full_fails_that_task_alone(tmp_path, origin, www, outdir, small_tmpfs):
    small = small_tmpfs
    big = make_file(www / "toobig.bin", 3 * 1024 * 1024, seed=36)
    fine = make_file(www / "fine.bin", 3 * 1024 * 1024, seed=37)
    with LocalCluster(tmp_path / "c", peers=1) as c:
        t1, r1 = _fetch_in_thread(c, "peer1", origin.url("toobig.bin"), small / "x.bin")
        t2, r2 = _fetch_in_thread(c, "peer1", origin.url("fine.bin"), outdir / "fine.bin")
        t1.join(60)
        t2.join(60)
        assert "error" in r1 and "disk full" in str(r1["error"]), r1
        assert list(small.iterdir()) == []  # no partial file, no temp file
        assert "stats" in r2 and (outdir / "fine.bin").read_bytes() == fine
        # the daemon still holds the pieces of the failed output: another path works
        r = c.fetch("peer1", origin.url("toobig.bin"), outdir / "big.bin")
        assert r.returncode == 0 and (outdir / "big.bin").read_bytes() == big


def test_origin_that_stops_sending_times_out_cleanly(tmp_path, origin, www, outdir):
    make_file(www / "hang.bin", 2 * 1024 * 1024, seed=38)
    env = {n: {"DFZMQ_SOURCE_TIMEOUT_S": "1"} for n in ("seed0", "peer1")}
    with LocalCluster(tmp_path / "c", peers=1, daemon_env=env) as c:
        origin.set_rate(1)  # one byte a second: the first chunk never leaves
        try:
            r = c.fetch("peer1", origin.url("hang.bin"), outdir / "h.bin")
        finally:
            origin.set_rate(None)
        assert r.returncode != 0 and "timed out" in r.stderr, r.stderr
        assert list(outdir.iterdir()) == []


# -- storage ------------------------------------------------------------------------------------


def test_disk_quota_evicts_least_recently_used_tasks(tmp_path, origin, www, outdir):
    env = {"peer1": {"DFZMQ_DISK_QUOTA": str(4 * 1024 * 1024), "DFZMQ_GC_INTERVAL_S": "0.3",
                     "DFZMQ_GC_LOW_WATERMARK": "0.5"}}
    with LocalCluster(tmp_path / "c", peers=1, daemon_env=env) as c:
        files = [f"lru{i}.bin" for i in range(3)]
        data = {f: make_file(www / f, 1_500_000, seed=60 + i) for i, f in enumerate(files)}
        for f in files:
            r = c.fetch("peer1", origin.url(f), outdir / f)
            assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 20
        while True:  # 4.5 MB held against a 4 MiB quota: the oldest goes, down to half the quota
            st = c.stat("peer1")
            if st["gc"]["evicted"] >= 1:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        assert st["usage_bytes"] <= 2 * 1024 * 1024
        # Evicted means gone from this peer only: fetching it again still works (from the seed).
        r = c.fetch("peer1", origin.url(files[0]), outdir / "again.bin")
        assert r.returncode == 0 and (outdir / "again.bin").read_bytes() == data[files[0]]
        assert all(origin.bytes_served(f) == len(data[f]) for f in files)  # origin read once each
