"""Issue 4's proxy benchmark across shaped links: curl through a peer's proxy against curl from
the origin, each on its own host as in a real cluster.

`tools/bench.py proxy` runs both on loopback, where nothing but the two cores limits either side:
it measures the proxy path's CPU against curl's and http.server's. In a cluster the origin is
across a network and the file is held by peers across another; this runs that in the lab
(tools/netlab.py): host 0 is the origin site (HTTP origin, manager, scheduler, seed), host 1 a
peer that fetched the file first, hosts 2.. one fresh peer per round. Every link is shaped to
the same rate each way (the origin site's upload too), so both downloads have the same bound:
the fetching host's downlink. Per round, on the fresh host: `curl URL` (straight from the
origin), then `curl -x ITS_PROXY URL` (the proxy matches `\\.bin$`, so the file comes peer to
peer from the seed and host 1), both outputs checked against the file's sha256. Reported: both
times, their ratio (goal 0.8), and the CPU seconds of the proxy's daemon and the two senders.

`python tools/bench.py proxynet --net-mbit 1000 --proxy-mib 1024` (root; skips where namespaces
cannot be made). Rates above what two cores can carry through the proxy path (about 300 MiB/s
on this VM, `bench.py proxy`) measure the cores again, not the network.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

from tools.labnet import LabError, unavailable_reason
from tools.netlab import Lab, LabSpec, proc_cpu_s, sha256_of

PROXY_PORT = 65001  # every host is its own namespace: one port serves them all


def curl_in(ns: str, out: Path, url: str, proxy: str = "") -> float:
    """Seconds `curl` in namespace `ns` took to fetch `url` to `out`; raises LabError on failure."""
    cmd = ["ip", "netns", "exec", ns, "curl", "-sSf", "--noproxy", "" if proxy else "*", "-o", str(out)]
    if proxy:
        cmd += ["-x", proxy]
    t0 = time.monotonic()
    r = subprocess.run([*cmd, url], capture_output=True, text=True)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise LabError(f"curl {'via ' + proxy if proxy else 'direct'} failed: {r.stderr.strip()}")
    return took


def run_proxy_net(size_mib: float, mbit: float, rounds: int, log=lambda msg: None) -> dict:
    from dfzmq import wire
    from dfzmq.cli import fetch_via_daemon

    env = (("DFZMQ_PROXY_LISTEN", f"0.0.0.0:{PROXY_PORT}"), ("DFZMQ_PROXY_RULES", r"\.bin$"))
    spec = LabSpec(peers=1 + rounds, size_mib=size_mib, peer_up_mbit=mbit, peer_down_mbit=mbit,
                   origin_up_mbit=mbit, env=env)
    lab = Lab(spec)
    try:
        log(f"building {spec.peers + 1} hosts at {mbit:g} Mbit/s each way")
        lab.start()
        out = lab.work / "out"
        out.mkdir()
        log(f"h1 fetches {size_mib:g} MiB first (from the seed, which reads the origin once)")
        fetch_via_daemon(lab.control("h1"), wire.Download("prime", lab.url, str(out / "prime.bin")),
                         lambda done, total: None)
        (out / "prime.bin").unlink()
        senders = [lab.procs[n].popen.pid for n in ("h0", "h1")]
        rows = []
        for r in range(rounds):
            host = r + 2
            name, ns = f"h{host}", lab.topo.ns[host]
            direct_s = curl_in(ns, out / "direct.bin", lab.url)
            direct_ok = sha256_of(out / "direct.bin") == lab.sha256
            (out / "direct.bin").unlink()
            pids = [lab.procs[name].popen.pid, *senders]
            cpu0 = sum(proc_cpu_s(p) for p in pids)
            proxy_s = curl_in(ns, out / "proxy.bin", lab.url, f"http://{lab.topo.ip(host)}:{PROXY_PORT}")
            cpu_s = sum(proc_cpu_s(p) for p in pids) - cpu0
            proxy_ok = sha256_of(out / "proxy.bin") == lab.sha256
            (out / "proxy.bin").unlink()
            got = (lab.stat(name) or {}).get("counters", {})  # daemon-wide bytes by source
            rows.append({"host": name, "direct_s": direct_s, "proxy_s": proxy_s, "ratio": direct_s / proxy_s,
                         "direct_ok": direct_ok, "proxy_ok": proxy_ok, "proxy_cpu_s": cpu_s,
                         "p2p_bytes": got.get("bytes.peer", 0) + got.get("bytes.seed", 0),
                         "origin_bytes": got.get("bytes.origin", 0)})
            log(f"{name}: direct {direct_s:.2f} s, via its proxy {proxy_s:.2f} s")
        origin = lab.origin_stats()
    finally:
        lab.close()
    f = spec.size
    return {"size": f, "mbit": mbit, "rounds": rows, "origin_over_f": origin.get("total_bytes", 0) / f,
            "ratio_best": min(x["direct_s"] for x in rows) / min(x["proxy_s"] for x in rows),
            "ratio_median": statistics.median(x["ratio"] for x in rows),
            "ok": all(x["direct_ok"] and x["proxy_ok"] for x in rows)}


def report(result: dict) -> str:
    mib = result["size"] / 2**20
    rate = result["mbit"] / 8 * 1e6 / 2**20
    lines = [f"proxynet {mib:.0f} MiB, every link {result['mbit']:g} Mbit/s ({rate:.0f} MiB/s):"]
    for x in result["rounds"]:
        lines.append(f"  {x['host']}: curl from the origin {x['direct_s']:.2f} s ({mib / x['direct_s']:.0f} MiB/s), "
                     f"curl -x its proxy {x['proxy_s']:.2f} s ({mib / x['proxy_s']:.0f} MiB/s): ratio "
                     f"{x['ratio']:.2f}; {x['p2p_bytes'] / 2**20:.0f} MiB p2p, "
                     f"{x['origin_bytes'] / 2**20:.0f} MiB from the origin; CPU-s proxy daemon + senders "
                     f"{x['proxy_cpu_s']:.2f}; copies {'ok' if x['direct_ok'] and x['proxy_ok'] else 'WRONG'}")
    lines.append(f"  ratio best {result['ratio_best']:.2f}, median {result['ratio_median']:.2f} [goal >= 0.8]; "
                 f"origin bytes / F {result['origin_over_f']:.2f} (h1's prime and each direct curl: "
                 f"{1 + len(result['rounds'])} expected)")
    return "\n".join(lines)


def bench(size_mib: float, mbit: float, rounds: int) -> None:
    reason = unavailable_reason()
    if reason is not None:
        print(f"proxynet skipped: {reason}")
        return
    print(report(run_proxy_net(size_mib, mbit, rounds, log=lambda m: print(f"  .. {m}", flush=True))))
