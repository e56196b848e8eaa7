"""nodes/source.py: piece planning, and SourceReader against a real counting HTTP origin and
file:// URLs. The origin must serve each byte it is asked for exactly once."""

from __future__ import annotations

import asyncio
import random

import blake3
import pytest

from dfzmq.errors import IntegrityError, SourceError
from dfzmq.wire import PieceInfo
from nodes import source
from nodes.source import SourceReader, choose_piece_length, groups, plan
from tools.origin import Origin

KiB, MiB = 1024, 1024 * 1024
SIZES = [0, 1, 65535, 65536, 65537, 3 * 65536 + 7, 5 * MiB + 12345]


# -- choose_piece_length, plan, groups -------------------------------------------------------


def test_choose_piece_length_bounds_and_growth():
    assert choose_piece_length(-1) == source.DEFAULT_PIECE
    assert choose_piece_length(0) == source.MIN_PIECE
    assert choose_piece_length(1) == source.MIN_PIECE
    assert choose_piece_length(10 * MiB) == source.MIN_PIECE
    assert choose_piece_length(1 << 50) == source.MAX_PIECE
    prev = 0
    for size in sorted({s for exp in range(45) for s in (1 << exp, (1 << exp) + 1, 3 << exp)}):
        length = choose_piece_length(size)
        assert source.MIN_PIECE <= length <= source.MAX_PIECE
        assert length & (length - 1) == 0  # a power of two
        assert length >= prev  # never shrinks as files grow
        prev = length
        if source.MIN_PIECE * source.TARGET_PIECES <= size <= source.MAX_PIECE * source.TARGET_PIECES:
            count = -(-size // length)  # hundreds of pieces (the remainder may add one)
            assert source.TARGET_PIECES // 2 <= count <= source.TARGET_PIECES + 1


def test_max_piece_caps_the_length_until_the_pieces_would_be_too_many():
    assert choose_piece_length(512 * MiB) == MiB
    assert choose_piece_length(512 * MiB, 256 << 10) == 256 << 10
    assert choose_piece_length(64 * MiB, 256 << 10) == 128 << 10  # shorter by size alone
    assert choose_piece_length(-1, 256 << 10) == source.DEFAULT_PIECE  # no size: no count to bound
    big = 16 << 30  # 16 GiB in 256 KiB pieces would be 65536: the cap yields at CAPPED_PIECES_MAX
    assert choose_piece_length(big, 256 << 10) == big // source.CAPPED_PIECES_MAX == MiB
    assert choose_piece_length(512 * MiB, 1000) == source.MIN_PIECE  # never below 64 KiB
    for size in (MiB, 100 * MiB + 7, 3 << 30):
        for cap in (64 << 10, 256 << 10, 4 * MiB):
            length = choose_piece_length(size, cap)
            assert length <= max(cap, choose_piece_length(size)) and length & (length - 1) == 0
            assert length <= cap or -(-size // length) >= source.CAPPED_PIECES_MAX // 2


def test_plan_cuts_at_the_cap_but_keeps_known_boundaries():
    size = 512 * MiB + 5
    pieces = plan(size, {}, 256 << 10)
    assert_covers(pieces, size)
    assert {length for _, _, length in pieces[:-1]} == {256 << 10} and pieces[-1][2] == 5
    # a resumed task keeps the manifest it has, whatever this reader's cap
    known = {0: PieceInfo(0, 0, MiB, "d")}
    assert {length for _, _, length in plan(size, known, 256 << 10)[:-1]} == {MiB}


def test_file_url_reader_cuts_at_its_cap(tmp_path):
    path = tmp_path / "sparse.bin"
    size = 64 * MiB + 3  # 128 KiB pieces by size alone
    with open(path, "wb") as f:
        f.truncate(size)
    for cap, want in ((0, 128 << 10), (64 << 10, 64 << 10)):
        got = {}

        async def on_piece(info, data):
            got[info.num] = info

        reader = SourceReader(path.as_uri(), {}, max_piece=cap)
        assert asyncio.run(reader.run({}, set(), -1, on_piece)).content_length == size
        assert {i.length for i in got.values() if i.offset + i.length < size} == {want}
        assert len(got) == -(-size // want)


def assert_covers(pieces, size):
    offset = 0
    for i, (num, off, length) in enumerate(pieces):
        assert num == i and off == offset and length > 0
        offset += length
    assert offset == size


@pytest.mark.parametrize("size", SIZES + [64 * MiB + 1, 10 * 1024 * MiB])
def test_plan_without_a_manifest(size):
    pieces = plan(size, {})
    assert_covers(pieces, size)
    length = choose_piece_length(size)
    assert all(p[2] == length for p in pieces[:-1])


def info(num, offset, length, d="00"):
    return PieceInfo(num, offset, length, d * 32)


def test_plan_keeps_known_boundaries():
    L = 65536
    size = 10 * L + 5
    full = plan(size, {})
    known = {n: info(n, o, ln) for n, o, ln in full if n in (0, 3, 4, 9, 10)}
    assert plan(size, known) == full
    # only the middle known; pieces before and after are cut at its length
    assert plan(size, {5: info(5, 5 * L, L)}) == full


def test_plan_with_uneven_known_pieces():
    """Content-defined boundaries: known pieces keep theirs; gaps never cross a known start."""
    known = {0: info(0, 0, 100), 1: info(1, 100, 300), 3: info(3, 500, 50)}
    pieces = plan(600, known)
    assert_covers(pieces, 600)
    assert pieces[:2] == [(0, 0, 100), (1, 100, 300)]
    assert pieces[2] == (2, 400, 100) and pieces[3] == (3, 500, 50)


def test_plan_when_only_the_short_last_piece_is_known():
    """A manifest that so far holds only the (shorter) last piece still plans the file."""
    L = 65536
    size = 7 * L + 100
    full = plan(size, {})
    last = full[-1]
    assert last[2] == 100
    assert plan(size, {last[0]: info(*last)}) == full


def test_plan_rejects_an_inconsistent_manifest():
    with pytest.raises(IntegrityError):
        plan(1000, {0: info(0, 0, 100), 1: info(1, 150, 100)})


@pytest.mark.parametrize("connections", [1, 2, 3, 4, 8, 64])
@pytest.mark.parametrize("seed", range(5))
def test_groups_cover_missing_pieces_once_in_contiguous_runs(connections, seed):
    rng = random.Random(seed)
    size = rng.randrange(1, 200) * 65536 + rng.randrange(65536)
    pieces = plan(size, {})
    missing = [p for p in pieces if rng.random() < 0.7]
    out = groups(missing, connections)
    flat = [p for g in out for p in g]
    assert flat == missing  # every missing piece once, in order
    for g in out:
        assert g
        for a, b in zip(g, g[1:]):
            assert a[1] + a[2] == b[1]  # contiguous: one Range request each
    runs = sum(1 for a, b in zip(missing, missing[1:]) if a[1] + a[2] != b[1]) + (1 if missing else 0)
    assert len(out) <= max(runs, 1) + connections
    if connections == 1 and missing:
        assert len(out) == runs


def test_groups_edge_cases():
    assert groups([], 4) == []
    one = [(0, 0, 10)]
    assert groups(one, 4) == [one]
    contiguous = [(n, n * 10, 10) for n in range(8)]
    assert [len(g) for g in groups(contiguous, 4)] == [2, 2, 2, 2]


# -- SourceReader against a real origin ------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    out = {}
    for size in SIZES:
        data = random.Random(size).randbytes(size)
        (root / f"f{size}.bin").write_bytes(data)
        out[size] = data
    return root, out


@pytest.fixture
def origin(files):
    with Origin(files[0]) as o:
        yield o


def read(url, known=None, have=None, content_length=-1, connections=4, headers=None):
    """Run a reader; returns (result, {num: (info, bytes)}, reader)."""
    got: dict[int, tuple[PieceInfo, bytes]] = {}

    async def on_piece(info, data):
        assert info.num not in got, "piece emitted twice"
        assert info.length == len(data) and info.digest == blake3.blake3(data).hexdigest()
        got[info.num] = (info, bytes(data))

    reader = SourceReader(url, headers or {}, connections)
    result = asyncio.run(reader.run(known or {}, have or set(), content_length, on_piece))
    return result, got, reader


def reassemble(got) -> bytes:
    out = b""
    for n in sorted(got):
        info, data = got[n]
        assert info.offset == len(out)
        out += data
    return out


@pytest.mark.parametrize("ignore_range", [False, True], ids=["ranges", "no-ranges"])
@pytest.mark.parametrize("size", SIZES)
def test_reads_the_file_once(origin, files, size, ignore_range):
    data = files[1][size]
    origin.set_ignore_range(ignore_range)
    result, got, reader = read(origin.url(f"f{size}.bin"))
    assert result.content_length == size
    assert reassemble(got) == data
    assert sorted(got) == list(range(len(got)))
    assert origin.wait_idle()["paths"].get(f"/f{size}.bin", {}).get("bytes", 0) == size
    assert origin.bytes_served(f"f{size}.bin") == size
    assert reader.bytes_read == size
    if size:
        assert result.etag


def test_known_content_length_skips_the_probe(origin, files):
    size = 3 * 65536 + 7
    result, got, _ = read(origin.url(f"f{size}.bin"), content_length=size, connections=2)
    assert reassemble(got) == files[1][size]
    assert origin.bytes_served(f"f{size}.bin") == size


@pytest.mark.parametrize("content_length", [-1, "known"])
@pytest.mark.parametrize("connections", [1, 4])
def test_partial_have_fetches_only_missing_pieces(origin, files, content_length, connections):
    size = 5 * MiB + 12345
    data = files[1][size]
    full = plan(size, {})
    known = {n: PieceInfo(n, o, ln, blake3.blake3(data[o:o + ln]).hexdigest()) for n, o, ln in full}
    rng = random.Random(connections)
    have = {n for n in known if rng.random() < 0.5} | {0}  # piece 0 held: the probe must not refetch it
    have.discard(len(full) - 1)
    missing_bytes = sum(ln for n, _, ln in full if n not in have)
    result, got, _ = read(origin.url(f"f{size}.bin"), known=known, have=have,
                          content_length=size if content_length == "known" else -1, connections=connections)
    assert set(got) == set(known) - have
    for n, (info, chunk) in got.items():
        assert info == known[n] and chunk == data[info.offset:info.offset + info.length]
    assert origin.wait_idle()["paths"][f"/f{size}.bin"]["bytes"] == missing_bytes
    assert result.content_length == size


def test_partial_have_without_a_known_manifest(origin, files):
    """A peer that holds pieces from parents but knows only their entries: the rest is cut to
    match, and only the rest is fetched."""
    size = 3 * 65536 + 7
    data = files[1][size]
    full = plan(size, {})
    known = {n: PieceInfo(n, o, ln, blake3.blake3(data[o:o + ln]).hexdigest()) for n, o, ln in full if n in (1, 3)}
    result, got, _ = read(origin.url(f"f{size}.bin"), known=known, have={1, 3}, content_length=size)
    assert sorted(got) == [0, 2]
    assert origin.bytes_served(f"f{size}.bin") == size - full[1][2] - full[3][2]


def test_changed_origin_content_is_an_integrity_error(origin, files):
    size = 3 * 65536 + 7
    known = {0: PieceInfo(0, 0, 65536, "00" * 32)}
    with pytest.raises(IntegrityError):
        read(origin.url(f"f{size}.bin"), known=known, content_length=size)


@pytest.mark.parametrize("status", [404, 403, 500, 503])
@pytest.mark.parametrize("content_length", [-1, 65537])
def test_http_errors_raise_source_error(origin, status, content_length):
    origin.set_status("f65537.bin", status)
    with pytest.raises(SourceError) as e:
        read(origin.url("f65537.bin") + "?X-Amz-Signature=secret", content_length=content_length)
    msg = str(e.value)
    assert str(status) in msg and "\n" not in msg
    assert "secret" not in msg  # query strings may carry credentials
    assert e.value.transient == (status >= 500)


def test_unresolvable_host(tmp_path):
    with pytest.raises(SourceError) as e:
        read("http://nonexistent.invalid/x")
    assert "\n" not in str(e.value) and "nonexistent.invalid" in str(e.value)
    assert not e.value.transient


def test_refused_connection_is_transient(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    with pytest.raises(SourceError) as e:
        read(f"http://127.0.0.1:{port}/x")
    assert "\n" not in str(e.value) and e.value.transient


def test_unsupported_scheme():
    with pytest.raises(SourceError, match="scheme"):
        read("ftp://example.com/x")


# -- file:// ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_file_urls(files, size):
    root, datas = files
    result, got, _ = read((root / f"f{size}.bin").as_uri())
    assert result.content_length == size and reassemble(got) == datas[size]


def test_file_url_with_partial_have(files):
    root, datas = files
    size = 3 * 65536 + 7
    result, got, reader = read((root / f"f{size}.bin").as_uri(), have={0, 2})
    assert sorted(got) == [1, 3] and reader.bytes_read == 65536 + 7


def test_file_url_with_spaces(tmp_path):
    p = tmp_path / "a file %.bin"
    p.write_bytes(b"hello")
    _, got, _ = read(p.as_uri())
    assert reassemble(got) == b"hello"


def test_missing_file_raises_source_error(tmp_path):
    with pytest.raises(SourceError) as e:
        read((tmp_path / "missing.bin").as_uri())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("held", [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]])
def test_probe_starts_at_the_first_missing_piece(origin, files, held):
    """Resuming with an unknown length: the probe reads bytes the peer lacks, never held ones;
    with every piece held, nothing is fetched at all."""
    size = 3 * 65536 + 7
    data = files[1][size]
    full = plan(size, {})
    known = {n: PieceInfo(n, o, ln, blake3.blake3(data[o:o + ln]).hexdigest()) for n, o, ln in full}
    result, got, _ = read(origin.url(f"f{size}.bin"), known=known, have=set(held))
    assert sorted(got) == [n for n in known if n not in held]
    assert result.content_length == size
    assert origin.wait_idle()["paths"].get(f"/f{size}.bin", {}).get("bytes", 0) == \
        sum(ln for n, _, ln in full if n not in held)
