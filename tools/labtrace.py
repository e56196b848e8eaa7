"""What a lab run's time went on: upload use per host over time, and the late pieces.

`python tools/netlab.py run ... --trace` samples the bridge's per-port byte counters every
`every_s` (the bytes each host put on its uplink) and has every daemon write a piece trace
(nodes/trace.py). This module turns both into the run report's "trace" section:

- uplinks, downlinks: per host, the share of its shaped rate it used over the run (until the
  last host finished), in the first and last fifth of the run, and the seconds it sat below
  half its rate while some peer still downloaded;
- late: per peer, where its last pieces came from (parent host, seconds from request to
  arrival) and how long its slowest request waited;
- waste: endgame duplicates, timed out requests and parents dropped as silent, by parent host;
- served: per parent host, how long pieces waited in its queue and then on the wire, and its
  child slowest on the wire (parent_waits);
- unasked: per parent host, the time from its first request until the last host finished in
  which no child had a request waiting at it: an uplink idle for want of requests, not of
  bandwidth (its children already held what it had, or it had none left). Session 9 found this
  way that the fast half of an N=32 slow-half run pulled from each other in step and sat
  unasked 10-23% of the run.

Pure functions over plain data (samples, trace lines), so the arithmetic is unit-tested
without namespaces.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from statistics import median_high
from pathlib import Path


def host_of(peer_id: str) -> str:
    """'dfzl123-h5-abcdef/taskprefix' -> 'h5' (the lab names hosts RUNID-hN)."""
    name = peer_id.split("/", 1)[0]
    for part in name.split("-"):
        if part.startswith("h") and part[1:].isdigit():
            return part
    return name


def link_use(samples: list[tuple[float, dict[int, int]]], rates_bps: dict[int, float],
             t_end: float, min_share: float = 0.5) -> dict[str, dict]:
    """Use of one direction of each host's link from (t, {host: bytes so far}) samples, t from
    the run's start, as a share of its shaped rate: over the run (until `t_end`, when the last
    host finished), in its first and last fifth, and the seconds spent below `min_share`."""
    out: dict[str, dict] = {}
    if len(samples) < 2 or t_end <= 0:
        return out
    for host, rate in rates_bps.items():
        used = first = last = idle = 0.0
        span_first = span_last = 0.0
        for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
            if t0 >= t_end:
                break
            dt = min(t1, t_end) - t0
            if dt <= 0:
                continue
            sent = (c1.get(host, 0) - c0.get(host, 0)) * dt / (t1 - t0)
            used += sent
            if sent < min_share * rate * dt:
                idle += dt
            if t0 < t_end / 5:
                first += sent
                span_first += dt
            if t1 > 4 * t_end / 5:
                last += sent
                span_last += dt
        out[f"h{host}"] = {
            "use": round(used / (rate * t_end), 3),
            "use_first_fifth": round(first / (rate * span_first), 3) if span_first else None,
            "use_last_fifth": round(last / (rate * span_last), 3) if span_last else None,
            "below_half_s": round(idle, 1),
        }
    return out


def read_trace(path: Path) -> list[list]:
    lines = []
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return lines


def late_pieces(events: list[list], t0: float, finish_s: float | None, last_k: int = 5) -> dict:
    """For one peer's trace: where its last `last_k` pieces came from and how long they took."""
    asked: dict[tuple[int, str], float] = {}
    got = []
    waits = []
    for t, ev, _task, num, parent, _extra in events:
        if ev == "req":
            asked[(num, parent)] = t
        elif ev == "got":
            at = asked.get((num, parent))
            wait = t - at if at is not None else None
            got.append((t - t0, num, parent, wait))
            if wait is not None:
                waits.append((wait, num, host_of(parent)))
    got.sort()
    tail = got[-last_k:]
    by_parent = Counter(host_of(p) for _, _, p, _ in got)
    return {
        "finish_s": finish_s,
        "pieces": len(got),
        "last": [{"at_s": round(t, 2), "num": n, "from": host_of(p),
                  "wait_s": None if w is None else round(w, 2)} for t, n, p, w in tail],
        "slowest": [{"wait_s": round(w, 2), "num": n, "from": h} for w, n, h in sorted(waits)[-3:]],
        "pieces_from": dict(sorted(by_parent.items())),
    }


def waste(all_events: dict[str, list[list]]) -> dict:
    counts: dict[str, Counter] = defaultdict(Counter)
    for events in all_events.values():
        for _t, ev, _task, _num, parent, _extra in events:
            if ev in ("dup", "timeout", "silent"):
                counts[ev][host_of(parent)] += 1
    return {ev: dict(sorted(c.items())) for ev, c in counts.items()}


def unasked(all_events: dict[str, list[list]], t0: float, t_end: float) -> dict[str, dict]:
    """Per parent host: seconds (and share) from its first request to `t_end` (from the run's
    start) in which no request was waiting at it. A request waits from when it was asked until
    its child held the piece, from whichever parent (or until `t_end`)."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for events in all_events.values():
        held: dict[int, float] = {}
        for t, ev, _task, num, _parent, _extra in events:
            if ev == "got":
                held.setdefault(num, t)
        for t, ev, _task, num, parent, _extra in events:
            if ev == "req":
                spans[host_of(parent)].append((t - t0, held.get(num, t0 + t_end) - t0))
    out = {}
    for host, waits in spans.items():
        waits.sort()
        start = waits[0][0]
        if start >= t_end:
            continue
        idle, covered = 0.0, start
        for begin, end in waits:
            begin, end = min(begin, t_end), min(end, t_end)
            if begin > covered:
                idle += begin - covered
            covered = max(covered, end)
        idle += t_end - covered
        out[host] = {"unasked_s": round(idle, 2), "unasked_share": round(idle / (t_end - start), 3)}
    return dict(sorted(out.items(), key=lambda kv: (len(kv[0]), kv[0])))


def parent_waits(all_events: dict[str, list[list]], t0: float) -> dict[str, dict]:
    """Per parent host, from its own upload events (`up-asked`: a request arrived, `up-sent`:
    the piece read and handed to the child's connection) and its children's arrivals: the median
    seconds a piece waited in the parent's queue and then on the wire (ZeroMQ, the kernel, the
    links, the child storing it), and the child whose pieces took longest on the wire, with when
    it first asked this parent. Session 18 found this way that a child added to a busy parent
    late (a laggard's boost) got its pieces after 8-21 s on the wire while the parent's first
    children got theirs in about 1 s: the parent's queue had released them first, TCP then gave
    the new connection little. A piece asked of the same parent twice (after a timeout) pairs
    each arrival with the earliest send not yet matched that left before it."""
    sends: dict[tuple, list[tuple[float, float]]] = defaultdict(list)  # (parent, child, task, num)
    for parent, events in all_events.items():
        asked: dict[tuple, list[float]] = defaultdict(list)
        for t, ev, task, num, child, _extra in events:
            key = (host_of(child), task, num)
            if ev == "up-asked":
                asked[key].append(t)
            elif ev == "up-sent" and asked[key]:
                sends[(parent, *key)].append((asked[key].pop(0), t))
    pairs: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    first: dict[tuple[str, str], float] = {}
    for child, events in all_events.items():
        for t, ev, task, num, parent, _extra in events:
            key = (host_of(parent), child)
            if ev == "req":
                first.setdefault(key, t - t0)
            elif ev == "got":
                pending = sends.get((key[0], child, task, num))
                if pending and pending[0][1] <= t:
                    at, out = pending.pop(0)
                    pairs[key].append((out - at, t - out))
    out: dict[str, dict] = {}
    for parent in sorted({p for p, _ in pairs}, key=lambda h: (len(h), h)):
        mine = {c: w for (p, c), w in pairs.items() if p == parent}
        waits = [w for ws in mine.values() for w in ws]
        worst = max(mine, key=lambda c: (len(mine[c]) >= 3, median_high([w for _, w in mine[c]])))
        joined = first.get((parent, worst))  # None: the child's trace has no request to it
        out[parent] = {
            "pieces": len(waits),
            "queue_s": round(median_high([q for q, _ in waits]), 2),
            "wire_s": round(median_high([w for _, w in waits]), 2),
            "slowest_child": {"child": worst, "asked_from_s": None if joined is None else round(joined, 1),
                              "pieces": len(mine[worst]),
                              "wire_s": round(median_high([w for _, w in mine[worst]]), 2)},
        }
    return out


def summarize(samples, rates_bps, t0: float, last_s: float | None, wall_s: float,
              traces: dict[str, Path], finish: dict[str, float | None]) -> dict:
    t_end = last_s or wall_s
    events = {name: read_trace(path) for name, path in traces.items()}
    # samples: (t, {host: (bytes received, bytes sent)}); rates: {host: (down, up) bytes/s}
    rx = [(t, {h: c[0] for h, c in counts.items()}) for t, counts in samples]
    tx = [(t, {h: c[1] for h, c in counts.items()}) for t, counts in samples]
    return {
        "uplinks": link_use(tx, {h: r[1] for h, r in rates_bps.items()}, t_end),
        "downlinks": link_use(rx, {h: r[0] for h, r in rates_bps.items() if h}, t_end),
        "late": {name: late_pieces(ev, t0, finish.get(name)) for name, ev in events.items()},
        "waste": waste(events),
        "unasked": unasked(events, t0, t_end),
        "served": parent_waits(events, t0),
    }
