"""The lab's network: namespaces, veth pairs on one bridge, and tc shaping (tools/netlab.py).

Everything is made inside namespaces whose names start with `dfzl<pid>-` (PREFIX); nothing is ever
created in the root namespace, and `remove_ns` kills what runs in a namespace before deleting it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tools.netlab import LabSpec

PREFIX = "dfzl"


class LabError(RuntimeError):
    """The lab could not be built or run (not a dfzmq failure: those are in the report)."""


def bytes_per_s(mbit: float) -> float:
    return mbit * 1e6 / 8


def gso_segments(mbit: float, packet_ms: float) -> int:
    """TCP segments per GSO packet so that one packet takes about `packet_ms` on a `mbit` link
    (at least 1, at most 44: a 64 KiB super-packet); 0 when packet_ms is 0 (veth defaults)."""
    if packet_ms <= 0:
        return 0
    return max(1, min(44, int(bytes_per_s(mbit) * packet_ms / 1000 / 1448)))


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


def pick_subnet() -> int:
    """A second octet for 10.X.0.0/24 that the root namespace does not route (for clarity only:
    the lab's subnet lives in its own namespaces and cannot clash)."""
    used = {int(m) for m in re.findall(r"\b10\.(\d+)\.", sh("ip", "-4", "route", "show", "table", "all").stdout)}
    free = [x for x in range(64, 255) if x not in used]
    return random.choice(free or list(range(64, 255)))


def check_congestion_control(name: str) -> None:
    """Raise LabError unless the hosts' namespaces may use TCP congestion control `name`."""
    def sysctl(key: str) -> list[str]:
        with open(f"/proc/sys/net/ipv4/{key}") as f:
            return f.read().split()

    available = sysctl("tcp_available_congestion_control")
    if name not in available:
        raise LabError(f"--congestion-control {name}: this kernel offers {', '.join(available)} "
                       f"(one built as a module loads with: modprobe tcp_{name})")
    # Linux lets a namespace other than the first choose only from the machine's allowed list
    allowed = sysctl("tcp_allowed_congestion_control")
    if name not in allowed:
        raise LabError(f"--congestion-control {name}: a network namespace may choose only from "
                       f"net.ipv4.tcp_allowed_congestion_control ({' '.join(allowed)}); as root: "
                       f"sysctl -w net.ipv4.tcp_allowed_congestion_control='{' '.join([*allowed, name])}'")


class Topology:
    def __init__(self, run_id: str, hosts: int, subnet: int) -> None:
        self.bridge_ns = f"{run_id}-br"
        self.ns = [f"{run_id}-h{i}" for i in range(hosts)]
        self.subnet = subnet
        self.made: list[str] = []  # namespaces, in creation order

    def ip(self, host: int) -> str:
        return f"10.{self.subnet}.0.{host + 1}"

    def build(self, spec: LabSpec) -> None:
        has_netem = spec.delay_ms <= 0 or self._has_netem()
        if not has_netem:
            raise LabError("--delay-ms needs the netem qdisc, which this kernel lacks (CONFIG_NET_SCH_NETEM)")
        if spec.congestion_control:
            check_congestion_control(spec.congestion_control)
        self._add_ns(self.bridge_ns)
        br = ("ip", "-n", self.bridge_ns)
        sh(*br, "link", "add", "br0", "type", "bridge")
        sh(*br, "link", "set", "br0", "up")
        for i, ns in enumerate(self.ns):
            self._add_ns(ns)
            host = ("ip", "-n", ns)
            # created straight inside the two namespaces: nothing ever appears in the root one
            sh(*br, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh(*br, "link", "set", f"h{i}", "master", "br0", "up")
            sh(*host, "link", "set", "eth0", "addrgenmode", "none")  # no IPv6 chatter on the links
            segs = gso_segments(min(spec.up_mbit(i), spec.down_mbit(i)), spec.packet_ms)
            if segs:
                sh(*host, "link", "set", "dev", "eth0", "gso_max_segs", str(segs), "gso_max_size", str(segs * 1500))
            sh(*host, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            sh(*host, "link", "set", "eth0", "up")
            sh(*host, "link", "set", "lo", "up")
            if spec.congestion_control:
                self.set_congestion_control(ns, spec.congestion_control)
            self.shape(ns, "eth0", spec.up_mbit(i), spec.delay_ms, spec.leaf_qdisc)
            self.shape(self.bridge_ns, f"h{i}", spec.down_mbit(i), 0, spec.leaf_qdisc)

    @staticmethod
    def set_congestion_control(ns: str, name: str) -> None:
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={name}")

    def congestion_control(self) -> str:
        """The congestion control the hosts' connections use (host 0's, as all are set alike)."""
        out = sh("ip", "netns", "exec", self.ns[0], "sysctl", "-n", "net.ipv4.tcp_congestion_control", check=False)
        return out.stdout.strip()

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.made.append(name)

    def _has_netem(self) -> bool:
        probe = f"{self.bridge_ns}-netem"
        sh("ip", "netns", "add", probe)
        try:
            return sh("tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                      check=False).returncode == 0
        finally:
            sh("ip", "netns", "del", probe, check=False)

    @staticmethod
    def shape(ns: str, dev: str, mbit: float, delay_ms: float, leaf: str = "pfifo_fast") -> None:
        tc = ("tc", "-n", ns)
        rate = f"{int(mbit * 1000)}kbit"
        # one htb class; burst of one GSO super-packet (veths hand 64 KiB skbs to the qdisc)
        sh(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
        sh(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate,
           "ceil", rate, "burst", "64k", "cburst", "64k", "quantum", "65536")
        if delay_ms > 0:
            sh(*tc, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem",
               "delay", f"{delay_ms}ms", "limit", "100000")
        elif leaf == "pfifo":
            sh(*tc, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "pfifo", "limit", "1000")
        else:  # pfifo_fast: its queue length is the device's txqueuelen (1000 on veths)
            sh(*tc, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "pfifo_fast")

    def counters(self) -> dict[int, tuple[int, int]]:
        """Per host, (bytes it received, bytes it sent), read at the bridge's end of its veth."""
        links = json.loads(sh("ip", "-n", self.bridge_ns, "-s", "-j", "link", "show").stdout)
        out = {}
        for link in links:
            m = re.fullmatch(r"h(\d+)", link.get("ifname", ""))
            if m:
                s = link["stats64"]
                out[int(m.group(1))] = (s["tx"]["bytes"], s["rx"]["bytes"])
        return out

    def drops(self) -> dict[int, tuple[int, int]]:
        """Per host, packets its shaped links dropped so far: (upload, download). The root htb
        counts what its leaf queue dropped."""
        def root_drops(ns: str, dev: str) -> int:
            out = sh("tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev, check=False).stdout
            return sum(q.get("drops", 0) for q in json.loads(out or "[]") if q.get("root"))
        return {i: (root_drops(ns, "eth0"), root_drops(self.bridge_ns, f"h{i}"))
                for i, ns in enumerate(self.ns)}

    def teardown(self) -> None:
        for ns in reversed(self.made):
            remove_ns(ns)
        self.made.clear()


def remove_ns(ns: str) -> None:
    """Kill whatever still runs in `ns`, then delete it (its veth ends, and so their peers, go too)."""
    for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    sh("ip", "netns", "del", ns, check=False)
