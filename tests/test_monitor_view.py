"""The monitor's screen as a pure function of its state, drawn at fixed terminal sizes."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from dfzmq import wire
from dfzmq.monitor_state import MonitorState
from dfzmq.monitor_view import bar, budget, human, render

SCHED = "scheduler-vm-1234abcd"


def big_state(n_hosts: int = 1000, n_tasks: int = 300, now: float = 100.0) -> MonitorState:
    st = MonitorState("tcp://10.0.0.1:8900", now - 5)
    members = [wire.MemberInfo(SCHED, "scheduler", "tcp://10.0.0.1:8910", "tcp://10.0.0.1:8911",
                               version="0.1.0"),
               wire.MemberInfo("seed-host", "seed", "tcp://10.0.0.2:7000", version="0.1.0"),
               wire.MemberInfo("old-sched", "scheduler", "tcp://10.0.0.9:8910", state="down")]
    st.on_manager_snapshot(wire.ClusterSnapshot(7, members, "tcp://10.0.0.1:8901"), now - 5)
    hosts = [wire.HostView(f"host-{i:04x}", f"node{i:04d}.rack{i % 40}.dc1.example.com",
                           seed=i == 0, idc="dc1", location="eu|fr|paris", version="0.1.0",
                           peers=i % 4, upload_slots=32, children=i % 33,
                           pieces_served=i, up_rate=float(i * 1000), down_rate=0.0)
             for i in range(n_hosts)]
    tasks = [wire.TaskView(f"{i:02x}" + "e" * 62, f"https://registry.example.com/v2/app{i}/blobs/sha256:{i:064x}",
                           content_length=(i + 1) << 20, piece_count=64, pieces_known=64,
                           complete=i % 3 == 0, peers=10, downloading=0 if i % 3 == 0 else 4,
                           done=6, done_bytes=6 * ((i + 1) << 20), origin_bytes=(i + 1) << 20,
                           p2p_bytes=5 * ((i + 1) << 20), rate=float(i * 10_000))
             for i in range(n_tasks)]
    st.on_scheduler_state(SCHED, wire.SchedulerState(50, SCHED, hosts, tasks), now - 1)
    for i in range(30):
        st.on_scheduler_pub(SCHED, wire.Event(51 + i, "back-to-source" if i % 2 else "peer-registered",
                                              {"task_id": tasks[i].task_id, "peer_id": f"host-{i:04x}/p",
                                               "reason": "first peer of the task"}), now - 0.5)
    st.on_manager_pub(wire.PubHeartbeat(7, "manager"), now - 0.5)
    return st


def draw(st: MonitorState, width: int, height: int, now: float = 100.0) -> list[str]:
    buf = io.StringIO()
    console = Console(file=buf, width=width, height=height, color_system=None, legacy_windows=False)
    console.print(render(st, width, height, now=now))
    return buf.getvalue().splitlines()


@pytest.mark.parametrize("width,height", [(80, 24), (100, 30), (120, 40), (200, 60)])
def test_a_thousand_hosts_fit_the_screen(width, height):
    lines = draw(big_state(), width, height)
    assert len(lines) <= height
    assert max(len(line) for line in lines) <= width
    text = "\n".join(lines)
    assert "of 1000" in text and "of 300" in text, "says how many rows it left out"
    assert "schedulers 1 up 1 down" in text and "seeds 1 up" in text and "peers 999 up" in text
    # Busiest first: the host uploading most and the task downloading fastest are on top.
    assert "node0999" in text and "node0000 " not in text
    assert "12beeeee" in text  # task 299: the highest rate among active tasks
    assert "back-to-source" in text
    assert "peer 001d" in text and "reason first peer" in text, "events name the peer, as hosts do"
    assert "q or Ctrl-C" in lines[-1]
    assert "SILENT" not in text


def test_80_columns_keep_the_numbers_and_drop_optional_columns():
    lines = draw(big_state(), 80, 24)
    text = "\n".join(lines)
    for col in ("task", "size", "peers", "progress", "rate", "origin/p2p", "up", "down", "load", "served"):
        assert col in text
    assert "location" not in text
    wide = "\n".join(draw(big_state(), 160, 40))
    assert "location" in wide and "eu|fr|paris" in wide


def test_a_silent_stream_is_said_plainly():
    st = big_state()
    text = "\n".join(draw(st, 100, 30, now=130.0))
    assert "STREAM SILENT" in text and "scheduler" in text and "manager silent" in text


def test_an_empty_cluster_and_tiny_terminals_render():
    st = MonitorState("tcp://127.0.0.1:8900", 0.0)
    lines = draw(st, 80, 24, now=1.0)
    assert "not answering" in lines[0]
    assert "Tasks — 0" in "\n".join(lines)
    lines = draw(big_state(), 40, 8)  # smaller than anything sensible: still bounded in width
    assert max(len(line) for line in lines) <= 40


def test_budget_gives_unused_rows_away():
    assert budget(24, 2, 1000, 0) == (2, 13, 0)
    assert budget(24, 1, 4, 50) == (1, 4, 10), "a small cluster shows more events"
    t, h, e = budget(60, 300, 1000, 200)
    assert t + h + e == 51 and e == 8


def test_helpers():
    assert human(0) == "0" and human(1536) == "1.5K" and human(64 << 20) == "64.0M"
    assert human(-1) == "?"
    assert bar(0.5, 4) == "██░░  50%"


def test_url_label_puts_the_telling_part_first():
    from dfzmq.monitor_view import url_label

    assert url_label("http://127.0.0.1:8000/data/model.bin?sig=x") == "model.bin · 127.0.0.1:8000"
    assert url_label("https://example.com/") == "example.com"


def test_hosts_no_scheduler_knows_any_more_count_as_down():
    st = big_state(n_hosts=40, n_tasks=30)
    st.on_scheduler_pub(SCHED, wire.StateDelta(81, SCHED, gone_hosts=["host-0001", "host-0002"]), 99.0)
    text = "\n".join(draw(st, 120, 40))
    assert "peers 37 up 2 down" in text
