"""Output files: written as pieces arrive, verified, renamed into place only when complete.

An `OutputSink` writes each piece at its offset into a temporary file beside the output path
(same filesystem, so the final rename is atomic) and on `finish` checks that the pieces it got
cover the file exactly, and the digests it was asked to check, before renaming.
A partial download never appears at the output path: any failure removes the temporary file.

Writes go through `nodes.directio.DirectFile`: O_DIRECT where the filesystem allows it, so a
byte the daemon already caches in its piece store is not cached a second time (the reasons are
in that module), plain `pwrite` elsewhere (tmpfs).

Which digests are computed over the whole output:
- a digest the user asked for (`--digest sha256:...` or `blake3:...`): always, in order
  (`OrderedHasher`), re-reading pieces that arrived early through `reader` (the daemon passes
  the piece store; the file itself is never read back, see nodes/directio.py);
- the task's whole-file blake3 from the manifest: only when `pieces_verified` is False. The
  daemon's task run verifies every piece against the manifest's blake3 digest before any sink
  sees it, and the whole-file digest comes in the same manifest from the same peer that cut
  the pieces; once every piece is verified and the pieces cover [0, length) exactly, the file
  *is* the manifest's content, and a second blake3 pass over it (about 0.4 CPU-s per GiB, plus
  re-reads of the pieces that arrived out of order) could only catch what the coverage check
  catches. Anyone able to forge the manifest's piece digests could forge its file digest too.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import blake3

from dfzmq.errors import DownloadError, IntegrityError, StorageError
from dfzmq.wire import PieceInfo
from nodes.directio import DirectFile


def new_hasher(algo: str) -> Any:
    if algo == "blake3":
        # One thread: rayon's workers spin (sched_yield) on a 2-core host shared with the
        # transfer itself, for no gain in wall time at piece sizes (measured: 1.5x the CPU).
        return blake3.blake3()
    if algo == "sha256":
        return hashlib.sha256()
    raise DownloadError(f"unsupported digest algorithm {algo!r} (use sha256 or blake3)")


def parse_digest(spec: str) -> tuple[str, str]:
    """'sha256:HEX' -> ('sha256', 'hex'). Raises DownloadError on anything else."""
    algo, sep, hexval = spec.partition(":")
    algo = algo.lower()
    if not sep or algo not in ("sha256", "blake3"):
        raise DownloadError(f"bad digest {spec!r}: expected sha256:HEX or blake3:HEX")
    try:
        if len(bytes.fromhex(hexval)) != 32:
            raise ValueError
    except ValueError:
        raise DownloadError(f"bad digest {spec!r}: expected 64 hex digits") from None
    return algo, hexval.lower()


class OrderedHasher:
    """Hashes a file whose pieces arrive in any order, without buffering them.

    `feed(info, data)` hashes `data` at once when it continues the hashed prefix; pieces that
    arrived earlier but out of order are re-read through `reader(info)` when their turn comes.
    """

    def __init__(self, algos: list[str], reader: Callable[[PieceInfo], Any]) -> None:
        self.hashers = {a: new_hasher(a) for a in algos}
        self.reader = reader
        self.upto = 0  # bytes hashed so far
        self.next_num = 0
        self.held: dict[int, PieceInfo] = {}

    def feed(self, info: PieceInfo, data: Any = None) -> None:
        """Note a piece; `data` may be None, in which case it is read back when needed."""
        self.held[info.num] = info
        if info.num == self.next_num:
            self._update(info, data if data is not None else self.reader(info))
            self._drain()

    def _update(self, info: PieceInfo, data: Any) -> None:
        for h in self.hashers.values():
            h.update(data)
        self.upto = info.offset + info.length
        self.next_num = info.num + 1
        self.held.pop(info.num, None)

    def _drain(self) -> None:
        while self.next_num in self.held:
            info = self.held[self.next_num]
            self._update(info, self.reader(info))

    def hexdigest(self, algo: str) -> str:
        return self.hashers[algo].hexdigest()


class OutputSink:
    """One output file of one download request.

    `reader(info) -> bytes` gives a piece's bytes again for the in-order hash of a user's
    digest (default: read back from the temporary file). `pieces_verified`: the caller checked
    every piece against the manifest, so the task's whole-file blake3 is not recomputed.
    `background`: each piece is written by a thread of the sink's own while the caller goes on
    (the daemon's writer thread stores the next piece meanwhile: an O_DIRECT write waits for
    the disk); at most one write is in flight, and its error surfaces at the next write or at
    `finish`, which fails the output as if the write itself had failed."""

    def __init__(self, output: str, expected: str = "", reader: Callable[[PieceInfo], Any] | None = None,
                 pieces_verified: bool = False, direct: bool = True, background: bool = False) -> None:
        self.path = Path(output).expanduser().absolute()
        self.expected = parse_digest(expected) if expected else None
        parent = self.path.parent
        if not parent.is_dir():
            raise StorageError(f"output directory does not exist: {parent}")
        if self.path.is_dir():
            raise StorageError(f"output path is a directory: {self.path}")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".dfzmq-part", dir=parent)
        except OSError as e:
            raise StorageError(f"cannot write to {parent}: {e.strerror}") from e
        self.fd = fd
        self.tmp = Path(tmp)
        try:
            self.out = DirectFile(tmp, fd, direct)
        except OSError as e:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write to {parent}: {e.strerror}") from e
        algos = [] if pieces_verified else ["blake3"]
        if self.expected and self.expected[0] not in algos:
            algos.append(self.expected[0])
        self.hasher = OrderedHasher(algos, reader or self._read_back) if algos else None
        self.extents: dict[int, tuple[int, int]] = {}  # num -> (offset, length) written
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dfzmq-output") if background else None
        self._pending: Future | None = None  # the write in flight in the background
        self.bytes = 0
        self.closed = False
        self.error: Exception | None = None  # set when finishing failed

    def _read_back(self, info: PieceInfo) -> bytes:
        return os.pread(self.fd, info.length, info.offset)

    def set_length(self, content_length: int) -> None:
        if content_length >= 0 and not self.closed:
            try:
                os.ftruncate(self.fd, content_length)
            except OSError as e:
                self.abort()
                raise StorageError(f"cannot size {self.path}: {e.strerror}") from e

    def write(self, info: PieceInfo, data: Any) -> None:
        if info.num in self.extents or self.closed:
            return
        try:
            self._settle()
            if self._pool is None:
                self.out.pwrite(data, info.offset)
            else:
                self._pending = self._pool.submit(self.out.pwrite, data, info.offset)
        except OSError as e:
            self.abort()
            raise self._write_error(e) from e
        self.extents[info.num] = (info.offset, info.length)
        self.bytes += info.length
        if self.hasher is not None:
            self.hasher.feed(info, data)

    def _settle(self) -> None:
        """Wait for the background write in flight; raises its OSError."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write_error(self, e: OSError) -> StorageError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageError(f"disk full writing {self.path}")
        return StorageError(f"cannot write {self.path}: {e.strerror}")

    def _covered(self) -> int:
        """Bytes from 0 covered by the written pieces without a gap or an overlap."""
        upto = 0
        for offset, length in sorted(self.extents.values()):
            if offset != upto:
                break
            upto += length
        return upto

    def finish(self, content_length: int, file_digest: str) -> None:
        """Verify the whole file and rename it into place. Raises and cleans up on mismatch."""
        try:
            self._settle()
        except OSError as e:
            self.abort()
            raise self._write_error(e) from e
        try:
            covered = self._covered()
            if covered != content_length:
                raise IntegrityError(f"output incomplete: {covered} of {content_length} bytes written")
            if self.bytes != content_length:
                raise IntegrityError(f"output pieces overlap: {self.bytes} bytes written for a file of "
                                     f"{content_length}")
            if self.hasher is not None and self.hasher.upto != content_length:
                raise IntegrityError(
                    f"output incomplete: {self.hasher.upto} of {content_length} bytes verified")
            if self.hasher is not None and "blake3" in self.hasher.hashers and file_digest:
                got = self.hasher.hexdigest("blake3")
                if got != file_digest:
                    raise IntegrityError(f"file digest mismatch: blake3 {got} != {file_digest}")
            if self.expected:
                algo, want = self.expected
                got = self.hasher.hexdigest(algo)
                if got != want:
                    raise IntegrityError(f"digest mismatch: {algo} of the download is {got}, expected {want}")
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(self.fd, 0o666 & ~umask)
            self._stop_pool()
            self.out.close()
            os.close(self.fd)
            self.closed = True
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise StorageError(f"cannot finish {self.path}: {e.strerror}") from e
        except Exception:
            self.abort()
            raise

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # a write in flight ends before its descriptor closes
            self._pool = None
        self._pending = None

    def abort(self) -> None:
        if not self.closed:
            self._stop_pool()
            try:
                self.out.close()
                os.close(self.fd)
            except OSError:
                pass
            self.closed = True
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass


def store_reader(store: Any) -> Callable[[PieceInfo], bytes]:
    """A sink's `reader` that takes a piece's bytes again from the daemon's piece store."""
    def read(info: PieceInfo) -> bytes:
        data = store.get(info.digest)
        if data is None:
            raise StorageError(f"piece {info.num} vanished from the store")
        return data
    return read
