"""Benchmarks that print figures (never timed assertions). `make bench` runs them all.

- warm: a file another peer already holds, `dfzmq fetch` through a daemon, against `curl`
  reading the same file from `python -m http.server`, alternated in one run (goal >= 0.8).
- cold: a file nobody holds, fetched through the seed peer, against `curl` straight from the
  origin (goal >= 0.7).
- swarm: eight peers fetch one file at once: total time, origin bytes / file size (goal 1.00),
  peak RSS of each daemon (goal < 150 MB).
- limits: measured upload, download and back-to-source rates against configured limits
  (goal: within 10%).
- killed: time lost when a parent is killed mid-swarm, against the same run without it.
- proxy: `curl -x` through a daemon's HTTP proxy for a file another peer already holds (the
  proxy's daemon fetches it P2P and streams it), and again once that daemon holds it, against
  `curl` reading the same file from `python -m http.server`, alternated in one run (goal >= 0.8).
Ratios are measured side by side in the same run because this machine is shared and noisy.
warm and proxy also print CPU seconds per side (best round): the client (curl or the dfzmq CLI)
plus the servers that worked for it (http.server; the receiving daemon and the peers that sent),
read from /proc, which the other jobs on the machine disturb far less than wall time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.cluster import LocalCluster, free_port  # noqa: E402
from tools.origin import Origin  # noqa: E402
from tools.procstat import cpu  # noqa: E402

MiB = 2**20


def make(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


def curl(url: str, out: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(["curl", "-sf", "-o", str(out), url], check=True)
    return time.monotonic() - t0


def dfzmq_fetch(cluster: LocalCluster, peer: str, url: str, out: Path) -> float:
    t0 = time.monotonic()
    r = cluster.fetch(peer, url, out)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return time.monotonic() - t0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process."""
    return sum(cpu(pid))


def children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


class CpuMeter:
    """CPU seconds spent by some processes (pids) and by this process's finished children
    between `start()` and `stop()`."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def start(self) -> None:
        self.t0 = [cpu_s(p) for p in self.pids] + [children_cpu_s()]

    def stop(self) -> float:
        t1 = [cpu_s(p) for p in self.pids] + [children_cpu_s()]
        return sum(b - a for a, b in zip(self.t0, t1))


def rss(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _http_server(root: Path, name: str, size: int) -> tuple[Path, int, subprocess.Popen]:
    """A directory holding NAME.bin of `size` bytes, served by `python -m http.server` (curl's
    side of the comparison: a plain, fast file server)."""
    www = root / f"www-{name}"
    www.mkdir()
    make(www / f"{name}.bin", size)
    port = free_port()
    http = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return www, port, http


def bench_warm(root: Path, size: int, rounds: int) -> None:
    www, port, http = _http_server(root, "warm", size)
    try:
        # One fresh peer per round: a peer that already holds the file would only export it.
        with Origin(www) as origin, LocalCluster(root / "c-warm", peers=1 + rounds, interval_s=1.0,
                                                 log_level="warning") as c:
            url = origin.url("warm.bin")
            dfzmq_fetch(c, "peer1", url, root / "prime.out")  # now the seed and peer1 hold it
            time.sleep(0.5)
            for _ in range(50):
                try:
                    curl(f"http://127.0.0.1:{port}/warm.bin", root / "probe.out")
                    break
                except subprocess.CalledProcessError:
                    time.sleep(0.1)
            curl_s, dfz_s, curl_cpu, dfz_cpu = [], [], [], []
            senders = [c.procs[n].popen.pid for n in ("seed0", "peer1")]
            for i in range(rounds):
                m = CpuMeter([http.pid])
                m.start()
                curl_s.append(curl(f"http://127.0.0.1:{port}/warm.bin", root / "curl.out"))
                curl_cpu.append(m.stop())
                m = CpuMeter([c.procs[f"peer{i + 2}"].popen.pid, *senders])
                m.start()
                dfz_s.append(dfzmq_fetch(c, f"peer{i + 2}", url, root / f"dfz{i}.out"))
                dfz_cpu.append(m.stop())
                (root / f"dfz{i}.out").unlink()
                (root / "curl.out").unlink()
            c_best, d_best = min(curl_s), min(dfz_s)
            print(f"warm   {size / MiB:.0f} MiB held by peers: curl<-http.server best {c_best:.2f}s "
                  f"({size / MiB / c_best:.0f} MiB/s), dfzmq fetch best {d_best:.2f}s "
                  f"({size / MiB / d_best:.0f} MiB/s); ratio {c_best / d_best:.2f} of curl "
                  f"(median {statistics.median(curl_s) / statistics.median(dfz_s):.2f}) [goal >= 0.8]; "
                  f"CPU-s best: curl+http.server {min(curl_cpu):.2f}, "
                  f"dfzmq CLI+daemon+senders {min(dfz_cpu):.2f}")
    finally:
        http.terminate()
        http.wait()


def bench_cold(root: Path, size: int, rounds: int) -> None:
    www = root / "www-cold"
    www.mkdir()
    make(www / "cold.bin", size)
    with Origin(www) as origin, LocalCluster(root / "c-cold", peers=1, interval_s=1.0, log_level="warning") as c:
        curl_s, dfz_s = [], []
        for i in range(rounds):
            curl_s.append(curl(origin.url("cold.bin"), root / "curl.out"))
            (root / "curl.out").unlink()
            # A new tag is a new task: nobody holds it, the seed reads the origin again.
            t0 = time.monotonic()
            r = subprocess.run(c.fetch_cmd("peer1", origin.url("cold.bin"), root / "cold.out", "--tag", f"r{i}"),
                               env=c.env(), capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(r.stderr)
            dfz_s.append(time.monotonic() - t0)
            (root / "cold.out").unlink()
        c_best, d_best = min(curl_s), min(dfz_s)
        print(f"cold   {size / MiB:.0f} MiB via the seed: curl<-origin best {c_best:.2f}s, dfzmq fetch best "
              f"{d_best:.2f}s; ratio {c_best / d_best:.2f} of curl "
              f"(median {statistics.median(curl_s) / statistics.median(dfz_s):.2f}) [goal >= 0.7]")


def bench_swarm(root: Path, size: int, peers: int) -> None:
    www = root / "www-swarm"
    www.mkdir()
    make(www / "swarm.bin", size)
    with Origin(www) as origin, LocalCluster(root / "c-swarm", peers=peers, interval_s=1.0,
                                             log_level="warning") as c:
        samples: dict[str, dict[str, int]] = {}
        import threading

        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for name in c.seeds + c.peers:
                    try:
                        r = rss(c.procs[name].popen.pid)
                    except OSError:
                        continue
                    cur = samples.setdefault(name, {"VmHWM": 0, "RssAnon": 0})
                    cur["VmHWM"] = max(cur["VmHWM"], r["VmHWM"])
                    cur["RssAnon"] = max(cur["RssAnon"], r["RssAnon"])
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        results = c.fetch_all(c.peers, origin.url("swarm.bin"), root)
        total = time.monotonic() - t0
        stop.set()
        sampler.join()
        errors = {n: r["error"] for n, r in results.items() if "error" in r}
        served = origin.bytes_served("swarm.bin")
        print(f"swarm  {size / MiB:.0f} MiB to {peers} peers at once: {total:.1f}s total, origin bytes / size "
              f"{served / size:.3f} [goal 1.00], errors {len(errors)}")
        for name in c.seeds + c.peers:
            s = samples.get(name, {})
            print(f"       {name:6s} peak RSS {s.get('VmHWM', 0) / 1e6:6.1f} MB "
                  f"(anonymous {s.get('RssAnon', 0) / 1e6:6.1f} MB; the rest is LMDB's page cache mapping)")
        for name in c.peers:
            (root / f"{name}.out").unlink(missing_ok=True)


def _timed_fetch(c: LocalCluster, peer: str, url: str, out: Path) -> float:
    t0 = time.monotonic()
    r = c.fetch(peer, url, out)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    out.unlink()
    return time.monotonic() - t0


def bench_limits(root: Path, size: int) -> None:
    rate = 16 * MiB
    www = root / "www-limits"
    www.mkdir()
    for name in ("up.bin", "down.bin", "src.bin"):
        make(www / name, size)
    cases = [
        ("upload", {"seed0": {"DFZMQ_UPLOAD_RATE": str(rate)}}, "up.bin"),
        ("download", {"peer1": {"DFZMQ_DOWNLOAD_RATE": str(rate)}}, "down.bin"),
        ("back-to-source", {"seed0": {"DFZMQ_SOURCE_RATE": str(rate)}}, "src.bin"),
    ]
    with Origin(www) as origin:
        for label, env, name in cases:
            with LocalCluster(root / f"c-{label}", peers=1, interval_s=1.0, log_level="warning",
                              daemon_env=env) as c:
                # Warm-up of the CLI and sockets with a tiny file, then the measured transfer.
                make(www / f"tiny-{label}", 1024)
                base = _timed_fetch(c, "peer1", origin.url(f"tiny-{label}"), root / "tiny.out")
                took = _timed_fetch(c, "peer1", origin.url(name), root / "l.out") - base
                got = size / took
                print(f"limit  {label:15s} limit {rate / MiB:5.1f} MiB/s, measured {got / MiB:5.1f} MiB/s "
                      f"over {took:.1f}s: {got / rate:.2f} of the limit [goal 0.90-1.10]")


def bench_killed(root: Path, size: int, peers: int = 4) -> None:
    import signal
    import threading

    www = root / "www-killed"
    www.mkdir()
    make(www / "k.bin", size)
    times = {}
    for kill in (False, True):
        # The seed uploads at a limited rate so the swarm takes a few seconds and peers matter.
        env = {"seed0": {"DFZMQ_UPLOAD_RATE": str(8 * MiB)}}
        with Origin(www) as origin, LocalCluster(root / f"c-kill{kill}", peers=peers, interval_s=0.5,
                                                 log_level="warning", daemon_env=env) as c:
            victim = c.peers[0]
            if kill:
                def strike() -> None:
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        st = c.stat(victim, 0.5) or {}
                        if st.get("uploaded_bytes", 0) > size // 8:
                            c.procs[victim].signal(signal.SIGKILL)
                            return
                        time.sleep(0.05)
                threading.Thread(target=strike, daemon=True).start()
            results = c.fetch_all(c.peers, origin.url("k.bin"), root, patience_s=1.0)
            survivors = [n for n in c.peers if not (kill and n == victim)]
            bad = [n for n in survivors if "error" in results[n]]
            times[kill] = max(results[n]["wall_s"] for n in survivors)
            if bad:
                print(f"killed errors: {[results[n]['error'] for n in bad]}")
            for n in c.peers:
                (root / f"{n}.out").unlink(missing_ok=True)
    print(f"killed {size / MiB:.0f} MiB to {peers} peers (seed up 8 MiB/s): {times[False]:.1f}s without a fault, "
          f"{times[True]:.1f}s with a parent killed mid-swarm: {times[True] - times[False]:+.1f}s lost")


def bench_proxy(root: Path, size: int, rounds: int) -> None:
    www, port, http = _http_server(root, "proxy", size)
    proxies = {f"peer{i + 2}": f"127.0.0.1:{free_port()}" for i in range(rounds)}
    env = {n: {"DFZMQ_PROXY_LISTEN": a, "DFZMQ_PROXY_RULES": r"\.bin$"} for n, a in proxies.items()}
    noproxy = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "no_proxy", "all_proxy")}

    def curl_via(proxy: str, url: str, out: Path) -> float:
        t0 = time.monotonic()
        subprocess.run(["curl", "-sf", "-x", f"http://{proxy}", "-o", str(out), url], check=True, env=noproxy)
        return time.monotonic() - t0

    try:
        # One fresh proxy daemon per round: the file is held by the seed and peer1 only.
        with Origin(www) as origin, LocalCluster(root / "c-proxy", peers=1 + rounds, interval_s=1.0,
                                                 log_level="warning", daemon_env=env) as c:
            url = origin.url("proxy.bin")
            dfzmq_fetch(c, "peer1", url, root / "prime.out")
            (root / "prime.out").unlink()
            direct = f"http://127.0.0.1:{port}/proxy.bin"
            for _ in range(50):
                try:
                    curl(direct, root / "probe.out")
                    break
                except subprocess.CalledProcessError:
                    time.sleep(0.1)
            curl_s, p2p_s, held_s, curl_cpu, p2p_cpu = [], [], [], [], []
            senders = [c.procs[n].popen.pid for n in ("seed0", "peer1")]
            for name, proxy in proxies.items():
                m = CpuMeter([http.pid])
                m.start()
                curl_s.append(curl(direct, root / "curl.out"))
                curl_cpu.append(m.stop())
                (root / "curl.out").unlink()
                m = CpuMeter([c.procs[name].popen.pid, *senders])
                m.start()
                p2p_s.append(curl_via(proxy, url, root / "p.out"))
                p2p_cpu.append(m.stop())
                (root / "p.out").unlink()
                held_s.append(curl_via(proxy, url, root / "h.out"))  # now this daemon holds it
                (root / "h.out").unlink()
            c_best, p_best, h_best = min(curl_s), min(p2p_s), min(held_s)
            mib = size / MiB
            print(f"proxy  {mib:.0f} MiB: curl<-http.server best {c_best:.2f}s ({mib / c_best:.0f} MiB/s); "
                  f"curl -x proxy, held by another peer, best {p_best:.2f}s ({mib / p_best:.0f} MiB/s): "
                  f"ratio {c_best / p_best:.2f} (median {statistics.median(curl_s) / statistics.median(p2p_s):.2f}); "
                  f"held by the proxy's daemon best {h_best:.2f}s ({mib / h_best:.0f} MiB/s): ratio "
                  f"{c_best / h_best:.2f} (median {statistics.median(curl_s) / statistics.median(held_s):.2f}) "
                  f"[goal >= 0.8]; CPU-s best: curl+http.server {min(curl_cpu):.2f}, "
                  f"curl+proxy daemon+senders (held by another peer) {min(p2p_cpu):.2f}")
    finally:
        http.terminate()
        http.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description="dfzmq benchmarks")
    ap.add_argument("which", nargs="*", default=["warm", "cold", "swarm", "limits", "killed", "proxy"])
    ap.add_argument("--proxy-mib", type=int, default=1024)
    ap.add_argument("--warm-mib", type=int, default=1024)
    ap.add_argument("--cold-mib", type=int, default=512)
    ap.add_argument("--swarm-mib", type=int, default=256)
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--net-mbit", type=float, default=1000, help="proxynet: every link's rate (root)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dfzmq-bench-"))
    try:
        if "warm" in args.which:
            bench_warm(root, args.warm_mib * MiB, args.rounds)
        if "cold" in args.which:
            bench_cold(root, args.cold_mib * MiB, args.rounds)
        if "swarm" in args.which:
            bench_swarm(root, args.swarm_mib * MiB, args.peers)
        if "limits" in args.which:
            bench_limits(root, 96 * MiB)
        if "killed" in args.which:
            bench_killed(root, 64 * MiB)
        if "proxy" in args.which:
            bench_proxy(root, args.proxy_mib * MiB, args.rounds)
        if "proxynet" in args.which:  # not in the default set: it needs root and takes minutes
            from tools.labproxy import bench as bench_proxynet

            bench_proxynet(args.proxy_mib, args.net_mbit, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
