"""dfzmq/metrics.py and the brokers' endpoints in-process: one registry per service (two
schedulers in one process do not collide), real HTTP scrapes, a failing collector never breaks
a scrape, and the helpers that turn counters into families."""

from __future__ import annotations

import urllib.request

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from brokers.manager.service import serve as serve_manager
from brokers.scheduler.service import serve as serve_scheduler
from dfzmq import net, wire
from dfzmq.config import ManagerConfig, SchedulerConfig
from dfzmq.errors import ConfigError
from dfzmq.metrics import MetricsServer, counter, errors, gauge, parse_addr, prefixed
from tests.conftest import TIMEOUT_S, serving


def samples(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_helpers_shape_counters_into_families():
    c = {"recv.HEARTBEAT": 3, "recv.PEER_DONE": 1, "dropped.bad-frame": 2, "sent.X": 5,
         "refused.unknown-host": 1, "back-to-source": 4}
    assert prefixed(c, "recv.") == {"HEARTBEAT": 3, "PEER_DONE": 1}
    assert errors(c) == {"dropped.bad-frame": 2, "refused.unknown-host": 1}
    fam = counter("dfzmq_x_total", "x", {"a b": 1}, "kind")
    assert fam.name == "dfzmq_x" and fam.samples[0].labels == {"kind": "a_b"}
    assert gauge("dfzmq_y", "y", 2).samples[0].value == 2
    assert parse_addr("127.0.0.1:0") == ("127.0.0.1", 0) and parse_addr(":9100") == ("0.0.0.0", 9100)
    for bad in ("nonsense", "host:99999", "host:"):
        with pytest.raises(ConfigError):
            parse_addr(bad)


def test_a_failing_collector_does_not_break_the_scrape():
    def collect():
        yield gauge("dfzmq_test_ok", "fine", 1)
        raise RuntimeError("boom")

    m = MetricsServer("127.0.0.1:0", collect)
    try:
        h = m.histogram("dfzmq_test_seconds", "a histogram next to it")
        h.observe(0.3)
        got = samples(m.url)
        assert got[("dfzmq_test_ok", ())] == 1
        assert got[("dfzmq_test_seconds_count", ())] == 1
    finally:
        m.close()


def test_manager_and_two_schedulers_in_one_process(tmp_path):
    mcfg = ManagerConfig(listen="127.0.0.1:0", data=tmp_path / "m", heartbeat_interval_s=0.2,
                         metrics="127.0.0.1:0")
    with serving(serve_manager, mcfg) as minfo:
        mgr = minfo["router"].removeprefix("tcp://")
        scfg = SchedulerConfig(manager=mgr, listen="127.0.0.1:0", heartbeat_interval_s=0.2,
                               metrics="127.0.0.1:0")
        with serving(serve_scheduler, scfg) as s1, serving(serve_scheduler, scfg) as s2:
            assert s1["metrics"] != s2["metrics"]
            # A malformed frame is dropped and counted; it shows as an error kind.
            ctx = zmq.Context()
            sock = net.make_socket(ctx, "control_dealer")
            sock.connect(s1["router"])
            sock.send_multipart([b"DFZ1", b"NOPE", b"\x00"])
            sock.send_multipart(wire.encode(wire.StateRequest()))
            assert sock.poll(int(TIMEOUT_S * 1000))
            assert isinstance(wire.decode(sock.recv_multipart()), wire.SchedulerState)
            sock.close(0)
            ctx.term()
            one = samples(s1["metrics"])
            assert one[("dfzmq_scheduler_errors_total", (("kind", "dropped.bad-frame"),))] == 1
            assert one[("dfzmq_scheduler_messages_total", (("kind", "StateRequest"),))] == 1
            two = samples(s2["metrics"])
            assert ("dfzmq_scheduler_errors_total", (("kind", "dropped.bad-frame"),)) not in two
            assert two[("dfzmq_scheduler_task_duration_seconds_count", ())] == 0
            assert two[("dfzmq_scheduler_hosts_expired_total", ())] == 0
            assert two[("dfzmq_scheduler_slow_loop_turns_total", ())] == 0

            def both_up() -> bool:
                m = samples(minfo["metrics"])
                return m.get(("dfzmq_manager_members", (("role", "scheduler"), ("state", "up")))) == 2

            import time

            end = time.monotonic() + 10
            while not both_up():
                assert time.monotonic() < end, samples(minfo["metrics"])
                time.sleep(0.1)


def test_manager_counts_ops_requests_and_one_internal_error_name(tmp_path):
    """Settings and job requests show in dfzmq_manager_messages_total like membership ones, and
    a bug caught in either part of the manager counts as the one `internal-error` kind (the
    schedulers' name too)."""
    import collections

    from brokers.manager.opsservice import Ops
    from brokers.manager.service import _guard

    mcfg = ManagerConfig(listen="127.0.0.1:0", data=tmp_path / "m", heartbeat_interval_s=0.2,
                         metrics="127.0.0.1:0")
    with serving(serve_manager, mcfg) as minfo:
        ctx = zmq.Context()
        sock = net.make_socket(ctx, "control_dealer")
        sock.connect(minfo["router"])
        for _ in range(2):
            sock.send_multipart(wire.encode(wire.ConfigGet()))
            assert sock.poll(int(TIMEOUT_S * 1000))
            assert isinstance(wire.decode(sock.recv_multipart()), wire.ConfigState)
        sock.close(0)
        ctx.term()
        m = samples(minfo["metrics"])
        assert m[("dfzmq_manager_messages_total", (("kind", "CONFIG_GET"),))] == 2
    c: collections.Counter = collections.Counter()

    def boom(*_):
        raise RuntimeError("bug")

    assert _guard(boom, c) == []
    ops = Ops(tmp_path / "o", "", c)
    try:
        assert ops._guard(boom) == []
    finally:
        ops.close()
    assert c == {"internal-error": 2}
