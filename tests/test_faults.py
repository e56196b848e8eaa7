"""Faults on real processes: a dead scheduler, a daemon killed mid-download, fetch with no daemon."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from dfzmq import wire
from dfzmq.cli import fetch_via_daemon
from tests.conftest import make_file
from tools.cluster import LocalCluster

pytestmark = pytest.mark.timeout(180)


def test_scheduler_down_fetch_still_succeeds_from_source(tmp_path, origin, www, outdir):
    data = make_file(www / "nosched.bin", 2_000_000, seed=21)
    with LocalCluster(tmp_path / "c", peers=1) as c:
        c.procs["scheduler0"].signal(signal.SIGKILL)
        c.procs["scheduler0"].popen.wait()
        r = c.fetch("peer1", origin.url("nosched.bin"), outdir / "x.bin")
        assert r.returncode == 0, r.stderr + c.tail("peer1")
        assert (outdir / "x.bin").read_bytes() == data
        assert origin.bytes_served("nosched.bin") == len(data)


def test_daemon_killed_mid_download_resumes_with_its_pieces(tmp_path, origin, www, outdir):
    size = 12 * 1024 * 1024
    data = make_file(www / "resume.bin", size, seed=22)
    with LocalCluster(tmp_path / "c", peers=1) as c:
        origin.set_rate(3 * 1024 * 1024)
        result: dict = {}

        def run() -> None:
            req = wire.Download("resume", origin.url("resume.bin"), str(outdir / "r.bin"))
            try:
                result["stats"] = fetch_via_daemon(c.control("peer1"), req, lambda d, t: None)
            except Exception as e:
                result["error"] = e

        try:
            t = threading.Thread(target=run)
            t.start()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                st = c.stat("peer1", 0.5)
                if st and st["pieces"] >= 20:
                    break
                time.sleep(0.05)
            held_before = c.stat("peer1")["pieces"]
            assert held_before >= 20
            c.procs["peer1"].signal(signal.SIGKILL)
            c.procs["peer1"].popen.wait()
            assert not (outdir / "r.bin").exists()
            c.restart("peer1")
            t.join(90)
        finally:
            origin.set_rate(None)
        assert "stats" in result, (result, c.tail("peer1"))
        assert result["stats"]["cached_bytes"] > 0  # it kept what it had before the kill
        assert (outdir / "r.bin").read_bytes() == data
        assert origin.bytes_served("resume.bin") == size  # the seed read it once; the peer reused


def _fetch_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfzmq", "fetch", *args, "--quiet"], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": sys.path[0]})


def test_fetch_without_daemon_goes_straight_to_source(origin, www, outdir):
    data = make_file(www / "direct.bin", 3_000_001, seed=23)
    digest = "blake3:" + __import__("blake3").blake3(data).hexdigest()
    r = _fetch_cli(origin.url("direct.bin"), "-O", str(outdir / "d.bin"), "--digest", digest)
    assert r.returncode == 0, r.stderr
    assert (outdir / "d.bin").read_bytes() == data
    r = _fetch_cli(origin.url("direct.bin"), "-O", str(outdir / "e.bin"), "--digest", "sha256:" + "1" * 64)
    assert r.returncode != 0 and "digest mismatch" in r.stderr
    r = _fetch_cli(origin.url("missing.bin"), "-O", str(outdir / "m.bin"))
    assert r.returncode != 0 and "404" in r.stderr
    r = _fetch_cli("not a url", "-O", str(outdir / "n.bin"))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in outdir.iterdir()) == ["d.bin"]


def test_one_shot_peer_joins_the_cluster(tmp_path, origin, www, outdir):
    data = make_file(www / "oneshot.bin", 1_500_000, seed=24)
    with LocalCluster(tmp_path / "c", peers=1) as c:
        r = c.fetch("peer1", origin.url("oneshot.bin"), outdir / "a.bin")
        assert r.returncode == 0, r.stderr
        r = _fetch_cli(origin.url("oneshot.bin"), "-O", str(outdir / "b.bin"), "--manager", c.manager_addr)
        assert r.returncode == 0, r.stderr
        assert (outdir / "b.bin").read_bytes() == data
        assert origin.bytes_served("oneshot.bin") == len(data)  # the one-shot peer used the swarm


def test_restarted_scheduler_learns_cached_files_from_peers(tmp_path, origin, www, outdir):
    data = make_file(www / "reannounce.bin", 2_500_000, seed=25)
    with LocalCluster(tmp_path / "c", peers=2) as c:
        r = c.fetch("peer1", origin.url("reannounce.bin"), outdir / "a.bin")
        assert r.returncode == 0, r.stderr
        c.procs["scheduler0"].signal(signal.SIGKILL)
        c.procs["scheduler0"].popen.wait()
        c.procs["scheduler0"].start(c.env())
        c.wait_ready()
        from tools.cluster import request
        deadline = time.monotonic() + 20
        while True:  # within a heartbeat the daemons learn of the restart and re-announce
            reply = request(f"tcp://{c.scheduler_addrs[0]}", wire.StatRequest(), 1.0)
            info = reply.info if isinstance(reply, wire.StatReply) else {}
            if info.get("hosts", 0) >= 3 and info.get("tasks", 0) >= 1:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        r = c.fetch("peer2", origin.url("reannounce.bin"), outdir / "b.bin")
        assert r.returncode == 0, r.stderr
        assert (outdir / "b.bin").read_bytes() == data
        assert origin.bytes_served("reannounce.bin") == len(data)  # served P2P, not from the origin


def test_dfzmq_up_runs_a_working_cluster(tmp_path, origin, www, outdir):
    from tools.cluster import free_port

    data = make_file(www / "up.bin", 1_000_000, seed=26)
    port = free_port()
    env = LocalCluster.env(None)  # the harness's environment, without a cluster
    up = subprocess.Popen([sys.executable, "-m", "dfzmq", "up", "--data", str(tmp_path / "up"),
                           "--manager-port", str(port), "--log-level", "warning"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        control = f"ipc://{tmp_path / 'up' / 'peer1'}/control.sock"
        deadline = time.monotonic() + 30
        while True:  # the peer daemon is ready once it has a live scheduler
            from tools.cluster import request
            reply = request(control, wire.StatRequest(), 0.5)
            if isinstance(reply, wire.StatReply) and any(reply.info["schedulers"].values()):
                break
            assert time.monotonic() < deadline and up.poll() is None, up.stdout.read1().decode()
            time.sleep(0.2)
        r = subprocess.run([sys.executable, "-m", "dfzmq", "fetch", origin.url("up.bin"), "-O", str(outdir / "u.bin"),
                            "--daemon", control, "--quiet"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert (outdir / "u.bin").read_bytes() == data
        assert origin.bytes_served("up.bin") == len(data)
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(15) == 0


def test_transient_origin_error_is_retried(origin, www, outdir):
    data = make_file(www / "flaky.bin", 700_000, seed=27)
    origin.set_status("/flaky.bin", 503)

    def heal() -> None:  # the origin recovers once it has refused the first request
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if origin.stats()["paths"].get("/flaky.bin", {}).get("requests", 0) >= 1:
                break
            time.sleep(0.01)
        origin.set_status("/flaky.bin", None)

    t = threading.Thread(target=heal)
    t.start()
    try:
        r = _fetch_cli(origin.url("flaky.bin"), "-O", str(outdir / "f.bin"))
    finally:
        t.join()
        origin.set_status("/flaky.bin", None)
    assert r.returncode == 0, r.stderr
    assert (outdir / "f.bin").read_bytes() == data


def test_curve_encrypted_cluster(tmp_path, origin, www, outdir):
    """With cluster CURVE keys every link is encrypted: the cluster works, plain clients get nothing."""
    from tools.cluster import request

    data = make_file(www / "curve.bin", 1_200_000, seed=28)
    with LocalCluster(tmp_path / "c", peers=2, curve=True) as c:
        results = c.fetch_all(c.peers, origin.url("curve.bin"), outdir)
        assert all("error" not in r for r in results.values()), results
        assert all((outdir / f"{p}.out").read_bytes() == data for p in c.peers)
        assert origin.bytes_served("curve.bin") == len(data)
        assert request(f"tcp://{c.scheduler_addrs[0]}", wire.StatRequest(), 1.0) is None
        assert request(f"tcp://{c.manager_addr}", wire.ListSchedulers(), 1.0) is None
        assert isinstance(request(f"tcp://{c.manager_addr}", wire.ListSchedulers(), 2.0, c.curve), wire.SchedulerList)
