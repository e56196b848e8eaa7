"""Figures for cluster operations on a local cluster of real processes (issue 6 part B):

- settings: how long after `dfzmq config set` returns every daemon applies the new value
  (polled through their control sockets every 10 ms, so the figure includes that granularity);
- preheat: a file of SIZE MiB preheated on the seed (`--wait`), then fetched by every peer at
  once: the origin's bytes before and after, and the fetch time against a cold fetch of another
  file of the same size.

    python tools/bench_ops.py [--peers 4] [--size-mib 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.cluster import LocalCluster  # noqa: E402
from tools.origin import Origin  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dfzmq-bench-ops-"))
    www = root / "www"
    www.mkdir()
    size = args.size_mib * 1024 * 1024
    for name in ("warm.bin", "cold.bin"):
        with open(www / name, "wb") as f:
            f.write(__import__("os").urandom(size))
    with Origin(www) as origin, LocalCluster(root / "cluster", peers=args.peers, seeds=1, log_level="warning") as cl:
        def cli(*a: str) -> None:
            subprocess.run([sys.executable, "-m", "dfzmq", *a, "--manager", cl.manager_addr], env=cl.env(),
                           check=True, capture_output=True)

        lat = []
        names = cl.seeds + cl.peers
        for i in range(args.rounds):
            value = (i + 2) * 1024 * 1024
            cli("config", "set", "upload_rate", str(value))
            t0 = time.monotonic()
            pending = set(names)
            while pending:
                pending = {n for n in pending if cl.stat(n)["settings"]["upload_rate"] != value}
                time.sleep(0.01)
            lat.append(time.monotonic() - t0)
        cli("config", "unset", "upload_rate")
        print(f"settings: {len(names)} daemons applied a change {statistics.median(lat) * 1000:.0f} ms (median of "
              f"{args.rounds}; max {max(lat) * 1000:.0f} ms) after `config set` returned")

        t0 = time.monotonic()
        cli("preheat", origin.url("warm.bin"), "--wait")
        pre_s = time.monotonic() - t0
        before = origin.stats()["total_bytes"]
        t0 = time.monotonic()
        res = cl.fetch_all(cl.peers, origin.url("warm.bin"), root)
        warm_s = time.monotonic() - t0
        assert all("error" not in r for r in res.values()), res
        added = origin.stats()["total_bytes"] - before
        t0 = time.monotonic()
        res = cl.fetch_all(cl.peers, origin.url("cold.bin"), root)
        cold_s = time.monotonic() - t0
        assert all("error" not in r for r in res.values()), res
        print(f"preheat: {args.size_mib} MiB on the seed in {pre_s:.2f} s; origin read {before / size:.2f}x the file")
        print(f"then {args.peers} peers fetched it at once in {warm_s:.2f} s reading {added} bytes from the origin; "
              f"a cold file of the same size took {cold_s:.2f} s ({warm_s / cold_s:.2f} of cold)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
