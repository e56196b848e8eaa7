"""tools/labtrace.py: the arithmetic of a lab run's trace (link use, late pieces, waste), on
made-up samples and trace lines; the lab test in tests/test_netlab.py runs it for real."""

from __future__ import annotations

import json

import pytest

from tools import labtrace


def test_host_of_lab_peer_ids():
    assert labtrace.host_of("dfzl123-h5-abcdef0123/6b402ad769b4c52a") == "h5"
    assert labtrace.host_of("dfzl9-h12-ff/x") == "h12"
    assert labtrace.host_of("plain") == "plain"


def test_link_use_shares_idle_time_and_fifths():
    rate = 1000.0  # bytes per second
    # host 1 sends at full rate for 5 s, then nothing for 5 s; host 2 at half rate throughout
    samples = [(float(t), {1: int(rate * min(t, 5)), 2: int(rate * t / 2)}) for t in range(11)]
    use = labtrace.link_use(samples, {1: rate, 2: rate}, t_end=10.0)
    assert use["h1"]["use"] == pytest.approx(0.5)
    assert use["h1"]["use_first_fifth"] == pytest.approx(1.0)
    assert use["h1"]["use_last_fifth"] == pytest.approx(0.0)
    assert use["h1"]["below_half_s"] == pytest.approx(5.0)
    assert use["h2"]["use"] == pytest.approx(0.5) and use["h2"]["below_half_s"] == 0.0
    # only the time until t_end counts
    assert labtrace.link_use(samples, {1: rate}, t_end=5.0)["h1"]["use"] == pytest.approx(1.0)
    assert labtrace.link_use(samples[:1], {1: rate}, t_end=5.0) == {}


def test_late_pieces_and_waste_from_trace_lines(tmp_path):
    lines = [
        [100.0, "req", "t", 1, "lab-h1-aa/t", None],
        [100.0, "req", "t", 2, "lab-h5-bb/t", None],
        [100.5, "got", "t", 1, "lab-h1-aa/t", None],
        [104.0, "timeout", "t", 2, "lab-h5-bb/t", None],
        [104.0, "req", "t", 2, "lab-h1-aa/t", None],
        [104.2, "got", "t", 2, "lab-h1-aa/t", None],
        [104.3, "dup", "t", 2, "lab-h5-bb/t", None],
        [104.4, "silent", "t", -1, "lab-h5-bb/t", None],
    ]
    path = tmp_path / "h2.trace"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    events = labtrace.read_trace(path)
    assert len(events) == len(lines)
    late = labtrace.late_pieces(events, t0=100.0, finish_s=4.3, last_k=1)
    assert late["pieces"] == 2 and late["pieces_from"] == {"h1": 2}
    assert late["last"] == [{"at_s": 4.2, "num": 2, "from": "h1", "wait_s": 0.2}]
    assert late["slowest"][-1] == {"wait_s": 0.5, "num": 1, "from": "h1"}
    assert labtrace.waste({"h2": events}) == {"timeout": {"h5": 1}, "dup": {"h5": 1}, "silent": {"h5": 1}}
    summary = labtrace.summarize([(0.0, {1: (0, 0)}), (1.0, {1: (500, 1000)})], {1: (1000.0, 1000.0)},
                                 100.0, 1.0, 1.0, {"h2": path}, {"h2": 4.3})
    assert summary["uplinks"]["h1"]["use"] == pytest.approx(1.0)
    assert summary["downlinks"]["h1"]["use"] == pytest.approx(0.5)
    assert summary["late"]["h2"]["finish_s"] == 4.3
    assert summary["unasked"]["h1"]["unasked_s"] == 0.5  # piece 1 waited 0-0.5 s; t_end 1 s


def test_unasked_time_is_when_no_request_waits_at_a_parent():
    """h1 is asked at 0 and 1 and both pieces are held at 2 and 3 (the second from h7: a request
    waits until its child holds the piece, from whoever); then nothing until 6. h5 is asked
    once at 4, and the piece never comes: it waits until the end."""
    def ev(t: float, kind: str, num: int, host: str) -> list:
        return [100.0 + t, kind, "t", num, f"lab-{host}-aa/t", None]

    child_a = [ev(0, "req", 1, "h1"), ev(1, "req", 2, "h1"), ev(2, "got", 1, "h1"),
               ev(1.5, "req", 2, "h7"), ev(3, "got", 2, "h7"),
               [100.0, "parents", "t", 2, "", ["lab-h1-aa/t", "lab-h7-aa/t"]]]
    child_b = [ev(6, "req", 3, "h1"), ev(7, "got", 3, "h1"), ev(4, "req", 4, "h5")]
    out = labtrace.unasked({"a": child_a, "b": child_b}, t0=100.0, t_end=10.0)
    assert list(out) == ["h1", "h5", "h7"]
    assert out["h1"] == {"unasked_s": 3.0 + 3.0, "unasked_share": 0.6}  # 3-6 s and 7-10 s
    assert out["h5"] == {"unasked_s": 0.0, "unasked_share": 0.0}
    assert out["h7"]["unasked_s"] == pytest.approx(7.0)  # asked 1.5-3, then never again
    assert labtrace.unasked({"a": child_a}, t0=100.0, t_end=0.5)["h1"]["unasked_s"] == 0.0


def test_gso_segments_keep_a_packet_within_its_link_time():
    from tools import netlab

    assert netlab.gso_segments(100, 0) == 0  # off: veth defaults
    assert netlab.gso_segments(2.5, 5) == 1  # 1448 bytes already take 4.6 ms
    assert netlab.gso_segments(25, 5) == 10
    assert netlab.gso_segments(10_000, 5) == 44  # never above a 64 KiB super-packet


def test_parent_waits_split_queue_from_wire_and_name_the_slowest_child():
    """h1 serves h2 (asked from 0 s) and h3 (asked from 5 s). h2's pieces wait 1 s in h1's queue
    and 0.5 s on the wire; h3's go out at once and take 8 s on the wire: h3 is the slowest child."""
    def ev(t: float, kind: str, num: int, host: str) -> list:
        return [100.0 + t, kind, "t", num, f"lab-{host}-aa/t", None]

    parent = []
    child2, child3 = [], []
    for k in range(3):
        parent += [ev(2 * k, "up-asked", k, "h2"), ev(2 * k + 1, "up-sent", k, "h2")]
        child2 += [ev(2 * k, "req", k, "h1"), ev(2 * k + 1.5, "got", k, "h1")]
        parent += [ev(5 + k, "up-asked", 10 + k, "h3"), ev(5 + k, "up-sent", 10 + k, "h3")]
        child3 += [ev(5 + k, "req", 10 + k, "h1"), ev(13 + k, "got", 10 + k, "h1")]
    child3.append(ev(20, "got", 99, "h1"))  # a piece h1 never logged sending (a trace cut short): not counted
    out = labtrace.parent_waits({"h1": parent, "h2": child2, "h3": child3}, t0=100.0)
    assert list(out) == ["h1"]
    assert out["h1"]["pieces"] == 6
    assert out["h1"]["queue_s"] == pytest.approx(1.0)  # the upper median of 0, 0, 0, 1, 1, 1
    assert out["h1"]["wire_s"] == pytest.approx(8.0)
    assert out["h1"]["slowest_child"] == {"child": "h3", "asked_from_s": 5.0, "pieces": 3, "wire_s": 8.0}


def test_parent_waits_pair_a_repeated_request_with_its_own_send():
    """h2 asks h1 for piece 7 at 0 (sent at once), times out and asks again at 20 (sent at
    once); the first copy lands at 10.4 and the second at 20.5: 10.4 s and 0.5 s on the wire,
    not 0.4 and a negative time."""
    def ev(t: float, kind: str, num: int, host: str, task: str = "t") -> list:
        return [100.0 + t, kind, task, num, f"lab-{host}-aa/{task}", None]

    parent = [ev(0, "up-asked", 7, "h2"), ev(0, "up-sent", 7, "h2"),
              ev(20, "up-asked", 7, "h2"), ev(20, "up-sent", 7, "h2"),
              ev(1, "up-asked", 7, "h2", task="u"), ev(1, "up-sent", 7, "h2", task="u")]
    child = [ev(0, "req", 7, "h1"), ev(10.4, "got", 7, "h1"), ev(20, "req", 7, "h1"), ev(20.5, "dup", 7, "h1"),
             ev(20.5, "got", 7, "h1"), ev(1, "req", 7, "h1", task="u"), ev(3, "got", 7, "h1", task="u")]
    out = labtrace.parent_waits({"h1": parent, "h2": child}, t0=100.0)
    assert out["h1"]["pieces"] == 3  # piece 7 of task t twice, of task u once
    assert out["h1"]["slowest_child"]["wire_s"] == pytest.approx(2.0)  # the median of 0.5, 2, 10.4
    assert out["h1"]["queue_s"] == 0.0
    assert labtrace.parent_waits({}, t0=0.0) == {}
