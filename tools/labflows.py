"""How one shaped uplink shares itself among TCP flows: a two-minute question the full lab takes an hour to ask.

One sender (host 0, shaped as tools/netlab.py shapes a host: an htb class at `--mbit` with the
lab's leaf queue) opens `--early` TCP connections to as many receivers at once and writes to
each without pause; `--late-at` seconds later it opens one more to another receiver. Every
second it prints what each connection's receiver acknowledged (TCP_INFO bytes_acked): the
mean, least and most of the early flows, the late flow, and the uplink queue's backlog.

Why (issue 3, README fourteenth round): a parent's uplink is shared by what each child
connection keeps in its queue, and Linux sizes a flow's packets by the lowest round trip it has
seen (`net.ipv4.tcp_tso_rtt_log`), so a connection opened on an idle link sends 64 KiB packets
and one opened behind a queue a few kilobytes. `--tso-rtt-log 0` turns that sizing off on every
host; `--late-first` puts the late connection in the queue's best-effort band and the others in
the bulk band (`SO_PRIORITY` 0 and 2), as a dfzmq parent does for its neediest child.

    python tools/labflows.py                          # 8 early flows at 3 Mbit/s, one late at 8 s
    python tools/labflows.py --late-first
    python tools/labflows.py --sndbuf 4096 --tso-rtt-log 0

Root, iproute2 and tc, as the lab; every namespace it makes is removed on exit (also Ctrl-C);
`python tools/netlab.py cleanup` removes what a killed run left.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `tools` of this checkout importable
    sys.path.insert(0, str(ROOT))

from nodes.uplink import BULK_PRIORITY, NEEDY_PRIORITY, TCP_INFO_LEN, TCPI_BYTES_ACKED  # noqa: E402
from tools.labnet import PREFIX, LabError, Topology, sh, unavailable_reason  # noqa: E402
from tools.netlab import LabSpec  # noqa: E402

PORT = 7000
SINK = ("import socket, sys\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()\n"
        "print('ready', flush=True)\n"
        "c, _ = s.accept()\n"
        "while c.recv(1 << 16):\n    pass\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/labflows.py", description=__doc__.splitlines()[0])
    p.add_argument("--early", type=int, default=8, help="connections opened at the start")
    p.add_argument("--late-at", type=float, default=8.0, help="seconds until the late connection")
    p.add_argument("--seconds", type=float, default=20.0, help="how long to measure")
    p.add_argument("--mbit", type=float, default=3.0, help="every host's upload and download")
    p.add_argument("--sndbuf", type=int, default=0, help="SO_SNDBUF of every connection (0: autotuned)")
    p.add_argument("--tso-rtt-log", type=int, default=-1,
                   help="net.ipv4.tcp_tso_rtt_log on every host (-1: leave the kernel's)")
    p.add_argument("--late-first", action="store_true",
                   help="the late connection in the best-effort band, the early ones in the bulk band")
    p.add_argument("--json", action="store_true", help="one JSON object per second instead of text")
    p.add_argument("--sender", action="store_true", help=argparse.SUPPRESS)  # inside host 0
    p.add_argument("--ips", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.sender:
        return send(args)
    reason = unavailable_reason()
    if reason is not None:
        print(f"labflows: {reason}", file=sys.stderr)
        return 2
    if args.early < 1 or args.seconds <= 0 or args.mbit <= 0:
        print("labflows: --early, --seconds and --mbit must be positive", file=sys.stderr)
        return 2
    hosts = args.early + 2
    topo = Topology(f"{PREFIX}{os.getpid()}", hosts, 200 + os.getpid() % 50)
    spec = LabSpec(peers=hosts - 1, peer_up_mbit=args.mbit, peer_down_mbit=args.mbit, origin_up_mbit=args.mbit)
    sinks: list[subprocess.Popen] = []

    def interrupted(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals[1:]:  # as Ctrl-C: the namespaces go either way
        signal.signal(sig, interrupted)
    try:
        topo.build(spec)
        if args.tso_rtt_log >= 0:
            for ns in topo.ns:
                sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.tcp_tso_rtt_log={args.tso_rtt_log}")
        for i in range(1, hosts):
            sinks.append(subprocess.Popen(["ip", "netns", "exec", topo.ns[i], sys.executable, "-c", SINK,
                                           topo.ip(i), str(PORT)], stdout=subprocess.PIPE, text=True))
        for p in sinks:  # each listening before the sender connects
            if p.stdout is None or p.stdout.readline().strip() != "ready":
                raise LabError("a receiver did not start")
        me = [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:]),
              "--sender", "--ips", ",".join(topo.ip(i) for i in range(hosts))]
        return subprocess.run(["ip", "netns", "exec", topo.ns[0], *me]).returncode
    except LabError as e:
        print(f"labflows: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for sig in signals:  # nothing stops the teardown
            signal.signal(sig, signal.SIG_IGN)
        for p in sinks:
            p.kill()
            p.wait()
        topo.teardown()
        for sig, handler in old.items():
            signal.signal(sig, handler)


def send(args: argparse.Namespace) -> int:
    """Inside host 0: open the flows, write to them, print what each got acknowledged."""
    ips = args.ips.split(",")
    conns: list[socket.socket] = []  # the early flows, in the order they connected
    late: list[socket.socket] = []
    lock = threading.Lock()

    def flow(ip: str, priority: int | None, into: list) -> None:
        s = socket.socket()
        if args.sndbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
        if priority is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, priority)
        s.connect((ip, PORT))
        with lock:
            into.append(s)
        chunk = b"\0" * 65536
        try:
            while True:
                s.sendall(chunk)
        except OSError:
            pass

    def start(ip: str, priority: int | None, into: list) -> None:
        threading.Thread(target=flow, args=(ip, priority, into), daemon=True).start()

    for ip in ips[1:args.early + 1]:
        start(ip, BULK_PRIORITY if args.late_first else None, conns)
    t0 = time.monotonic()
    last: dict[int, int] = {}
    late_started = False
    while (now := time.monotonic() - t0) < args.seconds:
        time.sleep(1.0)
        now = time.monotonic() - t0
        if not late_started and now >= args.late_at:
            start(ips[args.early + 1], NEEDY_PRIORITY if args.late_first else None, late)
            late_started = True
        with lock:
            current = list(conns) + list(late)
        rates = []
        for s in current:
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
            acked = struct.unpack_from("Q", info, TCPI_BYTES_ACKED)[0]
            rates.append((acked - last.get(s.fileno(), 0)) / 1e3)
            last[s.fileno()] = acked
        early = rates[:len(current) - len(late)]
        late_rate = rates[-1] if late else None
        backlog = queue_backlog()
        row = {"t": round(now, 1), "early_mean": round(sum(early) / max(1, len(early)), 1),
               "early_min": round(min(early, default=0.0), 1), "early_max": round(max(early, default=0.0), 1),
               "late": None if late_rate is None else round(late_rate, 1), "total": round(sum(rates), 1),
               "backlog_bytes": backlog}
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['t']:5.1f} s  early kB/s mean {row['early_mean']:6.1f} min {row['early_min']:6.1f} "
                  f"max {row['early_max']:6.1f}  late {'-' if late_rate is None else row['late']:>6}  "
                  f"total {row['total']:6.1f}  uplink backlog {backlog} B", flush=True)
    return 0


def queue_backlog() -> int:
    out = subprocess.run(["tc", "-s", "-j", "qdisc", "show", "dev", "eth0"], capture_output=True, text=True).stdout
    try:
        return max((q.get("backlog", 0) for q in json.loads(out)), default=0)
    except (ValueError, AttributeError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
