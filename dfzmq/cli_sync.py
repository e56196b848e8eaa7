"""`dfzmq sync`: cron-driven bulk sync of files through the cluster (nodes/sync.py, nodes/syncer.py).

Exit codes (cron and scripts tell outcomes apart by them):
  0   every entry synced (also: nothing to do)
  1   partial failure: some files or entries failed, others synced
  2   bad configuration or usage
  3   failed: nothing could be synced (index or origin unreachable, every file failed)
  4   the daemon is not answering
  75  another sync holds a destination's lock (EX_TEMPFAIL; with several entries, only if all were busy)

Output, for cron mail: nothing on stdout when nothing changed and nothing failed (unless
`--verbose`); otherwise one summary line (or `--json`, always printed). Errors go to stderr,
one line each.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Annotated, Optional

import typer

from dfzmq import net, wire
from dfzmq.cli import _default_daemon, _parse_headers, app, err_console, fail, fetch_via_daemon, setup_logging
from dfzmq.config import DaemonConfig, curve_of, load_toml, resolve
from dfzmq.errors import ConfigError, DfzmqError


def _setup_logging(verbose: bool) -> None:
    """rich on a terminal; plain one-line records otherwise (cron mail, journald)."""
    import logging

    if err_console.is_terminal:
        setup_logging("info" if verbose else "warning")
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("dfzmq sync: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _load_spec(path: Path):
    import tomllib

    from nodes.sync import entries_from_spec

    try:
        spec = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    # A relative dest is relative to the spec file, not to wherever cron happens to start.
    import dataclasses
    return [e if e.dest.is_absolute() else dataclasses.replace(e, dest=path.absolute().parent / e.dest)
            for e in entries_from_spec(spec)]


def _command_for(spec: Path, entry_name: str) -> list[str]:
    exe = shutil.which("dfzmq")
    return [*([exe] if exe else [sys.executable, "-m", "dfzmq"]), "sync", str(spec.absolute()), "--entry", entry_name]


async def _run(entries, fetcher_kind: str, addr: str | None, manager: str | None, curve, lock_timeout_s: float,
               jobs: int):
    import aiohttp

    from nodes.syncer import sync_entry

    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=60))
    daemon = tmp = None
    try:
        if fetcher_kind == "daemon":
            async def fetch(url, output, digest, headers, tag):
                req = wire.Download(uuid.uuid4().hex, url, output, digest, headers, tag, "")
                return await asyncio.to_thread(fetch_via_daemon, addr, req, lambda d, t: None)
        else:
            from nodes.daemon import Daemon
            from nodes.memtune import keep_freed_buffers
            keep_freed_buffers()  # a peer in this process: its pieces reuse freed buffers too
            tmp = Path(tempfile.mkdtemp(prefix="dfzmq-sync-"))
            cfg = DaemonConfig(manager=manager or "", data=tmp, listen="0.0.0.0:0" if manager else "127.0.0.1:0",
                               control=f"ipc://{tmp}/control.sock", map_size=1 << 38)
            daemon = Daemon(cfg, curve)
            await daemon.start(use_manager=bool(manager))

            async def fetch(url, output, digest, headers, tag):
                return await daemon.download(url, output, digest, headers, tag, "")
        return [await sync_entry(e, fetch, http, lock_timeout_s, jobs) for e in entries]
    finally:
        await http.close()
        if daemon is not None:
            await daemon.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def exit_code(results) -> int:
    statuses = [r.status for r in results]
    if all(s == "ok" for s in statuses):
        return 0
    if all(s == "busy" for s in statuses):
        return 75
    done = sum(r.fetched + r.skipped + r.deleted for r in results)
    if done == 0 and all(s in ("failed", "busy") for s in statuses):
        return 3
    return 1


def summary_line(results) -> str:
    t = {k: sum(getattr(r, k) for r in results) for k in
         ("checked", "fetched", "skipped", "deleted", "failed", "origin_bytes", "peer_bytes", "local_bytes")}
    busy = sum(1 for r in results if r.status == "busy")
    took = max((r.elapsed_s for r in results), default=0.0)
    return (f"dfzmq sync: {t['checked']} checked, {t['fetched']} fetched, {t['skipped']} skipped, "
            f"{t['deleted']} deleted, {t['failed']} failed" + (f", {busy} busy" if busy else "")
            + f"; {_human(t['origin_bytes'])} from origin, {_human(t['peer_bytes'])} from peers, "
            f"{_human(t['local_bytes'])} local; {took:.1f}s")


@app.command()
def sync(
    spec: Annotated[Optional[Path], typer.Argument(help="TOML spec: sync entries (README, dfzmq sync).")] = None,
    source: Annotated[Optional[str], typer.Option(help="Index URL (directory listing, JSON or text manifest).")] = None,
    url: Annotated[list[str], typer.Option("--url", help="A file URL to sync (repeatable), instead of --source.")] = [],
    dest: Annotated[Optional[Path], typer.Option(help="Destination directory (with --source/--url).")] = None,
    include: Annotated[list[str], typer.Option(help="Glob a relative path must match (repeatable).")] = [],
    exclude: Annotated[list[str], typer.Option(help="Glob of relative paths to leave out (repeatable).")] = [],
    delete: Annotated[bool, typer.Option("--delete", help="Remove files this sync put in DEST that the source no longer lists.")] = False,
    index_format: Annotated[str, typer.Option("--format", help="Index format: auto, html, json, text.")] = "auto",
    header: Annotated[list[str], typer.Option("--header", "-H", help="Header for the origin, 'Name: value'.")] = [],
    entry: Annotated[list[str], typer.Option(help="Only the spec entries of these names.")] = [],
    daemon: Annotated[Optional[str], typer.Option(envvar="DFZMQ_DAEMON", help="Control socket of the local daemon.")] = None,
    manager: Annotated[Optional[str], typer.Option(envvar="DFZMQ_MANAGER",
                                                   help="Without a daemon: join this cluster as a one-shot peer.")] = None,
    lock_timeout: Annotated[float, typer.Option(help="Seconds to wait for another sync of a destination.")] = 0.0,
    jobs: Annotated[int, typer.Option(help="Files fetched at once per entry.")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report instead of the summary line.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Summary even when nothing changed; log each file.")] = False,
    print_cron: Annotated[bool, typer.Option("--print-cron", help="Print crontab lines for the spec's scheduled entries.")] = False,
    print_systemd: Annotated[bool, typer.Option("--print-systemd", help="Print systemd service and timer units instead.")] = False,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", envvar="DFZMQ_CONFIG", help="TOML config file.")] = None,
) -> None:
    """Sync files from a source to a directory through the cluster; safe to run from cron.

    Exit codes: 0 synced, 1 partial failure, 2 bad configuration, 3 failed (nothing synced),
    4 daemon not answering, 75 another sync holds the lock."""
    from nodes.sync import entry_from

    _setup_logging(verbose)
    try:
        if spec is not None and (source or url):
            raise ConfigError("give a SPEC file or --source/--url with --dest, not both")
        if spec is not None:
            entries = _load_spec(spec)
            if entry:
                unknown = set(entry) - {e.name for e in entries}
                if unknown:
                    raise ConfigError(f"no entries named {', '.join(sorted(unknown))} in {spec}")
                entries = [e for e in entries if e.name in entry]
        else:
            if not (source or url) or dest is None:
                raise ConfigError("give a SPEC file, or --source URL (or --url URL) and --dest DIR")
            raw = {"name": "cli", "dest": str(dest), "include": include, "exclude": exclude, "delete": delete,
                   "format": index_format, "headers": _parse_headers(header)}
            raw.update({"index": source} if source else {"urls": url})
            entries = [entry_from(raw, {}, 1)]
        if print_cron or print_systemd:
            if spec is None:
                raise ConfigError("--print-cron and --print-systemd need a SPEC file")
            from nodes.sync import cron_line, systemd_units
            scheduled = [e for e in entries if e.schedule]
            if not scheduled:
                raise ConfigError(f"no entry in {spec} has a schedule")
            for e in scheduled:
                cmd = _command_for(spec, e.name) + (["--daemon", daemon] if daemon else []) + (
                    ["--manager", manager] if manager and not daemon else [])
                typer.echo(systemd_units(e, cmd) if print_systemd else cron_line(e, cmd))
            return
        if jobs < 1:
            raise ConfigError("--jobs must be at least 1")
        addr = daemon or (None if manager else _default_daemon())
        curve = None
        if not addr:
            curve = curve_of(resolve(DaemonConfig, "daemon", {}, load_toml(config)))
        if addr and "://" not in addr:
            addr = net.tcp(addr)
        results = asyncio.run(_run(entries, "daemon" if addr else "embedded", addr, manager, curve,
                                   lock_timeout, jobs))
    except DfzmqError as e:
        raise fail(str(e), e.exit_code) from None
    code = exit_code(results)
    for r in results:
        if r.status == "busy":
            err_console.print(f"dfzmq sync: {r.errors[0]}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps({"exit_code": code, "entries": [vars(r) for r in results]}, indent=1))
    elif verbose or code != 0 or any(r.fetched or r.deleted for r in results):
        typer.echo(summary_line(results))
    raise typer.Exit(code)
