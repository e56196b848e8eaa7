"""`dfzmq monitor`: the live full-screen view of a cluster (and `--once` for scripts).

The thin, impure part: sockets (`Feed`), the terminal (rich Live on the alternate screen, stdin
in cbreak mode for `q`) and the clock. What is known lives in `MonitorState`
(dfzmq/monitor_state.py), what is drawn comes from `render` (dfzmq/monitor_view.py).

`Feed` follows the Clone pattern per publisher: a SUB on its PUB first, then a snapshot over a
fresh DEALER; the state buffers early updates and says when to ask again (a gap, a restarted
publisher). A snapshot not answered within `ask_timeout_s`, or a stream silent that long, is
asked again on a fresh socket, so a manager or scheduler that comes back is picked up without
restarting the monitor. The manager's PUB address comes from its first snapshot.

The terminal is always given back as it was: the alternate screen is left and the tty modes
restored on `q`, Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import os
import select
import sys
import time
from typing import Annotated, Any, Optional

import typer
import zmq
from rich.console import Console
from rich.live import Live

from dfzmq import net, wire
from dfzmq.admin_client import admin_config
from dfzmq.cli import ConfigOpt, app, fail, run_guarded
from dfzmq.config import curve_of
from dfzmq.errors import RemoteProtocolError
from dfzmq.monitor_state import MANAGER, MonitorState, Need
from dfzmq.monitor_view import render
from dfzmq.service import StopFlag


class Feed:
    """The monitor's sockets: per publisher, a SUB on its events and a DEALER for snapshots."""

    def __init__(self, ctx: zmq.Context, state: MonitorState, curve: net.Curve | None = None,
                 ask_timeout_s: float = 3.0) -> None:
        self.ctx, self.state, self.curve = ctx, state, curve
        self.ask_timeout_s = ask_timeout_s
        self.subs: dict[str, zmq.Socket] = {}
        self.dealers: dict[str, zmq.Socket] = {}
        self.asked: dict[str, float] = {}
        self.owner: dict[zmq.Socket, tuple[str, str]] = {}  # socket -> (key, "sub" | "dealer")

    def start(self) -> None:
        self._ask(MANAGER)

    def close(self) -> None:
        for sock in list(self.owner):
            sock.close(0)
        self.owner.clear()

    def _addr(self, key: str) -> str:
        return self.state.manager.addr if key == MANAGER else self.state.schedulers[key].addr

    def _ask(self, key: str) -> None:
        """A fresh DEALER and a snapshot request to publisher `key`."""
        old = self.dealers.pop(key, None)
        if old is not None:
            self.owner.pop(old, None)
            old.close(0)
        sock = net.make_socket(self.ctx, "control_dealer", self.curve)
        sock.connect(self._addr(key))
        msg = wire.SnapshotRequest() if key == MANAGER else wire.StateRequest()
        sock.send_multipart(wire.encode(msg))
        self.dealers[key] = sock
        self.owner[sock] = (key, "dealer")
        self.asked[key] = time.monotonic()

    def _subscribe(self, key: str, events_addr: str) -> None:
        if key in self.subs or not events_addr:
            return
        sock = net.make_socket(self.ctx, "events_sub", self.curve)
        sock.connect(events_addr)
        self.subs[key] = sock
        self.owner[sock] = (key, "sub")

    def _drop(self, key: str) -> None:
        for table in (self.subs, self.dealers):
            sock = table.pop(key, None)
            if sock is not None:
                self.owner.pop(sock, None)
                sock.close(0)
        self.asked.pop(key, None)

    def _apply(self, needs: list[Need]) -> None:
        for need in needs:
            if need.what == "watch":
                self._drop(need.key)
                self._subscribe(need.key, self.state.schedulers[need.key].events_addr)
                self._ask(need.key)
            elif need.what == "unwatch":
                self._drop(need.key)
            elif need.what == "snapshot":
                self._ask(need.key)

    def poll(self, timeout_ms: int) -> int:
        """Receive and apply whatever arrives within `timeout_ms`; the number of messages."""
        poller = zmq.Poller()
        for sock in self.owner:
            poller.register(sock, zmq.POLLIN)
        handled = 0
        for sock, _ in poller.poll(timeout_ms):
            if sock not in self.owner:
                continue
            key, kind = self.owner[sock]
            for _ in range(1000):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = wire.decode(frames)
                except RemoteProtocolError:
                    self.state.counters["dropped.bad-frame"] += 1
                    continue
                handled += 1
                self._handle(key, kind, msg)
                if sock not in self.owner:  # closed by what we just applied
                    break
        self._tend(time.monotonic())
        return handled

    def _handle(self, key: str, kind: str, msg: Any) -> None:
        now = time.monotonic()
        if key == MANAGER:
            if isinstance(msg, wire.ClusterSnapshot) and kind == "dealer":
                self.asked.pop(key, None)
                first = MANAGER not in self.subs
                self._subscribe(MANAGER, msg.events_addr)
                self._apply(self.state.on_manager_snapshot(msg, now))
                if first and MANAGER in self.subs:
                    self._ask(MANAGER)  # now that we listen, a snapshot nothing can slip past
            elif kind == "sub" and isinstance(msg, (wire.ClusterUpdate, wire.PubHeartbeat)):
                self._apply(self.state.on_manager_pub(msg, now))
            return
        if key not in self.state.schedulers:
            return
        if isinstance(msg, wire.SchedulerState) and kind == "dealer":
            self.asked.pop(key, None)
            self._apply(self.state.on_scheduler_state(key, msg, now))
        elif kind == "sub" and isinstance(msg, (wire.StateDelta, wire.Event, wire.PubHeartbeat)):
            self._apply(self.state.on_scheduler_pub(key, msg, now))

    def _tend(self, now: float) -> None:
        """Ask again where a snapshot went unanswered or a stream went silent."""
        for key, at in list(self.asked.items()):
            if now - at > self.ask_timeout_s:
                self._ask(key)
        for key, _ in self.state.silent(now):
            if key not in self.asked and (key == MANAGER or key in self.state.schedulers):
                self._ask(key)


class _Keys:
    """stdin in cbreak mode (keys without Enter, Ctrl-C still a signal), restored on exit."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin.isatty() else None
        self.saved = None

    def __enter__(self) -> "_Keys":
        if self.fd is not None:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None and self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def pressed(self) -> str:
        if self.fd is None or not select.select([self.fd], [], [], 0)[0]:
            return ""
        return os.read(self.fd, 32).decode(errors="replace")


# (Not imported from cli_admin: either module may be imported first.)
ManagerOpt = Annotated[Optional[str], typer.Option(envvar="DFZMQ_MANAGER", help="HOST:PORT of the manager.")]


@app.command()
def monitor(
    manager: ManagerOpt = None,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (for scripts).")] = False,
    refresh: Annotated[float, typer.Option(help="Seconds between redraws.")] = 1.0,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Seconds to wait for each answer.")] = None,
    config: ConfigOpt = None,
) -> None:
    """A live view of the cluster: members, tasks, hosts and events. q or Ctrl-C quits."""
    cfg = run_guarded(admin_config, manager, timeout, config)
    curve = run_guarded(curve_of, cfg)
    console = Console()
    if once:
        from dfzmq.admin_client import gather

        state = run_guarded(gather, cfg.manager, curve, cfg.timeout_s)
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=120)  # for scripts and logs: room for the optional columns
        height = console.height if console.is_terminal else 60
        console.print(render(state, console.width, height, now=time.monotonic()))
        return
    if not console.is_terminal:
        raise fail("the live monitor needs a terminal; use --once to print one frame", 2)
    addr = run_guarded(net.tcp, cfg.manager)
    state = MonitorState(addr, time.monotonic(), silence_s=max(3.0, cfg.timeout_s))
    ctx = zmq.Context()
    feed = Feed(ctx, state, curve, cfg.timeout_s)
    stop = StopFlag()
    stop.install_signals()
    try:
        feed.start()
        with _Keys() as keys, Live(console=console, screen=True, auto_refresh=False,
                                   redirect_stdout=False, redirect_stderr=False) as live:
            next_draw = 0.0
            while not stop:
                if "q" in keys.pressed().lower():
                    break
                now = time.monotonic()
                if now >= next_draw:
                    live.update(render(state, console.width, console.height, now=now), refresh=True)
                    next_draw = now + refresh
                feed.poll(int(max(10, min(100, (next_draw - now) * 1000))))
    finally:
        feed.close()
        ctx.destroy(linger=0)
