"""The `dfzmq` command line: services (manager, scheduler, daemon, up) and clients (fetch).

The only place that configures logging handlers, turns DfzmqError into a one-line message
and an exit code, and reads flags, DFZMQ_* environment variables and the TOML config file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import zmq
from rich.console import Console
from rich.logging import RichHandler

from dfzmq import ids, net, wire
from dfzmq.config import DaemonConfig, ManagerConfig, SchedulerConfig, curve_of, load_toml, resolve
from dfzmq.errors import ConfigError, DfzmqError, DownloadError, UnavailableError
from dfzmq.service import StopFlag

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="dfzmq: peer-to-peer file distribution over ZeroMQ.")
err_console = Console(stderr=True)
log = logging.getLogger("dfzmq")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", envvar="DFZMQ_CONFIG",
                                                   help="TOML config file.")]
LogOpt = Annotated[str, typer.Option("--log-level", envvar="DFZMQ_LOG_LEVEL", help="debug, info, warning.")]
MetricsOpt = Annotated[Optional[str], typer.Option("--metrics", help="HOST:PORT to serve Prometheus /metrics on (off by default).")]


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=False)],
    )


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]dfzmq: error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def run_guarded(fn, *args: Any) -> Any:
    try:
        return fn(*args)
    except DfzmqError as e:
        raise fail(str(e), e.exit_code) from None


def _print_ready(what: str, info: dict) -> None:
    log.info("%s ready: %s", what, " ".join(f"{k}={v}" for k, v in info.items()))


# -- services -----------------------------------------------------------------------------------


@app.command()
def manager(
    listen: Annotated[Optional[str], typer.Option(help="HOST:PORT of the ROUTER (PUB on PORT+1).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Directory of the manager's LMDB state.")] = None,
    advertise: Annotated[Optional[str], typer.Option(help="Host others use to reach this manager.")] = None,
    metrics: MetricsOpt = None,
    config: ConfigOpt = None,
    log_level: LogOpt = "info",
) -> None:
    """Run the manager: cluster membership, scheduler list, cluster settings."""
    setup_logging(log_level)
    from brokers.manager.service import serve

    cfg = run_guarded(resolve, ManagerConfig, "manager",
                      {"listen": listen, "data": data, "advertise": advertise, "metrics": metrics},
                      load_toml(config))
    stop = StopFlag()
    stop.install_signals()
    curve = run_guarded(curve_of, cfg)
    run_guarded(lambda: serve(cfg, zmq.Context(), stop, lambda info: _print_ready("manager", info), curve=curve))


@app.command()
def scheduler(
    manager: Annotated[Optional[str], typer.Option(help="HOST:PORT of the manager.")] = None,
    listen: Annotated[Optional[str], typer.Option(help="HOST:PORT of the ROUTER (events PUB on PORT+1).")] = None,
    advertise: Annotated[Optional[str], typer.Option(help="Host peers use to reach this scheduler.")] = None,
    metrics: MetricsOpt = None,
    config: ConfigOpt = None,
    log_level: LogOpt = "info",
) -> None:
    """Run a scheduler: picks parents for peers, triggers seed peers."""
    setup_logging(log_level)
    from brokers.scheduler.service import serve

    cfg = run_guarded(resolve, SchedulerConfig, "scheduler",
                      {"manager": manager, "listen": listen, "advertise": advertise, "metrics": metrics},
                      load_toml(config))
    stop = StopFlag()
    stop.install_signals()
    curve = run_guarded(curve_of, cfg)
    # A stable id (host and address) so a restarted scheduler is the same member, not a new one
    # next to a ghost of itself in the manager's list.
    sched_id = None if cfg.listen.endswith(":0") else "scheduler-" + ids.host_id(salt=cfg.listen + cfg.advertise)
    run_guarded(lambda: serve(cfg, zmq.Context(), stop, lambda info: _print_ready("scheduler", info),
                              scheduler_id=sched_id, curve=curve))


@app.command()
def daemon(
    manager: Annotated[Optional[str], typer.Option(help="HOST:PORT of the manager.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Directory of the piece store and control socket.")] = None,
    seed: Annotated[Optional[bool], typer.Option("--seed/--no-seed", help="Run as a seed peer.")] = None,
    listen: Annotated[Optional[str], typer.Option(help="HOST:PORT of the upload server (port 0: any).")] = None,
    advertise: Annotated[Optional[str], typer.Option(help="Host other peers use to reach this one.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Use this scheduler instead of asking the manager.")] = None,
    control: Annotated[Optional[str], typer.Option(help="Control socket (default ipc://DATA/control.sock).")] = None,
    proxy_listen: Annotated[Optional[str], typer.Option(help="Serve the HTTP proxy / registry mirror here (HOST:PORT or PORT).")] = None,
    metrics: MetricsOpt = None,
    config: ConfigOpt = None,
    log_level: LogOpt = "info",
) -> None:
    """Run a peer daemon (or, with --seed, a seed peer)."""
    setup_logging(log_level)
    from nodes.daemon import run_daemon
    from nodes.memtune import keep_freed_buffers

    keep_freed_buffers()  # piece buffers reused, not fresh pages per piece (nodes/memtune.py)

    cfg = run_guarded(resolve, DaemonConfig, "daemon",
                      {"manager": manager, "data": data, "seed": seed, "listen": listen,
                       "advertise": advertise, "scheduler": scheduler, "control": control,
                       "proxy_listen": proxy_listen, "metrics": metrics},
                      load_toml(config))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_daemon(cfg, stop, lambda info: _print_ready("daemon", info), curve_of(cfg))

    run_guarded(asyncio.run, main())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                "help_option_names": []})
def lab(ctx: typer.Context) -> None:
    """The shaped multi-host network lab (root): `dfzmq lab run --peers 8 --size-mib 64 ...`,
    `dfzmq lab cleanup`; `dfzmq lab run --help` lists the options."""
    from tools.netlab import main as lab_main

    raise typer.Exit(lab_main(ctx.args or ["--help"]))


@app.command()
def keygen() -> None:
    """Print a new CURVE key pair for a cluster, as TOML to put in every member's config."""
    pub, sec = zmq.curve_keypair()
    typer.echo(f'curve_public = "{pub.decode()}"\ncurve_secret = "{sec.decode()}"')


# -- fetch ----------------------------------------------------------------------------------------


def _parse_headers(headers: list[str]) -> dict[str, str]:
    out = {}
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"bad header {h!r}: expected 'Name: value'")
        out[name.strip()] = value.strip()
    return out


class _Progress:
    """A rich progress bar on a terminal; nothing otherwise."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.bar = None
        if enabled:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TimeRemainingColumn,
                                       TransferSpeedColumn)
            self.bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), console=err_console,
                                transient=True)
            self.bar.start()
            self.task = self.bar.add_task(label, total=None)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total if total >= 0 else None)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def fetch_via_daemon(addr: str, req: wire.Download, progress, patience_s: float = 60.0) -> dict:
    """Ask a daemon over its control socket. A daemon that dies mid-download (and comes back
    within `patience_s`) is asked again: it resumes from the pieces it kept."""
    ctx = zmq.Context()
    silent_limit_s = 5.0
    deadline = time.monotonic() + patience_s
    answered = False
    try:
        while True:
            sock = net.make_socket(ctx, "control_dealer")
            sock.connect(addr)
            sock.send_multipart(wire.encode(req))
            last = time.monotonic()
            try:
                while time.monotonic() - last < silent_limit_s:
                    if not sock.poll(200):
                        continue
                    msg = wire.decode(sock.recv_multipart())
                    last = time.monotonic()
                    answered = True
                    if isinstance(msg, wire.DownloadProgress) and msg.request_id == req.request_id:
                        progress(msg.done_bytes, msg.total_bytes)
                    elif isinstance(msg, wire.DownloadResult) and msg.request_id == req.request_id:
                        if msg.ok:
                            return msg.stats
                        raise DownloadError(msg.error)
                    elif isinstance(msg, wire.Error):
                        raise DownloadError(f"daemon refused the request: {msg.code} {msg.detail}")
            finally:
                sock.close(0)
            if not answered or time.monotonic() > deadline:
                raise UnavailableError(f"daemon at {addr} is not answering")
            log.warning("daemon at %s went silent; asking again", addr)
    finally:
        ctx.term()


def fetch_embedded(req: wire.Download, manager: str | None, progress, curve=None) -> dict:
    """A one-shot peer in this process: through the cluster with a manager, else from source."""
    from nodes.daemon import Daemon
    from nodes.memtune import keep_freed_buffers

    keep_freed_buffers()

    tmp = Path(tempfile.mkdtemp(prefix="dfzmq-fetch-"))
    cfg = DaemonConfig(manager=manager or "", data=tmp, listen="0.0.0.0:0" if manager else "127.0.0.1:0",
                       control=f"ipc://{tmp}/control.sock", map_size=1 << 36)

    async def go() -> dict:
        d = Daemon(cfg, curve)
        await d.start(use_manager=bool(manager))
        try:
            return await d.download(req.url, req.output, req.digest, req.headers, req.tag,
                                    req.application, progress)
        finally:
            await d.stop()

    try:
        return asyncio.run(go())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_daemon() -> str | None:
    """The local daemon's control socket, if one is running at the default place."""
    data = Path(os.environ.get("DFZMQ_DATA", DaemonConfig().data))
    sock = data / "control.sock"
    return f"ipc://{sock}" if sock.exists() else None


@app.command()
def fetch(
    url: Annotated[str, typer.Argument(help="http://, https:// or file:// URL.")],
    output: Annotated[Path, typer.Option("--output", "-O", help="Where to write the file.")],
    daemon: Annotated[Optional[str], typer.Option(envvar="DFZMQ_DAEMON",
                                                  help="Control socket of a local daemon (ipc://... or tcp://...).")] = None,
    manager: Annotated[Optional[str], typer.Option(envvar="DFZMQ_MANAGER",
                                                   help="Without a daemon: join this cluster as a one-shot peer.")] = None,
    digest: Annotated[Optional[str], typer.Option(help="Verify the whole file: sha256:HEX or blake3:HEX.")] = None,
    header: Annotated[list[str], typer.Option("--header", "-H", help="Header for the origin, 'Name: value'.")] = [],
    tag: Annotated[str, typer.Option(help="Task tag: same URL, different tag, different task.")] = "",
    application: Annotated[str, typer.Option(help="Application name, part of the task id.")] = "",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    config: ConfigOpt = None,
    log_level: LogOpt = "error",
) -> None:
    """Download URL to the --output path through the local daemon, a one-shot peer, or straight from source."""
    setup_logging(log_level)
    req = wire.Download(uuid.uuid4().hex, url, str(output.expanduser().absolute()), digest or "",
                        run_guarded(_parse_headers, header), tag, application)
    if digest:
        from nodes.sink import parse_digest
        run_guarded(parse_digest, digest)
    progress = _Progress(not quiet and err_console.is_terminal, output.name)
    try:
        addr = daemon or (None if manager else _default_daemon())
        if addr:
            stats = run_guarded(fetch_via_daemon, net.tcp(addr) if "://" not in addr else addr, req, progress)
        else:
            dcfg = run_guarded(resolve, DaemonConfig, "daemon", {}, load_toml(config))
            stats = run_guarded(fetch_embedded, req, manager, progress, run_guarded(curve_of, dcfg))
    finally:
        progress.close()
    if err_console.is_terminal and not quiet:
        err_console.print(f"{output}: {stats.get('content_length', 0)} bytes in {stats.get('elapsed_s', 0)}s "
                          f"(origin {stats.get('origin_bytes', 0)}, peers "
                          f"{stats.get('peer_bytes', 0) + stats.get('seed_bytes', 0)})", highlight=False)


# -- up ---------------------------------------------------------------------------------------------


@app.command()
def up(
    data: Annotated[Path, typer.Option(help="Where the cluster keeps its state.")] = Path("./dfzmq-up"),
    manager_port: Annotated[int, typer.Option(help="Manager port (scheduler uses +10).")] = 8900,
    peers: Annotated[int, typer.Option(help="Peer daemons besides the seed peer.")] = 1,
    log_level: LogOpt = "info",
) -> None:
    """Run a whole cluster on this machine: manager, scheduler, a seed peer and peer daemons."""
    setup_logging(log_level)
    data = data.absolute()
    mgr = f"127.0.0.1:{manager_port}"
    sched = f"127.0.0.1:{manager_port + 10}"
    exe = [sys.executable, "-m", "dfzmq"]
    specs = [
        ("manager", [*exe, "manager", "--listen", mgr, "--data", str(data / "manager")]),
        ("scheduler", [*exe, "scheduler", "--manager", mgr, "--listen", sched]),
        ("seed", [*exe, "daemon", "--seed", "--manager", mgr, "--data", str(data / "seed"),
                  "--listen", "127.0.0.1:0"]),
    ] + [
        (f"peer{i}", [*exe, "daemon", "--manager", mgr, "--data", str(data / f"peer{i}"),
                      "--listen", "127.0.0.1:0"])
        for i in range(1, peers + 1)
    ]
    procs = []
    for name, cmd in specs:
        procs.append((name, subprocess.Popen([*cmd, "--log-level", log_level])))
    err_console.print(f"[bold]dfzmq up[/]: manager {mgr}, scheduler {sched}, seed and {peers} peer(s) in {data}")
    for i in range(1, peers + 1):
        err_console.print(f"  fetch through peer{i}: dfzmq fetch URL -O PATH --daemon ipc://{data}/peer{i}/control.sock")
    err_console.print("Ctrl-C stops the cluster.")
    stop = StopFlag()
    stop.install_signals()
    try:
        while not stop:
            for name, p in procs:
                if p.poll() is not None:
                    raise fail(f"{name} exited with code {p.returncode}")
            time.sleep(0.3)
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


# Command groups kept in modules of their own register on `app` when imported (one line each).
import dfzmq.cli_ops  # noqa: E402,F401  config, preheat, jobs, cache
import dfzmq.cli_init  # noqa: E402,F401  (dfzmq init containerd|docker)
from dfzmq import cli_admin, cli_monitor  # noqa: E402,F401  hosts, tasks, task, monitor
import dfzmq.cli_sync  # noqa: E402,F401  dfzmq sync


def main() -> None:
    app()


if __name__ == "__main__":
    main()
