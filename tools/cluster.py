"""A local dfzmq cluster of real processes, for tests, the demo and the benchmarks.

`LocalCluster` starts a manager, schedulers, seed peers and peer daemons as separate
`python -m dfzmq ...` processes on loopback, each with its own data directory, waits until each
is really serving (not a sleep: it asks them), and stops every process it started, also on
failure. It talks to services only through their public sockets and the CLI.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from dfzmq import net, wire


def _ephemeral_low() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port that was free a moment ago, with the next one free too (services use PORT+1).

    Chosen below the kernel's ephemeral range, so that no outgoing connection (of which a test
    run makes thousands on loopback) can take it between this check and the service's bind.
    """
    top = max(11000, _ephemeral_low() - 2)
    for _ in range(200):
        port = random.randrange(10000, top)
        try:
            with socket.socket() as s, socket.socket() as s2:
                s.bind(("127.0.0.1", port))
                s2.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


def request(addr: str, msg, timeout_s: float = 2.0, curve: net.Curve | None = None):
    """One request/reply over a fresh DEALER; None on timeout."""
    ctx = zmq.Context()
    sock = net.make_socket(ctx, "control_dealer", curve)
    try:
        sock.connect(addr)
        sock.send_multipart(wire.encode(msg))
        if sock.poll(int(timeout_s * 1000)):
            return wire.decode(sock.recv_multipart())
        return None
    finally:
        sock.close(0)
        ctx.term()


@dataclass
class Proc:
    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self, env: dict[str, str]) -> None:
        out = open(self.log, "ab")
        self.popen = subprocess.Popen([sys.executable, "-m", "dfzmq", *self.args], stdout=out,
                                      stderr=subprocess.STDOUT, env={**env, **self.extra_env},
                                      start_new_session=True,
                                      # `-m dfzmq` imports from the working directory first: run
                                      # this checkout's code even when started from another one.
                                      cwd=Path(__file__).resolve().parent.parent)
        out.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self, timeout_s: float = 5.0) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class LocalCluster:
    def __init__(self, root: Path, peers: int = 2, seeds: int = 1, schedulers: int = 1,
                 interval_s: float = 0.5, log_level: str = "info", extra_daemon_args: list[str] | None = None,
                 curve: bool = False, daemon_env: dict[str, dict[str, str]] | None = None,
                 metrics: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.interval_s = interval_s
        self.log_level = log_level
        self.manager_port = free_port()
        self.manager_addr = f"127.0.0.1:{self.manager_port}"
        self.procs: dict[str, Proc] = {}
        cfg = self.root / "cluster.toml"
        self.curve = None
        keys = ""
        if curve:
            pub, sec = zmq.curve_keypair()
            self.curve = net.Curve(pub, sec)
            keys = f'curve_public = "{pub.decode()}"\ncurve_secret = "{sec.decode()}"\n'
        cfg.write_text(
            keys + f"heartbeat_interval_s = {interval_s}\n"
            "[daemon]\nschedule_timeout_s = 5.0\nstall_timeout_s = 8.0\n"
        )
        self.config = cfg
        self._add("manager", ["manager", "--listen", self.manager_addr, "--data", str(self.root / "manager")])
        self.scheduler_addrs = []
        for i in range(schedulers):
            port = free_port()
            self.scheduler_addrs.append(f"127.0.0.1:{port}")
            self._add(f"scheduler{i}", ["scheduler", "--manager", self.manager_addr, "--listen", f"127.0.0.1:{port}"])
        self.seeds = [f"seed{i}" for i in range(seeds)]
        self.peers = [f"peer{i}" for i in range(1, peers + 1)]
        for name in self.seeds + self.peers:
            args = ["daemon", "--manager", self.manager_addr, "--data", str(self.root / name),
                    "--listen", "127.0.0.1:0", *(extra_daemon_args or [])]
            if name.startswith("seed"):
                args.append("--seed")
            self._add(name, args)
            self.procs[name].extra_env = dict((daemon_env or {}).get(name, {}))
        # With metrics, every process serves /metrics on a port of its own: metrics_url(name).
        self.metrics_addrs: dict[str, str] = {}
        if metrics:
            for name, p in self.procs.items():
                self.metrics_addrs[name] = f"127.0.0.1:{free_port()}"
                p.args[1:1] = ["--metrics", self.metrics_addrs[name]]

    def metrics_url(self, name: str) -> str:
        return f"http://{self.metrics_addrs[name]}/metrics"

    def _add(self, name: str, args: list[str]) -> None:
        self.procs[name] = Proc(name, [*args, "--config", str(self.config), "--log-level", self.log_level],
                                self.root / f"{name}.log")

    def env(self=None) -> dict[str, str]:
        """The environment for dfzmq processes: this checkout importable, no stray DFZMQ_*."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("DFZMQ_DAEMON", None)
        env.pop("DFZMQ_MANAGER", None)
        return env

    def control(self, name: str) -> str:
        return f"ipc://{self.root / name}/control.sock"

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout_s: float = 20.0) -> "LocalCluster":
        env = self.env()
        try:
            for p in self.procs.values():
                p.start(env)
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = 20.0, names: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        want_scheds = sum(1 for n in self.procs if n.startswith("scheduler") and self.procs[n].alive())
        while True:
            for p in self.procs.values():
                if p.popen is not None and p.popen.poll() is not None:
                    raise RuntimeError(f"{p.name} exited ({p.popen.returncode}); log:\n{self.tail(p.name)}")
            reply = request(f"tcp://{self.manager_addr}", wire.ListSchedulers(), 0.5, self.curve)
            ok = isinstance(reply, wire.SchedulerList) and len(reply.schedulers) >= want_scheds
            for name in names or (self.seeds + self.peers):
                if not ok:
                    break
                st = self.stat(name, 0.5)
                ok = st is not None and want_scheds > 0 and sum(st["schedulers"].values()) >= want_scheds
            if ok:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("cluster not ready; " + "; ".join(
                    f"{n}: {self.tail(n, 3)}" for n in self.procs))
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM everything at once, then wait (a daemon flushes its store on the way out)."""
        for p in self.procs.values():
            p.signal(signal.SIGTERM)
        for p in self.procs.values():
            p.stop()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def restart(self, name: str, timeout_s: float = 20.0) -> None:
        self.procs[name].stop()
        self.procs[name].start(self.env())
        if name in self.seeds + self.peers:
            self.wait_ready(timeout_s, [name])

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join(self.procs[name].log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # -- clients ----------------------------------------------------------------------------

    def stat(self, name: str, timeout_s: float = 2.0) -> dict | None:
        reply = request(self.control(name), wire.StatRequest(), timeout_s)
        return reply.info if isinstance(reply, wire.StatReply) else None

    def fetch_cmd(self, name: str, url: str, output: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "dfzmq", "fetch", url, "-O", str(output), "--daemon",
                self.control(name), "--quiet", *extra]

    def fetch(self, name: str, url: str, output: Path, *extra: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.fetch_cmd(name, url, output, *extra), env=self.env(), capture_output=True,
                              text=True, timeout=timeout_s)

    def fetch_all(self, names: list[str], url: str, outdir: Path, timeout_s: float = 180,
                  patience_s: float = 60.0) -> dict[str, dict]:
        """Fetch on several daemons at once through their control sockets; per daemon, the stats
        (or {"error": ...}) and the wall time."""
        import threading

        from dfzmq.cli import fetch_via_daemon

        results: dict[str, dict] = {}

        def one(name: str) -> None:
            req = wire.Download(f"req-{name}", url, str(outdir / f"{name}.out"))
            t0 = time.monotonic()
            try:
                stats = fetch_via_daemon(self.control(name), req, lambda d, t: None, patience_s)
                results[name] = {**stats, "wall_s": time.monotonic() - t0}
            except Exception as e:  # reported to the caller, which asserts
                results[name] = {"error": str(e), "wall_s": time.monotonic() - t0}

        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s)
        return results
