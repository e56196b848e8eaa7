"""The proxy's pure parts (rules, headers, ranges), the registry mirror's upstream choice, origin
metadata travelling through the scheduler core, and `dfzmq init containerd|docker`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dfzmq import ids, wire
from dfzmq.cli import app
from dfzmq.config import DaemonConfig, resolve
from dfzmq.errors import ConfigError
from nodes import httprules
from nodes.httprules import Answer, answer_range
from nodes.registry import BLOB, upstream_map, upstream_url
from nodes.source import origin_meta
from tests.test_scheduler_core import TASK, FakeNet

# -- rules and headers -------------------------------------------------------------------------


def test_rules_match_only_get_of_http_urls():
    rules = httprules.Rules([r"\.safetensors$", r"^http://files\.example/"])
    assert rules.match("GET", "http://hf.example/m/model.safetensors")
    assert rules.match("GET", "http://files.example/x?sig=1")
    assert not rules.match("POST", "http://files.example/x")
    assert not rules.match("GET", "http://other.example/x.bin")
    assert not rules.match("GET", "https://files.example/x")  # HTTPS is a tunnel: not seen
    with pytest.raises(ValueError, match="bad proxy rule"):
        httprules.Rules(["(unclosed"])


def test_origin_headers_keep_credentials_and_drop_per_request_ones():
    got = httprules.origin_headers([
        ("Host", "x"), ("Authorization", "Bearer t"), ("Cookie", "a=1"), ("Range", "bytes=0-1"),
        ("If-None-Match", '"e"'), ("Accept-Encoding", "gzip"), ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"), ("Proxy-Authorization", "Basic p"), ("X-Dfzmq-Tag", "v2"), ("User-Agent", "curl"),
    ])
    assert got == {"Authorization": "Bearer t", "Cookie": "a=1", "User-Agent": "curl"}
    fwd = httprules.end_to_end([("Connection", "close, X-Hop"), ("X-Hop", "1"), ("Range", "bytes=1-"),
                                ("Transfer-Encoding", "chunked"), ("ETag", '"e"')])
    assert fwd == [("Range", "bytes=1-"), ("ETag", '"e"')]


@pytest.mark.parametrize("header,want", [
    (None, Answer(200, 0, 1000)),
    ("bytes=0-99", Answer(206, 0, 100)),
    ("bytes=990-2000", Answer(206, 990, 1000)),
    ("bytes=500-", Answer(206, 500, 1000)),
    ("bytes=-10", Answer(206, 990, 1000)),
    ("bytes=-5000", Answer(206, 0, 1000)),
    ("bytes=1000-", Answer(416)),
    ("bytes=-0", Answer(416)),
    ("bytes=0-1,5-6", Answer(200, 0, 1000)),  # several ranges: the whole body
    ("items=0-1", Answer(200, 0, 1000)),
    ("bytes=9-3", Answer(200, 0, 1000)),
    ("bytes=x-3", Answer(200, 0, 1000)),
])
def test_answer_range(header, want):
    assert answer_range(header, None, '"e"', 1000) == want


def test_if_range_and_if_none_match():
    assert answer_range("bytes=0-9", '"e"', '"e"', 100) == Answer(206, 0, 10)
    assert answer_range("bytes=0-9", '"old"', '"e"', 100) == Answer(200, 0, 100)
    assert answer_range("bytes=0-9", 'W/"e"', 'W/"e"', 100) == Answer(200, 0, 100)  # weak: never
    assert httprules.etag_matches('"a", W/"e"', '"e"')
    assert httprules.etag_matches("*", '"e"')
    assert not httprules.etag_matches('"a"', '"e"') and not httprules.etag_matches(None, '"e"')


def test_origin_meta_keeps_the_replayed_headers():
    meta = origin_meta({"Content-Type": "text/csv", "ETag": '"1"', "Server": "x", "Set-Cookie": "s=1"})
    assert meta == {"status": "200", "content-type": "text/csv", "etag": '"1"'}


def test_proxy_lists_from_env_and_toml():
    cfg = resolve(DaemonConfig, "daemon", {}, {"daemon": {"proxy_rules": [r"a b", "c"]}},
                  env={"DFZMQ_REGISTRY_MIRRORS": "https://index.docker.io  http://127.0.0.1:5000"})
    assert cfg.proxy_rules == ["a b", "c"]  # a TOML array keeps spaces inside a rule
    assert cfg.registry_mirrors == ["https://index.docker.io", "http://127.0.0.1:5000"]
    with pytest.raises(ConfigError):
        resolve(DaemonConfig, "daemon", {}, {"proxy_rules": 5}, env={})


# -- registry mirror ----------------------------------------------------------------------------


def test_registry_upstream_by_ns_and_default():
    ups = upstream_map(["https://index.docker.io", "http://127.0.0.1:5000", "ghcr.io"])
    assert ups["docker.io"] == "https://registry-1.docker.io"
    assert upstream_url(ups, "https://registry-1.docker.io", "/v2/library/alpine/manifests/3?ns=docker.io") == \
        "https://registry-1.docker.io/v2/library/alpine/manifests/3"
    assert upstream_url(ups, "https://x", "/v2/a/tags/list?ns=127.0.0.1:5000&n=10") == \
        "http://127.0.0.1:5000/v2/a/tags/list?n=10"
    assert upstream_url(ups, "https://ghcr.io", "/v2/") == "https://ghcr.io/v2/"
    assert upstream_url(ups, "https://ghcr.io", "/v2/?ns=evil.example") is None  # not an open proxy
    with pytest.raises(ConfigError):
        upstream_map(["ftp://x"])


def test_blob_paths_and_blob_task_ids():
    digest = "sha256:" + "ab" * 32
    m = BLOB.match(f"/v2/library/my-app/blobs/{digest}")
    assert m and m["name"] == "library/my-app" and m["digest"] == digest
    assert not BLOB.match(f"/v2/library/app/manifests/{digest}")
    assert not BLOB.match("/v2/app/blobs/sha256:xyz")
    # One blob through two registries (or mirrors) is one task.
    assert ids.task_id("https://a.example/v2/x/blobs/" + digest, content_digest=digest) == \
        ids.task_id("http://b.example:5000/v2/y/blobs/" + digest, content_digest=digest)


# -- origin metadata through the scheduler --------------------------------------------------------


def test_origin_meta_reaches_peers_that_did_not_read_the_origin():
    net = FakeNet()
    src, other = net.host("src"), net.host("other")
    src.register()
    assert src.one(wire.BackToSource)
    other.register()
    other.take()
    meta = {"status": "200", "content-type": "application/x-tar", "etag": '"v1"'}
    src.send(wire.PieceReport(TASK, src.peer(), [], 300, "origin", meta))
    got = other.take(wire.TaskManifest)
    assert got and got[-1].meta == meta and got[-1].content_length == 300
    # A later, different claim does not change it; a late registrant gets it with the manifest.
    src.send(wire.PieceReport(TASK, src.peer(), [], 300, "origin", {"status": "200", "etag": '"v2"'}))
    late = net.host("late")
    late.register()
    assert late.take(wire.TaskManifest)[0].meta == meta
    assert net.core.tasks[TASK].meta == meta


def test_reannounced_finished_peer_brings_its_meta_back():
    net = FakeNet()
    a = net.host("a")
    meta = {"status": "200", "content-type": "text/plain"}
    a.send(wire.PeerRegister(TASK, a.peer(), "http://o/x", state="succeeded",
                             pieces=[wire.PieceInfo(0, 0, 10, "d0")], content_length=10, meta=meta))
    assert net.core.tasks[TASK].meta == meta


# -- dfzmq init ----------------------------------------------------------------------------------


def test_init_containerd_writes_hosts_toml(tmp_path, monkeypatch):
    monkeypatch.setenv("DFZMQ_PROXY_LISTEN", "0.0.0.0:65001")
    monkeypatch.setenv("DFZMQ_REGISTRY_MIRRORS", "https://index.docker.io http://127.0.0.1:5000")
    runner = CliRunner()
    dry = runner.invoke(app, ["init", "containerd", "--dry-run", "--config-path", str(tmp_path)])
    assert dry.exit_code == 0, dry.output
    assert 'server = "https://registry-1.docker.io"' in dry.output
    assert '[host."http://127.0.0.1:65001"]' in dry.output
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    r = runner.invoke(app, ["init", "containerd", "--config-path", str(tmp_path)])
    assert r.exit_code == 0, r.output
    hub = (tmp_path / "docker.io" / "hosts.toml").read_text()
    local = (tmp_path / "127.0.0.1:5000" / "hosts.toml").read_text()
    import tomllib
    assert tomllib.loads(hub)["host"]["http://127.0.0.1:65001"]["capabilities"] == ["pull", "resolve"]
    assert tomllib.loads(local)["server"] == "http://127.0.0.1:5000"
    again = runner.invoke(app, ["init", "containerd", "--config-path", str(tmp_path)])
    assert again.exit_code == 2 and "exists" in again.output
    assert runner.invoke(app, ["init", "containerd", "--config-path", str(tmp_path), "--force"]).exit_code == 0


def test_init_docker_prints_registry_mirrors(monkeypatch):
    monkeypatch.setenv("DFZMQ_PROXY_LISTEN", "65001")
    monkeypatch.setenv("DFZMQ_REGISTRY_MIRRORS", "https://index.docker.io")
    r = CliRunner().invoke(app, ["init", "docker"])
    assert r.exit_code == 0 and '"registry-mirrors": [\n    "http://127.0.0.1:65001"\n  ]' in r.output
    monkeypatch.delenv("DFZMQ_PROXY_LISTEN")
    r = CliRunner().invoke(app, ["init", "docker"])
    assert r.exit_code == 2 and "proxy_listen" in r.output


# -- StreamSink ---------------------------------------------------------------------------------


class _Store:
    """Pieces by digest, as the piece store hands them out."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, digest: str) -> bytes | None:
        return self.data.get(digest)

    def get_ready(self, digest: str, view: bool = False) -> bytes | None:
        return self.data.get(digest)  # all in memory: never DISK


def _pieces(blob: bytes, size: int) -> list[tuple[wire.PieceInfo, bytes]]:
    out = []
    for num, off in enumerate(range(0, len(blob), size)):
        chunk = blob[off:off + size]
        out.append((wire.PieceInfo(num, off, len(chunk), f"d{num}"), chunk))
    return out


def _stream(blob: bytes, order: list[int], start: int, end: int, expected: str = "", verify: bool = False):
    import asyncio
    import threading

    from nodes.stream import StreamSink

    async def go():
        store = _Store()
        sink = StreamSink(asyncio.get_running_loop(), store, expected)
        pieces = _pieces(blob, 100)

        def writer():  # the run's writer thread: store, then tell the sink, in any order
            sink.set_length(len(blob))
            for i in order:
                info, data = pieces[i]
                store.data[info.digest] = data
                sink.write(info, None)
            sink.finish(len(blob), "")

        got = bytearray()
        threading.Thread(target=writer).start()
        try:
            async for chunk in sink.body(start, end, verify):
                got += chunk
        except Exception as e:
            return bytes(got), e
        return bytes(got), None

    return asyncio.run(go())


def test_stream_sink_yields_ranges_in_order_whatever_the_arrival_order():
    import random
    blob = random.Random(3).randbytes(1050)
    order = list(range(11))
    random.Random(4).shuffle(order)
    assert _stream(blob, order, 0, 1050) == (blob, None)
    assert _stream(blob, order, 150, 777) == (blob[150:777], None)  # starts and ends mid-piece
    assert _stream(blob, order, 1049, 1050) == (blob[1049:], None)


def test_stream_sink_holds_back_the_last_piece_until_the_digest_matched():
    import hashlib
    import random

    from dfzmq.errors import IntegrityError
    blob = random.Random(5).randbytes(1050)
    good = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert _stream(blob, list(range(11)), 0, 1050, good, verify=True) == (blob, None)
    got, err = _stream(blob, list(range(11)), 0, 1050, "sha256:" + "0" * 64, verify=True)
    assert isinstance(err, IntegrityError)
    assert got == blob[:1000]  # everything but the last piece went out; the client sees a cut


def test_stream_sink_keeps_pieces_handed_over_within_its_hold_for_a_client_behind_the_download():
    """A client slower than the download takes the pieces the run handed over as they were, up
    to hold_bytes ahead of it, instead of reading them back from the store (from disk, once
    they left its cache of recent pieces); beyond the hold it reads the store."""
    import asyncio
    import random

    from nodes.stream import HoldBudget, StreamSink
    blob = random.Random(6).randbytes(1050)
    pieces = _pieces(blob, 100)

    class Counting(_Store):
        reads = 0

        def get_ready(self, digest: str, view: bool = False) -> bytes | None:
            self.reads += 1
            return super().get_ready(digest, view)

    async def go():
        store = Counting()
        sink = StreamSink(asyncio.get_running_loop(), store, budget=HoldBudget(300))

        def hand(i):  # as the writer thread does: store, then tell the sink with the bytes
            info, data = pieces[i]
            store.data[info.digest] = data
            sink.write(info, memoryview(data))

        sink.set_length(len(blob))
        hand(0)  # stored before the client asked: read from the store
        await asyncio.sleep(0)
        body = sink.body(0, len(blob))
        got = bytearray(await body.__anext__())
        for i in range(1, 11):  # the rest arrives while the client still holds piece 0
            hand(i)
        await asyncio.sleep(0)
        assert sorted(sink.held) == [100, 200] and sink.held_size == 200  # 300 bytes from byte 0
        sink.finish(len(blob), "")
        async for chunk in body:
            got += chunk
        return bytes(got), sink, store

    got, sink, store = asyncio.run(go())
    assert got == blob
    assert (sink.reads_held, sink.reads_store, store.reads) == (2, 9, 9)
    assert sink.held == {} and sink.held_size == 0

    async def reused():  # a buffer its owner refills (a bytearray) is never kept
        sink = StreamSink(asyncio.get_running_loop(), Counting(), budget=HoldBudget(400))
        sink.window = (0, len(blob))
        sink.write(pieces[1][0], bytearray(pieces[1][1]))
        sink.write(pieces[2][0], memoryview(bytearray(pieces[2][1])))
        sink.write(pieces[3][0], pieces[3][1])
        await asyncio.sleep(0)
        return sorted(sink.held)

    assert asyncio.run(reused()) == [300]

    async def shared_and_closed():
        """One budget for every stream of the proxy; a body closed early (the client went) gives
        its part back at once, and holds nothing more after."""
        loop = asyncio.get_running_loop()
        budget = HoldBudget(300)
        full = Counting()
        full.data = {info.digest: data for info, data in pieces}
        a, b = StreamSink(loop, full, budget=budget), StreamSink(loop, full, budget=budget)
        for sink in (a, b):
            sink.set_length(len(blob))
            sink.write(pieces[0][0], pieces[0][1])
        await asyncio.sleep(0)
        bodies = [a.body(0, len(blob)), b.body(0, len(blob))]
        for body in bodies:
            await body.__anext__()
        for i in (1, 2):
            a.write(*pieces[i])
            b.write(*pieces[i])
        await asyncio.sleep(0)
        assert budget.used == 300 and (a.held_size, b.held_size) == (200, 100)  # a came first
        await bodies[0].aclose()
        assert budget.used == 100 and a.held == {} and a.window == (0, 0)
        a.write(*pieces[3])
        await asyncio.sleep(0)
        assert a.held == {} and budget.used == 100
        await bodies[1].aclose()
        return budget.used

    assert asyncio.run(shared_and_closed()) == 0


@pytest.mark.parametrize("hub", ["docker.io", "https://docker.io", "index.docker.io", "http://index.docker.io",
                                 "registry-1.docker.io", "https://registry-1.docker.io/"])
def test_every_docker_hub_alias_goes_to_registry_1(hub, monkeypatch):
    """containerd's ns=docker.io, and docker's requests without ns, reach registry-1 (the API host)
    whichever Docker Hub name the operator wrote; dfzmq init writes the same server."""
    from dfzmq.cli_init import registries
    from nodes.registry import RegistryMirror
    ups = upstream_map([hub])
    assert upstream_url(ups, "", "/v2/library/x/manifests/latest?ns=docker.io") == \
        "https://registry-1.docker.io/v2/library/x/manifests/latest"
    assert RegistryMirror(None, [hub]).default == "https://registry-1.docker.io"
    monkeypatch.setenv("DFZMQ_PROXY_LISTEN", "65001")
    assert registries(DaemonConfig(registry_mirrors=[hub])) == [("docker.io", "https://registry-1.docker.io")]


@pytest.mark.parametrize("name", ["docker.io", "index.docker.io", "registry-1.docker.io"])
def test_image_references_naming_docker_hub_resolve_to_registry_1(name):
    from dfzmq.registry import parse_ref
    for text, repo in ((f"{name}/nginx:1.27", "library/nginx"), (f"{name}/bitnami/redis:7", "bitnami/redis")):
        r = parse_ref(text)
        assert (r.registry, r.repository) == ("registry-1.docker.io", repo), text
