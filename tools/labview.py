"""The lab's report drawn with rich: a pure function of the result dict (tools/netlab.py)."""

from __future__ import annotations

MiB = 2**20


def _mib(b) -> str:
    return "-" if b is None else f"{b / MiB:.1f}"


def render(result: dict):
    """The report as rich renderables (a pure function of the result)."""
    from rich.console import Group
    from rich.table import Table

    hosts = Table(title=f"dfzmq lab {result['run_id']}: {result['file_bytes'] / MiB:g} MiB to "
                        f"{result['spec']['peers']} peers ({result['subnet']}, "
                        f"TCP {result.get('congestion_control') or '?'})")
    # MiB columns: what the daemon stored from the origin / the seed / other peers, bytes on its
    # link in and out, and piece bytes its upload server sent
    for col in ("host", "up/dn Mbit", "done s", "origin", "seed", "peers", "wire in", "wire out",
                "sent", "CPU s", "copy"):
        hosts.add_column(col, justify="left" if col in ("host", "copy") else "right")
    for h in result["hosts"]:
        copy = "-" if "copy_ok" not in h else ("ok" if h["copy_ok"] else f"BAD {h['error']}"[:60])
        hosts.add_row(h["host"] + (" seed" if h["role"] != "peer" else ""),
                      f"{h['up_mbit']:g}/{h['down_mbit']:g}",
                      "-" if h["finish_s"] is None else f"{h['finish_s']:.2f}",
                      _mib(h["origin_bytes"]), _mib(h["seed_bytes"]), _mib(h["peer_bytes"]),
                      _mib(h["wire_rx_bytes"]), _mib(h["wire_tx_bytes"]), _mib(h["uploaded_bytes"]),
                      f"{h['cpu_s']:.1f}", copy)
    summary = Table(show_header=False, box=None)
    cpu = result["cpu"]
    last = result["last_s"]
    for k, v in (
        ("last host finished", "FAILED" if last is None else f"{last:.2f} s"),
        ("lower bound", f"{result['bound_s']:.2f} s"),
        ("last / bound", "-" if result["ratio"] is None else f"{result['ratio']:.2f}"),
        ("plain downloads from origin", f"{result['plain_s']:.2f} s"),
        ("origin bytes / F", f"{result['origin_over_f']:.3f}"),
        ("redundant bytes (stored beyond N*F)", f"{result['redundant_bytes']} ({result['redundant_pct']:.2f}%)"),
        ("redundant bytes (sent beyond N*F)", f"{result['redundant_sent_bytes']} ({result['redundant_sent_pct']:.2f}%)"),
        ("wire bytes into peers / N*F", f"{result['wire_rx_over_nf']:.3f} (incl. TCP/IP and ZeroMQ overhead)"),
        ("CPU used by this lab (all cores)", f"{cpu['lab_pct']:.0f}%"),
        ("CPU busy, whole machine (mean / peak)", f"{cpu['busy_pct']:.0f}% / {cpu['peak_pct']:.0f}%, "
                                              f"softirq {cpu['softirq_pct']:.0f}% "
                                              f"(per core {', '.join(f'{c:.0f}%' for c in cpu['per_core_pct'])})"),
        ("CPU s: peers / seed / scheduler / origin", f"{cpu['peer_daemons_cpu_s']:.1f} / {cpu['seed_cpu_s']:.1f} / "
                                                    f"{cpu['cpu_s']['scheduler']:.1f} / {cpu['cpu_s']['origin']:.1f}"),
    ):
        summary.add_row(k, v)
    live = result.get("liveness")
    if live is not None:
        # a run where control traffic was lost measures the loss, not the scheduling
        summary.add_row("scheduler dropped hosts / daemons reconnected / slow scheduler turns",
                        f"{live['scheduler_dropped_hosts']} / {live['daemon_reconnects']} / "
                        f"{live['scheduler_slow_turns']}")
    drops = result.get("queue_drops")
    if drops:
        summary.add_row("packets dropped by shaped links (up / down)",
                        ", ".join(f"{h} {u}/{d}" for h, (u, d) in drops.items()))
    for goal, met in result["goals"].items():
        summary.add_row(f"goal: {goal}", "met" if met else "NOT MET")
    for problem in result["problems"]:
        summary.add_row("FAILED", problem)
    if "trace" not in result:
        return Group(hosts, summary)
    trace = result["trace"]
    links = Table(title="--trace: link use, share of the shaped rate (whole run / last fifth); share of the "
                        "run no child asked it for anything; slowest piece wait")
    for col in ("host", "up use", "down use", "unasked", "slowest wait s", "last piece from",
                "served: queue / wire s, slowest child"):
        links.add_column(col, justify="left" if col == "host" else "right")
    for h in result["hosts"]:
        up, dn = trace["uplinks"].get(h["host"], {}), trace.get("downlinks", {}).get(h["host"], {})
        late = trace["late"].get(h["host"], {})
        slowest = max((x["wait_s"] for x in late.get("slowest", [])), default=None)
        last = late.get("last") or [{}]
        asked = trace.get("unasked", {}).get(h["host"])
        served = trace.get("served", {}).get(h["host"])
        worst = served["slowest_child"] if served else None
        links.add_row(h["host"], f"{up.get('use', 0):.2f} / {up.get('use_last_fifth') or 0:.2f}",
                      f"{dn['use']:.2f} / {dn.get('use_last_fifth') or 0:.2f}" if dn else "-",
                      f"{asked['unasked_share']:.2f}" if asked else "-",
                      "-" if slowest is None else f"{slowest:.1f}", last[-1].get("from", "-"),
                      f"{served['queue_s']:.1f} / {served['wire_s']:.1f}, {worst['child']} {worst['wire_s']:.1f} "
                      + ("" if worst["asked_from_s"] is None else f"(from {worst['asked_from_s']:.0f} s)")
                      if served else "-")
    waste = ", ".join(f"{ev} {sum(c.values())}" for ev, c in trace["waste"].items()) or "none"
    return Group(hosts, summary, links, f"duplicates / timeouts / parents dropped silent: {waste}")
