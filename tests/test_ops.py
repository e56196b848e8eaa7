"""Operating a live cluster of real processes: /metrics over HTTP, the admin commands, and the
monitor (`--once`, and the live one driven in tmux: screen checked, `q` sent, terminal restored).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_file
from tools.cluster import LocalCluster, free_port

DEADLINE_S = 30.0
SIZE = 3 * 1024 * 1024 + 12345  # not a whole number of pieces


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    """Manager, scheduler, seed and three peers, every one serving /metrics."""
    with LocalCluster(tmp_path_factory.mktemp("ops"), peers=3, metrics=True) as c:
        yield c


def scrape(cluster: LocalCluster, name: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a real HTTP scrape of `name`'s /metrics."""
    text = urllib.request.urlopen(cluster.metrics_url(name), timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def dfzmq(cluster: LocalCluster, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """The real `dfzmq` command in a process of its own."""
    return subprocess.run([sys.executable, "-m", "dfzmq", *args], env=cluster.env(),
                          capture_output=True, text=True, timeout=timeout_s)


def cli(*args: str) -> subprocess.CompletedProcess:
    """The same CLI in this process (typer's CliRunner): the cluster is still real processes,
    only the interpreter start-up of each command is saved."""
    from typer.testing import CliRunner

    from dfzmq.cli import app

    r = CliRunner().invoke(app, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)


def wait_for(fn, what: str, deadline_s: float = DEADLINE_S):
    end = time.monotonic() + deadline_s
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fetched(ops, origin, www, tmp_path_factory):
    """One file fetched by two peers (one after the other, so the second has two parents)."""
    data = make_file(www / "ops.bin", SIZE, seed=6)
    out = tmp_path_factory.mktemp("ops-out")
    before = {n: scrape(ops, n) for n in ("peer1", "peer2", "seed0", "scheduler0")}
    for name in ("peer1", "peer2"):
        r = ops.fetch_all([name], origin.url("ops.bin"), out)[name]
        assert "error" not in r, r
        assert (out / f"{name}.out").read_bytes() == data
    return {"url": origin.url("ops.bin"), "before": before}


def test_metrics_move_with_a_real_fetch(ops, fetched):
    before = fetched["before"]
    for name in ("peer1", "peer2"):
        m = scrape(ops, name)
        got = {s: value(m, "dfzmq_daemon_bytes_total", source=s) - value(before[name], "dfzmq_daemon_bytes_total", source=s)
               for s in ("origin", "parent")}
        assert got["origin"] + got["parent"] == SIZE, (name, got)
        assert got["parent"] > 0, "the cluster served it peer to peer"
        assert value(m, "dfzmq_daemon_task_duration_seconds_count", result="succeeded") >= 1
        assert value(m, "dfzmq_daemon_tasks_active") == 0
        assert value(m, "dfzmq_daemon_schedulers_up") == 1
        pieces = value(m, "dfzmq_daemon_pieces_total", source="origin") + value(m, "dfzmq_daemon_pieces_total", source="parent")
        assert pieces > 1
    seed = scrape(ops, "seed0")
    seed_origin = value(seed, "dfzmq_daemon_bytes_total", source="origin") - value(before["seed0"], "dfzmq_daemon_bytes_total", source="origin")
    assert seed_origin == SIZE, "the seed read the origin once"
    served = sum(value(scrape(ops, n), "dfzmq_daemon_uploaded_bytes_total") for n in ("seed0", "peer1", "peer2", "peer3"))
    received = sum(value(scrape(ops, n), "dfzmq_daemon_bytes_total", source="parent") for n in ("peer1", "peer2"))
    assert served >= received > 0

    sched = scrape(ops, "scheduler0")
    sb = before["scheduler0"]
    assert value(sched, "dfzmq_scheduler_decisions_total", decision="parents") > value(sb, "dfzmq_scheduler_decisions_total", decision="parents")
    assert value(sched, "dfzmq_scheduler_decisions_total", decision="seed_trigger") >= 1
    assert value(sched, "dfzmq_scheduler_back_to_source_total") >= 1  # the seed went to the origin
    # Gauges are refreshed once per interval, and on a loaded machine a host may have to
    # re-announce itself after a late heartbeat: wait for the settled picture.
    def settled() -> bool:
        m = scrape(ops, "scheduler0")
        return (value(m, "dfzmq_scheduler_hosts", type="seed") == 1
                and value(m, "dfzmq_scheduler_hosts", type="peer") == 3
                and value(m, "dfzmq_scheduler_peers", state="Succeeded") >= 3)

    wait_for(settled, "one seed, three peers and three finished peers in the scheduler's gauges")
    wait_for(lambda: value(scrape(ops, "scheduler0"), "dfzmq_scheduler_reported_bytes_total", source="origin") >= SIZE,
             "the scheduler's origin byte count")
    wait_for(lambda: value(scrape(ops, "scheduler0"), "dfzmq_scheduler_task_duration_seconds_count") >= 1,
             "a task duration observed by the scheduler")

    mgr = scrape(ops, "manager")
    assert value(mgr, "dfzmq_manager_members", role="scheduler", state="up") == 1
    assert value(mgr, "dfzmq_manager_members", role="seed", state="up") == 1
    assert value(mgr, "dfzmq_manager_messages_total", kind="HEARTBEAT") > 0


def test_metrics_flag_rejects_a_bad_address(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dfzmq", "manager", "--listen", "127.0.0.1:0",
                        "--data", str(tmp_path / "m"), "--metrics", "nonsense"],
                       env=LocalCluster.env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "metrics" in r.stderr and "HOST:PORT" in r.stderr
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "dfzmq", "daemon", "--data", str(tmp_path / "d"),
                            "--manager", "", "--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}"],
                           env=LocalCluster.env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "cannot serve metrics" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_admin_commands_json_and_tables(ops, fetched):
    def task_known():
        r = cli("tasks", "--json", "--manager", ops.manager_addr)
        assert r.returncode == 0, r.stderr
        tasks = [t for t in json.loads(r.stdout)["tasks"] if t["url"] == fetched["url"]]
        return tasks if tasks and tasks[0]["done"] >= 3 and tasks[0]["origin_bytes"] == SIZE else None

    (t,) = wait_for(task_known, "the task in `dfzmq tasks --json`")
    assert t["complete"] and t["content_length"] == SIZE and t["p2p_bytes"] >= SIZE

    r = cli("hosts", "--json", "--manager", ops.manager_addr)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [s["answered"] for s in doc["schedulers"]] == [True]
    hosts = doc["hosts"]
    assert len(hosts) == 4 and sum(h["seed"] for h in hosts) == 1
    assert wait_for(lambda: [h for h in json.loads(cli("hosts", "--json", "--manager", ops.manager_addr).stdout)["hosts"]
                             if h["seed"] and h["up_bytes"] > 0 and h["pieces_served"] > 0], "the seed's upload counters")

    r = cli("task", t["task_id"][:10], "--json", "--manager", ops.manager_addr)
    assert r.returncode == 0, r.stderr
    detail = json.loads(r.stdout)
    assert detail["task"]["task_id"] == t["task_id"]
    n = detail["task"]["piece_count"]
    assert n > 1
    done = [p for p in detail["peers"] if p["state"] == "Succeeded"]
    assert len(done) >= 3 and all(p["ranges"] == [[0, n - 1]] and p["held"] == n for p in done)

    for cmd in (["hosts"], ["tasks"], ["task", t["task_id"][:8]]):
        r = cli(*cmd, "--manager", ops.manager_addr)
        assert r.returncode == 0, r.stderr
    assert "who holds which pieces" in r.stdout and f"0-{n - 1}" in r.stdout and "(seed)" in r.stdout


def test_admin_errors_are_one_line_and_exit_non_zero(ops):
    r = cli("task", "0123456789abcdef", "--manager", ops.manager_addr)
    assert r.returncode == 1 and "no scheduler knows task" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    nobody = f"127.0.0.1:{free_port()}"
    for cmd in (["hosts"], ["tasks"], ["monitor", "--once"]):
        r = cli(*cmd, "--manager", nobody, "--timeout", "0.5")
        assert r.returncode == 4 and "not answering" in r.stderr, (cmd, r.stderr)
    r = cli("hosts", "--manager", "no-port-here")
    assert r.returncode == 2 and "HOST:PORT" in r.stderr
    r = cli("monitor", "--manager", ops.manager_addr)  # output captured: not a terminal
    assert r.returncode == 2 and "--once" in r.stderr


def test_monitor_once_prints_one_frame(ops, fetched):
    r = dfzmq(ops, "monitor", "--once", "--manager", ops.manager_addr,
              timeout_s=30)
    assert r.returncode == 0, r.stderr
    assert "schedulers 1 up" in r.stdout and "seeds 1 up" in r.stdout and "peers 3 up" in r.stdout
    assert "ops.bin" in r.stdout and "Hosts — 4" in r.stdout
    assert "peer-done" in r.stdout, "recent events come with the scheduler's snapshot"


def tmux(sock: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", "-S", sock, *args], capture_output=True, text=True, timeout=10)


def test_live_monitor_in_tmux(ops, fetched, origin, www, tmp_path):
    """Two real monitors in tmux, 80x24 and 120x40: both draw the cluster, both follow a new
    download over the PUB streams, one quits on `q` and one on Ctrl-C, each giving the
    terminal back as it found it."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed for this test (`make debs` installs it)")
    sock = str(tmp_path / "tmux.sock")  # a tmux server of our own, its socket in our tmp dir
    # The wrapper shell outlives Ctrl-C (a trap, which its children do not inherit) to report.
    cmd = (f"trap true INT; a=$(stty -g); {sys.executable} -m dfzmq monitor --manager {ops.manager_addr}; rc=$?; "
           f'b=$(stty -g); [ "$a" = "$b" ] && echo TTY-RESTORED; echo MONITOR-EXIT=$rc; sleep 120')
    sessions = {"small": ("80", "24"), "large": ("120", "40")}
    try:
        for name, (cols, rows) in sessions.items():
            r = subprocess.run(["tmux", "-S", sock, "-f", "/dev/null", "new-session", "-d", "-s", name,
                                "-x", cols, "-y", rows, "sh", "-c", cmd], env=ops.env(),
                               capture_output=True, text=True, timeout=10)
            assert r.returncode == 0, r.stderr

        def screen(name: str) -> str:
            return tmux(sock, "capture-pane", "-p", "-t", name).stdout

        for name in sessions:
            # A whole frame: the footer is drawn last (a capture may land mid-redraw).
            first = wait_for(lambda: (s := screen(name)) and "peers 3 up" in s and "ops.bin" in s
                             and "2 stream(s) live" in s and "q or Ctrl-C" in s and s,
                             f"the {name} monitor's first frame")
            assert ("location" in first) == (name == "large"), first
        # A new download while they run: the task and its events arrive over the PUB streams.
        make_file(www / "live.bin", 1024 * 1024, seed=7)
        r = ops.fetch_all(["peer3"], origin.url("live.bin"), tmp_path)["peer3"]
        assert "error" not in r, r
        for name in sessions:
            wait_for(lambda: (s := screen(name)) and "live.bin" in s and "peer-done" in s,
                     f"the new task and its events on the {name} monitor")
        tmux(sock, "send-keys", "-t", "small", "q")
        tmux(sock, "send-keys", "-t", "large", "C-c")
        for name in sessions:
            after = wait_for(lambda: (s := screen(name)) and "MONITOR-EXIT=" in s and s,
                             f"the {name} monitor to exit")
            assert "MONITOR-EXIT=0" in after and "TTY-RESTORED" in after, after
            assert "Tasks" not in after, "the alternate screen was left"
    finally:
        tmux(sock, "kill-server")


def test_admin_and_monitor_speak_curve_with_the_cluster_key(tmp_path):
    """An encrypted cluster with two schedulers: every daemon is known to both, and the
    admin view merges them into one row per host."""
    with LocalCluster(tmp_path / "curve", peers=1, curve=True, schedulers=2) as c:
        r = cli("hosts", "--json", "--manager", c.manager_addr, "--config", str(c.config))
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert [s["answered"] for s in doc["schedulers"]] == [True, True]
        assert len(doc["hosts"]) == 2 and all(h["peers"] == 0 for h in doc["hosts"])
        r = cli("monitor", "--once", "--manager", c.manager_addr, "--config", str(c.config))
        assert r.returncode == 0 and "schedulers 2 up" in r.stdout and "peers 1 up" in r.stdout, r.stderr
        r = cli("hosts", "--manager", c.manager_addr, "--timeout", "1")
        assert r.returncode == 4, "without the key, no answer"


def test_feed_follows_the_streams_and_says_when_one_goes_silent(ops, fetched):
    """The live monitor's socket loop, in-process, against the real cluster: a frozen scheduler
    (SIGSTOP) is reported silent within seconds, and followed again once it resumes."""
    import signal

    import zmq

    from dfzmq import net
    from dfzmq.cli_monitor import Feed
    from dfzmq.monitor_state import MANAGER, MonitorState

    ctx = zmq.Context()
    state = MonitorState(net.tcp(ops.manager_addr), time.monotonic(), silence_s=2.0)
    feed = Feed(ctx, state, None, ask_timeout_s=2.0)

    def poll_until(pred, what: str) -> None:
        end = time.monotonic() + DEADLINE_S
        while not pred():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            feed.poll(100)

    def scheduler_silent() -> bool:
        return any(k != MANAGER for k, _ in state.silent(time.monotonic()))

    try:
        feed.start()
        poll_until(lambda: any(t.url == fetched["url"] for t in state.tasks()), "the task from a snapshot")
        # An idle cluster publishes heartbeats only: hearing them after the snapshot shows the
        # SUB side is connected.
        poll_until(lambda: all(s.last_heard and s.last_heard > s.snapshot_at + 0.5
                               for s in [state.manager, *state.schedulers.values()]),
                   "heartbeats on every PUB stream")
        assert not scheduler_silent()
        sched = ops.procs["scheduler0"]
        sched.signal(signal.SIGSTOP)
        try:
            # The admin commands name a scheduler that does not answer and print the rest (or,
            # once the manager has noticed, list it as down).
            r = cli("hosts", "--json", "--manager", ops.manager_addr, "--timeout", "0.5")
            assert r.returncode == 0, r.stderr
            (entry,) = json.loads(r.stdout)["schedulers"]
            assert entry["answered"] is False
            assert "did not answer" in r.stderr if entry["up"] else True
            poll_until(scheduler_silent, "the frozen scheduler reported silent")
            from dfzmq.monitor_view import render
            from rich.console import Console
            import io

            buf = io.StringIO()
            Console(file=buf, width=100, height=30, color_system=None).print(render(state, 100, 30, time.monotonic()))
            assert "STREAM SILENT" in buf.getvalue()
        finally:
            sched.signal(signal.SIGCONT)
        poll_until(lambda: not scheduler_silent(), "the scheduler's stream back")
    finally:
        feed.close()
        ctx.destroy(linger=0)
