"""Benchmark for `dfzmq sync` and content-defined pieces (prints figures, asserts nothing).

delta: a file (1 GiB by default) is synced by every peer of a local cluster (`dfzmq sync`
through each peer's daemon, all at once); then the origin's file is replaced by
  (a) a version with 1% of its bytes changed in `--places` scattered places, and
  (b) the first version with 10 MiB inserted in the middle,
and each is synced again by every peer. Printed per version: bytes each peer received (from
the origin, the seed and other peers; pieces taken from its own store do not count) divided by
the file size [goal < 3%], and origin bytes / file size (the seed reads each version once).

cost: what content-defined pieces cost where they are not needed, side by side in one run on
one cluster: a cold fetch through the seed (fixed pieces with parallel Range requests, against
CDC's one sequential stream), and a swarm (every peer fetching one new file at once), each with
a plain task and with a `cdc/` task, alternating, best of `--rounds`.

    python tools/bench_sync.py [delta] [cost] [--size-mib 1024] [--peers 4] [--places 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.cluster import LocalCluster  # noqa: E402
from tools.origin import Origin  # noqa: E402

MiB = 2**20


def make(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(rng.randbytes(n))
            left -= n


def scattered(src: Path, dst: Path, fraction: float, places: int, seed: int) -> None:
    """A copy of `src` with `fraction` of its bytes overwritten, in `places` runs spread evenly
    (each at a random spot within its stretch of the file)."""
    shutil.copyfile(src, dst)
    size = src.stat().st_size
    run = int(size * fraction / places)
    rng = random.Random(seed)
    stretch = size // places
    with open(dst, "r+b") as f:
        for i in range(places):
            at = i * stretch + rng.randrange(max(1, stretch - run))
            f.seek(at)
            f.write(rng.randbytes(run))


def inserted(src: Path, dst: Path, extra: int, seed: int) -> None:
    size = src.stat().st_size
    rng = random.Random(seed)
    with open(src, "rb") as a, open(dst, "wb") as b:
        half = size // 2
        shutil.copyfileobj(_limited(a, half), b, 4 * MiB)
        left = extra
        while left:
            n = min(left, 4 * MiB)
            b.write(rng.randbytes(n))
            left -= n
        shutil.copyfileobj(a, b, 4 * MiB)


def _limited(f, n: int):
    class R:
        def read(self, k=-1):
            nonlocal n
            if n <= 0:
                return b""
            data = f.read(n if k < 0 else min(k, n))
            n -= len(data)
            return data
    return R()


def sync_all(c: LocalCluster, url: str, root: Path) -> dict[str, dict]:
    """Every peer runs `dfzmq sync --url URL --dest DIR --json` at once; their reports."""
    out: dict[str, dict] = {}

    def one(name: str) -> None:
        p = subprocess.run([sys.executable, "-m", "dfzmq", "sync", "--url", url, "--dest", str(root / f"dst-{name}"),
                            "--daemon", c.control(name), "--json"], env=c.env(), capture_output=True, text=True)
        try:
            out[name] = json.loads(p.stdout)["entries"][0]
        except (ValueError, KeyError, IndexError):
            out[name] = {"error": p.stderr.strip() or f"exit {p.returncode}"}

    threads = [threading.Thread(target=one, args=(n,)) for n in c.peers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def bench_delta(root: Path, size: int, peers: int, places: int) -> None:
    www = root / "www"
    www.mkdir(parents=True)
    v1 = root / "v1.bin"
    make(v1, size, 1)
    va, vb = root / "va.bin", root / "vb.bin"
    scattered(v1, va, 0.01, places, 2)
    inserted(v1, vb, 10 * MiB, 3)
    with Origin(www) as origin, LocalCluster(root / "c", peers=peers, interval_s=1.0, log_level="warning") as c:
        for label, version in (("v1 (first sync)", v1), (f"1% changed in {places} places", va),
                               ("10 MiB inserted in the middle", vb)):
            shutil.copyfile(version, www / "data.bin")
            vsize = version.stat().st_size
            before = origin.bytes_served("data.bin")
            t0 = time.monotonic()
            reports = sync_all(c, origin.url("data.bin"), root)
            took = time.monotonic() - t0
            served = origin.bytes_served("data.bin") - before
            errs = {n: r["error"] for n, r in reports.items() if "error" in r or r.get("status") != "ok"}
            got = [(r.get("origin_bytes", 0) + r.get("peer_bytes", 0)) / vsize for r in reports.values()]
            local = [r.get("local_bytes", 0) / vsize for r in reports.values()]
            print(f"{label:32s} {vsize / MiB:7.1f} MiB, {peers} peers, {took:5.1f}s: received per peer / size "
                  f"max {max(got) * 100:6.2f}% mean {sum(got) / len(got) * 100:6.2f}%, from own store "
                  f"mean {sum(local) / len(local) * 100:6.2f}%; origin bytes / size {served / vsize:.3f}"
                  + (f"; errors {errs}" if errs else ""), flush=True)
            for name in c.peers:
                dst = root / f"dst-{name}" / "data.bin"
                if not errs and dst.stat().st_size != vsize:
                    print(f"   {name}: wrong size {dst.stat().st_size}")
    print("goal: received per peer / size < 3% for the changed versions")


def bench_cost(root: Path, size: int, peers: int, rounds: int) -> None:
    from dfzmq import wire
    from dfzmq.cli import fetch_via_daemon

    www = root / "www-cost"
    www.mkdir(parents=True)
    # Every measurement gets a file of its own: identical bytes would be local hits (pieces are
    # content-addressed, whatever the chunking), which is not what this measures.
    with Origin(www) as origin, LocalCluster(root / "c-cost", peers=peers, interval_s=1.0, log_level="warning") as c:
        cold = {"fixed": [], "cdc": []}
        swarm = {"fixed": [], "cdc": []}
        for i in range(rounds):
            for kind in ("fixed", "cdc"):
                name = f"cold-{i}-{kind}.bin"
                make(www / name, size, 100 + 2 * i + (kind == "cdc"))
                tag = "cdc/x" if kind == "cdc" else ""
                t0 = time.monotonic()
                req = wire.Download(f"c{i}{kind}", origin.url(name), str(root / "cold.out"), "", {}, tag)
                fetch_via_daemon(c.control(c.peers[0]), req, lambda d, t: None, 300)
                cold[kind].append(time.monotonic() - t0)
                os.unlink(root / "cold.out")
                os.unlink(www / name)
            for kind in ("fixed", "cdc"):
                name = f"swarm-{i}-{kind}.bin"
                make(www / name, size, 200 + 2 * i + (kind == "cdc"))
                tag = "cdc/x" if kind == "cdc" else ""
                errors = []

                def one(peer: str) -> None:
                    req = wire.Download(f"s{i}{kind}{peer}", origin.url(name), str(root / f"{peer}.out"), "", {}, tag)
                    try:
                        fetch_via_daemon(c.control(peer), req, lambda d, t: None, 300)
                    except Exception as e:  # reported below
                        errors.append(f"{peer}: {e}")

                t0 = time.monotonic()
                ts = [threading.Thread(target=one, args=(n,)) for n in c.peers]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                swarm[kind].append(time.monotonic() - t0)
                if errors:
                    print(f"   swarm {kind} round {i}: {errors}")
                for n in c.peers:
                    (root / f"{n}.out").unlink(missing_ok=True)
                os.unlink(www / name)
        f, d = min(cold["fixed"]), min(cold["cdc"])
        print(f"cold   {size / MiB:.0f} MiB via the seed: fixed pieces best {f:.2f}s, cdc best {d:.2f}s; "
              f"cdc/fixed time {d / f:.2f}")
        f, d = min(swarm["fixed"]), min(swarm["cdc"])
        print(f"swarm  {size / MiB:.0f} MiB to {peers} peers: fixed pieces best {f:.2f}s, cdc best {d:.2f}s; "
              f"cdc/fixed time {d / f:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", nargs="*", default=["delta", "cost"])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--cost-mib", type=int, default=512)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--places", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dfzmq-bench-sync-"))
    try:
        if "delta" in args.which:
            bench_delta(root / "delta", args.size_mib * MiB, args.peers, args.places)
        if "cost" in args.which:
            bench_cost(root / "cost", args.cost_mib * MiB, args.peers, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
