"""A shaped multi-host network lab: how fast does dfzmq spread one file over slow, shared links?

`python tools/netlab.py run --peers N --size-mib F [rates]` builds N+1 hosts as network
namespaces (`dfzl<pid>-h0..hN`), each joined by a veth pair to one Linux bridge that lives in a
namespace of its own (`dfzl<pid>-br`), with addresses in 10.X.0.0/24 (X random per run). Each
host's upload is shaped on the egress of its own veth end, its download on the egress of the
bridge's end (htb, with a pfifo_fast queue behind it: Linux's classic default qdisc, which lets
packets marked low-delay pass bulk data, as dfzmq marks its control sockets; `--leaf-qdisc pfifo`
gives one FIFO for everything; netem when `--delay-ms` is given and the kernel has it). Host 0 is the
origin site: the counting HTTP origin (tools/origin.py), manager, scheduler and a seed peer; hosts
1..N run one peer daemon each. Every process is the real `python -m dfzmq ...` run with
`ip netns exec`. All N peers fetch a generated file at once through their daemons' control
sockets (ipc:// files, reachable from here across namespaces); every copy is checked (sha256).

The report, per run: each host's finish time; the last one over the lower bound
`max(F/us, F/d, N*F/(us + N*u))` (DESIGN.md, "What fast means here"); the time plain downloads
from the origin would take, `max(N*F/us, F/d)`; origin bytes / F (the origin's /_stats);
redundant bytes (what the peers' stats say they stored beyond N*F); bytes on the wire into each
peer (the bridge port's counters: payload plus TCP/IP and ZeroMQ overhead plus any duplicates);
and CPU use from /proc/stat and each process's /proc/PID/stat, so a run limited by the two cores
rather than by the links shows as such. `--json` prints the same as JSON.

`--trace` adds what the time went on (tools/labtrace.py): each host's uplink and downlink use
over the run (the bridge's counters sampled twice a second), where each peer's last pieces came
from and how long they waited (every daemon writes a piece trace, nodes/trace.py), and the
duplicates, timeouts and dropped parents by parent host. `--env DFZMQ_X=Y` passes a setting to
every dfzmq process, for A/B runs of one change.

What it must never do: touch anything outside what it made. Nothing is created in the root
namespace (no route, address or link), the subnet exists only inside the lab's namespaces, and
every namespace, link, process and temp dir of a run is removed on exit, Ctrl-C, SIGTERM or
failure. `cleanup` removes leftovers of earlier runs by prefix, leaving runs whose process is
still alive alone unless `--force`. Without root or `ip`, it says why and exits 0 (a skip).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `tools` and `dfzmq` of this checkout importable
    sys.path.insert(0, str(ROOT))

from dfzmq import wire  # noqa: E402
from tools.labnet import (  # noqa: E402,F401 (re-exported: the lab's API in one place)
    PREFIX, LabError, Topology, bytes_per_s, gso_segments, pick_subnet, remove_ns, sh, unavailable_reason)
from tools.labview import render  # noqa: E402,F401
from tools.cluster import request  # noqa: E402
from tools.procstat import cpu  # noqa: E402

MiB = 2**20
ORIGIN_LIMIT = 1.01  # origin bytes / F above this fails the run
RATIO_GOAL = 1.25  # issue 3's goals, reported per run
REDUNDANT_GOAL_PCT = 2.0
# Fixed ports are safe here: host 0 is a namespace of this run alone.
MANAGER_PORT, SCHEDULER_PORT, ORIGIN_PORT = 7000, 7010, 8080
FILE_NAME = "lab.bin"
SLOW_HOSTS = ("last", "first", "alternate")


# --- the run's parameters and the pure arithmetic ------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabSpec:
    peers: int = 4
    size_mib: float = 16
    peer_up_mbit: float = 100
    peer_down_mbit: float = 100
    origin_up_mbit: float = 200
    slow_half_up_mbit: float | None = None  # N//2 of the peers upload at this rate
    # Which peers are the slow half: "last" (hosts N-N//2+1..N) or "alternate" (even hosts). The
    # lab starts peers in host order and they register roughly so: "last" is a rack of slow
    # hosts that came up together (speed follows registration order, and the scheduler's first
    # choices see it before any uplink is measured); "alternate" spreads them through the order.
    slow_hosts: str = "last"
    delay_ms: float = 0  # one-way, added on every host's upload
    timeout_s: float | None = None  # default: from the plain-download time
    trace: bool = False  # sample uplinks and keep piece traces (tools/labtrace.py)
    env: tuple[tuple[str, str], ...] = ()  # extra DFZMQ_* settings for every dfzmq process (A/B runs)
    # The queue behind each shaped link: pfifo_fast (Linux's classic default qdisc: three bands by
    # IP TOS, so low-delay control packets pass bulk data) or pfifo (one FIFO for everything).
    leaf_qdisc: str = "pfifo_fast"
    # Longest packet a host hands its shaped link, in ms of that link's time. A veth passes 64 KiB
    # GSO super-packets; at 2.5 Mbit/s one takes 200 ms, and every ack or request waits behind it.
    # A real NIC puts 1500-byte frames on the wire: --packet-ms caps GSO at about this many ms
    # (0, the default, leaves it: the cap more than doubles softirq work, and two cores are few).
    packet_ms: float = 0.0
    # TCP congestion control on every host ("" keeps what new namespaces get from the machine,
    # which the report names): bbr paces each connection at its own bandwidth estimate, cubic
    # and reno fill the queue until it drops; peers see the difference on a shared slow uplink.
    congestion_control: str = ""

    @property
    def size(self) -> int:
        return int(self.size_mib * MiB)

    def up_mbit(self, host: int) -> float:
        if host == 0:
            return self.origin_up_mbit
        if self.slow_half_up_mbit is not None and self.is_slow(host):
            return self.slow_half_up_mbit
        return self.peer_up_mbit

    def is_slow(self, host: int) -> bool:
        """Whether peer `host` (1..N) is one of the N//2 slow ones."""
        if self.slow_hosts == "alternate":
            return host % 2 == 0
        if self.slow_hosts == "first":
            return host <= self.peers // 2
        return host > self.peers - self.peers // 2

    def down_mbit(self, host: int) -> float:
        # the origin site's download carries only acks and control: the seed reads the origin locally
        return self.origin_up_mbit if host == 0 else self.peer_down_mbit


def bounds(spec: LabSpec) -> tuple[float, float]:
    """(lower bound of any distribution, time of plain downloads from the origin), in seconds."""
    f, n = spec.size, spec.peers
    us, d = bytes_per_s(spec.origin_up_mbit), bytes_per_s(spec.peer_down_mbit)
    u = sum(bytes_per_s(spec.up_mbit(i)) for i in range(1, n + 1)) / n
    return max(f / us, f / d, n * f / (us + n * u)), max(n * f / us, f / d)


def read_cpu() -> list[tuple[int, int]]:
    """(busy, total) jiffies for all cores together, then per core, from /proc/stat."""
    out = []
    with open("/proc/stat") as fh:
        for line in fh:
            if not line.startswith("cpu"):
                break
            v = [int(x) for x in line.split()[1:9]]  # user..steal; guest is inside user
            out.append((sum(v) - v[3] - v[4], sum(v)))
    return out


def read_softirq() -> int:
    """Jiffies all cores spent in softirq: where veth, bridge and tc work is done."""
    with open("/proc/stat") as fh:
        return int(fh.readline().split()[7])


def cpu_busy(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[float]:
    """Percent busy between two samples, all cores first."""
    return [100.0 * (b1 - b0) / max(1, t1 - t0) for (b0, t0), (b1, t1) in zip(a, b)]


def proc_cpu_s(pid: int) -> float:
    try:
        return sum(cpu(pid))
    except (OSError, IndexError, ValueError):
        return 0.0


class CpuMonitor:
    """Samples /proc/stat twice a second, so the peak of a run is seen, not only its mean."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-monitor", daemon=True)

    def __enter__(self) -> "CpuMonitor":
        self.first = read_cpu()
        self.softirq0 = read_softirq()
        self._thread.start()
        return self

    def _run(self) -> None:
        prev = self.first
        while not self._stop.wait(self.every_s):
            cur = read_cpu()
            self.peak = max(self.peak, cpu_busy(prev, cur)[0])
            prev = cur

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.last = read_cpu()
        self.softirq_pct = 100.0 * (read_softirq() - self.softirq0) / max(1, self.last[0][1] - self.first[0][1])

    def busy(self) -> list[float]:
        return cpu_busy(self.first, self.last)


# --- processes inside the namespaces --------------------------------------------------------------


@dataclass
class NsProc:
    name: str
    ns: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None

    def start(self, base_env: dict[str, str]) -> None:
        with open(self.log, "ab") as out:
            # `ip netns exec` execs the command: popen.pid is the service itself. In this tree's
            # root: `python -m` puts the working directory first on sys.path, ahead of
            # PYTHONPATH, so a lab started from another checkout ran that checkout's code (an
            # A/B of two trees run from one of them compared it with itself).
            self.popen = subprocess.Popen(["ip", "netns", "exec", self.ns, *self.argv], stdout=out,
                                          stderr=subprocess.STDOUT, env={**base_env, **self.env},
                                          start_new_session=True, cwd=ROOT)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout_s: float = 5.0) -> None:
        if not self.alive():
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFZMQ_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MiB))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


class Lab:
    """One run: the network, the processes, the distribution, the report. `close()` undoes all."""

    def __init__(self, spec: LabSpec, keep: bool = False) -> None:
        if spec.peers < 1 or spec.size <= 0:
            raise LabError("need at least one peer and a non-empty file")
        if spec.slow_hosts not in SLOW_HOSTS:
            raise LabError(f"slow_hosts is one of {', '.join(SLOW_HOSTS)}, not {spec.slow_hosts!r}")
        self.spec = spec
        self.keep = keep
        self.run_id = f"{PREFIX}{os.getpid()}"
        self.work = Path(tempfile.mkdtemp(prefix=f"{self.run_id}-"))
        self.topo = Topology(self.run_id, spec.peers + 1, pick_subnet())
        self.procs: dict[str, NsProc] = {}
        self.daemons: list[str] = []

    def control(self, name: str) -> str:
        return f"ipc://{self.work / name}/control.sock"

    @property
    def url(self) -> str:
        return f"http://{self.topo.ip(0)}:{ORIGIN_PORT}/{FILE_NAME}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.topo.build(self.spec)
        www = self.work / "www"
        www.mkdir()
        self.sha256 = make_file(www / FILE_NAME, self.spec.size)
        h0, ns0 = self.topo.ip(0), self.topo.ns[0]
        manager = f"{h0}:{MANAGER_PORT}"
        py = [sys.executable]
        self._add("origin", ns0, [*py, "-m", "tools.origin", "--root", str(www), "--host", h0,
                                  "--port", str(ORIGIN_PORT), "--port-file", str(self.work / "origin.port")])
        extra = dict(self.spec.env)
        self._add("manager", ns0, [*py, "-m", "dfzmq", "manager", "--listen", manager,
                                   "--data", str(self.work / "manager")], extra)
        self._add("scheduler", ns0, [*py, "-m", "dfzmq", "scheduler", "--manager", manager,
                                     "--listen", f"{h0}:{SCHEDULER_PORT}", "--advertise", h0], extra)
        for i in range(self.spec.peers + 1):
            name = f"h{i}"
            ip = self.topo.ip(i)
            args = [*py, "-m", "dfzmq", "daemon", "--manager", manager, "--data", str(self.work / name),
                    "--listen", f"{ip}:0", "--advertise", ip]
            env = {**dict(self.spec.env), "DFZMQ_HOSTNAME": f"{self.run_id}-{name}"}
            if self.spec.trace:
                env["DFZMQ_PIECE_TRACE"] = str(self.work / f"{name}.trace")
            self._add(name, self.topo.ns[i], args + (["--seed"] if i == 0 else []), env)
            self.daemons.append(name)
        env = child_env()
        for p in self.procs.values():
            p.start(env)
        self._wait_ready(timeout_s)

    def _add(self, name: str, ns: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.procs[name] = NsProc(name, ns, argv, self.work / f"{name}.log", env or {})

    def stat(self, name: str, timeout_s: float = 1.0) -> dict | None:
        reply = request(self.control(name), wire.StatRequest(), timeout_s)
        return reply.info if isinstance(reply, wire.StatReply) else None

    def _wait_ready(self, timeout_s: float) -> None:
        """Ready when the origin wrote its port and every daemon (seed included) holds a live link
        to a scheduler, which it can only have found through the manager."""
        deadline = time.monotonic() + timeout_s
        pending = set(self.daemons)
        while True:
            for p in self.procs.values():
                if not p.alive():
                    raise LabError(f"{p.name} exited ({p.popen.returncode}); log:\n{p.tail()}")
            for name in sorted(pending):
                st = self.stat(name, 0.5)
                if st is not None and any(st["schedulers"].values()):
                    pending.discard(name)
            if not pending and (self.work / "origin.port").exists():
                return
            if time.monotonic() > deadline:
                raise LabError("lab not ready in time; waiting for " + ", ".join(sorted(pending) or ["origin"]))
            time.sleep(0.2)

    def origin_stats(self) -> dict:
        code = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        r = sh("ip", "netns", "exec", self.topo.ns[0], sys.executable, "-c", code,
               f"http://{self.topo.ip(0)}:{ORIGIN_PORT}/_stats")
        return json.loads(r.stdout)

    def distribute(self) -> dict:
        from dfzmq.cli import fetch_via_daemon

        spec = self.spec
        bound_s, plain_s = bounds(spec)
        timeout_s = spec.timeout_s or 60 + 4 * plain_s
        out_dir = self.work / "out"
        out_dir.mkdir()
        peers = self.daemons[1:]
        results: dict[str, dict] = {}

        def one(name: str, t0: float) -> None:
            req = wire.Download(f"lab-{name}", self.url, str(out_dir / f"{name}.bin"), digest=f"sha256:{self.sha256}")
            try:
                stats = fetch_via_daemon(self.control(name), req, lambda done, total: None)
                results[name] = {**stats, "finish_s": time.monotonic() - t0}
            except Exception as e:  # reported per host; the run goes on for the others
                results[name] = {"error": f"{type(e).__name__}: {e}", "finish_s": time.monotonic() - t0}

        wire0 = self.topo.counters()
        drops0 = self.topo.drops()
        cpu0 = {n: proc_cpu_s(p.popen.pid) for n, p in self.procs.items()}
        cpu0["lab"] = proc_cpu_s(os.getpid())
        samples: list[tuple[float, dict[int, tuple[int, int]]]] = []
        stop_sampling = threading.Event()

        def sample(t0: float) -> None:  # bytes each host sent so far, for --trace
            while True:
                samples.append((time.monotonic() - t0, self.topo.counters()))
                if stop_sampling.wait(0.5):
                    return

        with CpuMonitor() as mon:
            t0 = time.monotonic()
            sampler = threading.Thread(target=sample, args=(t0,), daemon=True)
            if spec.trace:
                sampler.start()
            threads = [threading.Thread(target=one, args=(n, t0), daemon=True) for n in peers]
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(0.0, t0 + timeout_s - time.monotonic()))
            wall_s = time.monotonic() - t0
            stop_sampling.set()
            if spec.trace:
                sampler.join()
        wire1 = self.topo.counters()
        drops1 = self.topo.drops()
        cpu1 = {n: proc_cpu_s(p.popen.pid) for n, p in self.procs.items()}
        cpu1["lab"] = proc_cpu_s(os.getpid())
        origin = self.origin_stats()
        report = self._report(results, origin, wire0, wire1, cpu0, cpu1, mon, wall_s, bound_s, plain_s)
        report["queue_drops"] = {name: [drops1[i][k] - drops0[i][k] for k in (0, 1)]
                                 for i, name in enumerate(self.daemons)
                                 if drops1[i] != drops0[i]}
        report["liveness"] = self.liveness_losses()
        if spec.trace:
            from tools import labtrace

            rates = {i: (bytes_per_s(spec.down_mbit(i)), bytes_per_s(spec.up_mbit(i)))
                     for i in range(spec.peers + 1)}
            traces = {n: self.work / f"{n}.trace" for n in peers}
            finish = {n: results.get(n, {}).get("finish_s") for n in peers}
            report["trace"] = labtrace.summarize(samples, rates, t0, report["last_s"], wall_s, traces, finish)
        return report

    def _report(self, results, origin, wire0, wire1, cpu0, cpu1, mon, wall_s, bound_s, plain_s) -> dict:
        spec, f = self.spec, self.spec.size
        hosts = []
        for i, name in enumerate(self.daemons):
            r = results.get(name, {"error": "timed out"} if i else {})
            st = self.stat(name) or {}
            row = {
                "host": name, "ip": self.topo.ip(i), "role": "origin site" if i == 0 else "peer",
                "up_mbit": spec.up_mbit(i), "down_mbit": spec.down_mbit(i),
                "finish_s": r.get("finish_s"), "error": r.get("error", ""),
                "origin_bytes": r.get("origin_bytes", 0), "seed_bytes": r.get("seed_bytes", 0),
                "peer_bytes": r.get("peer_bytes", 0),
                "wire_rx_bytes": wire1[i][0] - wire0[i][0], "wire_tx_bytes": wire1[i][1] - wire0[i][1],
                "uploaded_bytes": st.get("uploaded_bytes"),
                "cpu_s": round(cpu1[name] - cpu0[name], 2),
            }
            if i:
                out = self.work / "out" / f"{name}.bin"
                row["copy_ok"] = not row["error"] and out.exists() and sha256_of(out) == self.sha256
            hosts.append(row)
        peers = hosts[1:]
        n = spec.peers
        finished = [h["finish_s"] for h in peers if h["copy_ok"]]
        last_s = max(finished) if len(finished) == n else None
        stored = sum(h["origin_bytes"] + h["seed_bytes"] + h["peer_bytes"] for h in peers)
        wire_rx = sum(h["wire_rx_bytes"] for h in peers)
        # Stats count stored pieces only, so a piece received twice shows up in what was sent:
        # every uploader's piece bytes plus the peers' own origin reads.
        sent = sum(h["uploaded_bytes"] or 0 for h in hosts) + sum(h["origin_bytes"] for h in peers)
        busy = mon.busy()
        # The machine may be shared: what this run itself used is its processes plus softirq
        # (veth, bridge, tc), as a share of all cores over the distribution.
        own_s = sum(cpu1[k] - cpu0[k] for k in cpu1)
        own_pct = 100.0 * own_s / max(1e-9, wall_s * (len(busy) - 1)) + mon.softirq_pct
        origin_over_f = origin.get("total_bytes", 0) / f
        redundant_sent_pct = 100.0 * (sent - n * f) / (n * f)
        ratio = last_s / bound_s if last_s else None
        # A run fails when a copy is missing or wrong, or when the origin was read more than once
        # per cluster (dfzmq's promise). Time and redundancy are goals: reported, not failures.
        problems = [] if last_s is not None else [f"{n - len(finished)} of {n} copies missing or wrong"]
        if origin_over_f > ORIGIN_LIMIT:
            problems.append(f"origin served {origin_over_f:.3f} F (limit {ORIGIN_LIMIT} F)")
        return {
            "ok": not problems,
            "problems": problems,
            "goals": {
                f"last/bound <= {RATIO_GOAL}": ratio is not None and ratio <= RATIO_GOAL,
                f"origin bytes <= {ORIGIN_LIMIT} F": origin_over_f <= ORIGIN_LIMIT,
                f"redundant sent < {REDUNDANT_GOAL_PCT}%": redundant_sent_pct < REDUNDANT_GOAL_PCT,
            },
            "spec": asdict(spec), "file_bytes": f, "run_id": self.run_id,
            "subnet": f"10.{self.topo.subnet}.0.0/24",
            "congestion_control": self.topo.congestion_control(),
            "hosts": hosts,
            "last_s": last_s, "wall_s": round(wall_s, 3),
            "bound_s": bound_s, "ratio": ratio,
            "plain_s": plain_s,
            "origin_bytes": origin.get("total_bytes", 0),
            "origin_over_f": origin_over_f,
            "redundant_bytes": stored - n * f,
            "redundant_pct": 100.0 * (stored - n * f) / (n * f),
            "redundant_sent_bytes": sent - n * f,
            "redundant_sent_pct": redundant_sent_pct,
            "wire_rx_over_nf": wire_rx / (n * f),
            "cpu": {
                "cores": len(busy) - 1, "busy_pct": round(busy[0], 1), "softirq_pct": round(mon.softirq_pct, 1),
                "lab_pct": round(own_pct, 1),
                "per_core_pct": [round(b, 1) for b in busy[1:]], "peak_pct": round(mon.peak, 1),
                "cpu_s": {k: round(cpu1[k] - cpu0[k], 2) for k in ("origin", "manager", "scheduler")},
                "peer_daemons_cpu_s": round(sum(h["cpu_s"] for h in peers), 2),
                "seed_cpu_s": hosts[0]["cpu_s"],
            },
        }

    def liveness_losses(self) -> dict[str, int]:
        """How often the scheduler dropped a host as silent and daemons gave the scheduler up,
        and the scheduler's slow loop turns, from the logs: a run where control traffic was lost
        is not a measure of scheduling."""
        def count(name: str, pattern: str) -> int:
            p = self.procs.get(name)
            text = p.log.read_text(errors="replace") if p and p.log.exists() else ""
            return len(re.findall(pattern, text))
        # (rich wraps long log lines: any run of whitespace may be a line break)
        return {"scheduler_dropped_hosts": count("scheduler", r"host\s+\S+\s+silent\s+for"),
                "scheduler_slow_turns": count("scheduler", r"loop\s+turn\s+took"),
                "daemon_reconnects": sum(count(n, r"scheduler\s+\S+\s+at\s+\S+\s+silent")
                                         for n in self.daemons)}

    def tails(self) -> str:
        return "\n".join(f"--- {p.name} ({p.ns})\n{p.tail()}" for p in self.procs.values())

    def close(self) -> None:
        """Stop every process, remove every namespace and (unless kept) the work dir. Signals are
        ignored meanwhile, so a second Ctrl-C cannot leave half a lab behind."""
        main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} if main else {}
        try:
            for p in self.procs.values():
                try:
                    p.stop()
                except OSError:
                    pass
            self.topo.teardown()
            if not self.keep:
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def run_lab(spec: LabSpec, keep: bool = False, log=lambda msg: None) -> dict:
    """Build the lab, distribute, report, tear down. Raises LabError when the lab itself fails."""
    lab = Lab(spec, keep)
    try:
        log(f"building {spec.peers + 1} hosts ({lab.run_id}-h0..h{spec.peers}) and starting dfzmq")
        try:
            lab.start()
        except LabError as e:
            raise LabError(f"{e}\n{lab.tails()}") from None
        log(f"distributing {spec.size_mib:g} MiB to {spec.peers} peers")
        result = lab.distribute()
        if not result["ok"]:
            result["logs"] = lab.tails()
        if keep:
            result["work_dir"] = str(lab.work)
        return result
    finally:
        lab.close()


def cleanup(force: bool = False) -> tuple[list[str], list[str]]:
    """Remove namespaces and temp dirs of earlier runs: (removed, left alone because running)."""
    removed, busy = [], []
    names = [line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]
    dirs = list(Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*"))
    for item in [*names, *(str(d) for d in dirs)]:
        m = re.match(rf"{PREFIX}(\d+)-", Path(item).name)
        if not m:
            continue
        pid = int(m.group(1))
        if not force and pid != os.getpid() and Path(f"/proc/{pid}").exists():
            busy.append(item)
            continue
        if item.startswith("/"):
            shutil.rmtree(item, ignore_errors=True)
        else:
            remove_ns(item)
        removed.append(item)
    return removed, busy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/netlab.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="build a lab, distribute one file, report, tear down")
    run.add_argument("--peers", type=int, default=4)
    run.add_argument("--size-mib", type=float, default=16)
    run.add_argument("--peer-up-mbit", type=float, default=100)
    run.add_argument("--peer-down-mbit", type=float, default=100)
    run.add_argument("--origin-up-mbit", type=float, default=200)
    run.add_argument("--slow-half-up-mbit", type=float, default=None, help="upload of N//2 of the peers")
    run.add_argument("--slow-hosts", choices=SLOW_HOSTS, default="last",
                     help="which peers are the slow half: the last N//2 (they start and register "
                          "together, after the fast half), the first N//2, or every even-numbered one")
    run.add_argument("--delay-ms", type=float, default=0, help="one-way delay added on each host's upload")
    run.add_argument("--timeout-s", type=float, default=None, help="give up on the fetches after this long")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument("--env", action="append", default=[], metavar="DFZMQ_NAME=VALUE",
                     help="a setting for every dfzmq process, e.g. DFZMQ_WINDOW_TARGET_S=0 (repeatable)")
    run.add_argument("--leaf-qdisc", choices=("pfifo_fast", "pfifo"), default="pfifo_fast",
                     help="queue behind each shaped link (pfifo_fast honours IP TOS; pfifo is one FIFO)")
    run.add_argument("--packet-ms", type=float, default=0.0,
                     help="cap GSO packets at about this many ms of link time (0 = veth's 64 KiB)")
    run.add_argument("--congestion-control", default="", metavar="NAME",
                     help="TCP congestion control on every host (bbr, cubic, reno; default: the machine's)")
    run.add_argument("--trace", action="store_true",
                     help="also report upload use per host over time and where the last pieces came from")
    run.add_argument("--keep", action="store_true", help="keep the work dir (logs, copies)")
    clean = sub.add_parser("cleanup", help="remove namespaces and temp dirs left by earlier runs")
    clean.add_argument("--force", action="store_true", help="also those of runs that still seem alive")
    args = parser.parse_args(argv)

    from rich.console import Console

    err = Console(stderr=True)
    reason = unavailable_reason()
    if reason is not None:
        err.print(f"netlab skipped: {reason}")
        return 0
    if args.cmd == "cleanup":
        removed, busy = cleanup(args.force)
        for item in removed:
            err.print(f"removed {item}")
        for item in busy:
            err.print(f"left alone (its run is alive; --force to remove): {item}")
        err.print(f"{len(removed)} removed")
        return 0

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # SIGINT too: a shell's background job inherits it ignored, and Ctrl-C must still clean up
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    extra_env = []
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq or not name.startswith("DFZMQ_"):
            err.print(f"netlab: --env wants DFZMQ_NAME=VALUE, got {item!r}")
            return 2
        extra_env.append((name, value))
    spec = LabSpec(peers=args.peers, size_mib=args.size_mib, peer_up_mbit=args.peer_up_mbit,
                   peer_down_mbit=args.peer_down_mbit, origin_up_mbit=args.origin_up_mbit,
                   slow_half_up_mbit=args.slow_half_up_mbit, slow_hosts=args.slow_hosts,
                   delay_ms=args.delay_ms, timeout_s=args.timeout_s, trace=args.trace, env=tuple(extra_env),
                   leaf_qdisc=args.leaf_qdisc, packet_ms=args.packet_ms,
                   congestion_control=args.congestion_control)
    try:
        result = run_lab(spec, args.keep, log=lambda m: err.print(f"[dim]{m}[/dim]"))
    except LabError as e:
        err.print(f"netlab failed: {e}", markup=False)
        return 1
    except KeyboardInterrupt:
        err.print("netlab interrupted; everything it made is removed")
        return 130
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        out = Console()
        if not out.is_terminal:
            out = Console(width=120)
        out.print(render(result))
        if not result["ok"]:
            err.print(result.get("logs", ""), markup=False)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
