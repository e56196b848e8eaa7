"""CPU per piece of a swarm's daemons, on loopback, without the network lab (issue 3).

    python tools/swarm_cpu.py --peers 12 --size-mib 16                  # as fast as loopback goes
    python tools/swarm_cpu.py --peers 12 --size-mib 16 --upload-rate 2MiB   # uplinks capped (lab-like)
    python tools/swarm_cpu.py ... --env DFZMQ_X=Y --json                 # A/B a setting; JSON out

A real LocalCluster (manager, scheduler, one seed, N peer daemons as processes) distributes a
generated file (64 KiB pieces at 16 MiB) to every peer at once. CPU seconds per process come
from /proc/PID/stat, before and after the distribution only (start-up is not counted); the
message counts per piece come from each daemon's counters (`msg.in.*` / `msg.out.*`, counted
where the daemon sends and receives on its peer-to-peer and scheduler sockets).

`--upload-rate` caps every daemon's uploads (the daemons' own token bucket), so pieces trickle
in one at a time as in the lab's shaped links instead of in loopback bursts, which batch for
free. Per-piece CPU is what a daemon spends per piece it received (its uploads included):
what to compare between versions. Wall time is printed but is noise on a shared machine.
Compare two versions side by side with `--checkout DIR` (runs DIR's code, e.g. a `git archive`
of the older commit), alternating runs. A figure printer, never an assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.procstat import cpu  # noqa: E402
from tools.cluster import LocalCluster  # noqa: E402
from tools.origin import Origin  # noqa: E402

MiB = 1 << 20


def one_run(peers: int, size_mib: int, upload_rate: str, env: dict[str, str]) -> dict:
    root = Path(tempfile.mkdtemp(prefix="dfzmq-swarmcpu-"))
    try:
        www = root / "www"
        www.mkdir()
        (www / "f.bin").write_bytes(os.urandom(size_mib * MiB))
        denv = dict(env)
        if upload_rate:
            denv["DFZMQ_UPLOAD_RATE"] = upload_rate
        names = ["seed0"] + [f"peer{i}" for i in range(1, peers + 1)]
        with Origin(www) as origin, LocalCluster(root / "c", peers=peers, interval_s=1.0, log_level="warning",
                                                 daemon_env={n: denv for n in names}) as c:
            url = origin.url("f.bin")
            time.sleep(1.0)
            pids = {n: p.popen.pid for n, p in c.procs.items()}
            counters0 = {n: (c.stat(n) or {}).get("counters", {}) for n in names}
            before = {n: cpu(p) for n, p in pids.items()}
            t0 = time.monotonic()
            res = c.fetch_all(c.peers, url, root, timeout_s=600, patience_s=300)
            wall = time.monotonic() - t0
            after = {n: cpu(p) for n, p in pids.items()}
            counters1 = {n: (c.stat(n) or {}).get("counters", {}) for n in names}
            errors = {n: r["error"] for n, r in res.items() if "error" in r}
            pieces = {n: counters1[n].get("pieces.peer", 0) + counters1[n].get("pieces.seed", 0)
                      + counters1[n].get("pieces.origin", 0)
                      - counters0[n].get("pieces.peer", 0) - counters0[n].get("pieces.seed", 0)
                      - counters0[n].get("pieces.origin", 0) for n in names}
            cpu_s = {n: sum(after[n]) - sum(before[n]) for n in pids}
            msgs: dict[str, float] = {}
            total_pieces = sum(pieces[n] for n in c.peers) or 1
            for n in names:
                for k, v in counters1[n].items():
                    if k.startswith("msg."):
                        msgs[k] = msgs.get(k, 0) + v - counters0[n].get(k, 0)
            return {
                "peers": peers, "size_mib": size_mib, "upload_rate": upload_rate, "env": env,
                "wall_s": round(wall, 2), "errors": errors,
                "piece_count": pieces[c.peers[0]],
                "peer_cpu_s": [round(cpu_s[n], 2) for n in c.peers],
                "seed_cpu_s": round(cpu_s["seed0"], 2),
                "scheduler_cpu_s": round(cpu_s["scheduler0"], 2),
                "ms_per_piece": round(1000 * sum(cpu_s[n] for n in c.peers) / total_pieces, 3),
                "ms_per_piece_all": round(1000 * sum(cpu_s[n] for n in names) / total_pieces, 3),
                "msgs_per_piece": {k: round(v / total_pieces, 2) for k, v in sorted(msgs.items())},
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=12)
    ap.add_argument("--size-mib", type=int, default=16)
    ap.add_argument("--upload-rate", default="", help="each daemon's upload cap, e.g. 2MiB (default none)")
    ap.add_argument("--env", action="append", default=[], help="DFZMQ_X=Y for every daemon")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--checkout", action="append", default=[],
                    help="run this directory's code too (alternating runs), e.g. an older commit")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    env = dict(kv.partition("=")[::2] for kv in a.env)
    if a.checkout:
        # Side by side: this checkout and each other one, alternating, one run each per round.
        me = Path(__file__).resolve().parent.parent
        dirs = [me, *[Path(d).resolve() for d in a.checkout]]
        base = [sys.executable, "tools/swarm_cpu.py", "--peers", str(a.peers), "--size-mib",
                str(a.size_mib), "--upload-rate", a.upload_rate, "--json", *sum((["--env", e] for e in a.env), [])]
        results: dict[str, list[dict]] = {str(d): [] for d in dirs}
        for _ in range(a.runs):
            for d in dirs:
                envp = {**os.environ, "PYTHONPATH": str(d)}
                out = subprocess.run(base, cwd=d, env=envp,
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    return 1
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results[str(d)].append(r)
                print(f"{d}: {r['ms_per_piece']} ms/piece (peers), {r['ms_per_piece_all']} with the seed, "
                      f"wall {r['wall_s']} s, scheduler {r['scheduler_cpu_s']} s", flush=True)
        for d, rs in results.items():
            print(f"{d}: median {statistics.median(r['ms_per_piece'] for r in rs):.3f} ms/piece over {len(rs)} runs")
        return 0
    for _ in range(a.runs):
        r = one_run(a.peers, a.size_mib, a.upload_rate, env)
        if a.json:
            print(json.dumps(r))
        else:
            print(f"N={r['peers']} F={r['size_mib']} MiB pieces={r['piece_count']} upload cap={r['upload_rate'] or 'none'}"
                  f" wall {r['wall_s']} s errors {r['errors'] or 'none'}")
            print(f"  peer daemons CPU-s: mean {statistics.mean(r['peer_cpu_s']):.2f} max {max(r['peer_cpu_s']):.2f};"
                  f" seed {r['seed_cpu_s']}; scheduler {r['scheduler_cpu_s']}")
            print(f"  CPU per piece per peer daemon: {r['ms_per_piece']} ms ({r['ms_per_piece_all']} ms with the seed)")
            for k, v in r["msgs_per_piece"].items():
                print(f"  {k:28s} {v} per piece received")
    return 0


if __name__ == "__main__":
    sys.exit(main())
