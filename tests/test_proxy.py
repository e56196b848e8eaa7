"""The daemon's HTTP proxy with real clients (curl, wget, pip, a raw socket) against a real
origin and a real cluster of processes: matched URLs go peer to peer and come out byte-identical
with the origin's headers (also on a peer that never read the origin), unmatched ones pass
through, Range requests, CONNECT tunnels, signed URLs, credentials, streaming while the task
is still downloading."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import make_file
from tools.cluster import LocalCluster, free_port
from tools.origin import Origin

pytestmark = pytest.mark.skipif(shutil.which("curl") is None or shutil.which("wget") is None,
                                reason="curl and wget are needed (make test installs them)")

SIZE = 3 * 1024 * 1024 + 12345
RULES = r"/p2p/ \.whl$"
DEADLINE_S = 60


def client_env() -> dict[str, str]:
    """No proxy settings from the environment: each test says which proxy to use."""
    return {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}


def curl(proxy: str, url: str, out: Path, *args: str) -> tuple[int, dict[str, str], str]:
    """Status and headers of a curl through `proxy` (body into `out`)."""
    r = subprocess.run(["curl", "-sS", "-D-", "-o", str(out), "-x", f"http://{proxy}", *args, url],
                       capture_output=True, text=True, env=client_env(), timeout=DEADLINE_S)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, r.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    www = tmp_path_factory.mktemp("www-proxy")
    (www / "p2p").mkdir()
    (www / "plain").mkdir()
    files = {name: make_file(www / name, SIZE, seed=i) for i, name in
             enumerate(["p2p/a.bin", "p2p/b.bin", "p2p/c.bin", "p2p/signed.bin", "p2p/slow.bin",
                        "p2p/secret.bin", "plain/d.bin", "p2p/many.bin"])}
    with Origin(www) as origin:
        yield origin, files


@pytest.fixture(scope="module")
def proxies(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-proxy")
    ports = {n: free_port() for n in ("peer1", "peer2")}
    env = {n: {"DFZMQ_PROXY_LISTEN": f"127.0.0.1:{p}", "DFZMQ_PROXY_RULES": RULES,
               "DFZMQ_PROXY_FILTER_PARAMS": "token"} for n, p in ports.items()}
    env["peer2"]["DFZMQ_PROXY_PREFETCH"] = "true"  # peer1 keeps the default (off)
    with LocalCluster(root, peers=2, daemon_env=env) as c:
        yield c, {n: f"127.0.0.1:{p}" for n, p in ports.items()}


def test_curl_and_wget_fetch_matched_urls_p2p_with_origin_headers(site, proxies, tmp_path):
    origin, files = site
    c, px = proxies
    url = origin.url("p2p/a.bin")
    direct = subprocess.run(["curl", "-sS", "-I", url], capture_output=True, text=True,
                            env=client_env()).stdout.lower()
    status, h1, _ = curl(px["peer1"], url, tmp_path / "1.out")
    assert status == 200 and (tmp_path / "1.out").read_bytes() == files["p2p/a.bin"]
    assert h1["content-length"] == str(SIZE)
    assert f"etag: {h1['etag']}" in direct and f"content-type: {h1['content-type']}" in direct
    # peer2 never reads the origin: the seed and peer1 hold it; same bytes, same headers.
    r = subprocess.run(["wget", "-q", "-S", "-O", str(tmp_path / "2.out"), "-e", "use_proxy=yes",
                        "-e", f"http_proxy=http://{px['peer2']}", url],
                       capture_output=True, text=True, env=client_env(), timeout=DEADLINE_S)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "2.out").read_bytes() == files["p2p/a.bin"]
    assert f"ETag: {h1['etag']}" in r.stderr and f"Content-Type: {h1['content-type']}" in r.stderr
    assert origin.bytes_served("/p2p/a.bin") == SIZE  # the origin was read once, by the seed
    assert c.stat("peer2")["counters"].get("proxy.p2p", 0) >= 1


def test_unmatched_urls_pass_through_untouched(site, proxies, tmp_path):
    origin, files = site
    c, px = proxies
    url = origin.url("plain/d.bin")
    for i in range(2):
        status, _, _ = curl(px["peer1"], url, tmp_path / "d.out")
        assert status == 200 and (tmp_path / "d.out").read_bytes() == files["plain/d.bin"]
    assert origin.bytes_served("/plain/d.bin") == 2 * SIZE  # each request went to the origin
    # A request body passes through too (the origin's control endpoint takes JSON).
    r = subprocess.run(["curl", "-sS", "-x", f"http://{px['peer1']}", "-X", "POST", "-H", "Content-Type: application/json",
                        "-H", "Expect: 100-continue",
                        "--data-binary", '{"statuses": {}}', "-w", "%{http_code}", "-o", "/dev/null",
                        origin.url("_config")], capture_output=True, text=True, env=client_env())
    assert r.stdout == "200", r.stderr
    # An origin error passes through with its status.
    status, _, _ = curl(px["peer1"], origin.url("plain/missing.bin"), tmp_path / "m.out")
    assert status == 404
    counters = c.stat("peer1")["counters"]
    assert counters.get("proxy.passthrough", 0) >= 4


def test_range_requests(site, proxies, tmp_path):
    origin, files = site
    c, px = proxies
    data = files["p2p/b.bin"]
    url = origin.url("p2p/b.bin")
    # Not held anywhere, prefetch off: the range goes to the origin, only those bytes.
    status, h, _ = curl(px["peer1"], url, tmp_path / "r0.out", "-r", "1000-1999")
    assert status == 206 and (tmp_path / "r0.out").read_bytes() == data[1000:2000]
    assert origin.bytes_served("/p2p/b.bin") == 1000
    assert c.stat("peer1")["counters"].get("proxy.range-passthrough", 0) == 1
    # Once held, ranges are answered from the pieces that cover them (across piece borders).
    curl(px["peer1"], url, tmp_path / "whole.out")
    status, h, _ = curl(px["peer1"], url, tmp_path / "r1.out", "-r", "5-9")
    assert status == 206 and (tmp_path / "r1.out").read_bytes() == data[5:10]
    # peer2 (prefetch on) does not hold it: it fetches the whole task P2P and answers from it.
    for spec, want in [("70000-200000", data[70000:200001]), ("-5000", data[-5000:]),
                       (f"{SIZE - 10}-", data[-10:]), ("0-0", data[:1])]:
        status, h, _ = curl(px["peer2"], url, tmp_path / "r.out", "-r", spec)
        assert status == 206, spec
        assert (tmp_path / "r.out").read_bytes() == want, spec
        assert h["content-range"].endswith(f"/{SIZE}")
    status, h, _ = curl(px["peer2"], url, tmp_path / "r.out", "-H", f"Range: bytes={SIZE + 5}-")
    assert status == 416 and h["content-range"] == f"bytes */{SIZE}"
    assert origin.bytes_served("/p2p/b.bin") == 1000 + SIZE
    assert c.stat("peer2")["counters"].get("proxy.p2p-range", 0) >= 4


def test_signed_urls_of_one_object_are_one_task(site, proxies, tmp_path):
    origin, files = site
    c, px = proxies
    base = origin.url("p2p/signed.bin")
    u1 = base + "?X-Amz-Signature=aaa&X-Amz-Expires=60&token=one&version=3"
    u2 = base + "?version=3&X-Amz-Signature=bbb&X-Amz-Expires=90&token=two"
    s1, h1, _ = curl(px["peer1"], u1, tmp_path / "s1.out")
    s2, h2, _ = curl(px["peer2"], u2, tmp_path / "s2.out")
    assert s1 == s2 == 200 and h1["x-dfzmq-task"] == h2["x-dfzmq-task"]
    assert (tmp_path / "s1.out").read_bytes() == (tmp_path / "s2.out").read_bytes() == files["p2p/signed.bin"]
    assert origin.bytes_served("/p2p/signed.bin") == SIZE
    s3, h3, _ = curl(px["peer2"], base + "?version=4", tmp_path / "s3.out")
    assert h3["x-dfzmq-task"] != h1["x-dfzmq-task"]  # a real parameter still makes another task


def test_credentials_reach_the_origin_and_are_never_logged(site, proxies, tmp_path):
    origin, files = site
    c, px = proxies
    secret = "Bearer sekret-7f3a9c"
    origin.set_required_header(("Authorization", secret))
    try:
        status, _, _ = curl(px["peer1"], origin.url("p2p/c.bin"), tmp_path / "no.out")
        assert status == 401  # the origin's own refusal, relayed
        status, _, _ = curl(px["peer1"], origin.url("p2p/secret.bin"), tmp_path / "yes.out",
                            "-H", f"Authorization: {secret}")
        assert status == 200 and (tmp_path / "yes.out").read_bytes() == files["p2p/secret.bin"]
    finally:
        origin.set_required_header(None)
    logs = "".join(c.tail(n, 10_000) for n in c.procs)
    assert "sekret-7f3a9c" not in logs


def test_connect_tunnel_passes_through(site, proxies, tmp_path):
    origin, files = site
    c, px = proxies
    before = c.stat("peer1")["counters"].get("proxy.connect", 0)
    status, _, _ = curl(px["peer1"], origin.url("plain/d.bin"), tmp_path / "t.out", "--proxytunnel")
    assert status == 200 and (tmp_path / "t.out").read_bytes() == files["plain/d.bin"]
    assert c.stat("peer1")["counters"]["proxy.connect"] == before + 1
    port = free_port()  # nobody listens there
    r = subprocess.run(["curl", "-sS", "--proxytunnel", "-x", f"http://{px['peer1']}", f"http://127.0.0.1:{port}/"],
                       capture_output=True, text=True, env=client_env())
    assert r.returncode != 0 and "502" in r.stderr


def test_body_streams_while_the_task_downloads(site, proxies):
    """The first bytes reach the client while the origin has sent only part of the file."""
    origin, files = site
    c, px = proxies
    origin.set_rate(1024 * 1024)  # the whole file takes about 3 s from the origin
    try:
        host, port = px["peer2"].split(":")
        with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as s:
            url = origin.url("p2p/slow.bin")
            s.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            got = b""
            while b"\r\n\r\n" not in got:
                got += s.recv(65536)
            head, _, body = got.partition(b"\r\n\r\n")
            while len(body) < 64 * 1024:
                body += s.recv(65536)
            served_then = origin.bytes_served("/p2p/slow.bin")
            assert served_then < SIZE, "the proxy waited for the whole file"
            while chunk := s.recv(1 << 20):
                body += chunk
        assert head.startswith(b"HTTP/1.1 200") and body == files["p2p/slow.bin"]
    finally:
        origin.set_rate(None)


def _wheel(dirpath: Path) -> Path:
    """A minimal pure-Python wheel: package dfzmqdemo 1.0 with one module."""
    name = "dfzmqdemo-1.0-py3-none-any.whl"
    files = {
        "dfzmqdemo.py": "ANSWER = 42\n",
        "dfzmqdemo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: dfzmqdemo\nVersion: 1.0\n",
        "dfzmqdemo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: dfzmq-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        import base64
        record.append(f"{path},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{len(text)}")
    record.append("dfzmqdemo-1.0.dist-info/RECORD,,")
    files["dfzmqdemo-1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    out = dirpath / name
    with zipfile.ZipFile(out, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return out


def test_pip_installs_a_wheel_through_the_proxy(proxies, tmp_path):
    c, px = proxies
    index = tmp_path / "index"
    (index / "packages").mkdir(parents=True)
    (index / "simple" / "dfzmqdemo").mkdir(parents=True)
    whl = _wheel(index / "packages")
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    (index / "simple" / "dfzmqdemo" / "index.html").write_text(
        f'<html><body><a href="../../packages/{whl.name}#sha256={sha}">{whl.name}</a></body></html>\n')
    port = free_port()
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(index)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.1)
        before = c.stat("peer1")["counters"].get("proxy.p2p", 0)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                            "--proxy", f"http://{px['peer1']}", "--index-url", f"http://127.0.0.1:{port}/simple",
                            "--target", str(tmp_path / "target"), "dfzmqdemo"],
                           capture_output=True, text=True, env=client_env(), timeout=DEADLINE_S * 2)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (tmp_path / "target" / "dfzmqdemo.py").read_text() == "ANSWER = 42\n"
        assert c.stat("peer1")["counters"].get("proxy.p2p", 0) == before + 1  # the wheel came P2P
    finally:
        http.terminate()
        http.wait()


def test_malformed_requests_are_answered_400_and_counted(proxies):
    c, px = proxies
    host, port = px["peer1"].split(":")
    before = c.stat("peer1")["counters"].get("proxy.bad-request", 0)
    with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as s:
        s.sendall(b"\x16\x03\x01 this is not HTTP\r\n\r\n")  # e.g. a TLS hello to a plain port
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 400")
    assert c.stat("peer1")["counters"]["proxy.bad-request"] == before + 1
    # The proxy still serves others.
    with socket.create_connection((host, int(port)), timeout=DEADLINE_S) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 404")


def test_concurrent_clients_of_one_url_share_one_task(site, proxies, tmp_path):
    origin, files = site
    c, px = proxies
    url = origin.url("p2p/many.bin")
    procs = [subprocess.Popen(["curl", "-sSf", "-x", f"http://{px[n]}", "-o", str(tmp_path / f"{n}-{i}.out"), url],
                              env=client_env()) for i in range(3) for n in ("peer1", "peer2")]
    assert all(p.wait(DEADLINE_S) == 0 for p in procs)
    for i in range(3):
        for n in ("peer1", "peer2"):
            assert (tmp_path / f"{n}-{i}.out").read_bytes() == files["p2p/many.bin"]
    assert origin.bytes_served("/p2p/many.bin") == SIZE
