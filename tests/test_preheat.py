"""Preheat jobs on a real cluster (manager, scheduler, seed peer, daemons as processes) and a
real counting origin: after a preheat, a fetch reads nothing more from the origin. `--image`
runs against Debian's docker-registry (anonymous, an image pushed through its API) and against
a small registry served by an aiohttp app in this test for what docker-registry cannot do
alone: a multi-platform index and the Bearer-token flow (it has no token service of its own).
Jobs survive a manager restart and a seed restarted mid-job."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import threading
import time

import pytest
from aiohttp import web

from dfzmq import ids, wire
from tests.clirun import run_cli
from tests.conftest import make_file
from tools.cluster import LocalCluster, request


@pytest.fixture(scope="module")
def cl(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("preheat"), peers=2, seeds=1) as c:
        yield c


def dfzmq(cl: LocalCluster, *args: str):
    return run_cli(*args, "--manager", cl.manager_addr)


def host_of(cl: LocalCluster, name: str) -> str:
    return cl.stat(name)["host_id"]


def test_preheat_then_fetch_reads_nothing_from_origin(cl, www, origin, outdir):
    data = make_file(www / "model.bin", 3 * 1024 * 1024 + 17, seed=1)
    url = origin.url("model.bin")
    r = dfzmq(cl, "preheat", url, "--wait")
    assert r.returncode == 0, r.stderr
    assert "succeeded" in r.stdout
    assert origin.bytes_served("model.bin") == len(data)  # the seed read it, once

    r = cl.fetch("peer1", url, outdir / "model.bin")
    assert r.returncode == 0, r.stderr
    assert (outdir / "model.bin").read_bytes() == data
    assert origin.bytes_served("model.bin") == len(data)  # nothing more

    r = dfzmq(cl, "jobs", "--json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)[0]
    assert job["kind"] == "preheat" and job["state"] == "succeeded" and job["urls"] == [url]
    assert list(job["hosts"]) == [host_of(cl, "seed0")]  # scope seeds: the seed peers only
    assert job["finished"] >= job["created"] > 0


def test_preheat_scope_all_puts_the_file_on_every_daemon(cl, www, origin, outdir):
    data = make_file(www / "all.bin", 2 * 1024 * 1024, seed=2)
    url = origin.url("all.bin")
    r = dfzmq(cl, "preheat", url, "--scope", "all", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["state"] == "succeeded"
    assert set(job["hosts"]) == {host_of(cl, n) for n in ("seed0", "peer1", "peer2")}
    assert origin.bytes_served("all.bin") == len(data)  # the origin once for the whole cluster
    from dfzmq.cli import fetch_via_daemon

    stats = fetch_via_daemon(cl.control("peer2"), wire.Download("r1", url, str(outdir / "all.bin")),
                             lambda d, t: None)
    assert (outdir / "all.bin").read_bytes() == data
    # peer2 already held every piece: served from its own store, nothing from anywhere else
    assert stats["cached_bytes"] == len(data)
    assert stats["origin_bytes"] == stats["peer_bytes"] == stats["seed_bytes"] == 0
    assert origin.bytes_served("all.bin") == len(data)


def test_failed_preheat_is_reported_and_exit_code_says_so(cl, origin):
    r = dfzmq(cl, "preheat", origin.url("missing.bin"), "--wait")
    assert r.returncode == 3
    assert "404" in r.stderr and "failed" in r.stdout
    r = dfzmq(cl, "jobs")
    assert r.returncode == 0 and "failed" in r.stdout


def test_preheat_bad_input(cl):
    for args in ([], ["not-a-url"], ["http://x/y", "--scope", "nowhere"], ["http://x/y", "--image", "a/b:c"]):
        r = dfzmq(cl, "preheat", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and "error" in r.stderr
    r = dfzmq(cl, "jobs", "job-doesnotexist")
    assert r.returncode == 1 and "no job" in r.stderr


# -- preheat --image ------------------------------------------------------------------------------


class TinyRegistry:
    """The registry API subset a pull uses, with token auth, on its own loop and thread."""

    TOKEN = "t0ken-for-team-app"

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[str, bytes]] = {}  # ref -> (media type, body)
        self.blob_bytes: dict[str, int] = {}
        self.token_requests: list[dict] = []
        self.port = 0

    def add_blob(self, data: bytes) -> dict:
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[d] = data
        return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": len(data)}

    def add_manifest(self, ref: str, doc: dict) -> str:
        body = json.dumps(doc).encode()
        d = "sha256:" + hashlib.sha256(body).hexdigest()
        self.manifests[ref] = self.manifests[d] = (doc["mediaType"], body)
        return d

    def app(self) -> web.Application:
        def authorized(req: web.Request) -> bool:
            return req.headers.get("Authorization") == f"Bearer {self.TOKEN}"

        def challenge() -> web.Response:
            realm = f"http://127.0.0.1:{self.port}/token"
            return web.Response(status=401, headers={"WWW-Authenticate":
                                f'Bearer realm="{realm}",service="tiny",scope="repository:team/app:pull"'})

        async def token(req: web.Request) -> web.Response:
            self.token_requests.append(dict(req.query))
            return web.json_response({"token": self.TOKEN})

        async def manifest(req: web.Request) -> web.Response:
            if not authorized(req):
                return challenge()
            got = self.manifests.get(req.match_info["ref"])
            if got is None:
                return web.Response(status=404)
            return web.Response(body=got[1], headers={"Content-Type": got[0],
                                "Docker-Content-Digest": "sha256:" + hashlib.sha256(got[1]).hexdigest()})

        async def blob(req: web.Request) -> web.StreamResponse:
            if not authorized(req):
                return challenge()
            data = self.blobs.get(req.match_info["digest"])
            if data is None:
                return web.Response(status=404)
            start, end = 0, len(data)
            rng = req.headers.get("Range", "")
            status = 200
            if rng.startswith("bytes="):
                a, _, b = rng[6:].partition("-")
                start, end = int(a), min(len(data), int(b) + 1 if b else len(data))
                status = 206
            body = data[start:end]
            self.blob_bytes[req.match_info["digest"]] = self.blob_bytes.get(req.match_info["digest"], 0) + len(body)
            headers = {"Content-Length": str(len(body)), "Accept-Ranges": "bytes"}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            return web.Response(status=status, body=body, headers=headers)

        app = web.Application()
        app.router.add_get("/token", token)
        app.router.add_get("/v2/team/app/manifests/{ref}", manifest)
        app.router.add_get("/v2/team/app/blobs/{digest}", blob)
        return app

    def __enter__(self) -> "TinyRegistry":
        ready = threading.Event()
        self.loop = asyncio.new_event_loop()

        async def start() -> None:
            self.runner = web.AppRunner(self.app())
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
                                       daemon=True)
        self.thread.start()
        assert ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_preheat_image_picks_the_platform_and_uses_a_token(cl):
    import random

    with TinyRegistry() as reg:
        rnd = random.Random(7)
        per_platform = {}
        for arch in ("amd64", "arm64"):
            config = reg.add_blob(json.dumps({"architecture": arch}).encode())
            layers = [reg.add_blob(rnd.randbytes(n)) for n in (700_000, 300_000)]
            d = reg.add_manifest(f"m-{arch}", {
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {**config, "mediaType": "application/vnd.oci.image.config.v1+json"},
                "layers": layers})
            per_platform[arch] = (d, [config["digest"]] + [l["digest"] for l in layers])
        reg.add_manifest("1.0", {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": per_platform[a][0],
                           "size": 1, "platform": {"os": "linux", "architecture": a}} for a in ("amd64", "arm64")]})

        ref = f"127.0.0.1:{reg.port}/team/app:1.0"
        r = dfzmq(cl, "preheat", "--image", ref, "--platform", "linux/arm64", "--wait", "--json")
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)
        assert job["state"] == "succeeded" and job["note"].startswith(ref)
        assert job["headers"] == ["Authorization"]  # names only: the token is not printed
        assert reg.token_requests and reg.token_requests[0]["scope"] == "repository:team/app:pull"
        want = per_platform["arm64"][1]
        # every blob of the chosen platform read once by the seed; none of the other platform
        assert {d: reg.blob_bytes.get(d, 0) for d in want} == {d: len(reg.blobs[d]) for d in want}
        assert not any(reg.blob_bytes.get(d) for d in per_platform["amd64"][1][1:])
        # blobs are tasks named by their digest, as the registry mirror names them
        sched = request(f"tcp://{cl.scheduler_addrs[0]}", wire.SnapshotRequest(), 3.0)
        tasks = {t["task_id"]: t for t in sched.info["snapshot"]["tasks"]}
        for d in want:
            url = f"http://127.0.0.1:{reg.port}/v2/team/app/blobs/{d}"
            t = tasks[ids.task_id(url, content_digest=d)]
            assert t["complete"] and t["content_length"] == len(reg.blobs[d])

        r = dfzmq(cl, "preheat", "--image", ref, "--platform", "linux/s390x")
        assert r.returncode != 0 and "linux/amd64" in r.stderr and "linux/arm64" in r.stderr
        r = dfzmq(cl, "preheat", "--image", f"127.0.0.1:{reg.port}/team/app:nope")
        assert r.returncode != 0 and "not found" in r.stderr


def _preheat_restarting(cl, origin, name: str, served: int, restart: str) -> None:
    """`preheat NAME --wait` from a slowed origin; once the origin has served more than `served`
    bytes, restart `restart`. The preheat must still succeed."""
    origin.set_rate(2 * 1024 * 1024)
    try:
        p = subprocess.Popen([sys.executable, "-m", "dfzmq", "preheat", origin.url(name), "--wait",
                              "--manager", cl.manager_addr], env=cl.env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while origin.bytes_served(name) <= served and time.monotonic() < deadline:
            time.sleep(0.05)
        cl.restart(restart)
        out, err = p.communicate(timeout=120)
    finally:
        origin.set_rate(None)
    assert p.returncode == 0, err
    assert "succeeded" in out


def test_a_job_survives_a_manager_restart(cl, www, origin):
    data = make_file(www / "slow.bin", 4 * 1024 * 1024, seed=11)
    # jobs are in the manager's LMDB; reports are sent until shown
    _preheat_restarting(cl, origin, "slow.bin", 0, "manager")
    assert origin.bytes_served("slow.bin") == len(data)


def _push(base: str, repo: str, data: bytes) -> str:
    """Upload a blob to a real registry (monolithic upload); its digest."""
    import urllib.request

    d = "sha256:" + hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"{base}/v2/{repo}/blobs/uploads/", method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        location = resp.headers["Location"]
    sep = "&" if "?" in location else "?"
    url = location if location.startswith("http") else base + location
    req = urllib.request.Request(f"{url}{sep}digest={d}", data=data, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 201
    return d


def test_preheat_image_from_debian_docker_registry(cl, tmp_path):
    """The real thing: Debian's docker-registry (distribution 2.x, anonymous), an image pushed
    through its API, preheated; its access log shows each blob's bytes were served once."""
    import random
    import shutil
    import urllib.request

    exe = shutil.which("docker-registry")
    if exe is None:
        pytest.skip("Debian package docker-registry is not installed (make test installs it)")
    from tools.cluster import free_port

    port = free_port()
    (tmp_path / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    log = open(tmp_path / "registry.log", "wb")
    proc = subprocess.Popen([exe, "serve", str(tmp_path / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(base + "/v2/", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "registry.log").read_text()
                time.sleep(0.1)
        rnd = random.Random(12)
        layers = [rnd.randbytes(n) for n in (900_000, 250_000)]
        config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        blobs = {_push(base, "team/app", b): b for b in [config, *layers]}
        digests = list(blobs)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digests[0], "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d,
                        "size": len(blobs[d])} for d in digests[1:]]}).encode()
        req = urllib.request.Request(f"{base}/v2/team/app/manifests/1.0", data=manifest, method="PUT",
                                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 201

        r = dfzmq(cl, "preheat", "--image", f"127.0.0.1:{port}/team/app:1.0", "--wait")
        assert r.returncode == 0, r.stderr
        assert "3 blobs" in r.stderr and "succeeded" in r.stdout
        sched = request(f"tcp://{cl.scheduler_addrs[0]}", wire.SnapshotRequest(), 3.0)
        tasks = {t["task_id"]: t for t in sched.info["snapshot"]["tasks"]}
        for d, data in blobs.items():
            t = tasks[ids.task_id(f"{base}/v2/team/app/blobs/{d}", content_digest=d)]
            assert t["complete"] and t["content_length"] == len(data)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    # the access log: bytes the registry sent per blob, over every GET (probe and ranges)
    sent: dict[str, int] = {}
    for line in (tmp_path / "registry.log").read_text(errors="replace").splitlines():
        m = re.search(r'"GET /v2/team/app/blobs/(sha256:[0-9a-f]{64}) HTTP/[\d.]+" (\d{3}) (\d+)', line)
        if m and m.group(2) in ("200", "206"):
            sent[m.group(1)] = sent.get(m.group(1), 0) + int(m.group(3))
    assert sent == {d: len(b) for d, b in blobs.items()}


def test_a_seed_restarted_mid_job_finishes_its_part(cl, www, origin):
    data = make_file(www / "resume.bin", 4 * 1024 * 1024, seed=13)
    # the job still names the seed: the restarted daemon picks it up again
    _preheat_restarting(cl, origin, "resume.bin", 1024 * 1024 - 1, "seed0")
    # it resumed from the pieces it kept rather than reading the whole file again
    assert len(data) <= origin.bytes_served("resume.bin") < 1.6 * len(data)


def test_preheat_of_a_local_file_is_refused(cl):
    """file:// would make every seed read its own disk and serve the file over P2P."""
    r = dfzmq(cl, "preheat", "file:///etc/hostname")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip().count("\n") == 0 and "error" in r.stderr and "http" in r.stderr, r.stderr
    # the manager refuses it too (another client could send anything)
    reply = request(f"tcp://{cl.manager_addr}", wire.JobCreate("preheat", ["file:///etc/hostname"], "all"), 3.0)
    assert isinstance(reply, wire.Error) and reply.code == "bad-request", reply
    jobs = request(f"tcp://{cl.manager_addr}", wire.JobList(1000), 3.0).jobs
    assert not any(u.startswith("file:") for j in jobs for u in j.urls)
