"""MonitorState: the Clone pattern on the client side (snapshot, sequenced updates, resync), the
merging of what several schedulers say, and silence detection. Pure: no sockets, no clock."""

from __future__ import annotations

from dfzmq import wire
from dfzmq.monitor_state import MANAGER, MonitorState, Need

S1, S2 = "scheduler-one", "scheduler-two"


def member(mid: str, role: str = "scheduler", state: str = "up") -> wire.MemberInfo:
    return wire.MemberInfo(mid, role, f"tcp://{mid}:1", f"tcp://{mid}:2", version="1.0", state=state)


def host(hid: str, **kw) -> wire.HostView:
    return wire.HostView(hid, hid + ".example", **kw)


def sched_state(seq: int, hosts=(), tasks=(), sid: str = S1) -> wire.SchedulerState:
    return wire.SchedulerState(seq, sid, list(hosts), list(tasks), interval_s=1.0)


def started(*schedulers: str) -> MonitorState:
    st = MonitorState("tcp://mgr:1", 0.0)
    needs = st.on_manager_snapshot(wire.ClusterSnapshot(3, [member(s) for s in schedulers]), 0.0)
    assert needs == [Need("watch", s) for s in schedulers]
    return st


def test_updates_before_the_snapshot_wait_and_stale_ones_are_dropped():
    st = started(S1)
    early = [wire.StateDelta(5, S1, hosts=[host("a")]), wire.StateDelta(6, S1, hosts=[host("b")]),
             wire.Event(7, "peer-registered", {"task_id": "t1"})]
    for m in early:
        assert st.on_scheduler_pub(S1, m, 0.1) == []
    assert st.hosts() == []
    # The snapshot already includes seq 5: only 6 and 7 are applied on top of it.
    assert st.on_scheduler_state(S1, sched_state(5, [host("a"), host("z")]), 0.2) == []
    assert {h.host_id for h in st.hosts()} == {"a", "b", "z"}
    assert [e.name for e in st.events] == ["peer-registered"]
    assert st.schedulers[S1].seq == 7
    assert st.counters["stale"] == 1


def test_a_gap_asks_for_a_new_snapshot():
    st = started(S1)
    st.on_scheduler_state(S1, sched_state(10), 0.0)
    assert st.on_scheduler_pub(S1, wire.StateDelta(11, S1, hosts=[host("a")]), 0.1) == []
    # 12 was lost (a full queue): ask again, keep 13 for after the snapshot.
    assert st.on_scheduler_pub(S1, wire.StateDelta(13, S1, hosts=[host("c")]), 0.2) == [Need("snapshot", S1)]
    assert st.schedulers[S1].seq is None
    st.on_scheduler_state(S1, sched_state(12, [host("a"), host("b")]), 0.3)
    assert {h.host_id for h in st.hosts()} == {"a", "b", "c"}
    # A heartbeat ahead of us also means something was lost.
    assert st.on_scheduler_pub(S1, wire.PubHeartbeat(15, S1), 0.4) == [Need("snapshot", S1)]


def test_a_restarted_publisher_is_noticed_by_its_heartbeat():
    st = started(S1)
    st.on_scheduler_state(S1, sched_state(500), 0.0)
    # Just after the snapshot a lower seq is a message that was already on its way.
    assert st.on_scheduler_pub(S1, wire.PubHeartbeat(499, S1), 0.5) == []
    assert st.on_scheduler_pub(S1, wire.PubHeartbeat(3, S1), 10.0) == [Need("snapshot", S1)]


def test_manager_updates_start_and_stop_following_schedulers():
    st = started(S1)
    up = wire.ClusterUpdate(4, member(S2))
    assert st.on_manager_pub(up, 1.0) == [Need("watch", S2)]
    st.on_scheduler_state(S2, sched_state(1, [host("x")], sid=S2), 1.1)
    assert [h.host_id for h in st.hosts()] == ["x"]
    down = wire.ClusterUpdate(5, member(S2, state="down"))
    assert st.on_manager_pub(down, 2.0) == [Need("unwatch", S2)]
    assert st.hosts() == [], "a scheduler that is down no longer speaks for its hosts"
    assert [e.name for e in st.events][-2:] == ["scheduler-up", "scheduler-down"]
    assert st.on_manager_pub(wire.ClusterUpdate(7, member(S2)), 3.0) == [Need("snapshot", MANAGER)]


def test_hosts_merge_across_schedulers_and_tasks_prefer_the_fuller_record():
    st = started(S1, S2)
    st.on_scheduler_state(S1, sched_state(1, [host("a", peers=2, children=1, up_bytes=10)],
                                          [wire.TaskView("t", "u", peers=1)]), 0.0)
    st.on_scheduler_state(S2, sched_state(1, [host("a", peers=3, children=2, up_bytes=99)],
                                          [wire.TaskView("t", "u", peers=4)], sid=S2), 0.0)
    (a,) = st.hosts()
    assert (a.peers, a.children, a.up_bytes) == (5, 3, 99)
    (t,) = st.tasks()
    assert t.peers == 4


def test_silence_is_reported_per_stream():
    st = started(S1)
    st.on_scheduler_state(S1, sched_state(1), 0.0)
    assert st.silent(2.0) == []
    st.on_manager_pub(wire.PubHeartbeat(3, "manager"), 9.0)
    assert [k for k, _ in st.silent(10.0)] == [S1]
    # A stream never heard from counts from when we started following it.
    fresh = MonitorState("tcp://mgr:1", 100.0)
    assert [k for k, _ in fresh.silent(104.0)] == [MANAGER]


def test_hosts_no_scheduler_knows_are_counted_as_gone():
    st = started(S1)
    st.on_scheduler_state(S1, sched_state(1, [host("a"), host("b")]), 0.0)
    st.on_scheduler_pub(S1, wire.StateDelta(2, S1, gone_hosts=["b"]), 1.0)
    assert [h.host_id for h in st.hosts()] == ["a"] and set(st.gone_hosts) == {"b"}
    st.on_scheduler_pub(S1, wire.StateDelta(3, S1, hosts=[host("b")]), 2.0)
    assert not st.gone_hosts


def test_snapshots_bring_recent_events_once():
    st = started(S1)
    events = [wire.EventView(4, "peer-registered", {"peer_id": "a/1"}, age_s=5.0),
              wire.EventView(5, "back-to-source", {"peer_id": "a/1"}, age_s=4.0)]
    st.on_scheduler_state(S1, wire.SchedulerState(5, S1, [], [], events=events), 10.0)
    assert [(e.name, e.at) for e in st.events] == [("peer-registered", 5.0), ("back-to-source", 6.0)]
    st.on_scheduler_pub(S1, wire.Event(6, "task-done", {"task_id": "t"}), 11.0)
    # A resync snapshot repeats history the tail already holds: nothing is shown twice.
    st.on_scheduler_state(S1, wire.SchedulerState(6, S1, [], [], events=[
        *events, wire.EventView(6, "task-done", {"task_id": "t"}, age_s=1.0)]), 12.0)
    assert [e.name for e in st.events] == ["peer-registered", "back-to-source", "task-done"]
