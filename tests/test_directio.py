"""nodes/directio.py and the output sink on top of it: O_DIRECT where the filesystem takes it
(block-aligned middles of pieces), plain writes for unaligned heads and tails, a clean fallback
on tmpfs, and byte-identical files whatever the piece boundaries and file length."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from dfzmq.errors import IntegrityError
from dfzmq.wire import PieceInfo
from nodes.directio import ALIGN, DirectFile
from nodes.sink import OutputSink, store_reader
from tests.test_sink import cut

SHM = Path("/dev/shm")


def direct_works(d: Path) -> bool:
    fd = os.open(d / ".probe", os.O_RDWR | os.O_CREAT)
    try:
        f = DirectFile(str(d / ".probe"), fd)
        ok = f.direct
        f.close()
        return ok
    finally:
        os.close(fd)
        (d / ".probe").unlink()


def sink_roundtrip(d: Path, data: bytes, lengths: list[int], shuffle: int | None = None,
                   background: bool = False) -> OutputSink:
    pieces = cut(data, lengths)
    if shuffle is not None:
        random.Random(shuffle).shuffle(pieces)
    sink = OutputSink(str(d / "out.bin"), pieces_verified=True, background=background)
    sink.set_length(len(data))
    for info, chunk in pieces:
        sink.write(info, chunk)
    sink.finish(len(data), "")
    assert (d / "out.bin").read_bytes() == data
    assert [p.name for p in d.iterdir() if p.name.endswith(".dfzmq-part")] == []
    return sink


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("size", [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 3 * 65536 + 17, 1 << 20, (1 << 20) + 4095])
def test_sizes_on_disk(tmp_path, size, background):
    data = random.Random(size).randbytes(size)
    sink = sink_roundtrip(tmp_path, data, [65536], shuffle=size, background=background)
    if direct_works(tmp_path):
        # Everything but the last partial block went around the page cache.
        assert sink.out.buffered_bytes == size % ALIGN if size >= ALIGN else sink.out.buffered_bytes == size
        assert sink.out.direct_bytes == size - sink.out.buffered_bytes


def test_unaligned_piece_boundaries(tmp_path):
    """Content-defined pieces start anywhere: blocks across a boundary go the plain way, and
    two pieces sharing a block both land."""
    data = random.Random(1).randbytes(700_000)
    sink = sink_roundtrip(tmp_path, data, [5000, 123_457, 4096, 1, 70_001, 8192 * 3], shuffle=2, background=True)
    if direct_works(tmp_path):
        assert sink.out.direct_bytes > len(data) // 2
        assert sink.out.buffered_bytes > 0


def test_pieces_larger_than_the_bounce_buffer(tmp_path, monkeypatch):
    monkeypatch.setattr("nodes.directio.BUFFER_BYTES", 3 * ALIGN)
    data = random.Random(3).randbytes(10 * ALIGN * 7 + 11)
    sink_roundtrip(tmp_path, data, [10 * ALIGN * 2], shuffle=4)


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm on this host")
def test_tmpfs_falls_back_to_plain_writes(tmp_path):
    d = Path(os.path.realpath(SHM)) / f"dfzmq-test-{os.getpid()}-{tmp_path.name}"
    d.mkdir()
    try:
        data = random.Random(5).randbytes(3 * 65536 + 999)
        sink = sink_roundtrip(d, data, [65536], shuffle=6)
        if not direct_works(d):  # tmpfs refuses O_DIRECT: every byte went the plain way
            assert sink.out.direct_bytes == 0 and sink.out.buffered_bytes == len(data)
        # (tmpfs takes O_DIRECT since Linux 6.6; test_refused_at_open_falls_back covers the refusal.)
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def test_refused_at_write_time_falls_back(tmp_path, monkeypatch):
    """Some filesystems accept O_DIRECT at open and refuse the write (EINVAL)."""
    real = os.pwrite
    f = None

    def pwrite(fd, buf, offset):
        if f is not None and fd == f.dfd:
            raise OSError(22, "Invalid argument")
        return real(fd, buf, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    path = tmp_path / "x"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    f = DirectFile(str(path), fd, direct=True)
    data = random.Random(7).randbytes(5 * ALIGN + 3)
    f.pwrite(data, 0)
    f.pwrite(data, len(data))
    f.close()
    os.close(fd)
    assert path.read_bytes() == data + data
    assert f.direct_bytes == 0 and not f.direct


def test_user_digest_rereads_from_the_store_not_the_file(tmp_path):
    """With a user digest and out-of-order pieces, early pieces are read again through the
    reader (the piece store in the daemon), never from the output file."""
    import hashlib

    data = random.Random(9).randbytes(300_001)
    pieces = cut(data, [65536])
    by_digest = {info.digest: chunk for info, chunk in pieces}

    class Store:
        reads = 0

        def get(self, digest):
            Store.reads += 1
            return by_digest.get(digest)

    sink = OutputSink(str(tmp_path / "o"), "sha256:" + hashlib.sha256(data).hexdigest(),
                      reader=store_reader(Store()), pieces_verified=True)
    for info, chunk in reversed(pieces):
        sink.write(info, chunk)
    sink.finish(len(data), "")
    assert (tmp_path / "o").read_bytes() == data
    assert Store.reads == len(pieces) - 1


def test_verified_pieces_still_need_full_coverage(tmp_path):
    data = random.Random(11).randbytes(200_000)
    pieces = cut(data, [65536])
    sink = OutputSink(str(tmp_path / "o"), pieces_verified=True)
    for info, chunk in pieces[:-1]:
        sink.write(info, chunk)
    with pytest.raises(IntegrityError, match="incomplete"):
        sink.finish(len(data), "")
    assert list(tmp_path.iterdir()) == []
    # Overlapping pieces that add up to the length are not a whole file either.
    sink = OutputSink(str(tmp_path / "o"), pieces_verified=True)
    a, b = pieces[0][0], pieces[1][0]
    sink.write(a, pieces[0][1])
    sink.write(PieceInfo(1, a.offset + 1, b.length, b.digest), pieces[1][1])
    for info, chunk in pieces[2:]:
        sink.write(info, chunk)
    with pytest.raises(IntegrityError, match="incomplete"):
        sink.finish(len(data), "")
    assert list(tmp_path.iterdir()) == []


def test_refused_at_open_falls_back(tmp_path, o_direct_refused):
    data = random.Random(13).randbytes(2 * 65536 + 5)
    sink = sink_roundtrip(tmp_path, data, [65536], shuffle=1)
    assert not sink.out.direct and sink.out.direct_bytes == 0 and sink.out.buffered_bytes == len(data)


@pytest.mark.parametrize("fail_at", [1, 3])  # a middle write (seen at the next write), the last (seen at finish)
def test_background_write_failure_fails_the_output(tmp_path, monkeypatch, fail_at):
    import errno

    from dfzmq.errors import StorageError

    real = DirectFile.pwrite
    calls = []

    def pwrite(self, data, offset):
        calls.append(offset)
        if len(calls) == fail_at + 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, offset)

    monkeypatch.setattr(DirectFile, "pwrite", pwrite)
    data = random.Random(17).randbytes(4 * 65536)
    sink = OutputSink(str(tmp_path / "o"), pieces_verified=True, background=True)
    with pytest.raises(StorageError, match="disk full"):
        for info, chunk in cut(data, [65536]):
            sink.write(info, chunk)
        sink.finish(len(data), "")
    assert list(tmp_path.iterdir()) == []
