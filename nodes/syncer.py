"""`dfzmq sync`, the I/O half: lock, state file, index and HEAD requests, fetches, deletes.

`sync_entry(entry, fetch, http)` syncs one destination and returns an `EntryResult`. Files go
through the cluster like any fetch: `fetch` is the local daemon's control socket or an embedded
one-shot daemon (dfzmq/cli_sync.py chooses), which writes each file to a temporary name beside
it and renames it into place only once verified, so a destination file is always a whole
version, old or new.

Cron safety:
- an exclusive `fcntl.flock` on DEST/.dfzmq-sync.lock for the whole run; a second run waits
  up to `lock_timeout_s` and then gives up with `LockBusy` (exit 75, EX_TEMPFAIL);
- DEST/.dfzmq-sync.json records, per file synced, its URL, version, size and local mtime; it is
  rewritten (temporary file, fsync, rename) after fetched files (at most once a second) and at
  the end, so a run killed at any point leaves whole files and a state no newer than them: the
  next run re-checks what is not recorded (a file the daemon finished after the kill is then a
  local cache hit, no transfer);
- temporary `*.dfzmq-part` files older than an hour (left by a killed daemon) are removed;
- an unreachable index or origin fails the entry without touching the destination's files:
  nothing is deleted unless the whole listing was read.

Never deletes a file it did not sync (see nodes/sync.py), never follows a path out of DEST.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable
from urllib.parse import unquote, urlsplit

import aiohttp

from dfzmq.errors import DfzmqError, UnavailableError
from nodes.sync import (LOCK_FILE, PART_SUFFIX, STATE_FILE, Entry, IndexUnreadable, Remote, deletions,
                        parse_json_manifest, parse_listing, parse_text_manifest, remotes_from_urls,
                        select, sniff_format, task_tag, unchanged, version_of)

log = logging.getLogger(__name__)

# fetch(url, output, digest, headers, tag) -> the daemon's stats for that file
Fetch = Callable[[str, str, str, dict, str], Awaitable[dict]]

STALE_PART_S = 3600.0
MAX_LISTING_DIRS = 10_000
STATE_SAVE_INTERVAL_S = 1.0


class LockBusy(DfzmqError):
    """Another sync holds the destination's lock."""

    exit_code = 75


@dataclass
class EntryResult:
    name: str
    dest: str
    status: str = "ok"  # ok, partial, failed, busy
    checked: int = 0
    fetched: int = 0
    skipped: int = 0
    deleted: int = 0
    failed: int = 0
    origin_bytes: int = 0
    peer_bytes: int = 0
    local_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


# -- lock and state ----------------------------------------------------------------------------


async def acquire_lock(dest: Path, timeout_s: float) -> int:
    fd = os.open(dest / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
        if time.monotonic() >= deadline:
            os.close(fd)
            raise LockBusy(f"another dfzmq sync is running on {dest} (lock {dest / LOCK_FILE})")
        await asyncio.sleep(0.2)


def load_state(dest: Path) -> dict[str, dict]:
    try:
        doc = json.loads((dest / STATE_FILE).read_text())
        files = doc["files"]
        if isinstance(files, dict):
            return {k: v for k, v in files.items() if isinstance(v, dict)}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, OSError) as e:
        log.warning("%s: unreadable state file (%s); every file is checked again", dest, e)
    return {}


def save_state(dest: Path, files: dict[str, dict]) -> None:
    tmp = dest / f"{STATE_FILE}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": files}, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest / STATE_FILE)


def local_stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if path.is_file() else None


def remove_stale_parts(dest: Path, now: float) -> None:
    for p in dest.rglob(f"*{PART_SUFFIX}"):
        try:
            if now - p.stat().st_mtime > STALE_PART_S:
                p.unlink()
        except OSError:
            pass


# -- the source side ---------------------------------------------------------------------------


async def _get_text(http: aiohttp.ClientSession, url: str, headers: dict) -> tuple[str, str]:
    if urlsplit(url).scheme == "file":
        path = unquote(urlsplit(url).path)
        try:
            return Path(path).read_text(), ""
        except OSError as e:
            raise IndexUnreadable(f"cannot read index {path}: {e.strerror}") from None
    try:
        async with http.get(url, headers=headers) as resp:
            if resp.status >= 400:
                raise IndexUnreadable(f"index {url} answered {resp.status} {resp.reason or ''}".strip())
            body = await resp.text(errors="replace")
            return body, resp.headers.get("Content-Type", "")
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise IndexUnreadable(f"cannot read index {url}: {type(e).__name__} {e}".strip()) from None


async def list_source(entry: Entry, http: aiohttp.ClientSession) -> list[Remote]:
    """Every file the entry's source offers (before include/exclude)."""
    if entry.urls:
        return remotes_from_urls(entry.urls)
    body, ctype = await _get_text(http, entry.index, entry.headers)
    fmt = sniff_format(entry.format, entry.index, ctype, body)
    if fmt == "json":
        return parse_json_manifest(body, entry.index)
    if fmt == "text":
        return parse_text_manifest(body, entry.index)
    root = entry.index if entry.index.endswith("/") else entry.index.rsplit("/", 1)[0] + "/"
    files, todo = parse_listing(body, entry.index, root)
    seen = {entry.index}
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        if len(seen) > MAX_LISTING_DIRS:
            raise IndexUnreadable(f"listing under {root} has more than {MAX_LISTING_DIRS} directories")
        page, _ = await _get_text(http, url, entry.headers)
        more, dirs = parse_listing(page, url, root)
        files += more
        todo += dirs
    return files


async def probe(http: aiohttp.ClientSession, url: str, headers: dict) -> tuple[int, str, str]:
    """(size, ETag, Last-Modified) from a HEAD (or a 1-byte GET where HEAD is refused)."""
    scheme = urlsplit(url).scheme
    if scheme == "file":
        st = os.stat(unquote(urlsplit(url).path))
        return st.st_size, "", f"{st.st_mtime_ns}"
    async with http.head(url, headers=headers, allow_redirects=True) as resp:
        if resp.status in (405, 501):
            resp = None
        elif resp.status >= 400:
            raise DfzmqError(f"origin answered {resp.status} {resp.reason or ''}".strip())
        else:
            size = int(resp.headers.get("Content-Length", -1))
            return size, resp.headers.get("ETag", ""), resp.headers.get("Last-Modified", "")
    async with http.get(url, headers={**headers, "Range": "bytes=0-0"}, allow_redirects=True) as resp:
        if resp.status >= 400:
            raise DfzmqError(f"origin answered {resp.status} {resp.reason or ''}".strip())
        total = resp.headers.get("Content-Range", "").rpartition("/")[2]
        size = int(total) if total.isdigit() else -1
        return size, resp.headers.get("ETag", ""), resp.headers.get("Last-Modified", "")


# -- one entry ---------------------------------------------------------------------------------


async def sync_entry(entry: Entry, fetch: Fetch, http: aiohttp.ClientSession, lock_timeout_s: float = 0.0,
                     jobs: int = 4) -> EntryResult:
    t0 = time.monotonic()
    dest = entry.dest.absolute()
    res = EntryResult(entry.name, str(dest))
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        res.status, res.errors = "failed", [f"cannot create {dest}: {e.strerror}"]
        return res
    try:
        lock = await acquire_lock(dest, lock_timeout_s)
    except LockBusy as e:
        res.status, res.errors = "busy", [str(e)]
        return res
    try:
        await _sync_locked(entry, dest, fetch, http, jobs, res)
    finally:
        os.close(lock)  # releases the flock
        res.elapsed_s = round(time.monotonic() - t0, 3)
    return res


async def _sync_locked(entry: Entry, dest: Path, fetch: Fetch, http: aiohttp.ClientSession, jobs: int,
                       res: EntryResult) -> None:
    remove_stale_parts(dest, time.time())
    state = load_state(dest)
    try:
        remotes = select(await list_source(entry, http), entry.include, entry.exclude)
    except DfzmqError as e:
        res.status, res.failed = "failed", res.failed + 1
        res.errors.append(f"{entry.name}: {e}")
        log.error("%s: %s (destination left as it is)", entry.name, e)
        return
    res.checked = len(remotes)
    last_save = [time.monotonic()]
    dirty = [False]

    def note(path: str, record: dict | None) -> None:
        if record is None:
            state.pop(path, None)
        else:
            state[path] = record
        dirty[0] = True
        if time.monotonic() - last_save[0] >= STATE_SAVE_INTERVAL_S:
            save_state(dest, state)
            last_save[0], dirty[0] = time.monotonic(), False

    sem = asyncio.Semaphore(max(1, jobs))
    fatal: list[BaseException] = []

    async def one(r: Remote) -> None:
        async with sem:
            if fatal:
                return
            out = dest / r.path
            try:
                size, etag, lm = (r.size, "", "") if r.digest else await probe(http, r.url, entry.headers)
                version = version_of(r, size, etag, lm)
                if unchanged(state.get(r.path), version, local_stat(out)):
                    res.skipped += 1
                    return
                out.parent.mkdir(parents=True, exist_ok=True)
                headers = dict(entry.headers)
                if etag and not etag.startswith("W/") and not r.digest:
                    headers["If-Match"] = etag  # a file replaced since the HEAD fails, not mixes
                stats = await fetch(r.url, str(out), r.digest, headers, task_tag(version))
            except UnavailableError as e:
                fatal.append(e)
                return
            except (DfzmqError, OSError, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                res.failed += 1
                msg = str(e) or type(e).__name__
                res.errors.append(f"{r.path}: {msg}")
                log.error("%s: %s: %s", entry.name, r.path, msg)
                return
            st = local_stat(out)
            if st is None:
                res.failed += 1
                res.errors.append(f"{r.path}: missing after download")
                return
            res.fetched += 1
            res.origin_bytes += stats.get("origin_bytes", 0)
            res.peer_bytes += stats.get("seed_bytes", 0) + stats.get("peer_bytes", 0)
            res.local_bytes += stats.get("local_bytes", 0) + stats.get("cached_bytes", 0)
            log.info("%s: fetched %s (%d bytes)", entry.name, r.path, st[0])
            note(r.path, {"url": r.url, "version": version, "size": st[0], "mtime_ns": st[1]})

    try:
        await asyncio.gather(*(one(r) for r in remotes))
        if fatal:
            raise fatal[0]
        if entry.delete:
            wanted = {r.path for r in remotes}
            if not wanted and state:
                log.warning("%s: the source lists no files; nothing deleted", entry.name)
            for path in deletions(state, wanted):
                target = dest / path
                try:
                    if target.is_file() or target.is_symlink():
                        target.unlink()
                    _prune_dirs(target.parent, dest)
                except OSError as e:
                    res.failed += 1
                    res.errors.append(f"{path}: cannot delete: {e.strerror}")
                    continue
                res.deleted += 1
                log.info("%s: deleted %s", entry.name, path)
                note(path, None)
    finally:
        if dirty[0] or not (dest / STATE_FILE).exists():
            save_state(dest, state)
    if res.failed:
        res.status = "failed" if res.fetched + res.skipped + res.deleted == 0 else "partial"


def _prune_dirs(d: Path, dest: Path) -> None:
    """Remove directories left empty by a delete, up to (not including) the destination."""
    while d != dest and dest in d.parents:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent
