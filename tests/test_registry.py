"""The registry mirror with real servers and clients: Debian's `docker-registry` (distribution
v2) as the upstream, with its own authentication (htpasswd's basic challenge, or the bearer
token flow with a token server run here that signs JWTs with `openssl`, as Docker Hub's auth
service does), an image built here and pushed with `skopeo`,
then `skopeo copy` of it through the mirrors of three daemons at once. Every copy verifies
(skopeo checks every blob against its digest), and the registry's access log shows that it
served each blob's bytes once for the whole cluster."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.test_proxy import client_env
from tools.cluster import LocalCluster, free_port
from tools.ociimage import make_image

pytestmark = pytest.mark.skipif(
    not all(shutil.which(x) for x in ("docker-registry", "skopeo", "htpasswd")),
    reason="docker-registry, skopeo and htpasswd are needed (make test installs them)")

DEADLINE_S = 60
USER, PASSWORD = "alice", "s3cret-pw"
BLOB_LINE = re.compile(r'"GET /v2/[^ ]+/blobs/(sha256:[0-9a-f]{64}) HTTP/[0-9.]+" (\d{3}) (\d+)')


def wait_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A registry token service (docker's token auth spec): basic credentials in, a JWT signed
    with RS256 (by `openssl dgst`) out, granting what the scope asks for the repository."""

    def __init__(self, root: Path, service: str, issuer: str) -> None:
        self.key, self.cert = root / "token.key", root / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                        "-out", str(self.cert), "-days", "2", "-subj", "/CN=dfzmq-test-token"],
                       capture_output=True, check=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             capture_output=True, check=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.service, self.issuer = service, issuer
        self.issued = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # docker's token flow: basic credentials, scope in the query
                want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                ok = self.headers.get("Authorization", "") == want
                self.answer(ok, parse_qs(urlsplit(self.path).query))

            def do_POST(self):  # the OAuth2 password grant (containerd's first try)
                n = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(n).decode())
                ok = form.get("username") == [USER] and form.get("password") == [PASSWORD]
                self.answer(ok, {"scope": " ".join(form.get("scope", [])).split()})

            def answer(self, ok: bool, q: dict) -> None:
                if not ok:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                tok = server.token(q.get("scope", []))
                body = json.dumps({"token": tok, "access_token": tok, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def token(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        head = b64url(json.dumps({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}).encode())
        claims = b64url(json.dumps({"iss": self.issuer, "sub": USER, "aud": self.service, "exp": now + 600,
                                    "nbf": now - 60, "iat": now, "jti": os.urandom(8).hex(),
                                    "access": access}).encode())
        signed = f"{head}.{claims}".encode()
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signed,
                             capture_output=True, check=True).stdout
        self.issued += 1
        return f"{head}.{claims}.{b64url(sig)}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module", params=["htpasswd", "token"])
def registry(request, tmp_path_factory):
    """A docker-registry on a free loopback port with htpasswd (basic challenge) or token auth."""
    root = tmp_path_factory.mktemp("registry")
    tokens = None
    if request.param == "htpasswd":
        htpasswd = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], capture_output=True, text=True, check=True)
        (root / "htpasswd").write_text(htpasswd.stdout)
        auth = f"""  htpasswd:
    realm: dfzmq-test
    path: {root / "htpasswd"}
"""
    else:
        tokens = TokenServer(root, "dfzmq-registry", "dfzmq-test-issuer")
        auth = f"""  token:
    realm: {tokens.realm}
    service: dfzmq-registry
    issuer: dfzmq-test-issuer
    rootcertbundle: {tokens.cert}
"""
    port = free_port()
    (root / "config.yml").write_text(f"""version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root / "data"}
http:
  addr: 127.0.0.1:{port}
auth:
{auth}""")
    log = root / "registry.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, log)
        yield f"127.0.0.1:{port}", log, tokens
    finally:
        proc.terminate()
        proc.wait(10)
        if tokens is not None:
            tokens.close()


def skopeo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, env=client_env(), timeout=timeout)


def blob_bytes_served(log: Path) -> Counter:
    served: Counter = Counter()
    for m in BLOB_LINE.finditer(log.read_text(errors="replace")):
        if m.group(2) in ("200", "206"):
            served[m.group(1)] += int(m.group(3))
    return served


@pytest.fixture(scope="module")
def mirrors(registry, tmp_path_factory):
    """Three daemons (and a seed) whose mirrors front the registry; per daemon, its mirror port."""
    reg = registry[0]
    ports = {n: free_port() for n in ("peer1", "peer2", "peer3")}
    env = {n: {"DFZMQ_PROXY_LISTEN": f"127.0.0.1:{p}", "DFZMQ_REGISTRY_MIRRORS": f"http://{reg}"}
           for n, p in ports.items()}
    with LocalCluster(tmp_path_factory.mktemp("cluster-mirror"), peers=3, daemon_env=env) as c:
        yield c, ports


def test_skopeo_copies_through_three_mirrors_each_blob_served_once(registry, mirrors, tmp_path):
    reg, reg_log, tokens = registry
    c, ports = mirrors
    blobs = make_image(tmp_path / "oci", "v1", (3 * 1024 * 1024, 700 * 1024), seed=7)
    r = skopeo("copy", "--dest-tls-verify=false", "--dest-creds", f"{USER}:{PASSWORD}",
               f"oci:{tmp_path / 'oci'}:v1", f"docker://{reg}/team/app:v1")
    assert r.returncode == 0, r.stderr
    assert not blob_bytes_served(reg_log)  # pushing serves nothing
    # The wrong password: the registry's 401 reaches the client through the mirror.
    bad = skopeo("inspect", "--tls-verify=false", "--creds", f"{USER}:wrong", f"docker://127.0.0.1:{ports['peer1']}/team/app:v1")
    assert bad.returncode != 0 and "unauthorized" in bad.stderr.lower(), bad.stderr
    procs = {
        n: subprocess.Popen(["skopeo", "copy", "--src-tls-verify=false", "--src-creds", f"{USER}:{PASSWORD}",
                             f"docker://127.0.0.1:{p}/team/app:v1", f"dir:{tmp_path / n}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=client_env())
        for n, p in ports.items()}
    outs = {n: p.communicate(timeout=120)[0] for n, p in procs.items()}
    for n, p in procs.items():
        assert p.returncode == 0, f"{n}: {outs[n]}\n{c.tail(n)}"
        for digest in blobs:
            assert (tmp_path / n / digest.split(":")[1]).read_bytes() == \
                   (tmp_path / "oci" / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
        counters = c.stat(n)["counters"]
        assert counters.get("registry.blob", 0) == len(blobs), counters
    logs = "".join(c.tail(n, 10_000) for n in c.procs)
    assert PASSWORD not in logs
    if tokens is not None:
        assert tokens.issued >= 3  # each client went through the bearer token flow
    served = {d: n for d, n in blob_bytes_served(reg_log).items() if d in blobs}
    assert served == blobs, f"registry served {served}, blobs are {blobs}"


@pytest.fixture(scope="module")
def containerd(tmp_path_factory):
    """A containerd of our own (root, state and socket in a temp dir; no CRI plugin)."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        pytest.skip("containerd is needed (make test installs it)")
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    root = tmp_path_factory.mktemp("containerd")
    sock = root / "containerd.sock"
    (root / "config.toml").write_text(f"""version = 2
root = "{root / 'root'}"
state = "{root / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
""")
    log = root / "containerd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["containerd", "--config", str(root / "config.toml")], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while subprocess.run(["ctr", "--address", str(sock), "version"], capture_output=True).returncode != 0:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.2)
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(20)


def test_containerd_pulls_through_the_mirror_with_init_hosts_toml(registry, mirrors, containerd, tmp_path):
    """`dfzmq init containerd` writes hosts.toml; containerd's resolver (ctr --hosts-dir, the
    code CRI uses) sends the pull to the mirror with ?ns=, through the registry's auth."""
    reg, reg_log, tokens = registry
    blobs = make_image(tmp_path / "oci", "v2", (900 * 1024,), seed=int(reg.rsplit(":", 1)[1]))  # new per registry
    r = skopeo("copy", "--dest-tls-verify=false", "--dest-creds", f"{USER}:{PASSWORD}",
               f"oci:{tmp_path / 'oci'}:v2", f"docker://{reg}/team/ctd:v2")
    assert r.returncode == 0, r.stderr
    c, ports = mirrors
    env = {"DFZMQ_PROXY_LISTEN": f"127.0.0.1:{ports['peer1']}", "DFZMQ_REGISTRY_MIRRORS": f"http://{reg}"}
    init = subprocess.run([sys.executable, "-m", "dfzmq", "init", "containerd", "--config-path", str(tmp_path / "hosts")],
                          capture_output=True, text=True, env={**LocalCluster.env(), **env}, cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    assert (tmp_path / "hosts" / reg / "hosts.toml").exists()
    before = c.stat("peer1")["counters"]
    pull = subprocess.run(["ctr", "--address", containerd, "content", "fetch", "--hosts-dir", str(tmp_path / "hosts"),
                           "--user", f"{USER}:{PASSWORD}", f"{reg}/team/ctd:v2"],
                          capture_output=True, text=True, env=client_env(), timeout=120)
    assert pull.returncode == 0, pull.stderr
    assert "trying next host" not in pull.stderr  # it never fell back to the registry itself
    counters = c.stat("peer1")["counters"]
    assert counters.get("registry.blob", 0) == before.get("registry.blob", 0) + 2, counters  # layer, config
    assert counters.get("registry.refused", 0) == 0
    served = {d: n for d, n in blob_bytes_served(reg_log).items() if d in blobs}
    assert served == blobs  # read once, by the seed
