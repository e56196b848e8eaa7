"""Content-defined chunking: cuts that survive insertions, streaming cuts equal to one-shot
cuts, the CDC back-to-source reader (HTTP and file://, resume), and on real processes a new
version of a file whose pieces a peer mostly takes from its own store."""

from __future__ import annotations

import asyncio
import random

import pytest

from dfzmq import wire
from nodes.cdc import Cutter, average_for, cut, wants_cdc
from nodes.source import SourceReader, digest
from tests.conftest import make_file

AVG = 64 << 10


def digests(data: bytes, avg: int = AVG) -> list[str]:
    return [digest(data[o:o + n]) for o, n in cut(data, avg)]


def test_insertion_shifts_only_nearby_pieces():
    rng = random.Random(7)
    old = rng.randbytes(8 << 20)
    mid = len(old) // 2
    new = old[:mid] + rng.randbytes(100_000) + old[mid:]
    a, b = digests(old), digests(new)
    shared = set(a) & set(b)
    lost = len(a) - len(shared)
    # 100 KB inserted at one place touches the piece it lands in and at most a couple more.
    assert lost <= 3, (lost, len(a))
    new_bytes = sum(n for o, n in cut(new, AVG) if digest(new[o:o + n]) not in shared)
    assert new_bytes < 100_000 + 4 * 4 * AVG, new_bytes
    # Fixed-length pieces share nothing after the insertion point: what CDC avoids.
    fixed = lambda d: {digest(d[i:i + AVG]) for i in range(0, len(d), AVG)}  # noqa: E731
    assert len(fixed(old) & fixed(new)) <= len(fixed(old)) // 2 + 1


def test_scattered_edits_keep_other_pieces():
    rng = random.Random(8)
    old = bytearray(rng.randbytes(8 << 20))
    new = bytearray(old)
    for _ in range(4):
        at = rng.randrange(len(new) - 1000)
        new[at:at + 1000] = rng.randbytes(1000)
    a, b = digests(bytes(old)), digests(bytes(new))
    assert len(set(a) - set(b)) <= 4 * 2


def test_streaming_cutter_equals_one_shot_cut():
    rng = random.Random(9)
    data = rng.randbytes(3 << 20)
    for slice_max in (997, 4096, 300_000, 5 << 20):
        c = Cutter(AVG)
        out: list[tuple[int, bytes]] = []
        i = 0
        while i < len(data):
            n = rng.randint(1, slice_max)
            out += c.feed(data[i:i + n])
            i += n
        out += c.finish()
        assert [(o, len(b)) for o, b in out] == cut(data, AVG)
        assert b"".join(b for _, b in out) == data


def test_bands_and_tag():
    assert average_for(1 << 30) == average_for((1 << 30) + (10 << 20)) == 512 << 10
    assert average_for(10 << 20) == 64 << 10
    assert 64 <= (1 << 30) // average_for(1 << 30) <= 4096
    assert wants_cdc("cdc/abc") and not wants_cdc("") and not wants_cdc("v1")


def _read(url: str, known=None, have=None, length: int = -1):
    got: dict[int, tuple[wire.PieceInfo, bytes]] = {}

    async def on_piece(info, data):
        got[info.num] = (info, data)

    async def go():
        r = SourceReader(url, {}, cdc=True)
        res = await r.run(dict(known or {}), set(have or ()), length, on_piece)
        return res, r

    res, reader = asyncio.run(go())
    return got, res, reader


@pytest.mark.parametrize("scheme", ["http", "file"])
def test_cdc_reader_cuts_like_the_cutter_and_resumes(origin, www, scheme):
    data = make_file(www / f"cdc-{scheme}.bin", 5 << 20 | 12345, seed=11)
    url = origin.url(f"cdc-{scheme}.bin") if scheme == "http" else f"file://{www}/cdc-{scheme}.bin"
    before = origin.bytes_served(f"cdc-{scheme}.bin")
    got, res, reader = _read(url)
    assert res.content_length == len(data)
    expect = cut(data, average_for(len(data)))
    assert [(got[n][0].offset, got[n][0].length) for n in sorted(got)] == expect
    assert b"".join(got[n][1] for n in sorted(got)) == data
    if scheme == "http":
        assert origin.bytes_served(f"cdc-{scheme}.bin") - before == len(data)
    # A peer taking over after the first third: it reads only from the first piece it lacks.
    known = {n: got[n][0] for n in sorted(got)[: len(got) // 3]}
    have = set(known)
    before = origin.bytes_served(f"cdc-{scheme}.bin")
    got2, res2, reader2 = _read(url, known, have)
    assert sorted(got2) == sorted(set(got) - have)
    assert all(got2[n][0] == got[n][0] for n in got2)
    resumed_at = known[max(known)].offset + known[max(known)].length
    assert reader2.bytes_read == len(data) - resumed_at
    if scheme == "http":
        assert origin.bytes_served(f"cdc-{scheme}.bin") - before == len(data) - resumed_at


def test_new_version_comes_mostly_from_the_local_store(tmp_path, www, origin, outdir):
    """Real processes: peer1 holds v1; v2 (bytes inserted in the middle, a small edit) is read
    from the origin once by the seed, and peer1 receives only the changed pieces."""
    from dfzmq.cli import fetch_via_daemon
    from tools.cluster import LocalCluster

    rng = random.Random(12)
    v1 = rng.randbytes(12 << 20)
    mid = len(v1) // 2
    v2 = bytearray(v1[:mid] + rng.randbytes(200_000) + v1[mid:])
    at = len(v2) // 5
    v2[at:at + 5000] = rng.randbytes(5000)
    v2 = bytes(v2)

    def fetch(c, peer, tag, out):
        req = wire.Download(f"r-{peer}-{tag}", origin.url("ver.bin"), str(out), "", {}, tag)
        return fetch_via_daemon(c.control(peer), req, lambda d, t: None)

    with LocalCluster(tmp_path / "c", peers=2) as c:
        (www / "ver.bin").write_bytes(v1)
        before = origin.bytes_served("ver.bin")
        st1 = fetch(c, "peer1", "cdc/v1", outdir / "v1")
        assert (outdir / "v1").read_bytes() == v1
        assert origin.bytes_served("ver.bin") - before == len(v1)
        assert st1["local_bytes"] == 0 and st1["pieces"] > 50

        (www / "ver.bin").write_bytes(v2)
        before = origin.bytes_served("ver.bin")
        st2 = fetch(c, "peer1", "cdc/v2", outdir / "v2")
        assert (outdir / "v2").read_bytes() == v2
        assert origin.bytes_served("ver.bin") - before == len(v2)  # the seed read v2 once
        received = st2["origin_bytes"] + st2["seed_bytes"] + st2["peer_bytes"]
        assert st2["local_bytes"] + received == len(v2)
        assert received < 205_000 + 6 * 4 * average_for(len(v2)), st2
        assert st2["local_bytes"] > 0.85 * len(v2), st2

        st3 = fetch(c, "peer2", "cdc/v2", outdir / "v2b")  # peer2 never held v1: all of it
        assert (outdir / "v2b").read_bytes() == v2
        assert st3["local_bytes"] == 0
        assert st3["seed_bytes"] + st3["peer_bytes"] + st3["origin_bytes"] == len(v2)


def test_cdc_reader_surfaces_a_failing_store(origin, www):
    """Pieces are handed on a few behind the stream; a failure there still fails the read."""
    from dfzmq.errors import StorageError

    make_file(www / "cdc-fail.bin", 2 << 20, seed=13)
    seen = []

    async def on_piece(info, data):
        seen.append(info.num)
        if info.num == 2:
            raise StorageError("disk full")

    async def go():
        await SourceReader(origin.url("cdc-fail.bin"), {}, cdc=True).run({}, set(), -1, on_piece)

    with pytest.raises(StorageError):
        asyncio.run(go())
    assert seen == [0, 1, 2]
