"""Admin commands: `dfzmq hosts`, `dfzmq tasks`, `dfzmq task TASK_ID` (human tables or --json).

They ask the manager which schedulers exist, then every scheduler that is up for its view
(dfzmq/admin_client.py), and print the merged result. A scheduler that does not answer is named
on stderr (and in the JSON, `"answered": false`) while the others' data is printed; a manager
that does not answer is exit code 4; an unknown or ambiguous task id is exit code 1.

`dfzmq task ID` accepts a unique prefix of the id (tables show 8 characters) and shows who
holds which pieces compactly: per peer, the count, the ranges of piece numbers
("0-127,131,140-511") and a 32-cell strip where each cell is a slice of the task's pieces
(█ all held, ▓ at least half, ▒ some, · none).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from brokers.scheduler.views import unbitmap
from dfzmq.cli import ConfigOpt, app, run_guarded
from dfzmq.admin_client import AdminConfig
from dfzmq.config import curve_of
from dfzmq.monitor_state import MonitorState
from dfzmq.monitor_view import host_order, human, rate, short, task_order, url_label

err = Console(stderr=True, highlight=False)


def _out() -> Console:
    out = Console(highlight=False)
    # Piped or captured: whole rows rather than an 80-column squeeze.
    return out if out.is_terminal else Console(highlight=False, width=200)

STRIP_CELLS = 32


ManagerOpt = Annotated[Optional[str], typer.Option(envvar="DFZMQ_MANAGER", help="HOST:PORT of the manager.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
TimeoutOpt = Annotated[Optional[float], typer.Option("--timeout", help="Seconds to wait for each answer.")]


def admin_config(manager: str | None, timeout: float | None, config: Path | None) -> AdminConfig:
    from dfzmq.admin_client import admin_config as resolve_admin

    return run_guarded(resolve_admin, manager, timeout, config)


def _gather(cfg: AdminConfig) -> MonitorState:
    from dfzmq.admin_client import gather

    state = run_guarded(gather, cfg.manager, run_guarded(curve_of, cfg), cfg.timeout_s)
    for key, s in sorted(state.schedulers.items()):
        if not s.down and not s.answered:
            err.print(f"dfzmq: warning: scheduler {key} at {s.addr} did not answer; its part is missing",
                      soft_wrap=True)
    return state


def _schedulers_json(state: MonitorState) -> list[dict[str, Any]]:
    """Every scheduler the manager knows, up or down, and whether it answered us."""
    out = []
    for m in state.members_by_role("scheduler"):
        s = state.schedulers.get(m.member_id)
        up = m.state == "up"
        out.append({"scheduler_id": m.member_id, "addr": m.addr, "version": m.version, "up": up,
                    "answered": bool(up and s is not None and not s.down and s.answered)})
    return out


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


# -- piece holders ------------------------------------------------------------------------------


def ranges(nums: list[int]) -> list[tuple[int, int]]:
    """Sorted piece numbers as inclusive (first, last) runs."""
    out: list[tuple[int, int]] = []
    for n in sorted(nums):
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def ranges_text(runs: list[tuple[int, int]], limit: int = 6) -> str:
    if not runs:
        return "-"
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    more = f" (+{len(runs) - limit} more)" if len(runs) > limit else ""
    return ",".join(parts) + more


def strip(nums: list[int], total: int, cells: int = STRIP_CELLS) -> str:
    if total <= 0:
        return "?"
    cells = min(cells, total)
    held = set(nums)
    out = []
    for c in range(cells):
        lo, hi = c * total // cells, (c + 1) * total // cells
        n = sum(1 for i in range(lo, hi) if i in held)
        span = hi - lo
        out.append("█" if n == span else "▓" if 2 * n >= span else "▒" if n else "·")
    return "".join(out)


# -- commands -----------------------------------------------------------------------------------


def _table(title: str, width: int, columns: list[tuple[str, str, int]], rows: list[list[str]],
           free_text: tuple[str, ...] = ("host", "url")) -> Table:
    """A table with the columns whose minimum terminal width (third item) `width` reaches:
    narrow terminals lose optional columns rather than fold every cell. Numbers keep their
    whole width; the one free-text column (`free_text`) gets what they leave."""
    keep = [i for i, (_, _, min_w) in enumerate(columns) if width >= min_w]
    natural = {i: max([len(columns[i][0]), *(len(r[i]) for r in rows)]) for i in keep}
    free = [i for i in keep if columns[i][0] in free_text]
    fixed = sum(w for i, w in natural.items() if i not in free) + 3 * len(keep)
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i in keep:
        name, justify, _ = columns[i]
        if i in free:
            t.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis",  # type: ignore[arg-type]
                         max_width=max(10, width - fixed))
        else:
            t.add_column(name, justify=justify, no_wrap=True, min_width=natural[i])  # type: ignore[arg-type]
    for row in rows:
        t.add_row(*(row[i] for i in keep))
    return t


@app.command()
def hosts(manager: ManagerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = None,
          config: ConfigOpt = None) -> None:
    """List the hosts the schedulers know: role, location, traffic, load, pieces served."""
    state = _gather(admin_config(manager, timeout, config))
    rows = sorted(state.hosts(), key=host_order)
    if as_json:
        _print_json({"schedulers": _schedulers_json(state),
                     "hosts": [dataclasses.asdict(h) for h in rows]})
        return
    out = _out()
    columns = [("host", "left", 0), ("id", "left", 100), ("role", "left", 0), ("idc", "left", 120),
               ("location", "left", 100), ("version", "left", 120), ("up", "right", 0),
               ("down", "right", 0), ("sent", "right", 140), ("received", "right", 140),
               ("load", "right", 0), ("tasks", "right", 0), ("served", "right", 0)]
    cells = [[h.hostname, short(h.host_id, 12), "seed" if h.seed else "peer", h.idc or "-",
              h.location or "-", h.version or "-", rate(h.up_rate), rate(h.down_rate),
              human(h.up_bytes), human(h.down_bytes), f"{h.children}/{h.upload_slots}",
              str(h.peers), str(h.pieces_served)] for h in rows]
    out.print(_table(f"{len(rows)} host(s)", out.width, columns, cells))


@app.command()
def tasks(manager: ManagerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = None,
          config: ConfigOpt = None) -> None:
    """List the tasks the schedulers know: size, peers, progress, origin and P2P bytes."""
    state = _gather(admin_config(manager, timeout, config))
    rows = sorted(state.tasks(), key=task_order)
    if as_json:
        _print_json({"schedulers": _schedulers_json(state),
                     "tasks": [dataclasses.asdict(t) for t in rows]})
        return
    out = _out()
    columns = [("task", "left", 0), ("url", "left", 0), ("size", "right", 0), ("state", "left", 100),
               ("peers", "right", 100), ("dl", "right", 0), ("done", "right", 0),
               ("rate", "right", 0), ("origin", "right", 0), ("p2p", "right", 0)]
    cells = []
    for v in rows:
        st = "failed" if v.failed else "complete" if v.complete else "running"
        cells.append([v.task_id[:12 if out.width >= 100 else 8], v.url if out.width >= 160 else url_label(v.url),
                      human(v.content_length), st, str(v.peers),
                      str(v.downloading + v.back_to_source), str(v.done), rate(v.rate),
                      human(v.origin_bytes), human(v.p2p_bytes)])
    out.print(_table(f"{len(rows)} task(s)", out.width, columns, cells))


@app.command()
def task(task_id: Annotated[str, typer.Argument(help="Task id, or a unique prefix of it.")],
         manager: ManagerOpt = None, as_json: JsonOpt = False, timeout: TimeoutOpt = None,
         config: ConfigOpt = None) -> None:
    """Show one task and who holds which of its pieces."""
    from dfzmq.admin_client import find_task

    cfg = admin_config(manager, timeout, config)
    details = run_guarded(find_task, cfg.manager, task_id, run_guarded(curve_of, cfg), cfg.timeout_s)
    d = details[0]
    v = d.task
    total = v.piece_count if v.piece_count > 0 else v.pieces_known
    peers = [(p, unbitmap(p.bitmap)) for p in d.peers]
    if as_json:
        _print_json({
            "scheduler_id": d.scheduler_id, "task": dataclasses.asdict(v),
            "peers": [{**{k: val for k, val in dataclasses.asdict(p).items() if k != "bitmap"},
                       "ranges": [list(r) for r in ranges(nums)]} for p, nums in peers],
        })
        return
    state = "failed: " + v.failed if v.failed else "complete" if v.complete else "running"
    out = _out()
    out.print(f"[bold]task[/] {v.task_id}\n[bold]url[/]  {escape(v.url)}\n"
              f"size {human(v.content_length)} ({v.content_length} bytes), "
              f"{total if total >= 0 else '?'} pieces, {escape(state)}; scheduler {d.scheduler_id}\n"
              f"peers {v.peers}: {v.downloading} downloading, {v.back_to_source} from the origin, "
              f"{v.done} done; origin {human(v.origin_bytes)}, p2p {human(v.p2p_bytes)}")
    cells_n = STRIP_CELLS if out.width >= 110 else STRIP_CELLS // 2
    columns = [("host", "left", 0), ("peer", "left", 0), ("state", "left", 0), ("held", "right", 0),
               ("pieces", "left", 0), ("parents", "right", 100), ("ranges", "left", 0)]
    cells = [[p.hostname or short(p.host_id), short(p.peer_id.split("/")[0], 10) + (" (seed)" if p.seed else ""),
              p.state, f"{p.held}/{total if total >= 0 else '?'}", strip(nums, total, cells_n),
              str(len(p.parent_ids)), ranges_text(ranges(nums))]
             for p, nums in sorted(peers, key=lambda x: (-x[0].held, x[0].peer_id))]
    out.print(_table("who holds which pieces", out.width, columns, cells, free_text=("ranges",)))
