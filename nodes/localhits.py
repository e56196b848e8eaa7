"""Local hits: pieces of a new task that this peer already holds under another task.

Pieces are content-addressed (the store key is the blake3 digest), so when the manifest of a
new version of a file arrives, every piece whose digest is already in the local store (from the
old version's task, typically, when both were cut at content-defined boundaries) is taken from
the store instead of being requested from a parent: it is referenced for the new task (the
store counts references per task), written to the task's outputs and reported to the scheduler
like any other piece, under `local_bytes` in the stats. Nothing crosses the network for it.

The picker is told at once that the piece is held, so no parent is asked for it while the
writer thread copies it; if the piece vanished meanwhile (evicted by GC), the picker forgets it
and it is requested from parents as usual.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from dfzmq import wire
from dfzmq.errors import DfzmqError, DownloadError

if TYPE_CHECKING:
    from nodes.task import TaskRun


def take_local(run: "TaskRun", fresh: list[wire.PieceInfo]) -> None:
    """Called on the loop with new manifest entries; schedules the copy of local hits."""
    if run.state in ("source", "succeeded", "failed"):
        return
    store = run.daemon.store
    hits = [p for p in fresh if p.num not in run.held and p.num not in run.writing and store.has(p.digest)]
    if not hits:
        return
    for p in hits:
        run.writing.add(p.num)
        run.picker.on_piece("", p.num)
    fut = run._in_writer(_copy, run, hits)
    fut.add_done_callback(lambda f: _copied(run, hits, f))


def _copy(run: "TaskRun", hits: list[wire.PieceInfo]) -> list[bool]:
    """Writer thread: reference each piece for this task and feed it to the outputs."""
    ok = []
    for p in hits:
        data = run.daemon.store.get(p.digest)
        if data is None:
            ok.append(False)
            continue
        run._write(p, data, False)
        ok.append(True)
    return ok


def _copied(run: "TaskRun", hits: list[wire.PieceInfo], fut: asyncio.Future) -> None:
    for p in hits:
        run.writing.discard(p.num)
    if run.state in ("succeeded", "failed"):
        return
    err = fut.exception()
    if err is not None:
        run.fail(err if isinstance(err, DfzmqError) else DownloadError(f"internal error: {err}"))
        return
    for p, ok in zip(hits, fut.result()):
        if ok:
            run._stored(p, "local")
        else:
            run.picker.unhave(p.num)
    run._pump()
