"""CPU seconds of a process or one of its threads, from /proc (what the benchmarks and the lab
compare: robust to other jobs on a shared machine, unlike wall time)."""

from __future__ import annotations

import os

TCK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int, tid: str | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid`, or of its thread `tid`."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return int(fields[11]) / TCK, int(fields[12]) / TCK
