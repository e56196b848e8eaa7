"""`make demo`: a local dfzmq cluster distributing a real file peer to peer, and what happened.

Starts a counting HTTP origin serving a generated file, then a manager, a scheduler, a seed
peer and four peer daemons as real processes on loopback; fetches the file on all four peers at
once through their control sockets; verifies every copy; prints per peer the time and where
its bytes came from, and how many bytes the origin served. Everything is removed afterwards
unless --keep is given.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tools.cluster import LocalCluster  # noqa: E402
from tools.origin import Origin  # noqa: E402


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    args = ap.parse_args()
    console = Console()
    root = Path(tempfile.mkdtemp(prefix="dfzmq-demo-"))
    try:
        www = root / "www"
        www.mkdir()
        size = args.size_mib * 2**20
        console.print(f"[bold]dfzmq demo[/]: generating a {mib(size)} file for the origin ...")
        sha = hashlib.sha256()
        with open(www / "model.bin", "wb") as f:
            for _ in range(size // 2**20):
                block = os.urandom(2**20)
                sha.update(block)
                f.write(block)
        want = sha.hexdigest()
        with Origin(www) as origin, LocalCluster(root / "cluster", peers=args.peers, interval_s=1.0,
                                                 log_level="warning") as cluster:
            console.print(f"cluster up: manager {cluster.manager_addr}, scheduler "
                          f"{cluster.scheduler_addrs[0]}, 1 seed peer, {args.peers} peers; "
                          f"origin {origin.url('model.bin')}")
            console.print(f"fetching on {args.peers} peers at once ...")
            t0 = time.monotonic()
            results = cluster.fetch_all(cluster.peers, origin.url("model.bin"), root)
            total_s = time.monotonic() - t0
            served = origin.bytes_served("model.bin")
            table = Table(title=f"{mib(size)} to {args.peers} peers in {total_s:.1f} s")
            for col in ("peer", "time", "from origin", "from seed", "from other peers", "sha256"):
                table.add_column(col, justify="right" if col != "peer" else "left")
            ok_all = True
            for name in cluster.peers:
                r = results[name]
                if "error" in r:
                    ok_all = False
                    table.add_row(name, f"{r['wall_s']:.1f} s", "-", "-", "-", f"[red]{r['error']}[/]")
                    continue
                h = hashlib.sha256()
                with open(root / f"{name}.out", "rb") as f:
                    while block := f.read(4 << 20):
                        h.update(block)
                ok = h.hexdigest() == want
                ok_all &= ok
                table.add_row(name, f"{r['wall_s']:.1f} s", mib(r["origin_bytes"]), mib(r["seed_bytes"]),
                              mib(r["peer_bytes"]), "[green]ok[/]" if ok else "[red]MISMATCH[/]")
            console.print(table)
            seed = cluster.stat("seed0") or {}
            console.print(f"origin served {mib(served)} for a {mib(size)} file: "
                          f"[bold]{served / size:.2f}x[/] the file size "
                          f"(plain downloads would have read {args.peers}x)")
            console.print(f"seed peer uploaded {mib(seed.get('uploaded_bytes', 0))}; the other "
                          f"{mib(sum(r.get('peer_bytes', 0) for r in results.values()))} went peer to peer")
            if not ok_all or served != size:
                console.print("[bold red]demo failed[/]")
                return 1
        return 0
    finally:
        if args.keep:
            console.print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
