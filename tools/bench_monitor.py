"""What following a big cluster costs: the scheduler's view tick and snapshot, and one monitor frame.

    python tools/bench_monitor.py [--hosts 1000] [--tasks 300] [--peers 10] [--pieces 512]

Fills a real SchedulerCore with that many hosts and tasks (each task has one finished peer and
the rest downloading), has a third of the hosts report traffic each second, and times
`SchedulerViews.handle_timer` (the StateDelta), `state()` (a snapshot) and `render` at 80x24
and 200x60. Best of the rounds; wall-clock figures on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import io
import time

from rich.console import Console

from brokers.scheduler.core import SchedulerCore
from brokers.scheduler.views import SchedulerViews
from dfzmq import wire
from dfzmq.monitor_state import MonitorState
from dfzmq.monitor_view import render


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--peers", type=int, default=10)
    ap.add_argument("--pieces", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    core = SchedulerCore("sched", 1.0, 5)
    views = SchedulerViews(core, 1.0)
    now = 0.0
    for i in range(a.hosts):
        core.handle(f"h{i}".encode(), wire.HostAnnounce(f"h{i}", f"node{i}", f"tcp://n{i}:1"), now)
    pieces = [wire.PieceInfo(n, n << 16, 1 << 16, f"d{n}") for n in range(a.pieces)]
    for t in range(a.tasks):
        tid = f"{t:064x}"
        for k in range(a.peers):
            h = (t * 7 + k) % a.hosts
            msg = wire.PeerRegister(tid, f"h{h}/{t}", "http://origin/x",
                                    state="succeeded" if k == 0 else "pending",
                                    pieces=pieces if k == 0 else [], content_length=a.pieces << 16)
            views.observe(msg, core.handle(f"h{h}".encode(), msg, now), now)
    ticks, sizes = [], []
    for r in range(a.rounds):
        now += 1.0
        for h in range(0, a.hosts, 3):
            views.handle(f"h{h}".encode(), wire.HostStats(f"h{h}", down_bytes=int(now) * 5000 + h,
                                                          up_bytes=int(now) * 100), now)
        t0 = time.perf_counter()
        acts = views.handle_timer(now)
        ticks.append(time.perf_counter() - t0)
        sizes.append(sum(len(f) for act in acts for f in wire.encode(act.msg)))
    t0 = time.perf_counter()
    snap = views.state(now)
    snap_s = time.perf_counter() - t0
    snap_bytes = sum(len(f) for f in wire.encode(snap))
    print(f"{a.hosts} hosts, {a.tasks} tasks x {a.peers} peers, {a.pieces} pieces")
    print(f"view tick (StateDelta): best {min(ticks[1:] or ticks) * 1000:.1f} ms, "
          f"delta {sizes[-1] / 1024:.0f} KiB (first {sizes[0] / 1024:.0f} KiB)")
    print(f"snapshot: {snap_s * 1000:.1f} ms, {snap_bytes / 1024:.0f} KiB")
    state = MonitorState("tcp://manager:1", 0.0)
    state.on_manager_snapshot(wire.ClusterSnapshot(
        1, [wire.MemberInfo("sched", "scheduler", "tcp://s:1", "tcp://s:2")]), 0.0)
    state.on_scheduler_state("sched", wire.decode(wire.encode(snap)), 0.0)
    for w, h in ((80, 24), (200, 60)):
        console = Console(file=io.StringIO(), width=w, height=h, color_system=None)
        best = min(_timed(lambda: console.print(render(state, w, h, now=0.5)))
                   for _ in range(a.rounds))
        print(f"monitor frame {w}x{h}: best {best * 1000:.1f} ms")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
