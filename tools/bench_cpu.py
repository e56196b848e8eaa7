"""Where the CPU goes in one warm single-host transfer: CPU seconds per process and per thread of
the receiving daemon, and how far the client had got at points of the transfer.

    python tools/bench_cpu.py 1024 fetch      # dfzmq fetch of a 1 GiB file another peer holds
    python tools/bench_cpu.py 1024 proxy      # curl -x through the receiving daemon's proxy
    EXTRA=DFZMQ_WINDOW_BYTES=8388608 python tools/bench_cpu.py 512 fetch   # receiver settings
    PERF=/tmp/peer2.data python tools/bench_cpu.py 1024 proxy  # perf record of the receiving daemon

CPU seconds (from /proc/PID/stat and /proc/PID/task/TID/stat) are what to compare between
versions on a shared machine: wall time there swings 2x with other jobs. "client had 10/50/90%"
is when the client's output reached that share of the file, as a fraction of the wall time
(with streaming that overlaps the download, 50% comes near the middle). "page cache grew" is
the whole machine's (other jobs included); storage bytes per process come from /proc/PID/io
(page-cache hits are not reads). A figure printer, never an assertion.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.cluster import LocalCluster, free_port  # noqa: E402
from tools.origin import Origin  # noqa: E402
from tools.procstat import cpu  # noqa: E402

MiB = 1 << 20


def threads(pid: int) -> dict[str, tuple[str, float, float]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            out[tid] = (name, *cpu(pid, tid))
        except OSError:
            pass
    return out


def meminfo_kib(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def io_mib(pid: int) -> tuple[float, float]:
    """MiB this process made the kernel read from and write to storage (/proc/PID/io
    read_bytes, write_bytes: page-cache hits are not counted, writes count when dirtied)."""
    got = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                got[k] = int(v)
    except OSError:
        return 0.0, 0.0
    return got.get("read_bytes", 0) / MiB, got.get("write_bytes", 0) / MiB


def resident_mib(root: Path) -> float:
    """MiB of the files under `root` that sit in the page cache (util-linux fincore)."""
    paths = [str(p) for p in root.rglob("*") if p.is_file()]
    total = 0
    for i in range(0, len(paths), 500):
        r = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *paths[i:i + 500]], capture_output=True, text=True)
        total += sum(int(x) for x in r.stdout.split() if x.isdigit())
    return total / MiB


def main() -> int:
    size = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 1024 * MiB
    mode = sys.argv[2] if len(sys.argv) > 2 else "fetch"
    if mode not in ("fetch", "proxy"):
        print("usage: bench_cpu.py SIZE_MIB fetch|proxy", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="dfzmq-cpu-"))
    try:
        www = root / "www"
        www.mkdir()
        with open(www / "f.bin", "wb") as fh:
            for left in range(size, 0, -4 * MiB):
                fh.write(os.urandom(min(left, 4 * MiB)))
        proxy = f"127.0.0.1:{free_port()}"
        env = {"peer2": {"DFZMQ_PROXY_LISTEN": proxy, "DFZMQ_PROXY_RULES": r"\.bin$"}}
        for kv in filter(None, os.environ.get("EXTRA", "").split(",")):
            k, _, v = kv.partition("=")
            env["peer2"][k] = v
        with Origin(www) as origin, LocalCluster(root / "c", peers=2, interval_s=1.0, log_level="warning",
                                                 daemon_env=env) as c:
            url = origin.url("f.bin")
            r = c.fetch("peer1", url, root / "prime.out")
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return 1
            (root / "prime.out").unlink()
            time.sleep(1)
            pids = {n: p.popen.pid for n, p in c.procs.items()}
            before = {n: cpu(p) for n, p in pids.items()}
            threads_before = threads(pids["peer2"])
            out = root / "o.out"
            perf = None
            if os.environ.get("PERF"):  # PERF=out.data: perf record of the receiving daemon
                perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-g", "-o", os.environ["PERF"],
                                         "-p", str(pids["peer2"])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            cached0 = meminfo_kib("Cached")
            io0 = {n: io_mib(p) for n, p in pids.items()}
            t0 = time.monotonic()
            kids0 = os.times()
            if mode == "fetch":
                client = subprocess.Popen(c.fetch_cmd("peer2", url, out), env=c.env())
            else:
                clean = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "no_proxy", "all_proxy")}
                client = subprocess.Popen(["curl", "-sf", "-x", f"http://{proxy}", "-o", str(out), url], env=clean)
            marks: dict[float, float] = {}
            while client.poll() is None:
                try:
                    got = out.stat().st_size if mode == "proxy" else 0
                except OSError:
                    got = 0
                for q in (0.1, 0.5, 0.9):
                    if got >= q * size and q not in marks:
                        marks[q] = time.monotonic() - t0
                time.sleep(0.02)
            wall = time.monotonic() - t0
            if perf is not None:
                perf.send_signal(2)
                perf.wait()
            kids1 = os.times()
            after = {n: cpu(p) for n, p in pids.items()}
            threads_after = threads(pids["peer2"])
            line = f"{mode} {size / MiB:.0f} MiB: wall {wall:.2f}s ({size / MiB / wall:.0f} MiB/s), exit {client.returncode}"
            if mode == "proxy":
                line += "; client had 10/50/90% at " + " ".join(
                    f"{marks.get(q, wall) / wall:.2f}" for q in (0.1, 0.5, 0.9)) + " of the wall time"
            io1 = {n: io_mib(p) for n, p in pids.items()}
            print(line)
            with open(f"/proc/{pids['peer2']}/status") as f:
                mem = {k: int(v.split()[0]) // 1024 for k, _, v in (ln.partition(":") for ln in f)
                       if k in ("VmHWM", "RssAnon")}
            print(f"  receiving daemon: peak RSS {mem.get('VmHWM', 0)} MiB, anonymous now {mem.get('RssAnon', 0)} MiB")
            print(f"  page cache grew {(meminfo_kib('Cached') - cached0) / 1024:.0f} MiB (whole machine); the "
                  f"receiving daemon's store holds {resident_mib(c.root / 'peer2'):.0f} MiB of it")
            for n in pids:
                u, s = after[n][0] - before[n][0], after[n][1] - before[n][1]
                r, w = io1[n][0] - io0[n][0], io1[n][1] - io0[n][1]
                if u + s > 0.05:
                    print(f"  {n:10s} user {u:.2f} sys {s:.2f}   storage read {r:.0f} MiB, written {w:.0f} MiB")
            print(f"  {'client':10s} user {kids1.children_user - kids0.children_user:.2f} "
                  f"sys {kids1.children_system - kids0.children_system:.2f}")
            for tid, (name, u, s) in threads_after.items():
                _, u0, s0 = threads_before.get(tid, (name, 0.0, 0.0))
                if u - u0 + s - s0 > 0.05:
                    print(f"    peer2 thread {name:16s} user {u - u0:.2f} sys {s - s0:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
