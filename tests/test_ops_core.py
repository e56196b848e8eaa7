"""Unit tests of the pure parts of cluster operations: the manager's OpsCore (settings, jobs,
presence), the follower's Clone logic, setting validation and image references."""

from __future__ import annotations

import pytest

from brokers.manager.follow import Follower
from brokers.manager.ops import MAX_JOBS, OpsCore, PersistOps
from dfzmq import settings, wire
from dfzmq.actions import Publish, Send
from dfzmq.errors import ConfigError
from dfzmq.registry import parse_challenge, parse_platform, parse_ref

A, B, CLI = b"a", b"b", b"cli"


def sent(actions, cls):
    return [a.msg for a in actions if isinstance(a, Send) and isinstance(a.msg, cls)]


def published(actions, cls):
    return [a.msg for a in actions if isinstance(a, Publish) and isinstance(a.msg, cls)]


def core_with_hosts(now=0.0) -> OpsCore:
    n = iter(range(1, 10**6))
    core = OpsCore({}, [], seq=0, events_addr="tcp://m:1", make_id=lambda: f"job-{next(n)}")
    core.handle_timer(now, 1000.0)
    core.handle(A, wire.SyncRequest("seed-1", "seed", "s1"), now, 1000.0)
    core.handle(B, wire.SyncRequest("peer-1", "daemon", "p1"), now, 1000.0)
    return core


def test_config_set_validates_persists_publishes_and_unsets():
    core = OpsCore({}, [], seq=5)
    out = core.handle(CLI, wire.ConfigSet("upload-rate", "2MiB"), 0.0, 0.0)
    assert sent(out, wire.ConfigState)[0].config == {"upload_rate": 2 * 1024 * 1024}
    assert [a for a in out if isinstance(a, PersistOps)][0].seq == 6
    assert published(out, wire.ConfigUpdate)[0].seq == 6
    # the same value again changes nothing: no new seq, no publish
    out = core.handle(CLI, wire.ConfigSet("upload_rate", 2 * 1024 * 1024), 0.0, 0.0)
    assert not published(out, wire.ConfigUpdate) and core.seq == 6
    for key, value in (("nope", 1), ("upload_slots", 0), ("weight_idc", "x"), ("max_parents", 1.5)):
        out = core.handle(CLI, wire.ConfigSet(key, value), 0.0, 0.0)
        assert [e.code for e in sent(out, wire.Error)] == ["bad-request"], key
    out = core.handle(CLI, wire.ConfigSet("upload_rate", unset=True), 0.0, 0.0)
    assert published(out, wire.ConfigUpdate)[0].config == {} and core.seq == 7
    out = core.handle(CLI, wire.ConfigSet("nope", unset=True), 0.0, 0.0)
    assert sent(out, wire.Error)


def test_job_scopes_reports_and_completion():
    core = core_with_hosts()
    out = core.handle(CLI, wire.JobCreate("preheat", ["http://o/x"], "seeds"), 1.0, 1001.0)
    job = sent(out, wire.JobState)[0].job
    assert job.hosts == {"seed-1": "pending"} and job.created == 1001.0
    assert published(out, wire.JobUpdate)[0].job == job
    out = core.handle(CLI, wire.JobCreate("preheat", ["http://o/y"], "all"), 1.0, 1001.0)
    job2 = sent(out, wire.JobState)[0].job
    assert set(job2.hosts) == {"seed-1", "peer-1"}
    # the snapshot of a host lists its running jobs only
    snap = sent(core.handle(B, wire.SyncRequest("peer-1", "daemon"), 2.0, 1002.0), wire.SyncState)[0]
    assert [j.job_id for j in snap.jobs] == [job2.job_id] and snap.events_addr == "tcp://m:1"
    core.handle(A, wire.JobReport(job2.job_id, "seed-1", "succeeded"), 3.0, 1003.0)
    out = core.handle(B, wire.JobReport(job2.job_id, "peer-1", "failed", "origin said 404"), 3.0, 1004.0)
    done = sent(out, wire.JobState)[0].job
    assert done.state == "failed" and done.finished == 1004.0 and done.errors == {"peer-1": "origin said 404"}
    # a late or repeated report changes nothing
    out = core.handle(B, wire.JobReport(job2.job_id, "peer-1", "succeeded"), 4.0, 1005.0)
    assert not published(out, wire.JobUpdate) and sent(out, wire.JobState)[0].job == done
    out = core.handle(A, wire.JobReport(job.job_id, "seed-1", "succeeded"), 4.0, 1005.0)
    assert sent(out, wire.JobState)[0].job.state == "succeeded"
    listed = sent(core.handle(CLI, wire.JobList(1), 5.0, 0.0), wire.JobListReply)[0].jobs
    assert len(listed) == 1


def test_bad_jobs_are_refused():
    core = core_with_hosts()
    for msg in (wire.JobCreate("dance", ["http://o/x"]), wire.JobCreate("preheat", []),
                wire.JobCreate("preheat", ["http://o/x"], "moon"), wire.JobCreate("preheat", ["ftp://o/x"]),
                wire.JobCreate("cache-rm", ["http://o/x"], "all")):
        assert [e.code for e in sent(core.handle(CLI, msg, 1.0, 0.0), wire.Error)] == ["bad-request"], msg
    lonely = OpsCore({}, [], 0)
    lonely.handle(A, wire.SyncRequest("peer-1", "daemon"), 0.0, 0.0)
    err = sent(lonely.handle(CLI, wire.JobCreate("preheat", ["http://o/x"]), 1.0, 0.0), wire.Error)[0]
    assert err.code == "no-hosts" and "seed peer" in err.detail
    assert sent(core.handle(CLI, wire.JobGet("job-x"), 1.0, 0.0), wire.Error)[0].code == "unknown-job"


def test_a_host_that_goes_silent_fails_its_part_and_restart_gives_grace():
    core = core_with_hosts(now=0.0)
    job = sent(core.handle(CLI, wire.JobCreate("preheat", ["http://o/x"], "all"), 1.0, 0.0), wire.JobState)[0].job
    core.handle(A, wire.SyncRequest("seed-1", "seed"), 15.0, 0.0)
    core.handle(A, wire.JobReport(job.job_id, "seed-1", "succeeded"), 15.0, 0.0)
    assert core.handle_timer(15.0, 0.0) == []  # peer-1 last seen at 0: still within 20 s
    out = core.handle_timer(21.0, 5.0)
    j = published(out, wire.JobUpdate)[0].job
    assert j.state == "failed" and "host gone" in j.errors["peer-1"] and j.hosts["seed-1"] == "succeeded"
    # a manager restarted with a running job: hosts have one window to come back
    restarted = OpsCore({}, [job], seq=9)
    assert restarted.handle_timer(100.0, 0.0) == []
    restarted.handle(A, wire.SyncRequest("seed-1", "seed"), 110.0, 0.0)
    out = restarted.handle_timer(121.0, 0.0)
    j = published(out, wire.JobUpdate)[0].job
    assert j.hosts == {"seed-1": "pending", "peer-1": "failed"} and j.state == "running"


def test_old_finished_jobs_are_pruned():
    core = core_with_hosts()
    for i in range(MAX_JOBS + 3):
        job = sent(core.handle(CLI, wire.JobCreate("preheat", [f"http://o/{i}"]), 1.0, float(i)), wire.JobState)[0].job
        out = core.handle(A, wire.JobReport(job.job_id, "seed-1", "succeeded"), 1.0, float(i))
    assert len(core.jobs) == MAX_JOBS
    out = core.handle(CLI, wire.JobCreate("preheat", ["http://o/last"]), 1.0, 1e6)
    assert len(core.jobs) == MAX_JOBS and [a for a in out if isinstance(a, PersistOps)][0].drop


def test_follower_applies_newer_only_and_filters_jobs():
    f = Follower("peer-1", "daemon", interval_s=5.0, liveness=3)
    assert [type(m) for m in f.on_timer(0.0)] == [wire.SyncRequest] and f.on_timer(1.0) == []
    mine = wire.JobInfo("j1", "preheat", ["u"], "all", "running", 0.0, hosts={"peer-1": "pending"})
    other = wire.JobInfo("j2", "preheat", ["u"], "seeds", "running", 0.0, hosts={"seed-1": "pending"})
    changed, jobs = f.on_message(wire.SyncState(4, {"upload_rate": 1}, [mine, other], "tcp://m:1"), 1.0)
    assert changed and jobs == [mine] and f.events_addr == "tcp://m:1"
    assert f.on_message(wire.ConfigUpdate(3, {"upload_rate": 9}), 1.0, False) == (False, [])  # older
    assert f.on_message(wire.ConfigUpdate(6, {"upload_rate": 2}), 1.0, False) == (True, [])
    assert f.on_message(wire.SyncState(5, {"upload_rate": 1}), 2.0)[0] is False  # a stale snapshot
    assert f.config == {"upload_rate": 2}
    assert f.on_message(wire.JobUpdate(7, other), 2.0, False) == (False, [])
    # the manager silent for 3 intervals: reopen, and ask again at once
    assert not f.silent(16.0) and f.silent(17.5) and f.on_timer(17.5)


def test_settings_parse_and_valid():
    assert settings.parse("download-rate", "1MiB") == 1024 * 1024
    assert settings.parse("weight_seed", "0.25") == 0.25
    with pytest.raises(ConfigError, match="unknown setting"):
        settings.parse("speed", 1)
    with pytest.raises(ConfigError, match="between 1 and"):
        settings.parse("upload_slots", "0")
    assert settings.valid({"upload_rate": 5, "max_parents": 2, "bogus": 1, "upload_slots": -1}, "daemon") == {"upload_rate": 5}
    assert settings.parse("max_piece_length", "256KiB") == 256 * 1024
    assert settings.parse("max_piece_length", "0") == 0
    for bad in ("1000", "32MiB", "-1"):
        with pytest.raises(ConfigError, match="max_piece_length"):
            settings.parse("max_piece_length", bad)
    assert settings.valid({"upload_rate": 5, "max_parents": 2}, "scheduler") == {"max_parents": 2}


def test_image_references_and_challenges():
    r = parse_ref("nginx")
    assert (r.registry, r.repository, r.reference) == ("registry-1.docker.io", "library/nginx", "latest")
    r = parse_ref("localhost:5000/team/app:1.0")
    assert (r.registry, r.repository, r.reference) == ("localhost:5000", "team/app", "1.0")
    d = "sha256:" + "ab" * 32
    assert parse_ref(f"ghcr.io/o/p:t@{d}").reference == d
    for bad in ("", "Nginx", "http://x/y", "a b", "x/y@sha256:zz"):
        with pytest.raises(ConfigError):
            parse_ref(bad)
    assert parse_platform("linux/arm64/v8") == ("linux", "arm64", "v8")
    with pytest.raises(ConfigError):
        parse_platform("linux")
    assert parse_challenge('Bearer realm="https://a/token",service="reg",scope="repository:x:pull"') == {
        "realm": "https://a/token", "service": "reg", "scope": "repository:x:pull"}
    assert parse_challenge('Basic realm="x"') == {}


def test_follower_takes_a_reset_managers_settings():
    """A manager whose ops store was wiped starts again at seq 0 under a new epoch: its
    snapshot and later updates replace what the follower applied from the old store."""
    f = Follower("peer-1", "daemon")
    assert f.on_message(wire.SyncState(40, {"upload_rate": 1}, epoch="e1"), 1.0)[0]
    assert f.on_message(wire.SyncState(0, {}, epoch="e2"), 2.0)[0] and f.config == {}
    assert f.on_message(wire.ConfigUpdate(1, {"upload_rate": 5}, epoch="e2"), 2.0, False)[0]
    assert f.config == {"upload_rate": 5} and f.config_seq == 1
    assert f.on_message(wire.ConfigUpdate(0, {}, epoch="e2"), 2.0, False)[0] is False  # older, same epoch
    # the manager core stamps its store's epoch on snapshots and updates
    core = OpsCore({}, [], seq=0, epoch="e3")
    assert sent(core.handle(b"a", wire.SyncRequest("peer-1", "daemon"), 0.0, 0.0), wire.SyncState)[0].epoch == "e3"
    out = core.handle(b"c", wire.ConfigSet("upload_rate", "1MiB"), 0.0, 0.0)
    assert published(out, wire.ConfigUpdate)[0].epoch == "e3"


def test_ops_store_epoch_is_stable_and_new_after_a_wipe(tmp_path):
    import shutil

    from brokers.manager.opsstore import OpsStore
    s = OpsStore(tmp_path / "ops")
    first = s.epoch()
    assert first and s.epoch() == first
    s.close()
    s = OpsStore(tmp_path / "ops")
    assert s.epoch() == first
    s.close()
    shutil.rmtree(tmp_path / "ops")
    s = OpsStore(tmp_path / "ops")
    assert s.epoch() != first
    s.close()


def test_lowering_a_rate_live_does_not_freeze_transfers():
    """16 x 4 MiB reserved at 100 MB/s, then the rate drops to 1 MiB/s: the debt built at the
    old rate must not be repaid at the new one (that was ~64 s without a byte)."""
    from nodes.limits import TokenBucket
    from nodes.ops import retune

    MiB = 1 << 20
    b = TokenBucket(100e6)
    for _ in range(16):
        b.reserve(4 * MiB, 0.0)
    retune(b, MiB, now=0.1)
    wait = b.reserve(256 * 1024, 0.1)
    assert wait <= 0.6, wait  # at most the new burst's debt plus this piece
    # raising it again: no free burst beyond the new bucket's
    retune(b, 100 * MiB, now=0.2)
    assert b.tokens <= b.burst
    # a bucket that was unlimited starts limited with a full burst, not a stale balance
    u = TokenBucket(0)
    u.tokens = -1e9
    retune(u, MiB, now=5.0)
    assert u.reserve(1024, 5.0) == 0.0


def test_only_http_urls_from_remote_requests():
    """Jobs and seed triggers come over the network: a daemon takes only http(s) URLs from them."""
    from nodes.ops import remote_url_problem

    assert remote_url_problem("http://o/x") == remote_url_problem("HTTPS://o/x") == ""
    for url in ("file:///etc/hostname", "FILE:///etc/shadow", "ftp://o/x", "cache:///x", "/etc/passwd"):
        assert "http" in remote_url_problem(url), url
    core = core_with_hosts()
    out = core.handle(CLI, wire.JobCreate("preheat", ["file:///etc/hostname"]), 1.0, 1.0)
    err = sent(out, wire.Error)[0]
    assert err.code == "bad-request" and "file:///etc/hostname" in err.detail and not core.jobs


def test_a_job_right_after_a_manager_start_says_hosts_have_not_checked_in():
    """Presence is not stored: for one check-in round after a start the manager cannot know
    the hosts yet, and says so with a code the CLI retries on (not a flat "no seed peer")."""
    core = OpsCore({}, [], 0)
    core.handle_timer(100.0, 0.0)
    err = sent(core.handle(CLI, wire.JobCreate("preheat", ["http://o/x"]), 101.0, 0.0), wire.Error)[0]
    assert err.code == "starting" and "try again" in err.detail
    core.handle(A, wire.SyncRequest("seed-1", "seed"), 102.0, 0.0)
    assert sent(core.handle(CLI, wire.JobCreate("preheat", ["http://o/x"]), 102.0, 0.0), wire.JobState)
    err = sent(OpsCore({}, [], 0).handle(CLI, wire.JobCreate("preheat", ["http://o/x"], "all"), 0.0, 0.0), wire.Error)[0]
    assert err.code == "no-hosts"  # a core whose timer never ran is not "starting"
    late = OpsCore({}, [], 0)
    late.handle_timer(100.0, 0.0)
    assert sent(late.handle(CLI, wire.JobCreate("preheat", ["http://o/x"]), 115.0, 0.0), wire.Error)[0].code == "no-hosts"
