"""The shaped network lab, small: four peers, a 16 MiB file, real processes in namespaces.

It checks what must hold on any machine (every copy right, the origin read once, nothing left
behind), never how long it took: timing belongs to `make lab`, where it is reported.
"""

from __future__ import annotations

import io
import json
import os
import subprocess

import pytest

from tools import netlab


def test_bounds_follow_design():
    spec = netlab.LabSpec(peers=4, size_mib=16, peer_up_mbit=100, peer_down_mbit=100, origin_up_mbit=200)
    bound_s, plain_s = netlab.bounds(spec)
    f = 16 * 2**20
    assert bound_s == pytest.approx(f / 12.5e6)  # the peers' download is the limit
    assert plain_s == pytest.approx(4 * f / 25e6)
    slow = netlab.LabSpec(peers=4, size_mib=16, slow_half_up_mbit=20)
    assert [slow.up_mbit(i) for i in range(5)] == [200, 100, 100, 20, 20]
    spread = netlab.LabSpec(peers=5, size_mib=16, slow_half_up_mbit=20, slow_hosts="alternate")
    assert [spread.up_mbit(i) for i in range(6)] == [200, 100, 20, 100, 20, 100]
    first = netlab.LabSpec(peers=5, size_mib=16, slow_half_up_mbit=20, slow_hosts="first")
    assert [first.up_mbit(i) for i in range(6)] == [200, 20, 20, 100, 100, 100]
    # the same number of slow peers every way, so the same bound
    last = netlab.LabSpec(peers=5, size_mib=16, slow_half_up_mbit=20)
    assert netlab.bounds(spread) == pytest.approx(netlab.bounds(last))
    assert netlab.bounds(first) == pytest.approx(netlab.bounds(last))


@pytest.mark.timeout(180)
def test_lab_distributes_every_copy_reading_origin_once(tmp_path, monkeypatch):
    reason = netlab.unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be made here: {reason}")
    # Started from a directory holding another (here: broken) `dfzmq`, the lab still runs its
    # own tree's code: `python -m` puts the working directory ahead of PYTHONPATH.
    (tmp_path / "dfzmq").mkdir()
    (tmp_path / "dfzmq" / "__init__.py").write_text("raise ImportError('not the lab tree')\n")
    monkeypatch.chdir(tmp_path)
    # reno: built into every kernel, and unlike the usual default, so the setting is seen to take
    spec = netlab.LabSpec(peers=4, size_mib=16, peer_up_mbit=200, peer_down_mbit=200, origin_up_mbit=400,
                          trace=True, congestion_control="reno")
    result = netlab.run_lab(spec)

    assert result["ok"], (result["problems"], result.get("logs"))
    peers = result["hosts"][1:]
    assert len(peers) == 4 and all(h["copy_ok"] for h in peers), [(h["host"], h["error"]) for h in peers]
    assert result["origin_bytes"] <= 1.01 * spec.size
    assert result["congestion_control"] == "reno"
    # --trace: each daemon's piece trace and the bridge's counters made it into the report
    trace = result["trace"]
    assert set(trace["uplinks"]) == {f"h{i}" for i in range(5)}
    assert sum(v["use"] for v in trace["uplinks"].values()) > 0
    for name, late in trace["late"].items():
        assert late["pieces"] >= 1 and late["last"], name
    # the peers' upload events: what each served, split into its queue and the wire
    assert trace["served"] and all(v["pieces"] >= 1 and v["wire_s"] >= 0 for v in trace["served"].values())
    left = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
            if n.startswith(result["run_id"] + "-")]
    assert left == []

    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=140, color_system=None).print(netlab.render(result))
    assert "last / bound" in out.getvalue() and "slowest piece wait" in out.getvalue()
    assert "served: queue / wire s" in out.getvalue()


def test_lab_refuses_a_congestion_control_the_kernel_lacks():
    """Checked before anything is built: a one-line error, and no namespace made."""
    reason = netlab.unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be made here: {reason}")
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    spec = netlab.LabSpec(peers=1, size_mib=1, congestion_control="no-such-cc")
    with pytest.raises(netlab.LabError, match="no-such-cc: this kernel offers"):
        netlab.run_lab(spec)
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert [n for n in after.split() if n.startswith(f"{netlab.PREFIX}{os.getpid()}-")] == []
    assert len(after.splitlines()) <= len(before.splitlines())


def test_labflows_measures_early_flows_and_a_late_one_and_leaves_no_namespace(capfd):
    """tools/labflows.py (the README's fourteenth round): real flows through a shaped uplink."""
    from tools import labflows
    reason = netlab.unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be made here: {reason}")
    assert labflows.main(["--early", "2", "--late-at", "1", "--seconds", "3", "--mbit", "10",
                          "--late-first", "--json"]) == 0
    rows = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) >= 2 and rows[-1]["late"] is not None
    assert 0 < rows[-1]["total"] <= 10e6 / 8 / 1e3 * 1.2  # kB/s, within the 10 Mbit/s link
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert [n for n in after.split() if n.startswith(f"{netlab.PREFIX}{os.getpid()}-")] == []
