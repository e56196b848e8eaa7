"""The monitor's screen: a pure function of a `MonitorState` and a terminal size.

`render(state, width, height)` returns a rich renderable of at most `height` lines, each at most
`width` columns: a cluster header (members up and down, versions, silent streams in red), the
busiest tasks, the busiest hosts and the newest events, sized to fit. With a thousand hosts and
hundreds of tasks it shows the top rows and says how many it left out; sorting is by activity
(tasks downloading and their aggregate rate; hosts by upload + download rate, then pieces
served). Narrow terminals (80 columns) lose the optional columns, never the numbers.

It never touches sockets, clocks or the terminal: the live loop (dfzmq/cli_monitor.py) draws it.
"""

from __future__ import annotations

import collections
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from dfzmq import wire
from dfzmq.monitor_state import MANAGER, MonitorState

MIN_HEIGHT = 12


def human(n: float, unit: str = "") -> str:
    """1536 -> '1.5K'; sizes and rates in powers of 1024, short enough for narrow columns."""
    if n < 0:
        return "?"
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or prefix == "T":
            return (f"{n:.0f}{prefix}" if prefix == "" or n >= 100 else f"{n:.1f}{prefix}") + unit
        n /= 1024
    return f"{n:.1f}P{unit}"


def rate(n: float) -> str:
    return human(n, "/s") if n > 0 else "-"


def short(ident: str, n: int = 8) -> str:
    """The tail of a `prefix-hash` id or the head of a bare hash: what tells ids apart."""
    if "-" in ident and len(ident) > n:
        return ident.rsplit("-", 1)[-1][:n]
    return ident[:n]


def url_label(url: str) -> str:
    """What tells URLs apart in a narrow column: the last path segment first, then the host."""
    rest = url.split("://", 1)[-1].split("?", 1)[0]
    host, _, path = rest.partition("/")
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return f"{last} · {host}" if last else host


def bar(fraction: float, width: int = 6) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(round(fraction * width))
    return "█" * full + "░" * (width - full) + f" {fraction * 100:3.0f}%"


def versions(items: list[str]) -> str:
    c = collections.Counter(v or "?" for v in items)
    return ", ".join(f"{v}" if n == len(items) else f"{v}×{n}" for v, n in c.most_common(3))


# -- sorting ------------------------------------------------------------------------------------


def task_order(t: wire.TaskView) -> tuple:
    active = t.downloading + t.back_to_source > 0 or t.rate > 0
    return (not active, not t.failed, -t.rate, -t.peers, t.task_id)


def host_order(h: wire.HostView) -> tuple:
    return (-(h.up_rate + h.down_rate), -h.pieces_served, h.hostname, h.host_id)


# -- sections -----------------------------------------------------------------------------------


def header(state: MonitorState, now: float, width: int) -> list[Text]:
    scheds = state.members_by_role("scheduler")
    seeds = state.members_by_role("seed")
    hosts = state.hosts()
    peers = [h for h in hosts if not h.seed]
    tasks = state.tasks()
    active = sum(1 for t in tasks if t.downloading + t.back_to_source > 0)

    def updown(ms: list[wire.MemberInfo]) -> str:
        up = sum(1 for m in ms if m.state == "up")
        return f"{up} up" + (f" {len(ms) - up} down" if len(ms) > up else "")

    mgr = state.manager
    mgr_text = "up" if mgr.answered else "not answering"
    line1 = Text.assemble(("dfzmq monitor ", "bold"), (mgr.addr, "cyan"), f"  manager {mgr_text}",
                          no_wrap=True, overflow="ellipsis")
    peer_text = f"{len(peers)} up" + (f" {len(state.gone_hosts)} down" if state.gone_hosts else "")
    running = [m.version for m in scheds + seeds if m.state == "up"] + [h.version for h in peers]
    line2 = Text(f"schedulers {updown(scheds)} · seeds {updown(seeds)} · peers {peer_text}"
                 f" · tasks {len(tasks)} ({active} active)"
                 + (f" · version {versions(running)}" if running else ""),
                 no_wrap=True, overflow="ellipsis")
    silent = state.silent(now)
    if silent:
        parts = [f"{'manager' if k == MANAGER else 'scheduler ' + short(k)} silent {s:.0f}s"
                 for k, s in silent]
        line3 = Text("STREAM SILENT: " + "; ".join(parts) + " (numbers may be stale)",
                     style="bold red", no_wrap=True, overflow="ellipsis")
    else:
        followed = 1 + sum(1 for s in state.schedulers.values() if not s.down)
        line3 = Text(f"{followed} stream(s) live", style="green", no_wrap=True)
    return [line1, line2, line3]


def _table(columns: list[tuple[str, dict[str, Any]]]) -> Table:
    t = Table(box=None, show_header=True, header_style="bold", pad_edge=False, padding=(0, 1),
              expand=True, show_edge=False)
    for name, kw in columns:
        t.add_column(name, no_wrap=True, overflow="ellipsis", **kw)
    return t


def tasks_table(tasks: list[wire.TaskView], rows: int, width: int) -> Table:
    wide = width >= 110
    cols: list[tuple[str, dict[str, Any]]] = [
        ("task", {"width": 8}),
        ("url", {"ratio": 1, "min_width": 6}),
        ("size", {"justify": "right", "width": 7}),
        ("peers", {"justify": "right", "width": 7}),
        ("progress", {"width": 11}),
        ("rate", {"justify": "right", "width": 9}),
        ("origin/p2p", {"justify": "right", "width": 13}),
    ]
    if wide:
        cols.insert(4, ("b2s", {"justify": "right", "width": 3}))
    t = _table(cols)
    for v in tasks[:rows]:
        total = v.content_length * v.peers if v.content_length > 0 else 0
        if v.failed:
            progress = Text("failed", style="red")
        else:
            frac = (v.done_bytes / total) if total else (1.0 if v.complete and v.peers else 0.0)
            progress = Text(bar(frac, 5), style="green" if frac >= 1 else "")
        row = [short(v.task_id), url_label(v.url), human(v.content_length) if v.content_length >= 0 else "?",
               f"{v.downloading + v.back_to_source}↓{v.done}✓", progress, rate(v.rate),
               f"{human(v.origin_bytes)}/{human(v.p2p_bytes)}"]
        if wide:
            row.insert(4, str(v.back_to_source))
        t.add_row(*row)
    return t


def hosts_table(hosts: list[wire.HostView], rows: int, width: int) -> Table:
    wide = width >= 110
    cols: list[tuple[str, dict[str, Any]]] = [
        ("host", {"ratio": 1, "min_width": 8}),
        ("role", {"width": 4}),
        ("up", {"justify": "right", "width": 9}),
        ("down", {"justify": "right", "width": 9}),
        ("load", {"justify": "right", "width": 7}),
        ("tasks", {"justify": "right", "width": 5}),
        ("served", {"justify": "right", "width": 7}),
    ]
    if width >= 90:  # location first: it is what scheduling prefers after load
        cols.insert(2, ("location", {"ratio": 1, "min_width": 8}))
    if wide:
        cols.insert(2, ("idc", {"width": 8}))
    t = _table(cols)
    for h in hosts[:rows]:
        load = f"{h.children}/{h.upload_slots}"
        style = "yellow" if h.upload_slots and h.children >= h.upload_slots else ""
        name = f"{h.hostname} {short(h.host_id, 6)}" if h.hostname else short(h.host_id)
        row = [name, "seed" if h.seed else "peer", rate(h.up_rate),
               rate(h.down_rate), Text(load, style=style), str(h.peers), str(h.pieces_served)]
        if width >= 90:
            row.insert(2, h.location or "-")
        if wide:
            row.insert(2, h.idc or "-")
        t.add_row(*row)
    return t


def event_text(e: Any, now: float) -> Text:
    f = e.fields
    bits = []
    for key in ("task_id", "task"):
        if key in f:
            bits.append(f"task {short(str(f[key]))}")
    for key in ("peer_id", "peer", "host_id", "member", "by"):
        if key not in f or (key == "host_id" and ("peer_id" in f or "peer" in f)):
            continue  # (a peer id starts with its host id: the host is not repeated)
        # Peers and hosts are named as in the hosts table: the short host id.
        bits.append(f"{key.removesuffix('_id')} {short(str(f[key]).split('/')[0], 6)}")
    for key in ("hostname", "reason", "code"):
        if f.get(key):
            bits.append(f"{key} {f[key]}")
    age = max(0.0, now - e.at)
    src = "manager" if e.source == MANAGER else short(e.source, 6)
    style = "red" if any(w in e.name for w in ("failed", "blocked", "down", "left")) else ""
    return Text.assemble(f"{age:4.0f}s ", (f"{src:<8} ", "dim"), (f"{e.name:<15} ", style),
                         " ".join(bits), no_wrap=True, overflow="ellipsis")


def _title(text: str, shown: int, total: int, what: str) -> Text:
    more = f" — top {shown} of {total}" if shown < total else f" — {total}"
    return Text(f"{text}{more} {what}", style="bold blue", no_wrap=True, overflow="ellipsis")


def budget(height: int, n_tasks: int, n_hosts: int, n_events: int) -> tuple[int, int, int]:
    """Rows for tasks, hosts and events: 3 header lines, a footer, and a title plus a column
    header per table and a title for events (9 fixed lines)."""
    rows = max(0, height - 9)
    events = min(n_events, max(2, min(8, rows // 4)))
    rest = max(0, rows - events)
    tasks = min(n_tasks, max(1, rest // 2))
    hosts = min(n_hosts, rest - tasks)
    tasks = min(n_tasks, rest - hosts)  # give back what hosts do not need
    events = min(n_events, rows - tasks - hosts)  # and what neither needs goes to events
    return tasks, hosts, events


def render(state: MonitorState, width: int, height: int, now: float | None = None) -> Group:
    now = state.now if now is None else now
    height = max(height, MIN_HEIGHT)
    tasks = sorted(state.tasks(), key=task_order)
    hosts = sorted(state.hosts(), key=host_order)
    events = list(state.events)
    n_t, n_h, n_e = budget(height, len(tasks), len(hosts), len(events))
    parts: list[Any] = header(state, now, width)
    parts.append(_title("Tasks", n_t, len(tasks), "(active first, by rate)"))
    parts.append(tasks_table(tasks, n_t, width))
    parts.append(_title("Hosts", n_h, len(hosts), "(by traffic)"))
    parts.append(hosts_table(hosts, n_h, width))
    parts.append(Text(f"Events — last {n_e} of {len(events)}", style="bold blue", no_wrap=True))
    parts.extend(event_text(e, now) for e in events[len(events) - n_e:] if n_e)
    parts.append(Text("q or Ctrl-C: quit", style="dim", no_wrap=True))
    return Group(*parts)
