"""Registry blobs are checked against their digest before a daemon keeps them.

A task whose id is a blob's digest (`dfzmq.oci.blob_task_id`: the mirror's blob pulls and
preheat --image) knows the sha256 its content must have (`TaskRun.expected_sha256`, derived
from its URL and id, so seeds triggered by the scheduler know it too, with no new message).
When such a task is whole, `verify_content` checks it before the task is marked complete:

- after an origin read, from the sha256 the origin reader computed next to blake3 as the
  pieces were written (nodes/backsource.py), so no second pass;
- otherwise (pieces from parents, or a task stored before this check existed) by reading the
  pieces back in order in the writer thread: one pass over the blob, once; the result is kept
  in the task's metadata (`verified`), so later cache hits cost nothing.

On a mismatch (an error page answered with 200, a blob changed upstream) the task fails with
an IntegrityError, its pieces are deleted and the scheduler hears it left: nothing wrong is
ever served from the cache (also not to range requests), and the next pull starts afresh.
Counted as `task.digest-mismatch` in the daemon's counters.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from dfzmq.errors import DfzmqError, IntegrityError, StorageError

if TYPE_CHECKING:
    from nodes.task import TaskRun


async def verify_content(run: "TaskRun") -> bool:
    """True when the whole content matches; else the run has failed and is being deleted."""
    run.state = "verifying"  # the scheduler's messages and the watchdog leave the run alone
    try:
        got = await run._in_writer(content_sha256, run)
    except DfzmqError as e:
        run.state = "finishing"
        run.fail(e)
        return False
    if run.state != "verifying":  # failed meanwhile
        return False
    if got == run.expected_sha256:
        run.verified = True
        run.state = "running"
        return True
    run.daemon.counters["task.digest-mismatch"] += 1
    discard(run, IntegrityError(f"digest mismatch: sha256 of the content is {got}, "
                                f"expected {run.expected_sha256}; nothing kept"))
    return False


def content_sha256(run: "TaskRun") -> str:
    """Writer thread: sha256 of the stored content in piece order."""
    h = run.hasher
    if h is not None and "sha256" in h.hashers and h.upto == run.content_length:
        return h.hexdigest("sha256")
    sha, upto = hashlib.sha256(), 0
    for num, info in sorted(run.daemon.store.manifest(run.task_id).items()):
        if info.offset != upto:
            raise StorageError(f"piece {num} does not follow byte {upto}")
        sha.update(run._read_stored(info))
        upto += info.length
    return sha.hexdigest()


def discard(run: "TaskRun", err: DfzmqError) -> None:
    """Fail the run and delete what is stored of it (after every write already queued)."""
    run.state = "finishing"
    run.held.clear()
    run.daemon.writer.submit(run.daemon.store.delete_task, run.task_id)
    run.fail(err)
    run.daemon.forget(run.task_id)
