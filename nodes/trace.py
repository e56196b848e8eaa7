"""Piece trace for the network lab: one JSON line per piece event on a downloading peer.

Off unless the daemon's environment names a file in DFZMQ_PIECE_TRACE (the lab's `--trace`
sets it per daemon); then every piece request, arrival, duplicate, timeout and dropped parent
is appended as `[monotonic_s, event, task, num, parent, extra]`. CLOCK_MONOTONIC is one clock
for every namespace of a host, so the lab lines up the traces of all daemons with its own
start time. A few thousand lines per task: cheap enough to leave on for a whole lab run, and
never on in production unless asked for. It must never raise into the download path.
"""

from __future__ import annotations

import json
import os
import time

_fh = None
_opened = False


def _open():
    global _fh, _opened
    _opened = True
    path = os.environ.get("DFZMQ_PIECE_TRACE", "")
    if path:
        try:
            _fh = open(path, "a", buffering=1)  # line buffered: a killed daemon loses nothing
        except OSError:
            _fh = None
    return _fh


def enabled() -> bool:
    return (_fh if _opened else _open()) is not None


def trace(event: str, task_id: str, num: int = -1, parent: str = "", extra: object = None) -> None:
    fh = _fh if _opened else _open()
    if fh is None:
        return
    try:
        fh.write(json.dumps([round(time.monotonic(), 4), event, task_id[:16], num, parent, extra]) + "\n")
    except (OSError, ValueError):
        pass
