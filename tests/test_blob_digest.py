"""Registry blobs are tasks named by their sha256 digest, and their bytes are checked against it
before anything keeps them: on a real cluster (manager, scheduler, seed, two daemons as
processes, peer1 serving a registry mirror) in front of a small token-auth registry
(tests/test_preheat.TinyRegistry) that can be told to serve wrong bytes for a blob.

- preheat --image with --tag stores each blob under the same task id the mirror uses, so a
  pull through the mirror afterwards reads nothing from the registry;
- a registry answering wrong bytes (same length) makes the preheat job / the mirror pull fail,
  nothing stays stored under that task on any daemon, and a later pull of the right bytes works.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import time

import lmdb
import pytest

from dfzmq import wire
from dfzmq.oci import blob_task_id
from nodes.store import PieceStore
from tests.clirun import run_cli
from tests.test_preheat import TinyRegistry
from tools.cluster import LocalCluster, free_port, request

DEADLINE_S = 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with TinyRegistry() as reg:
        port = free_port()
        env = {"peer1": {"DFZMQ_PROXY_LISTEN": f"127.0.0.1:{port}",
                         "DFZMQ_REGISTRY_MIRRORS": f"http://127.0.0.1:{reg.port}"}}
        with LocalCluster(tmp_path_factory.mktemp("blobs"), peers=2, seeds=1, daemon_env=env) as cl:
            yield cl, reg, port


def image(reg: TinyRegistry, tag: str, sizes: tuple[int, ...], seed: int) -> tuple[str, list[str]]:
    """Push a one-platform image; its reference and its blob digests (config first)."""
    rnd = random.Random(seed)
    config = reg.add_blob(json.dumps({"architecture": "amd64", "seed": seed}).encode())
    layers = [reg.add_blob(rnd.randbytes(n)) for n in sizes]
    reg.add_manifest(tag, {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {**config, "mediaType": "application/vnd.oci.image.config.v1+json"},
                           "layers": layers})
    return f"127.0.0.1:{reg.port}/team/app:{tag}", [config["digest"]] + [l["digest"] for l in layers]


def corrupt(data: bytes) -> bytes:
    """Same length, one byte off in the middle: only the digest can tell."""
    mid = len(data) // 2
    return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]


def stored(cl: LocalCluster, name: str, tid: str) -> tuple[dict | None, int]:
    """(task meta, pieces held) in a daemon's LMDB store, read from this process (LMDB readers
    may share an environment with the running daemon)."""
    s = PieceStore.__new__(PieceStore)
    s.env = lmdb.open(str(cl.root / name / "store.lmdb"), readonly=True, max_dbs=4, lock=True, readahead=False)
    try:
        s.pieces, s.manifest_db = s.env.open_db(b"pieces"), s.env.open_db(b"manifest")
        s.tasks_db, s.refs_db = s.env.open_db(b"tasks"), s.env.open_db(b"refs")
        return s.get_task(tid), len(s.manifest(tid))
    finally:
        s.env.close()


def nothing_kept(cl: LocalCluster, tid: str) -> None:
    """No daemon keeps the task once every run of it has ended (polled: the failure is async)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        left = {n: stored(cl, n, tid) for n in cl.seeds + cl.peers}
        left = {n: v for n, v in left.items() if v != (None, 0)}
        if not left:
            return
        assert time.monotonic() < deadline, f"still stored: {left}"
        time.sleep(0.2)


def mirror_get(port: int, digest: str, read: bool = True) -> tuple[int, bytes]:
    """GET a blob through peer1's mirror, as a registry client with the registry's token."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        conn.request("GET", f"/v2/team/app/blobs/{digest}",
                     headers={"Authorization": f"Bearer {TinyRegistry.TOKEN}"})
        resp = conn.getresponse()
        return resp.status, resp.read() if read else b""
    finally:
        conn.close()


def preheat(cl: LocalCluster, *args: str) -> dict:
    r = run_cli("preheat", *args, "--wait", "--json", "--manager", cl.manager_addr)
    out = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    return {"rc": r.returncode, "stderr": r.stderr, **out}


def scheduler_tasks(cl: LocalCluster) -> dict[str, dict]:
    snap = request(f"tcp://{cl.scheduler_addrs[0]}", wire.SnapshotRequest(), 3.0)
    return {t["task_id"]: t for t in snap.info["snapshot"]["tasks"]}


def test_preheat_with_a_tag_stores_blobs_where_the_mirror_finds_them(setup):
    cl, reg, port = setup
    ref, digests = image(reg, "tagged", (600_000,), seed=1)
    job = preheat(cl, "--image", ref, "--tag", "team-a", "--application", "ci")
    assert job["rc"] == 0 and job["state"] == "succeeded", job
    tasks = scheduler_tasks(cl)
    for d in digests:
        assert tasks[blob_task_id(d)]["complete"], d
    layer = digests[1]
    before = reg.blob_bytes[layer]
    status, body = mirror_get(port, layer)
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer
    assert reg.blob_bytes[layer] == before  # served from the cluster, not the registry again


def test_preheat_of_wrong_bytes_fails_keeps_nothing_and_a_later_preheat_works(setup):
    cl, reg, _ = setup
    ref, digests = image(reg, "bad-preheat", (900_000,), seed=2)
    layer = digests[1]
    good = reg.blobs[layer]
    reg.blobs[layer] = corrupt(good)  # an upstream whose blob changed, or a proxy's error page
    job = preheat(cl, "--image", ref)
    assert job["rc"] != 0 and job.get("state") == "failed", job
    assert "digest" in json.dumps(job), job
    nothing_kept(cl, blob_task_id(layer))
    assert not scheduler_tasks(cl).get(blob_task_id(layer), {}).get("complete")
    reg.blobs[layer] = good
    job = preheat(cl, "--image", ref)
    assert job["rc"] == 0 and job["state"] == "succeeded", job
    meta, pieces = stored(cl, cl.seeds[0], blob_task_id(layer))
    assert meta and meta["complete"] and pieces == meta["piece_count"]


@pytest.mark.parametrize("read", [True, False], ids=["client-reads", "client-leaves"])
def test_mirror_pull_of_wrong_bytes_fails_keeps_nothing_and_a_later_pull_works(setup, read):
    cl, reg, port = setup
    _, digests = image(reg, f"bad-mirror-{read}", (1_500_000,), seed=3 + read)
    layer = digests[1]
    good = reg.blobs[layer]
    reg.blobs[layer] = corrupt(good)
    failed_before = sum(cl.stat(n)["counters"].get("task.digest-mismatch", 0) for n in cl.seeds + cl.peers)
    try:
        status, body = mirror_get(port, layer, read)
    except (http.client.HTTPException, OSError):
        status, body = -1, b""  # the mirror cut the connection rather than end a wrong body
    assert not (status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer) or not read
    assert status != 200 or not read or len(body) < len(good)
    deadline = time.monotonic() + DEADLINE_S
    while sum(cl.stat(n)["counters"].get("task.digest-mismatch", 0) for n in cl.seeds + cl.peers) == failed_before:
        assert time.monotonic() < deadline, "no run noticed the wrong digest"
        time.sleep(0.2)
    nothing_kept(cl, blob_task_id(layer))
    reg.blobs[layer] = good
    status, body = mirror_get(port, layer)
    assert status == 200 and body == good
    # and a range of it, from what is now stored
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    conn.request("GET", f"/v2/team/app/blobs/{layer}",
                 headers={"Authorization": f"Bearer {TinyRegistry.TOKEN}", "Range": "bytes=1000-1999"})
    resp = conn.getresponse()
    assert resp.status == 206 and resp.read() == good[1000:2000]
    conn.close()


@pytest.mark.parametrize("verified", [False, True], ids=["stored-unchecked", "corrupted-after-check"])
def test_a_wrong_blob_in_the_store_is_dropped_on_first_use(setup, verified):
    """A complete blob task already in a daemon's store with wrong bytes (as an older dfzmq could
    leave it, or a disk could) is caught when first used: by the run's check when never checked,
    by the mirror's streaming check otherwise. That pull fails, the task is deleted, the next
    pull works."""
    from dfzmq.wire import PieceInfo
    from nodes.source import digest

    cl, reg, port = setup
    _, digests = image(reg, f"legacy-{verified}", (300_000,), seed=9 + verified)
    layer, tid = digests[1], blob_task_id(digests[1])
    good = reg.blobs[layer]
    bad = corrupt(good)
    url = f"http://127.0.0.1:{reg.port}/v2/team/app/blobs/{layer}"
    store = PieceStore(cl.root / "peer1")  # LMDB: a second writer process waits for the lock
    try:
        store.put(tid, PieceInfo(0, 0, len(bad), digest(bad)), bad)
        store.put_task(tid, {"url": url, "tag": "", "application": "", "content_length": len(bad),
                             "complete": True, "file_digest": digest(bad), "piece_count": 1, "etag": "",
                             "content_type": "", "origin_meta": {"status": "200"}, "verified": verified})
    finally:
        store.env.close()
    try:
        status, body = mirror_get(port, layer)
    except (http.client.HTTPException, OSError):
        status, body = -1, b""
    assert body != bad  # the wrong bytes are never served whole
    nothing_kept(cl, tid)
    if verified:
        assert cl.stat("peer1")["counters"].get("proxy.digest-mismatch", 0) >= 1
    status, body = mirror_get(port, layer)
    assert status == 200 and body == good
