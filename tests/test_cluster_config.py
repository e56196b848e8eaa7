"""Cluster-wide settings (`dfzmq config get|set|unset`) on a real cluster of processes: the
manager keeps them in LMDB and pushes them; running daemons and schedulers apply them within
seconds, a restarted member gets them at once, unset falls back to the member's own setting,
and bad keys or values fail with one line and a non-zero exit."""

from __future__ import annotations

import json
import time

import pytest

from dfzmq import wire
from tests.clirun import run_cli
from tests.conftest import make_file
from tools.cluster import LocalCluster, request

MiB = 1024 * 1024
SOON_S = 15.0  # "within seconds", with room for a loaded machine


@pytest.fixture(scope="module")
def cl(tmp_path_factory):
    # peer1's own setting (environment) is what it must fall back to
    with LocalCluster(tmp_path_factory.mktemp("cfg"), peers=2, seeds=1,
                      daemon_env={"peer1": {"DFZMQ_UPLOAD_RATE": "1MiB"}}) as c:
        yield c


def dfzmq(cl: LocalCluster, *args: str):
    return run_cli(*args, "--manager", cl.manager_addr)


def eventually(fn, timeout_s: float = SOON_S):
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def daemon_setting(cl: LocalCluster, name: str, key: str):
    st = cl.stat(name)
    return None if st is None else st["settings"][key]


def scheduler_settings(cl: LocalCluster) -> dict:
    reply = request(f"tcp://{cl.scheduler_addrs[0]}", wire.StatRequest(), 3.0)
    return reply.info["settings"]


def test_set_reaches_running_daemons_and_unset_falls_back(cl):
    assert daemon_setting(cl, "peer1", "upload_rate") == MiB
    assert daemon_setting(cl, "peer2", "upload_rate") == 0
    r = dfzmq(cl, "config", "set", "upload_rate", "8MiB")
    assert r.returncode == 0 and r.stdout.strip() == f"upload_rate = {8 * MiB}", r.stderr
    for name in ("seed0", "peer1", "peer2"):
        assert eventually(lambda: daemon_setting(cl, name, "upload_rate") == 8 * MiB), name
    r = dfzmq(cl, "config", "unset", "upload-rate")
    assert r.returncode == 0, r.stderr
    assert eventually(lambda: daemon_setting(cl, "peer1", "upload_rate") == MiB)  # its own again
    assert eventually(lambda: daemon_setting(cl, "peer2", "upload_rate") == 0)


def test_load_limit_reaches_the_scheduler(cl):
    r = dfzmq(cl, "config", "set", "upload_slots", "3")
    assert r.returncode == 0, r.stderr
    assert eventually(lambda: daemon_setting(cl, "peer2", "upload_slots") == 3)
    # the daemon re-announced its host: the scheduler now counts 3 slots for it
    host = cl.stat("peer2")["host_id"]

    def slots() -> int | None:
        snap = request(f"tcp://{cl.scheduler_addrs[0]}", wire.SnapshotRequest(), 3.0).info["snapshot"]
        return next((h["upload_slots"] for h in snap["hosts"] if h["host_id"] == host), None)

    assert eventually(lambda: slots() == 3)
    assert dfzmq(cl, "config", "unset", "upload_slots").returncode == 0
    assert eventually(lambda: slots() == 32)  # the daemon's own load limit again


def test_scheduler_weights_and_parents(cl):
    assert scheduler_settings(cl)["weight_seed"] == 0.10
    assert dfzmq(cl, "config", "set", "weight_seed", "0.5").returncode == 0
    assert dfzmq(cl, "config", "set", "max_parents", "2").returncode == 0
    assert eventually(lambda: scheduler_settings(cl)["weight_seed"] == 0.5)
    assert eventually(lambda: scheduler_settings(cl)["max_parents"] == 2)
    r = dfzmq(cl, "config", "get", "--json")
    assert json.loads(r.stdout) == {"weight_seed": 0.5, "max_parents": 2}
    # a member registering now is welcomed with them too
    mgr = f"tcp://{cl.manager_addr}"
    welcome = request(mgr, wire.MemberRegister(wire.MemberInfo("probe", "seed", "tcp://127.0.0.1:9")), 3.0)
    request(mgr, wire.MemberLeave("probe"), 1.0)
    assert welcome.config == {"weight_seed": 0.5, "max_parents": 2}
    assert dfzmq(cl, "config", "get", "max_parents").stdout.strip() == "2"
    r = dfzmq(cl, "config", "get")
    assert r.returncode == 0 and "weight_seed" in r.stdout and "download_rate" in r.stdout
    assert dfzmq(cl, "config", "unset", "max_parents").returncode == 0
    assert eventually(lambda: scheduler_settings(cl)["max_parents"] == 6)  # its own default


def test_download_limit_is_enforced(cl, www, origin, outdir):
    make_file(www / "limited.bin", 3 * MiB, seed=9)
    assert dfzmq(cl, "config", "set", "download_rate", "2MiB").returncode == 0
    assert eventually(lambda: daemon_setting(cl, "peer2", "download_rate") == 2 * MiB)
    before = cl.stat("peer2")["limiter_wait_s"]["download"]
    t0 = time.monotonic()
    r = cl.fetch("peer2", origin.url("limited.bin"), outdir / "limited.bin")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert cl.stat("peer2")["limiter_wait_s"]["download"] > before
    assert took >= 0.8  # 3 MiB at 2 MiB/s after a 512 KiB burst cannot be faster than ~1.2 s
    assert dfzmq(cl, "config", "unset", "download_rate").returncode == 0


def test_max_piece_length_cuts_new_tasks_cluster_wide(cl, www, origin, outdir):
    size = 64 * MiB  # 128 KiB pieces by size alone
    data = make_file(www / "capped.bin", size, seed=11)
    assert dfzmq(cl, "config", "set", "max_piece_length", "64KiB").returncode == 0
    for name in ("seed0", "peer1", "peer2"):
        assert eventually(lambda: daemon_setting(cl, name, "max_piece_length") == 64 << 10), name
    url = origin.url("capped.bin")
    for name in ("peer1", "peer2"):  # the first cuts it (through the seed), the second follows
        r = cl.fetch(name, url, outdir / f"{name}.bin")
        assert r.returncode == 0, r.stderr
        assert (outdir / f"{name}.bin").read_bytes() == data
    tasks = request(f"tcp://{cl.scheduler_addrs[0]}", wire.SnapshotRequest(), 3.0).info["snapshot"]["tasks"]
    task = next(t for t in tasks if t["url"] == url)
    assert task["content_length"] == size and task["piece_count"] == size // (64 << 10)
    assert dfzmq(cl, "config", "unset", "max_piece_length").returncode == 0


def test_settings_survive_a_manager_restart_and_reach_a_restarted_daemon(cl):
    assert dfzmq(cl, "config", "set", "source_rate", "50M").returncode == 0
    assert eventually(lambda: daemon_setting(cl, "peer1", "source_rate") == 50_000_000)
    cl.restart("manager")
    r = eventually(lambda: dfzmq(cl, "config", "get", "source_rate").stdout.strip() == "50000000")
    assert r
    cl.restart("peer2")
    assert eventually(lambda: daemon_setting(cl, "peer2", "source_rate") == 50_000_000)
    # a change after the manager restart still reaches daemons that were running all along
    assert dfzmq(cl, "config", "set", "source_rate", "40M").returncode == 0
    assert eventually(lambda: daemon_setting(cl, "peer1", "source_rate") == 40_000_000)
    dfzmq(cl, "config", "unset", "source_rate")


def test_bad_keys_and_values(cl):
    for args in (["set", "no_such_key", "1"], ["set", "upload_slots", "0"], ["set", "upload_slots", "many"],
                 ["set", "download_rate", "5 parsecs"], ["set", "weight_idc", "1e9"], ["get", "nope"], ["unset", "nope"]):
        r = dfzmq(cl, "config", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and "error" in r.stderr, (args, r.stderr)
    # the manager validates too (another client could send anything)
    for key, value in (("upload_slots", "0"), ("bogus", 1), ("weight_seed", [1])):
        reply = request(f"tcp://{cl.manager_addr}", wire.ConfigSet(key, value), 3.0)
        assert isinstance(reply, wire.Error) and reply.code == "bad-request", reply
    reply = request(f"tcp://{cl.manager_addr}", wire.ConfigGet(), 3.0)
    assert "bogus" not in reply.config and "upload_slots" not in reply.config


def test_a_manager_on_a_wiped_ops_store_still_reaches_running_daemons(cl):
    """The manager's DATA/ops lost (disk replaced, directory removed): it starts again at seq 0.
    Running daemons must take its (empty) settings and the changes made after it."""
    import shutil

    for value in ("30M", "31M", "32M"):  # the old store's seq is well above what the new one reaches
        assert dfzmq(cl, "config", "set", "source_rate", value).returncode == 0
    assert eventually(lambda: daemon_setting(cl, "peer1", "source_rate") == 32_000_000)
    cl.procs["manager"].stop()
    shutil.rmtree(cl.root / "manager" / "ops")
    cl.procs["manager"].start(cl.env())
    # nothing set on the new manager: the daemon's own setting (unlimited) again
    assert eventually(lambda: daemon_setting(cl, "peer1", "source_rate") == 0)
    assert dfzmq(cl, "config", "set", "source_rate", "20M").returncode == 0
    assert eventually(lambda: daemon_setting(cl, "peer1", "source_rate") == 20_000_000)
    assert eventually(lambda: daemon_setting(cl, "seed0", "source_rate") == 20_000_000)
    dfzmq(cl, "config", "unset", "source_rate")


def test_a_daemon_with_a_fixed_scheduler_still_follows_the_manager(cl):
    """`scheduler` set (no scheduler discovery) and `manager` set: the daemon still takes the
    cluster's settings (and so its jobs); it used to be left out silently."""
    proc = cl.procs["peer2"]
    proc.extra_env["DFZMQ_SCHEDULER"] = cl.scheduler_addrs[0]
    try:
        cl.restart("peer2")
        assert dfzmq(cl, "config", "set", "upload_slots", "5").returncode == 0
        assert eventually(lambda: daemon_setting(cl, "peer2", "upload_slots") == 5)
    finally:
        dfzmq(cl, "config", "unset", "upload_slots")
        del proc.extra_env["DFZMQ_SCHEDULER"]
        cl.restart("peer2")


def test_operator_commands_read_the_admin_section(cl, tmp_path):
    """config/jobs/preheat/cache take the manager (and CURVE keys) from [admin], as hosts,
    tasks and monitor do; a [daemon] section for the host's own daemon does not redirect them."""
    cfg = tmp_path / "ops.toml"
    cfg.write_text(f'[admin]\nmanager = "{cl.manager_addr}"\ntimeout_s = 5.0\n\n'
                   '[daemon]\nmanager = "127.0.0.1:9"\n')
    for args in (["config", "get", "--json"], ["jobs", "--json"], ["hosts", "--json"]):
        r = run_cli(*args, "--config", str(cfg))
        assert r.returncode == 0, (args, r.stderr)
    r = run_cli("config", "set", "upload_slots", "6", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert dfzmq(cl, "config", "unset", "upload_slots").returncode == 0
