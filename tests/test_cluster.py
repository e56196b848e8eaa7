"""End-to-end on real processes: a manager, a scheduler, a seed peer and eight peer daemons on
loopback, a real HTTP origin that counts the bytes it sends, and the real `dfzmq fetch` CLI."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import threading
import time

import pytest
import zmq

from dfzmq import net, wire
from dfzmq.cli import fetch_via_daemon
from tests.conftest import make_file
from tools.cluster import request

pytestmark = pytest.mark.timeout(180)


def test_eight_peers_fetch_at_once_origin_read_once(cluster, origin, www, outdir):
    data = make_file(www / "big.bin", 24 * 1024 * 1024 + 12345, seed=1)
    results = cluster.fetch_all(cluster.peers, origin.url("big.bin"), outdir)
    for name in cluster.peers:
        assert "error" not in results[name], results[name]
        assert (outdir / f"{name}.out").read_bytes() == data, name
    assert origin.bytes_served("big.bin") == len(data)
    assert all(r["origin_bytes"] == 0 for r in results.values())  # the seed read the origin
    from_seed = sum(r["seed_bytes"] for r in results.values())
    from_peers = sum(r["peer_bytes"] for r in results.values())
    assert from_seed + from_peers == len(data) * len(cluster.peers)
    assert from_peers > from_seed, (from_peers, from_seed)


def test_file_already_in_cluster_costs_no_origin_bytes(cluster, origin, www, outdir):
    data = make_file(www / "cached.bin", 3 * 1024 * 1024 + 1, seed=2)
    r = cluster.fetch("peer1", origin.url("cached.bin"), outdir / "a")
    assert r.returncode == 0, r.stderr
    assert origin.bytes_served("cached.bin") == len(data)
    results = cluster.fetch_all(["peer2", "peer3"], origin.url("cached.bin"), outdir)
    assert all("error" not in v for v in results.values()), results
    assert origin.bytes_served("cached.bin") == len(data)  # nothing more from the origin
    again = cluster.fetch_all(["peer1"], origin.url("cached.bin"), outdir)["peer1"]
    assert again["cached_bytes"] == len(data) and again["origin_bytes"] == 0
    for name in ("peer1", "peer2", "peer3"):
        assert (outdir / f"{name}.out").read_bytes() == data


@pytest.mark.parametrize("size", [0, 1, 65537, 3 * 65536 + 7])
def test_odd_sizes(cluster, origin, www, outdir, size):
    name = f"size-{size}.bin"
    data = make_file(www / name, size, seed=size)
    results = cluster.fetch_all(["peer4", "peer5"], origin.url(name), outdir)
    for peer in ("peer4", "peer5"):
        assert "error" not in results[peer], results[peer]
        assert (outdir / f"{peer}.out").read_bytes() == data
    assert origin.bytes_served(name) == size


def test_peer_streams_from_seed_while_seed_still_reads_origin(cluster, origin, www, outdir):
    size = 8 * 1024 * 1024
    data = make_file(www / "slow.bin", size, seed=3)
    url = origin.url("slow.bin")
    origin.set_rate(2 * 1024 * 1024)  # the seed needs about 4 s to read it
    try:
        first_bytes_at: dict[str, int] = {}
        results: dict[str, object] = {}

        def run(peer: str) -> None:
            def progress(done: int, total: int) -> None:
                if done > 0 and peer not in first_bytes_at:
                    first_bytes_at[peer] = origin.bytes_served("slow.bin")
            req = wire.Download(f"slow-{peer}", url, str(outdir / f"{peer}.out"))
            try:
                results[peer] = fetch_via_daemon(cluster.control(peer), req, progress)
            except Exception as e:
                results[peer] = e

        t1 = threading.Thread(target=run, args=("peer6",))
        t1.start()
        deadline = time.monotonic() + 10
        while origin.bytes_served("slow.bin") == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        t2 = threading.Thread(target=run, args=("peer7",))
        t2.start()  # starts while the seed is still reading the origin
        t1.join(60)
        t2.join(60)
    finally:
        origin.set_rate(None)
    for peer in ("peer6", "peer7"):
        assert isinstance(results[peer], dict), results[peer]
        assert (outdir / f"{peer}.out").read_bytes() == data
        assert first_bytes_at[peer] < size, (peer, first_bytes_at[peer])
    assert origin.bytes_served("slow.bin") == size


def _cli_fetch(cluster, peer, url, out, *extra):
    return subprocess.run(cluster.fetch_cmd(peer, url, out, *extra), env=cluster.env(),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("status", [404, 500])
def test_origin_error_is_one_line_nonzero_and_no_file(cluster, origin, www, outdir, status):
    make_file(www / f"err{status}.bin", 1000)
    origin.set_status(f"/err{status}.bin", status)
    try:
        r = _cli_fetch(cluster, "peer8", origin.url(f"err{status}.bin"), outdir / "x.bin")
    finally:
        origin.set_status(f"/err{status}.bin", None)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and str(status) in lines[0], r.stderr
    assert os.listdir(outdir) == []


def test_unresolvable_url_fails_cleanly(cluster, outdir):
    r = _cli_fetch(cluster, "peer8", "http://nonexistent.invalid/file.bin", outdir / "x.bin")
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "nonexistent.invalid" in lines[0], r.stderr
    assert os.listdir(outdir) == []


def test_digest_checked(cluster, origin, www, outdir):
    data = make_file(www / "dig.bin", 200_000, seed=9)
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    r = _cli_fetch(cluster, "peer2", origin.url("dig.bin"), outdir / "ok.bin", "--digest", good)
    assert r.returncode == 0, r.stderr
    assert (outdir / "ok.bin").read_bytes() == data
    bad = "sha256:" + "0" * 64
    r = _cli_fetch(cluster, "peer3", origin.url("dig.bin"), outdir / "bad.bin", "--digest", bad)
    assert r.returncode != 0 and "digest" in r.stderr
    assert sorted(os.listdir(outdir)) == ["ok.bin"]


GARBAGE = [
    [b""],
    [b"\x00" * 5],
    [b"DFZ1"],
    [b"DFZ1", b"HEARTBEAT"],
    [b"XXXX", b"HEARTBEAT", b"\x80"],
    [b"DFZ1", b"NO_SUCH_KIND", b"\x80"],
    [b"DFZ1", b"PIECE_REQUEST", b"\xc1\xc1"],
    [b"DFZ1", b"PIECE_REQUEST", b"\x93\x01\x02\x03"],
    [b"DFZ1", b"PEER_REGISTER", b"\x81\xa7task_id\x05"],
    [b"DFZ1", b"PIECE_DATA", b"\x80"],
    [b"DFZ1", b"TASK_MANIFEST", b"\x82\xa7task_id\xa1t\xa6pieces\x91\x92\x01\x02"],
]


def _send_garbage(addr: str) -> None:
    ctx = zmq.Context()
    sock = net.make_socket(ctx, "control_dealer")
    sock.connect(addr)
    rng = random.Random(7)
    for frames in GARBAGE + [[rng.randbytes(rng.randrange(1, 300)) for _ in range(rng.randrange(1, 5))]
                             for _ in range(50)]:
        sock.send_multipart(frames)
    time.sleep(0.2)  # let the frames leave before the socket closes (linger is 0)
    sock.close(0)
    ctx.term()


def test_garbage_frames_to_every_router_are_dropped(cluster, origin, www, outdir):
    seed_stat = cluster.stat("seed0")
    targets = {
        "manager": f"tcp://{cluster.manager_addr}",
        "scheduler": f"tcp://{cluster.scheduler_addrs[0]}",
        "upload": seed_stat["upload_addr"],
        "control": cluster.control("peer1"),
    }
    for addr in targets.values():
        _send_garbage(addr)
    assert isinstance(request(targets["manager"], wire.ListSchedulers()), wire.SchedulerList)
    assert isinstance(request(targets["scheduler"], wire.HostAnnounce("probe", "probe", "tcp://127.0.0.1:1")),
                      wire.HostAck)
    assert isinstance(request(targets["upload"], wire.Heartbeat("probe")), wire.Heartbeat)
    st = cluster.stat("peer1")
    assert st["counters"]["dropped.bad-frame"] > 0
    assert cluster.stat("seed0")["counters"]["dropped.bad-frame"] > 0
    # and the cluster still distributes files
    data = make_file(www / "after-garbage.bin", 1_000_000, seed=11)
    results = cluster.fetch_all(["peer1", "peer2"], origin.url("after-garbage.bin"), outdir)
    assert all((outdir / f"{p}.out").read_bytes() == data for p in ("peer1", "peer2")), results
