"""`dfzmq config`, `dfzmq preheat`, `dfzmq jobs` and `dfzmq cache`: operating a cluster's
settings, jobs and cache from the command line (issue 6 part B).

Settings and jobs are the manager's (`--manager`, DFZMQ_MANAGER, or `manager` in the config
file's [admin] section or top level, with the CURVE keys and `timeout_s`: the one operators'
config, shared with hosts/tasks/monitor in dfzmq/admin_client.py); the cache commands talk to the local daemon's control socket (`--daemon`,
DFZMQ_DAEMON or the daemon at the default data directory), as `dfzmq fetch` does.
Tables for people, `--json` for scripts. Exit codes: 0 done, 1 refused or failed,
2 bad input, 3 a job or export failed, 4 manager or daemon not answering.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from dfzmq import net, settings, wire
from dfzmq.cli import (ConfigOpt, _default_daemon, _Progress, app, err_console, fail, fetch_via_daemon,
                       run_guarded)
from dfzmq.admin_client import Refused, admin_config
from dfzmq.admin_client import request as ask
from dfzmq.config import curve_of
from dfzmq.errors import DfzmqError, DownloadError, UnavailableError

out = Console(highlight=False, soft_wrap=True)

ManagerOpt = Annotated[Optional[str], typer.Option(envvar="DFZMQ_MANAGER", help="HOST:PORT of the manager.")]
DaemonOpt = Annotated[Optional[str], typer.Option(envvar="DFZMQ_DAEMON", help="Control socket of the local daemon.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _manager(manager: str | None, config: Path | None) -> tuple[str, Any, float]:
    """The manager's address, CURVE keys and answer timeout: [admin], as for hosts/tasks/monitor."""
    cfg = admin_config(manager, None, config)
    return net.tcp(cfg.manager), curve_of(cfg), cfg.timeout_s


def create_job(addr: str, msg: wire.JobCreate, curve: Any, timeout_s: float, patience_s: float = 15.0) -> wire.JobInfo:
    """JobCreate, asked again while a just-started manager waits for hosts to check in."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return ask(addr, msg, curve, timeout_s).job
        except Refused as e:
            if e.code != "starting" or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _dump(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


# -- config -------------------------------------------------------------------------------------

config_app = typer.Typer(no_args_is_help=True, help="Cluster-wide settings kept by the manager.")
app.add_typer(config_app, name="config")


@config_app.command("get")
def config_get(key: Annotated[Optional[str], typer.Argument(help="One setting (default: all).")] = None,
               manager: ManagerOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Show the cluster settings; keys not set use each member's own setting."""
    if key is not None and key.replace("-", "_") not in settings.KEYS:
        raise fail(f"unknown setting {key!r} (known: {', '.join(sorted(settings.KEYS))})", 2)
    addr, curve, wait_s = run_guarded(_manager, manager, config)
    state = run_guarded(ask, addr, wire.ConfigGet(), curve, wait_s)
    if key is not None:
        value = state.config.get(key.replace("-", "_"))
        if as_json:
            _dump(value)
        else:
            typer.echo("(unset)" if value is None else value)
        return
    if as_json:
        _dump(state.config)
        return
    table = Table("setting", "cluster value", "applies to", "meaning", title=f"cluster settings (seq {state.seq})")
    for name, spec in sorted(settings.KEYS.items()):
        v = state.config.get(name)
        table.add_row(name, "-" if v is None else str(v), spec.role, spec.help)
    out.print(table)


@config_app.command("set")
def config_set(key: str, value: str, manager: ManagerOpt = None, config: ConfigOpt = None) -> None:
    """Set KEY to VALUE cluster-wide; running members apply it within seconds."""
    run_guarded(settings.parse, key, value)  # a bad key or value fails here, before any network
    addr, curve, wait_s = run_guarded(_manager, manager, config)
    state = run_guarded(ask, addr, wire.ConfigSet(key, value), curve, wait_s)
    typer.echo(f"{key.replace('-', '_')} = {state.config.get(key.replace('-', '_'))}")


@config_app.command("unset")
def config_unset(key: str, manager: ManagerOpt = None, config: ConfigOpt = None) -> None:
    """Remove KEY cluster-wide; members fall back to their own setting."""
    if key.replace("-", "_") not in settings.KEYS:
        raise fail(f"unknown setting {key!r} (known: {', '.join(sorted(settings.KEYS))})", 2)
    addr, curve, wait_s = run_guarded(_manager, manager, config)
    run_guarded(ask, addr, wire.ConfigSet(key, None, unset=True), curve, wait_s)
    typer.echo(f"{key.replace('-', '_')} unset")


# -- jobs ---------------------------------------------------------------------------------------


def job_dict(job: wire.JobInfo) -> dict:
    """A job for people and scripts: header values are secrets (registry tokens), never shown."""
    return {"job_id": job.job_id, "kind": job.kind, "state": job.state, "scope": job.scope,
            "urls": job.urls, "note": job.note, "created": job.created, "finished": job.finished,
            "hosts": {h: {"hostname": job.hostnames.get(h, ""), "state": s, "error": job.errors.get(h, "")}
                      for h, s in job.hosts.items()},
            "headers": sorted(job.headers)}


def _when(t: float) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def jobs_table(jobs: list[wire.JobInfo]) -> Table:
    table = Table(box=None, pad_edge=False)
    for name in ("job", "kind", "state", "scope", "hosts done", "created", "took"):
        table.add_column(name, no_wrap=True)
    table.add_column("what", overflow="fold")
    for j in jobs:
        done = sum(1 for s in j.hosts.values() if s in ("succeeded", "failed"))
        failed = sum(1 for s in j.hosts.values() if s == "failed")
        style = {"succeeded": "green", "failed": "red"}.get(j.state, "yellow")
        what = j.note or (j.urls[0] + (f" (+{len(j.urls) - 1})" if len(j.urls) > 1 else ""))
        took = f"{j.finished - j.created:.1f}s" if j.finished else "-"
        table.add_row(j.job_id, j.kind, f"[{style}]{j.state}[/]", j.scope,
                      f"{done}/{len(j.hosts)}" + (f", {failed} failed" if failed else ""),
                      _when(j.created), took, what)
    return table


def wait_job(addr: str, curve: Any, job: wire.JobInfo, timeout_s: float) -> wire.JobInfo:
    deadline = time.monotonic() + timeout_s
    misses = 0
    while job.state == "running":
        if time.monotonic() > deadline:
            raise UnavailableError(f"job {job.job_id} still running after {timeout_s:.0f}s (dfzmq jobs {job.job_id})")
        time.sleep(0.3)
        try:
            job = ask(addr, wire.JobGet(job.job_id), curve, timeout_s=2.0).job
            misses = 0
        except UnavailableError:
            misses += 1  # a manager restarting: it keeps jobs in LMDB, ask again
            if misses > 30:
                raise
    return job


def _finish_job(job: wire.JobInfo, as_json: bool) -> None:
    if as_json:
        _dump(job_dict(job))
    else:
        for h, err in sorted(job.errors.items()):
            err_console.print(f"  {h}: {err}", highlight=False, soft_wrap=True)
        typer.echo(f"job {job.job_id} {job.state}")
    if job.state == "failed":
        raise typer.Exit(3)


@app.command()
def jobs(job_id: Annotated[Optional[str], typer.Argument(help="One job, with its hosts.")] = None,
         limit: Annotated[int, typer.Option(help="Newest N jobs.")] = 50,
         manager: ManagerOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List the manager's jobs (preheat, cache removal), newest first."""
    addr, curve, wait_s = run_guarded(_manager, manager, config)
    if job_id is not None:
        job = run_guarded(ask, addr, wire.JobGet(job_id), curve, wait_s).job
        if as_json:
            _dump(job_dict(job))
            return
        out.print(jobs_table([job]))
        hosts = Table("host", "hostname", "state", "error", box=None, pad_edge=False)
        for h, s in sorted(job.hosts.items()):
            hosts.add_row(h, job.hostnames.get(h, ""), s, job.errors.get(h, ""))
        out.print(hosts)
        for u in job.urls:
            typer.echo(u)
        return
    reply = run_guarded(ask, addr, wire.JobList(limit), curve, wait_s)
    if as_json:
        _dump([job_dict(j) for j in reply.jobs])
    else:
        out.print(jobs_table(reply.jobs))


@app.command()
def preheat(
    urls: Annotated[Optional[list[str]], typer.Argument(help="URLs to fetch ahead of demand.")] = None,
    image: Annotated[Optional[str], typer.Option(help="REGISTRY/NAME:TAG: preheat the image's blobs.")] = None,
    platform: Annotated[str, typer.Option(help="OS/ARCH, or OS/ARCH/VARIANT, to pick from a multi-platform image.")] = "linux/amd64",
    plain_http: Annotated[Optional[bool], typer.Option("--plain-http/--https", help="Registry scheme (default: http for localhost only).")] = None,
    registry_user: Annotated[str, typer.Option(envvar="DFZMQ_REGISTRY_USER", help="For the registry's token service.")] = "",
    registry_password: Annotated[str, typer.Option(envvar="DFZMQ_REGISTRY_PASSWORD", help="For the registry's token service.")] = "",
    scope: Annotated[str, typer.Option(help="seeds: the seed peers; all: every daemon.")] = "seeds",
    header: Annotated[list[str], typer.Option("--header", "-H", help="Header for the origin, 'Name: value'.")] = [],
    tag: Annotated[str, typer.Option(help="Task tag, as given to fetch.")] = "",
    application: Annotated[str, typer.Option(help="Application, as given to fetch.")] = "",
    wait: Annotated[bool, typer.Option("--wait", help="Wait until every host is done.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds.")] = 3600.0,
    manager: ManagerOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None,
) -> None:
    """Have seed peers (or every daemon) fetch URLs or an image before anyone asks for them."""
    from dfzmq.cli import _parse_headers

    if bool(urls) == bool(image):
        raise fail("give URLs or --image, not both and not neither", 2)
    if scope not in ("seeds", "all"):
        raise fail(f"bad scope {scope!r}: use seeds or all", 2)
    headers = run_guarded(_parse_headers, header)
    addr, curve, wait_s = run_guarded(_manager, manager, config)
    digests: dict[str, str] = {}
    note = ""
    if image:
        from dfzmq.registry import resolve_image

        res = run_guarded(asyncio.run, resolve_image(image, platform, plain_http, registry_user, registry_password))
        urls, digests, note = res.urls, res.digests, f"{image} ({platform})"
        headers = {**headers, **res.headers}
        if not as_json:
            err_console.print(f"{image}: {len(urls)} blobs, {res.size / 2**20:.1f} MiB (manifest {res.manifest_digest or '?'})",
                              highlight=False)
    else:
        for u in urls:
            if "://" not in u:
                raise fail(f"not a URL: {u!r}", 2)
            if not u.lower().startswith(("http://", "https://")):
                raise fail(f"cannot preheat {u!r}: only http:// and https:// URLs (seeds never read their own disk "
                           "for the cluster; `dfzmq cache import` puts a local file in)", 2)
    job = run_guarded(create_job, addr, wire.JobCreate("preheat", list(urls), scope, headers, tag, application,
                                                       note, digests), curve, wait_s)
    if not wait:
        if as_json:
            _dump(job_dict(job))
        else:
            typer.echo(job.job_id)
        return
    if not as_json:
        err_console.print(f"job {job.job_id}: {len(job.urls)} URL(s) on {len(job.hosts)} host(s)", highlight=False)
    _finish_job(run_guarded(wait_job, addr, curve, job, timeout), as_json)


# -- cache --------------------------------------------------------------------------------------

cache_app = typer.Typer(no_args_is_help=True, help="Files put into the cluster by hand (like Dragonfly's dfcache).")
app.add_typer(cache_app, name="cache")


def _daemon(daemon: str | None) -> str:
    addr = daemon or _default_daemon()
    if not addr:
        raise fail("no local daemon: give --daemon or DFZMQ_DAEMON", 4)
    return net.tcp(addr) if "://" not in addr else addr


def _cache(daemon: str | None, msg: Any, timeout_s: float) -> dict:
    reply = ask(_daemon(daemon), msg, timeout_s=timeout_s)
    if not isinstance(reply, wire.CacheResult):
        raise Refused(f"unexpected answer {type(reply).__name__}")
    if not reply.ok:
        raise DownloadError(reply.error)
    return reply.info


@cache_app.command("import")
def cache_import(file: Annotated[Path, typer.Argument(help="The file to put into the cluster.")],
                 cache_id: Annotated[Optional[str], typer.Option("--id", help="Its id (default: its blake3 digest).")] = None,
                 daemon: DaemonOpt = None, as_json: JsonOpt = False) -> None:
    """Store FILE in the local daemon and announce it; prints the id to export it by."""
    from nodes.ops import CACHE_ID

    path = file.expanduser().absolute()
    if not path.is_file():
        raise fail(f"not a file: {file}", 2)
    if cache_id is not None and not CACHE_ID.match(cache_id):
        raise fail(f"bad cache id {cache_id!r}: 1-128 letters, digits, '.', '_' or '-'", 2)
    info = run_guarded(_cache, daemon, wire.CacheImport(uuid.uuid4().hex, str(path), cache_id or ""), 600.0)
    if as_json:
        _dump(info)
    else:
        typer.echo(info["cache_id"])


@cache_app.command("export")
def cache_export(cache_id: str, output: Annotated[Path, typer.Option("--output", "-O", help="Where to write it.")],
                 daemon: DaemonOpt = None, quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False) -> None:
    """Fetch cache entry ID from the cluster (peer to peer) into PATH, verified by blake3."""
    from nodes.ops import CACHE_ID, cache_url

    if not CACHE_ID.match(cache_id):
        raise fail(f"bad cache id {cache_id!r}", 2)
    # An id that is a blake3 digest is checked end to end as well as against the manifest.
    digest = f"blake3:{cache_id}" if len(cache_id) == 64 and all(c in "0123456789abcdef" for c in cache_id) else ""
    req = wire.Download(uuid.uuid4().hex, cache_url(cache_id), str(output.expanduser().absolute()), digest)
    progress = _Progress(not quiet and err_console.is_terminal, output.name)
    try:
        run_guarded(fetch_via_daemon, _daemon(daemon), req, progress)
    finally:
        progress.close()


@cache_app.command("stat")
def cache_stat(cache_id: str, daemon: DaemonOpt = None, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Who holds cache entry ID, and its size (the local daemon, then the entry's scheduler)."""
    info = run_guarded(_cache, daemon, wire.CacheStat(uuid.uuid4().hex, cache_id), 5.0)
    _, curve, _ = run_guarded(_manager, None, config)  # the cluster's CURVE key, if any
    holders: list[dict] = []
    sched = info.get("scheduler") or {}
    if sched.get("addr"):
        try:
            reply = ask(sched["addr"], wire.SnapshotRequest(), curve, timeout_s=5.0)
            snap = reply.info.get("snapshot", {}) if isinstance(reply, wire.StatReply) else {}
        except DfzmqError:
            snap = {}
        hostnames = {h["host_id"]: h.get("hostname", "") for h in snap.get("hosts", [])}
        for t in snap.get("tasks", []):
            if t.get("task_id") == info["task_id"]:
                if info["content_length"] < 0:
                    info["content_length"] = t.get("content_length", -1)
                holders = [{"host_id": p["host_id"], "hostname": hostnames.get(p["host_id"], ""), "state": p["state"]}
                           for p in t.get("peers", []) if p.get("state") == "Succeeded"]
    info["holders"] = holders
    if as_json:
        _dump(info)
    if not info["held"] and not holders:
        raise fail(f"cache entry {cache_id} is not in the cluster", 1)
    if not as_json:
        typer.echo(f"{cache_id}: {info['content_length']} bytes, held here: {'yes' if info['held'] else 'no'}")
        for h in holders:
            typer.echo(f"  {h['host_id']}")


@cache_app.command("rm")
def cache_rm(cache_id: str,
             cluster: Annotated[bool, typer.Option("--cluster", help="Remove it from every daemon (a manager job).")] = False,
             daemon: DaemonOpt = None, manager: ManagerOpt = None, config: ConfigOpt = None,
             timeout: Annotated[float, typer.Option(help="With --cluster: wait this long.")] = 120.0) -> None:
    """Remove cache entry ID here (default) or from every daemon (--cluster)."""
    from nodes.ops import CACHE_ID, cache_url

    if not CACHE_ID.match(cache_id):
        raise fail(f"bad cache id {cache_id!r}", 2)
    if not cluster:
        info = run_guarded(_cache, daemon, wire.CacheRemove(uuid.uuid4().hex, cache_id), 60.0)
        if not info.get("removed"):
            raise fail(f"cache entry {cache_id} is not held here", 1)
        typer.echo(f"removed {cache_id} ({info.get('freed_bytes', 0)} bytes freed)")
        return
    addr, curve, wait_s = run_guarded(_manager, manager, config)
    job = run_guarded(create_job, addr, wire.JobCreate("cache-rm", [cache_url(cache_id)], "all", note=f"cache rm {cache_id}"),
                      curve, wait_s)
    _finish_job(run_guarded(wait_job, addr, curve, job, timeout), False)
