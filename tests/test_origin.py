"""The counting test origin: real sockets on 127.0.0.1, ephemeral ports, small files."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tools.origin import Origin, RangeDecision, RangeKind, TokenBucket, parse_range

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET"):
    """(status, headers, body) for any status, 4xx/5xx included."""
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "small.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, known pattern
    (root / "empty.bin").write_bytes(b"")
    (root / "two.bin").write_bytes(os.urandom(2 * MiB))
    (tmp_path / "secret.txt").write_text("outside the root")
    return root


@pytest.fixture
def origin(files: Path):
    with Origin(files) as o:
        yield o


def test_full_get_is_counted(origin: Origin, files: Path) -> None:
    status, headers, body = get(origin.url("small.bin"))
    assert status == 200
    assert body == (files / "small.bin").read_bytes()
    assert headers["Content-Length"] == str(MiB)
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"] and headers["Last-Modified"]
    assert headers["Content-Type"] == "application/octet-stream"
    assert origin.wait_idle() == {  # the handler may still be unwinding under load
        "total_bytes": MiB,
        "paths": {"/small.bin": {"bytes": MiB, "requests": 1}},
        "active": 0,
    }


def test_range_get_returns_and_counts_only_the_range(origin: Origin, files: Path) -> None:
    data = (files / "small.bin").read_bytes()
    status, headers, body = get(origin.url("small.bin"), {"Range": "bytes=1000-1999"})
    assert (status, body) == (206, data[1000:2000])
    assert headers["Content-Range"] == f"bytes 1000-1999/{MiB}"
    status, _, body = get(origin.url("small.bin"), {"Range": "bytes=-10"})
    assert (status, body) == (206, data[-10:])
    status, _, body = get(origin.url("small.bin"), {"Range": f"bytes={MiB - 5}-"})
    assert (status, body) == (206, data[-5:])
    assert origin.bytes_served("small.bin") == 1000 + 10 + 5
    assert origin.stats()["paths"]["/small.bin"]["requests"] == 3


def test_head_counts_no_bytes(origin: Origin) -> None:
    status, headers, body = get(origin.url("small.bin"), method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(MiB)
    assert origin.stats()["paths"]["/small.bin"] == {"bytes": 0, "requests": 1}


def test_unsatisfiable_range_is_416(origin: Origin) -> None:
    status, headers, _ = get(origin.url("small.bin"), {"Range": f"bytes={MiB}-"})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{MiB}"
    assert origin.stats()["total_bytes"] == 0


def test_empty_file_with_range_is_200_empty(origin: Origin) -> None:
    status, headers, body = get(origin.url("empty.bin"), {"Range": "bytes=0-"})
    assert (status, body, headers["Content-Length"]) == (200, b"", "0")


def test_if_range_mismatch_sends_whole_body(origin: Origin) -> None:
    status, _, body = get(origin.url("small.bin"), {"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert (status, len(body)) == (200, MiB)


def test_client_that_hangs_up_is_counted_for_what_was_sent(tmp_path: Path) -> None:
    root = tmp_path / "big"
    root.mkdir()
    size = 64 * MiB
    with open(root / "big.bin", "wb") as f:
        f.truncate(size)  # sparse: cheap to make, real bytes on the wire
    with Origin(root) as origin:
        conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=10)
        conn.request("GET", "/big.bin")
        resp = conn.getresponse()
        assert len(resp.read(MiB)) == MiB
        conn.sock.close()  # unread data pending: the kernel answers with a reset
        conn.close()
        stats = origin.wait_idle()
    assert stats["active"] == 0
    sent = stats["paths"]["/big.bin"]["bytes"]
    # what the client read plus at most the loopback socket buffers, never the whole file
    assert MiB <= sent < size // 2


@pytest.mark.parametrize("code", [404, 500])
def test_forced_status(origin: Origin, code: int) -> None:
    origin.set_status("small.bin", code)
    status, _, _ = get(origin.url("small.bin"))
    assert status == code
    origin.set_status("/small.bin", None)
    assert get(origin.url("small.bin"))[0] == 200
    assert origin.stats()["paths"]["/small.bin"] == {"bytes": MiB, "requests": 2}


def test_missing_and_escaping_paths_are_404(origin: Origin) -> None:
    assert get(origin.url("nope.bin"))[0] == 404
    assert get(origin.url("%2e%2e/secret.txt"))[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=10)
    conn.request("GET", "/../secret.txt")
    assert conn.getresponse().status == 404
    conn.close()


def test_ignore_range_mode(files: Path) -> None:
    with Origin(files, ignore_range=True) as origin:
        status, headers, body = get(origin.url("small.bin"), {"Range": "bytes=0-9"})
        assert (status, len(body)) == (200, MiB)
        assert "Accept-Ranges" not in headers and "Content-Range" not in headers


def test_required_header(files: Path) -> None:
    with Origin(files, required_header=("Authorization", "Bearer x")) as origin:
        assert get(origin.url("small.bin"))[0] == 401
        assert get(origin.url("small.bin"), {"Authorization": "Bearer y"})[0] == 401
        assert get(origin.url("small.bin"), {"Authorization": "Bearer x"})[0] == 200
        assert origin.stats()["paths"]["/small.bin"] == {"bytes": MiB, "requests": 3}


def test_rate_limit_is_roughly_honoured(origin: Origin) -> None:
    origin.set_rate(4 * MiB)
    t0 = time.monotonic()
    status, _, body = get(origin.url("two.bin"))
    elapsed = time.monotonic() - t0
    assert (status, len(body)) == (200, 2 * MiB)
    assert elapsed >= 0.3
    origin.set_rate(None)
    t0 = time.monotonic()
    get(origin.url("two.bin"))
    assert time.monotonic() - t0 < 0.3


def test_http_control_endpoints(origin: Origin) -> None:
    get(origin.url("small.bin"))
    _, _, body = get(origin.url("_stats"))
    assert json.loads(body)["paths"]["/small.bin"]["bytes"] == MiB
    cfg = {"statuses": {"/small.bin": 500}, "ignore_range": True, "rate_bytes_per_s": None}
    req = urllib.request.Request(origin.url("_config"), data=json.dumps(cfg).encode(), method="POST")
    assert get_request(req)[0] == 200
    assert get(origin.url("small.bin"))[0] == 500
    bad = urllib.request.Request(origin.url("_config"), data=b'{"statuses": 3}', method="POST")
    assert get_request(bad)[0] == 400
    assert get_request(urllib.request.Request(origin.url("_reset"), data=b"", method="POST"))[0] == 200
    assert origin.stats()["total_bytes"] == 0 and origin.stats()["paths"] == {}
    assert origin.state.ignore_range is True


def get_request(req: urllib.request.Request):
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize(
    "header, size, expected",
    [
        (None, 10, RangeDecision(RangeKind.FULL, 0, 9)),
        ("bytes=2-4", 10, RangeDecision(RangeKind.PARTIAL, 2, 4)),
        ("bytes=2-100", 10, RangeDecision(RangeKind.PARTIAL, 2, 9)),
        ("bytes=7-", 10, RangeDecision(RangeKind.PARTIAL, 7, 9)),
        ("bytes=-3", 10, RangeDecision(RangeKind.PARTIAL, 7, 9)),
        ("bytes=-30", 10, RangeDecision(RangeKind.PARTIAL, 0, 9)),
        ("bytes=10-", 10, RangeDecision(RangeKind.UNSATISFIABLE)),
        ("bytes=-0", 10, RangeDecision(RangeKind.UNSATISFIABLE)),
        ("bytes=5-2", 10, RangeDecision(RangeKind.FULL, 0, 9)),
        ("bytes=0-1,4-5", 10, RangeDecision(RangeKind.FULL, 0, 9)),
        ("items=0-1", 10, RangeDecision(RangeKind.FULL, 0, 9)),
        ("bytes=x-1", 10, RangeDecision(RangeKind.FULL, 0, 9)),
        ("bytes=0-", 0, RangeDecision(RangeKind.FULL, 0, -1)),
    ],
)
def test_parse_range(header: str | None, size: int, expected: RangeDecision) -> None:
    assert parse_range(header, size) == expected


def test_token_bucket_reserves_into_debt() -> None:
    bucket = TokenBucket.start(rate=1000, now=0.0)  # burst 100
    assert bucket.reserve(100, now=0.0) == 0.0
    assert bucket.reserve(500, now=0.0) == pytest.approx(0.5)
    assert bucket.reserve(500, now=0.0) == pytest.approx(1.0)  # a second sender queues behind
    assert bucket.reserve(0, now=2.0) == 0.0  # debt repaid, refilled to the burst only
    assert bucket.tokens == pytest.approx(100)


def test_process_mode_serves_and_exits_on_sigterm(files: Path, tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.origin", "--root", str(files), "--port-file", str(port_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("origin listening on http://127.0.0.1:")
        base = line.rsplit(" ", 1)[1]
        assert port_file.read_text().strip() == base.rsplit(":", 1)[1]
        status, _, body = get(base + "/small.bin")
        assert (status, len(body)) == (200, MiB)
        _, _, stats = get(base + "/_stats")
        assert json.loads(stats)["total_bytes"] == MiB
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
