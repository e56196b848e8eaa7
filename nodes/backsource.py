"""Back-to-source for one task: read what the peer lacks from the origin, store it, finish.

`read_origin(run)` is what a `TaskRun` does once it is told BACK_TO_SOURCE (or finds no
scheduler): it hashes what is already held (in the writer thread, where every later piece is
fed too, so the whole-file blake3 is computed without a second pass), reads the missing pieces
with a `SourceReader`, retries transient origin failures for what is still missing, and
finishes the task with the file's content length and digest. It never talks to parents and
never decides scheduling; failures go to `run.fail`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from dfzmq import wire
from dfzmq.errors import DfzmqError, DownloadError, IntegrityError, SourceError
from nodes.cdc import wants_cdc
from nodes.limits import take_all
from nodes.sink import OrderedHasher
from nodes.source import SourceReader

if TYPE_CHECKING:
    from nodes.task import TaskRun

REPORT_INTERVAL_S = 0.05  # how often piece reports go to the scheduler, at most
SOURCE_ATTEMPTS = 3  # tries at the origin for transient failures (cut connection, 5xx)


def _start_hasher(run: "TaskRun") -> None:
    """Writer thread: hash what is already held, in order; later pieces are fed as written."""
    hasher = OrderedHasher(["blake3"] + (["sha256"] if run.expected_sha256 else []), run._read_stored)
    for num, info in sorted(run.daemon.store.manifest(run.task_id).items()):
        hasher.feed(info)
    run.hasher = hasher


async def read_origin(run: "TaskRun") -> None:
    """Read the missing pieces from the origin, retrying transient failures, then finish."""
    try:
        await run._in_writer(_start_hasher, run)
    except DfzmqError as e:
        run.fail(e)
        return
    known = dict(run.manifest)
    reader = SourceReader(run.url, run.headers, run.cfg.source_connections, run.daemon.http,
                          run.cfg.source_timeout_s, cdc=wants_cdc(run.tag),
                          max_piece=run.cfg.max_piece_length)
    length = run.content_length if run.complete else -1

    async def on_piece(info: wire.PieceInfo, data: bytes) -> None:
        if run.content_length < 0 and reader.content_length >= 0:
            run.content_length = reader.content_length
            await run._in_writer(run._set_length)
        if reader.meta and not run.origin_meta:
            run.set_origin_meta(reader.meta)
        await take_all(info.length, run.daemon.source_bucket, run.daemon.download_bucket, run.bucket)
        await run._in_writer(run._write, info, data, False)
        if run.state != "source":
            return
        run._stored(info, "origin")
        if len(run.reports) and time.monotonic() - run.last_report >= REPORT_INTERVAL_S:
            run._flush_reports()
            run.last_report = time.monotonic()
        await asyncio.sleep(0)

    run.last_report = 0.0
    attempt = 0
    while True:
        try:
            result = await reader.run(known, set(run.held), length, on_piece)
            break
        except asyncio.CancelledError:
            raise
        except SourceError as e:
            attempt += 1
            if not e.transient or attempt >= SOURCE_ATTEMPTS or run.state != "source":
                run.fail(e)
                return
            # A cut connection or a 5xx: try again for what is still missing.
            run.log.info("origin failed (%s); retry %d in %.1fs", e, attempt, 0.5 * attempt)
            await asyncio.sleep(0.5 * attempt)
            known = dict(run.manifest)
            if run.content_length >= 0:
                length = run.content_length
            reader = SourceReader(run.url, run.headers, run.cfg.source_connections, run.daemon.http,
                                  run.cfg.source_timeout_s, cdc=wants_cdc(run.tag),
                                  max_piece=run.cfg.max_piece_length)
        except DfzmqError as e:
            run.fail(e)
            return
        except Exception as e:
            run.log.exception("back-to-source failed")
            run.fail(DownloadError(f"internal error: {e}"))
            return
    if run.state != "source":
        return
    run.content_length = result.content_length
    run.etag, run.content_type = result.etag or run.etag, result.content_type or run.content_type
    run.set_origin_meta(result.meta or {"status": "200"})
    run.piece_count = len(run.held)
    upto = await run._in_writer(lambda: run.hasher.upto)
    if upto != run.content_length:
        run.fail(IntegrityError(f"origin gave {upto} bytes, expected {run.content_length}"))
        return
    run.file_digest = await run._in_writer(lambda: run.hasher.hexdigest("blake3"))
    run.complete = True
    await run._in_writer(run._set_length)
    run._flush_reports()
    await run._finish()
