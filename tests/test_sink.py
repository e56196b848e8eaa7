"""nodes/sink.py: output files are written in any piece order, verified whole, and appear at
their path only complete and correct; every failure leaves neither output nor temp file."""

from __future__ import annotations

import hashlib
import os
import random

import blake3
import pytest

from dfzmq.errors import DownloadError, IntegrityError, StorageError
from dfzmq.wire import PieceInfo
from nodes.sink import OrderedHasher, OutputSink, parse_digest


def cut(data: bytes, lengths: list[int] | int) -> list[tuple[PieceInfo, bytes]]:
    """Pieces of `data`: fixed length, or the given (uneven) lengths."""
    out = []
    offset = num = 0
    while offset < len(data):
        length = lengths if isinstance(lengths, int) else lengths[num % len(lengths)]
        chunk = data[offset:offset + length]
        out.append((PieceInfo(num, offset, len(chunk), blake3.blake3(chunk).hexdigest()), chunk))
        offset += len(chunk)
        num += 1
    return out


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def leftovers(d) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".dfzmq-part"))


DATA = random.Random(7).randbytes(300_001)


@pytest.mark.parametrize("order", ["in-order", "reversed", "shuffled"])
def test_out_of_order_pieces_make_the_file(tmp_path, order):
    out = tmp_path / "f.bin"
    pieces = cut(DATA, [65536, 1000, 40000, 7])
    if order == "reversed":
        pieces.reverse()
    elif order == "shuffled":
        random.Random(3).shuffle(pieces)
    sink = OutputSink(str(out), "sha256:" + hashlib.sha256(DATA).hexdigest())
    sink.set_length(len(DATA))
    for info, chunk in pieces:
        assert not out.exists()  # never visible before it is complete
        sink.write(info, chunk)
    assert leftovers(tmp_path) == [sink.tmp.name]
    sink.finish(len(DATA), b3(DATA))
    assert out.read_bytes() == DATA
    assert leftovers(tmp_path) == []
    assert sink.bytes == len(DATA)


def test_duplicate_writes_are_ignored(tmp_path):
    out = tmp_path / "f.bin"
    pieces = cut(DATA, 100_000)
    sink = OutputSink(str(out))
    for info, chunk in pieces + pieces[::-1]:
        sink.write(info, chunk)
    assert sink.bytes == len(DATA)
    sink.finish(len(DATA), b3(DATA))
    assert out.read_bytes() == DATA


def test_blake3_expected_digest_and_mode(tmp_path):
    out = tmp_path / "f.bin"
    sink = OutputSink(str(out), "BLAKE3:" + b3(DATA).upper())
    for info, chunk in cut(DATA, 65536):
        sink.write(info, chunk)
    sink.finish(len(DATA), "")  # no file digest from the swarm: the user's digest still holds
    assert out.read_bytes() == DATA
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_empty_file(tmp_path):
    out = tmp_path / "empty"
    sink = OutputSink(str(out), "sha256:" + hashlib.sha256(b"").hexdigest())
    sink.set_length(0)
    sink.finish(0, b3(b""))
    assert out.read_bytes() == b""
    assert leftovers(tmp_path) == []


def test_replaces_an_existing_file_atomically(tmp_path):
    out = tmp_path / "f.bin"
    out.write_bytes(b"old contents")
    sink = OutputSink(str(out))
    for info, chunk in cut(DATA, 65536):
        sink.write(info, chunk)
    assert out.read_bytes() == b"old contents"
    sink.finish(len(DATA), b3(DATA))
    assert out.read_bytes() == DATA


def _written(tmp_path, expected: str = "", skip: int | None = None) -> OutputSink:
    sink = OutputSink(str(tmp_path / "f.bin"), expected)
    sink.set_length(len(DATA))
    for info, chunk in cut(DATA, 65536):
        if info.num != skip:
            sink.write(info, chunk)
    return sink


@pytest.mark.parametrize("case", ["sha256", "blake3-user", "file-digest", "incomplete", "incomplete-tail"])
def test_failures_leave_nothing(tmp_path, case):
    if case == "sha256":
        sink, digest = _written(tmp_path, "sha256:" + "00" * 32), b3(DATA)
    elif case == "blake3-user":
        sink, digest = _written(tmp_path, "blake3:" + "11" * 32), b3(DATA)
    elif case == "file-digest":
        sink, digest = _written(tmp_path), b3(DATA + b"x")
    elif case == "incomplete":
        sink, digest = _written(tmp_path, skip=2), b3(DATA)
    else:
        sink, digest = _written(tmp_path, skip=4), b3(DATA)  # the last piece
    with pytest.raises(IntegrityError):
        sink.finish(len(DATA), digest)
    assert list(tmp_path.iterdir()) == []
    sink.abort()  # idempotent
    sink.write(*cut(DATA, 65536)[0])  # a late piece after the failure is dropped, not an error
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_an_existing_output(tmp_path):
    out = tmp_path / "f.bin"
    out.write_bytes(b"old")
    sink = _written(tmp_path, "sha256:" + "00" * 32)
    with pytest.raises(IntegrityError):
        sink.finish(len(DATA), b3(DATA))
    assert out.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_wrong_content_length_is_incomplete(tmp_path):
    sink = _written(tmp_path)
    with pytest.raises(IntegrityError, match="incomplete"):
        sink.finish(len(DATA) + 1, b3(DATA))
    assert list(tmp_path.iterdir()) == []


def test_abort_removes_the_temp_file(tmp_path):
    sink = _written(tmp_path)
    sink.abort()
    assert list(tmp_path.iterdir()) == []


def test_bad_output_paths(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        OutputSink(str(tmp_path / "nope" / "f.bin"))
    with pytest.raises(StorageError, match="directory"):
        OutputSink(str(tmp_path))
    with pytest.raises(DownloadError):
        OutputSink(str(tmp_path / "f.bin"), "md5:" + "00" * 16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(StorageError, match="cannot write"):
            OutputSink(str(d / "f.bin"))
    finally:
        d.chmod(0o700)


def test_parse_digest():
    h = "ab" * 32
    assert parse_digest(f"sha256:{h}") == ("sha256", h)
    assert parse_digest(f"SHA256:{h.upper()}") == ("sha256", h)
    assert parse_digest(f"blake3:{h}") == ("blake3", h)


@pytest.mark.parametrize("spec", [
    "", "sha256", "sha256:", "ab" * 32, "md5:" + "ab" * 16, "sha512:" + "ab" * 64,
    "sha256:" + "ab" * 31, "sha256:" + "ab" * 33, "sha256:" + "zz" * 32, "sha256:" + "a" * 63,
    ":" + "ab" * 32, "sha256::" + "ab" * 32,
])
def test_parse_digest_errors(spec):
    with pytest.raises(DownloadError, match="bad digest"):
        parse_digest(spec)


@pytest.mark.parametrize("seed", range(10))
def test_ordered_hasher_matches_a_straight_hash(seed):
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(0, 200_000))
    lengths = [rng.randrange(1, 20_000) for _ in range(5)]
    pieces = cut(data, lengths)
    by_num = {info.num: chunk for info, chunk in pieces}
    reads: list[int] = []

    def reader(info):
        reads.append(info.num)
        return by_num[info.num]

    h = OrderedHasher(["blake3", "sha256"], reader)
    order = pieces[:]
    rng.shuffle(order)
    for info, chunk in order:
        # sometimes hand the bytes over, sometimes leave them to be read back
        h.feed(info, chunk if rng.random() < 0.5 else None)
    assert h.upto == len(data)
    assert h.hexdigest("blake3") == b3(data)
    assert h.hexdigest("sha256") == hashlib.sha256(data).hexdigest()
    assert not h.held
    assert len(reads) <= len(pieces)  # each piece read back at most once


def test_ordered_hasher_waits_for_the_gap():
    pieces = cut(DATA, 65536)
    h = OrderedHasher(["blake3"], lambda info: pieces[info.num][1])
    for info, chunk in pieces[1:]:
        h.feed(info, chunk)
    assert h.upto == 0 and h.next_num == 0
    h.feed(*pieces[0])
    assert h.upto == len(DATA) and h.hexdigest("blake3") == b3(DATA)
