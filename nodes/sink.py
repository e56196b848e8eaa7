"""Output files: written as pieces arrive, verified whole, renamed into place only when complete.

An `OutputSink` writes each piece at its offset into a temporary file beside the output path
(same filesystem, so the final rename is atomic), hashes the file in order as the verified
prefix grows (`OrderedHasher`, re-reading from the temp file what arrived out of order, so
memory stays flat), and on `finish` checks the whole-file digests before renaming.
A partial download never appears at the output path: any failure removes the temporary file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import blake3

from dfzmq.errors import DownloadError, IntegrityError, StorageError
from dfzmq.wire import PieceInfo


def new_hasher(algo: str) -> Any:
    if algo == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
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
    """One output file of one download request."""

    def __init__(self, output: str, expected: str = "") -> None:
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
        algos = ["blake3"]
        if self.expected and self.expected[0] not in algos:
            algos.append(self.expected[0])
        self.hasher = OrderedHasher(algos, self._read_back)
        self.written: set[int] = set()
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
        if info.num in self.written or self.closed:
            return
        try:
            view = memoryview(data)
            done = 0
            while done < info.length:
                done += os.pwrite(self.fd, view[done:], info.offset + done)
        except OSError as e:
            self.abort()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageError(f"disk full writing {self.path}") from e
            raise StorageError(f"cannot write {self.path}: {e.strerror}") from e
        self.written.add(info.num)
        self.bytes += info.length
        self.hasher.feed(info, data)

    def finish(self, content_length: int, file_digest: str) -> None:
        """Verify the whole file and rename it into place. Raises and cleans up on mismatch."""
        try:
            if self.hasher.upto != content_length:
                raise IntegrityError(
                    f"output incomplete: {self.hasher.upto} of {content_length} bytes verified")
            got = self.hasher.hexdigest("blake3")
            if file_digest and got != file_digest:
                raise IntegrityError(f"file digest mismatch: blake3 {got} != {file_digest}")
            if self.expected:
                algo, want = self.expected
                got = self.hasher.hexdigest(algo)
                if got != want:
                    raise IntegrityError(f"digest mismatch: {algo} of the download is {got}, expected {want}")
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(self.fd, 0o666 & ~umask)
            os.close(self.fd)
            self.closed = True
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.abort()
            raise StorageError(f"cannot finish {self.path}: {e.strerror}") from e
        except Exception:
            self.abort()
            raise

    def abort(self) -> None:
        if not self.closed:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.closed = True
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass
