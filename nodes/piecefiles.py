"""Large pieces as files beside the LMDB store, written and read with O_DIRECT; a small LRU of
recent pieces in memory.

Why pieces leave LMDB's data file (measured on this project's VM, see README "Benchmarks"):
LMDB writes a piece through the page cache, so every byte a daemon receives is cached once in
the store and, on a host pulling tens of GB of model files, pushes out pages that something
else needed (the kernel cannot tell a piece that no child will ask for again from a hot one).
On a VM whose free memory goes back to the hypervisor, each fresh page-cache page also costs an
allocation the host must back: 4 CPU-s per GiB of 2 MiB pieces written into LMDB after 10 s
idle (`dd bs=2M` the same), against 0.2-0.4 CPU-s for the same bytes written with O_DIRECT.
Dragonfly's dfdaemon keeps task data in files and metadata apart for the same reasons.

`PieceFiles` owns the directory `pieces/` under the store root: a piece is the file
`pieces/ab/abcdef...` named by its blake3 digest (256 subdirectories keep directories small).
- write: into a temporary name `<digest>.<pid>-<n>.tmp` in the same directory, then rename,
  so a file under a digest's name is always whole. The bytes go with O_DIRECT from a reused
  page-aligned buffer (reused, so its pages stay warm); a length that is not a multiple of the
  block is written rounded up and the file truncated to the length. A filesystem that refuses
  O_DIRECT (tmpfs before Linux 6.6, some FUSE and network filesystems; at open or at the first
  write) gets plain writes and reads from then on. ENOSPC/EDQUOT: StorageError, temp removed.
- read: O_DIRECT into a per-thread aligned buffer, one copy out into `bytes`. A buffered read
  would cost the sender the same fresh page-cache pages the receiver just avoided.
- sync: the files written since the last sync get `fdatasync` (the store calls it from
  `flush()`, at task boundaries, like LMDB's own sync).

It knows nothing of LMDB: which file is referenced, and when one may be deleted, is the store's
business (nodes/store.py). It must never delete a file the store still references.

`PieceCache` keeps recently stored or read pieces (bytes, or the zmq frame they arrived in),
bounded in bytes: in a swarm a peer's children ask for a piece right after it arrived, and a
streaming proxy client reads each piece back just after it was stored.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import mmap
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

from dfzmq.errors import StorageError

log = logging.getLogger(__name__)

ALIGN = 4096  # a multiple of every logical block size in use (512 and 4096)
BOUNCE_BYTES = 4 << 20  # each thread's aligned buffer for O_DIRECT, used in chunks of this
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def _syncfs(path: Path) -> bool:
    """syncfs(2) on the filesystem holding `path`; False where it is not available."""
    fn = getattr(_libc(), "syncfs", None)
    if fn is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fn(fd) == 0
    finally:
        os.close(fd)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class PieceFiles:
    def __init__(self, root: Path, direct: bool = True) -> None:
        self.root = root
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._local = threading.local()  # per-thread aligned buffer
        self._made: set[str] = set()  # subdirectories known to exist
        self._seq = itertools.count()
        self._unsynced: list[Path] = []
        self._unsynced_lock = threading.Lock()
        self.direct_bytes = 0  # written with O_DIRECT (for tests and figures)
        self.buffered_bytes = 0

    def path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / h

    # -- writing ---------------------------------------------------------------------------

    def write(self, key: bytes, data: Any) -> None:
        """Store `data` as the file of piece `key`, whole or not at all. StorageError on failure."""
        view = memoryview(data).cast("B")
        final = self.path(key)
        sub = final.parent
        if sub.name not in self._made:
            try:
                sub.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"cannot create {sub}: {e.strerror}") from e
            self._made.add(sub.name)
        tmp = sub / f"{final.name}.{os.getpid()}-{next(self._seq)}.tmp"
        try:
            if not (self.direct and self._write_direct(tmp, view)):
                self._write_plain(tmp, view)
            os.rename(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageError(f"disk full while storing a piece in {self.root}") from e
            raise StorageError(f"cannot store a piece in {self.root}: {e.strerror or e}") from e
        with self._unsynced_lock:
            self._unsynced.append(final)

    def _buffer(self) -> mmap.mmap:
        """This thread's aligned bounce buffer, BOUNCE_BYTES long whatever the piece length, so
        that the memory O_DIRECT needs stays bounded per thread (pieces go through it in chunks;
        reused, so its pages stay warm)."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = mmap.mmap(-1, BOUNCE_BYTES)  # page-aligned
        return buf

    def _write_direct(self, tmp: Path, view: memoryview) -> bool:
        """True when written with O_DIRECT; False when the filesystem refused it (then
        nothing of it is left behind and the store writes plainly from now on)."""
        n = view.nbytes
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno not in _REFUSED:
                raise
            self._refused(e)
            return False
        try:
            buf = self._buffer()
            done = 0
            try:
                while done < n:
                    chunk = min(BOUNCE_BYTES, n - done)
                    buf[:chunk] = view[done:done + chunk]
                    padded = _up(chunk)  # only the last chunk is not a multiple of ALIGN
                    out = memoryview(buf)[:padded]
                    try:
                        wrote = 0
                        while wrote < padded:
                            w = os.pwrite(fd, out[wrote:], done + wrote)
                            if w <= 0 or w % ALIGN:
                                raise OSError(errno.EIO, f"short direct write ({w} bytes)")
                            wrote += w
                    finally:
                        out.release()
                    done += chunk
            except OSError as e:
                if e.errno not in _REFUSED or done:
                    raise
                os.close(fd)
                fd = -1
                tmp.unlink(missing_ok=True)
                self._refused(e)
                return False
            if n % ALIGN:
                os.ftruncate(fd, n)
            self.direct_bytes += n
            return True
        finally:
            if fd >= 0:
                os.close(fd)

    def _refused(self, e: OSError) -> None:
        log.info("piece files in %s: O_DIRECT refused (%s), using plain writes", self.root, e.strerror)
        self.direct = False

    def _write_plain(self, tmp: Path, view: memoryview) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            done = 0
            while done < view.nbytes:
                done += os.pwrite(fd, view[done:], done)
        finally:
            os.close(fd)
        self.buffered_bytes += view.nbytes

    # -- reading ---------------------------------------------------------------------------

    def read(self, key: bytes, length: int) -> bytes | None:
        """The piece's bytes, or None if its file is missing or not `length` bytes long."""
        path = self.path(key)
        direct = self.direct
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0))
        except FileNotFoundError:
            return None
        except OSError as e:
            if not direct or e.errno not in _REFUSED:
                raise StorageError(f"cannot read piece file {path}: {e.strerror}") from e
            direct = False
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
        try:
            if not direct:
                data = os.pread(fd, length + 1, 0)
                return data if len(data) == length else None
            return self._read_direct(fd, length)
        except OSError as e:
            raise StorageError(f"cannot read piece file {path}: {e.strerror}") from e
        finally:
            os.close(fd)

    def _read_direct(self, fd: int, length: int) -> bytes | None:
        """Read `length` bytes through the bounce buffer in aligned chunks; None if the file is
        shorter or longer (one block past the end is asked for: a longer file shows)."""
        buf = self._buffer()
        chunks = []
        got = 0
        while True:
            want = min(BOUNCE_BYTES, _up(length - got) + ALIGN)
            view = memoryview(buf)[:want]
            try:
                n = os.preadv(fd, [view], got)
            finally:
                view.release()
            if got + n > length:
                return None  # the file is longer than the piece
            if n <= 0:
                break  # the end of the file
            chunks.append(buf[:n])
            got += n
            if n < want:
                break  # the end of the file
        if got != length:
            return None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # b"" for no chunks

    # -- deleting, listing, syncing --------------------------------------------------------

    def unlink(self, key: bytes) -> None:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot delete piece file %s: %s", self.path(key), e.strerror)

    def scan(self) -> Iterator[tuple[Path, bytes | None, int]]:
        """Every file under the directory: (path, digest, size) for a piece file, (path, None,
        size) for anything else (temporary files of an interrupted write, strays)."""
        if not self.root.is_dir():
            return
        for sub in os.scandir(self.root):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(sub.path):
                name = entry.name
                key = None
                if len(name) == 64 and name.startswith(sub.name):
                    try:
                        key = bytes.fromhex(name)
                    except ValueError:
                        pass
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except OSError:
                    size = -1
                yield Path(entry.path), key, size

    def sync(self) -> None:
        """Make the files written since the last call durable: one syncfs(2) of the store's
        filesystem (their data went with O_DIRECT; what is left is metadata: sizes, renames),
        else fdatasync of each file and then of their directories (a 100 GiB task of 16 MiB
        pieces is 6,400 files, ~5 ms each on a busy disk)."""
        with self._unsynced_lock:
            paths, self._unsynced = self._unsynced, []
        if not paths or _syncfs(self.root):
            return
        dirs = set()
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue  # deleted since: nothing to make durable
            try:
                os.fdatasync(fd)
            except OSError as e:
                log.warning("cannot sync piece file %s: %s", path, e.strerror)
            finally:
                os.close(fd)
            dirs.add(path.parent)
        for d in dirs:
            try:
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)


class PieceCache:
    """Recently stored or read pieces, least recently used dropped first, at most `limit`
    bytes. Thread-safe (the writer thread stores, the loop and reader threads read)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self.bytes = 0
        self._items: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def add(self, key: bytes, data: Any) -> None:
        """Keep `data` (bytes, or a buffer nobody will modify: a received zmq frame)."""
        size = memoryview(data).nbytes
        if size > self.limit:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= memoryview(old).nbytes
            self._items[key] = data
            self.bytes += size
            while self.bytes > self.limit:
                _, gone = self._items.popitem(last=False)
                self.bytes -= memoryview(gone).nbytes

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            if isinstance(data, bytes):
                return data
        out = bytes(data)  # outside the lock: a 2 MiB copy
        with self._lock:
            if self._items.get(key) is data:
                self._items[key] = out  # later readers share this copy
        return out

    def peek(self, key: bytes) -> Any:
        """The cached buffer as it is (bytes or a received frame's memoryview), no copy."""
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return data

    def drop(self, key: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= memoryview(old).nbytes
