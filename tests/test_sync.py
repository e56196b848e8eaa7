"""`dfzmq sync`: the pure plan (indexes, filters, versions, deletes, cron) and, on real processes
(a LocalCluster, the real HTTP origin with directory listings, the real CLI), repeated runs,
a changed file, deletes, overlapping runs, a run killed mid-sync, and a source that is down."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodes.sync import (Entry, IndexUnreadable, Remote, cron_line, deletions, entries_from_spec, on_calendar,
                        parse_json_manifest, parse_listing, parse_text_manifest, safe_path, select, task_tag,
                        unchanged, version_of)
from tests.conftest import make_file
from tools.cluster import LocalCluster
from tools.origin import Origin

# -- the pure half ---------------------------------------------------------------------------------


def test_listing_keeps_files_below_the_index_only():
    page = """<html><body><a href="../">../</a><a href="?C=N;O=D">Name</a>
    <a href="a%20b.bin">a b.bin</a><a href="sub/">sub/</a><a href="http://other/x">x</a>
    <a href="/elsewhere/y">y</a><a href=".dfzmq-sync.json">state</a></body></html>"""
    files, dirs = parse_listing(page, "http://h/data/", "http://h/data/")
    assert [(f.path, f.url) for f in files] == [("a b.bin", "http://h/data/a%20b.bin")]
    assert dirs == ["http://h/data/sub/"]
    files, _ = parse_listing('<a href="c.txt">c</a>', "http://h/data/sub/", "http://h/data/")
    assert files[0].path == "sub/c.txt"


def test_manifests():
    j = parse_json_manifest(json.dumps({"files": [{"path": "m/a.bin", "size": 3, "digest": "sha256:" + "ab" * 32},
                                                  {"path": "b", "url": "http://cdn/b?x=1"}]}),
                            "http://h/x/manifest.json")
    assert j[0] == Remote("m/a.bin", "http://h/x/m/a.bin", 3, "sha256:" + "ab" * 32)
    assert j[1].url == "http://cdn/b?x=1"
    t = parse_text_manifest(f"# comment\n\na.bin 10\nd/e 5 blake3:{'cd' * 32}\n{'ef' * 32}  *f g.bin\n",
                            "http://h/x/list.txt")
    assert [(r.path, r.size, r.digest) for r in t] == [
        ("a.bin", 10, ""), ("d/e", 5, "blake3:" + "cd" * 32), ("f g.bin", -1, "sha256:" + "ef" * 32)]
    for bad in ("../etc/passwd 3", "a x y z", "a 1 md5:00"):
        with pytest.raises(IndexUnreadable):
            parse_text_manifest(bad, "http://h/")
    with pytest.raises(IndexUnreadable):
        parse_json_manifest("{", "http://h/")


def test_paths_filters_versions_deletes():
    assert safe_path("a/b.bin") and not safe_path("../a") and not safe_path("/a") and not safe_path("a//b")
    assert not safe_path(".dfzmq-sync.json") and not safe_path("x/.a.1.dfzmq-part")
    rs = [Remote(p, "u") for p in ("a.bin", "d/b.bin", "d/c.txt", "tmp/x.bin")]
    assert [r.path for r in select(rs, ("*.bin",), ("tmp/*",))] == ["a.bin", "d/b.bin"]
    assert version_of(Remote("a", "u", 3, "sha256:00"), 3, '"e"') == "sha256:00"
    assert version_of(Remote("a", "u"), 3, '"e"', "lm") == 'etag:"e"'
    assert version_of(Remote("a", "u"), 3, "", "lm") == "lm:lm:3"
    assert task_tag("v1") != task_tag("v2") and task_tag("v1").startswith("cdc/")
    rec = {"version": "v", "size": 3, "mtime_ns": 7}
    assert unchanged(rec, "v", (3, 7))
    assert not unchanged(rec, "v2", (3, 7)) and not unchanged(rec, "v", (3, 8)) and not unchanged(rec, "v", None)
    assert deletions({"a": {}, "b": {}}, {"a"}) == ["b"]
    assert deletions({"a": {}}, set()) == []  # an empty listing deletes nothing


def test_spec_and_cron():
    es = entries_from_spec({"defaults": {"delete": True},
                            "sync": [{"name": "m", "dest": "/d/m", "index": "http://h/m/", "schedule": "*/10 * * * *"},
                                     {"name": "r", "dest": "/d/r", "urls": ["http://h/r.tar"], "delete": False}]})
    assert es[0].delete and not es[1].delete
    assert cron_line(es[0], ["dfzmq", "sync", "/s.toml", "--entry", "m"]) == "*/10 * * * * dfzmq sync /s.toml --entry m"
    assert on_calendar("*/10 * * * *") == "*-*-* *:0/10:00"
    assert on_calendar("30 2 * * *") == "*-*-* 02:30:00"
    assert on_calendar("0 3 * * 1") == "Mon *-*-* 03:00:00"
    from dfzmq.errors import ConfigError
    for bad in ({"sync": [{"dest": "/d"}]}, {"sync": [{"dest": "/d", "index": "ftp://x/"}]},
                {"sync": [{"dest": "/d", "index": "http://h/", "urls": ["http://h/a"]}]},
                {"sync": [{"dest": "/d", "index": "http://h/", "schedule": "every day"}]},
                {"sync": [{"dest": "/d", "index": "http://h/a/"}, {"dest": "/d", "index": "http://h/b/"}]}):
        with pytest.raises(ConfigError):
            entries_from_spec(bad)


# -- real processes --------------------------------------------------------------------------------

pytestmark_cluster = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tmp_path_factory.mktemp("syncsrc")


@pytest.fixture(scope="module")
def lorigin(src):
    with Origin(src, listing=True) as o:
        yield o


@pytest.fixture(scope="module")
def lc(tmp_path_factory):
    with LocalCluster(tmp_path_factory.mktemp("synccluster"), peers=2) as c:
        yield c


def run_sync(lc, *args, peer="peer1") -> subprocess.CompletedProcess:
    """The real `dfzmq sync` command, in this process (a CLI process costs a second to start;
    the runs that must be killed or overlap below are real processes)."""
    from typer.testing import CliRunner

    from dfzmq.cli import app

    res = CliRunner().invoke(app, ["sync", *args, "--daemon", lc.control(peer)])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def report(p: subprocess.CompletedProcess) -> dict:
    assert p.stdout, p.stderr
    return json.loads(p.stdout)["entries"][0]


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and not p.name.startswith(".dfzmq-sync")}


def fill(root: Path, name: str, files: dict[str, int], seed: int) -> dict[str, bytes]:
    out = {}
    for i, (rel, size) in enumerate(files.items()):
        p = root / name / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        out[rel] = make_file(p, size, seed=seed + i)
    return out


@pytest.mark.timeout(240)
def test_repeat_change_and_delete(lc, lorigin, src, tmp_path):
    data = fill(src, "ds", {"a.bin": 3 << 20, "sub/b.bin": 1 << 20, "sub/c.txt": 100, "skip.tmp": 10}, 1)
    dest = tmp_path / "dest"
    url = lorigin.url("ds/")
    p = run_sync(lc, "--source", url, "--dest", str(dest), "--exclude", "*.tmp", "--json")
    assert p.returncode == 0, p.stderr
    r = report(p)
    assert (r["checked"], r["fetched"], r["skipped"], r["failed"]) == (3, 3, 0, 0)
    want = {k: v for k, v in data.items() if k != "skip.tmp"}
    assert tree(dest) == want
    served = lorigin.stats()["total_bytes"]

    # Again: nothing fetched, no output at all (cron mail stays empty), no body bytes served.
    p = run_sync(lc, "--source", url, "--dest", str(dest), "--exclude", "*.tmp")
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", (p.stdout, p.stderr)
    assert lorigin.stats()["total_bytes"] == served

    # A changed file: only it is fetched, and the new version arrives (a new task, not the cache).
    new_a = bytearray(data["a.bin"])
    new_a[1000:1100] = os.urandom(100)
    (src / "ds" / "a.bin").write_bytes(bytes(new_a))
    (dest / "user-file").write_text("mine")  # not synced by us: never deleted
    p = run_sync(lc, "--source", url, "--dest", str(dest), "--exclude", "*.tmp")
    assert p.returncode == 0, p.stderr
    assert "1 fetched, 2 skipped" in p.stdout
    assert (dest / "a.bin").read_bytes() == bytes(new_a)

    # A file gone from the source: --delete removes it (and its now-empty directory), keeps others'.
    (src / "ds" / "sub" / "b.bin").unlink()
    (src / "ds" / "sub" / "c.txt").unlink()
    p = run_sync(lc, "--source", url, "--dest", str(dest), "--exclude", "*.tmp", "--delete", "--json")
    assert p.returncode == 0, p.stderr
    assert report(p)["deleted"] == 2
    assert not (dest / "sub").exists()
    assert tree(dest) == {"a.bin": bytes(new_a), "user-file": b"mine"}

    # A file edited locally is put back.
    (dest / "a.bin").write_bytes(b"oops")
    p = run_sync(lc, "--source", url, "--dest", str(dest), "--exclude", "*.tmp", "--json")
    assert p.returncode == 0 and report(p)["fetched"] == 1
    assert (dest / "a.bin").read_bytes() == bytes(new_a)


@pytest.mark.timeout(240)
def test_spec_file_manifest_and_second_host(lc, lorigin, src, tmp_path):
    """A TOML spec with a JSON manifest (digests): peer2 syncs what peer1 synced, from peers."""
    import hashlib
    data = fill(src, "man", {"x.bin": 2 << 20, "y.bin": 500_000}, 20)
    (src / "man" / "manifest.json").write_text(json.dumps({"files": [
        {"path": k, "size": len(v), "digest": "sha256:" + hashlib.sha256(v).hexdigest()} for k, v in data.items()]}))
    spec = tmp_path / "sync.toml"
    spec.write_text(f'[[sync]]\nname = "man"\ndest = "{tmp_path / "d1"}"\nindex = "{lorigin.url("man/manifest.json")}"\n'
                    f'schedule = "*/5 * * * *"\n')
    p = run_sync(lc, str(spec), "--json")
    assert p.returncode == 0, p.stderr
    assert tree(tmp_path / "d1") == data
    spec2 = tmp_path / "sync2.toml"
    spec2.write_text(spec.read_text().replace(str(tmp_path / "d1"), str(tmp_path / "d2")))
    before = lorigin.stats()["total_bytes"]
    r = report(run_sync(lc, str(spec2), "--json", peer="peer2"))
    assert r["fetched"] == 2 and r["origin_bytes"] == 0 and r["peer_bytes"] == sum(map(len, data.values()))
    # Digests from the manifest: the origin served the manifest and no file bytes, no HEAD needed.
    assert lorigin.stats()["total_bytes"] == before + (src / "man" / "manifest.json").stat().st_size
    assert tree(tmp_path / "d2") == data
    # The manifest's digests are checked: a lying manifest fails that file, the old copy stays.
    (src / "man" / "x.bin").write_bytes(os.urandom(1000))
    doc = json.loads((src / "man" / "manifest.json").read_text())
    doc["files"][0]["digest"] = "sha256:" + "00" * 32
    (src / "man" / "manifest.json").write_text(json.dumps(doc))
    p = run_sync(lc, str(spec2), peer="peer2")
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "x.bin" in p.stderr and "1 failed" in p.stdout
    assert tree(tmp_path / "d2") == data
    cron = subprocess.run([sys.executable, "-m", "dfzmq", "sync", "--print-cron", str(spec)], env=lc.env(),
                          capture_output=True, text=True)
    assert cron.returncode == 0 and cron.stdout.startswith("*/5 * * * * ") and "--entry man" in cron.stdout
    units = subprocess.run([sys.executable, "-m", "dfzmq", "sync", "--print-systemd", str(spec)], env=lc.env(),
                           capture_output=True, text=True)
    assert "OnCalendar=*-*-* *:0/5:00" in units.stdout


@pytest.mark.timeout(240)
def test_overlapping_runs_and_lock(lc, lorigin, src, tmp_path):
    fill(src, "ov", {f"f{i}.bin": 1 << 20 for i in range(3)}, 40)
    dest = tmp_path / "dest"
    dest.mkdir()
    # Someone holds the lock: a run exits at once with 75; with --lock-timeout it waits its turn.
    fd = os.open(dest / ".dfzmq-sync.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        p = run_sync(lc, "--source", lorigin.url("ov/"), "--dest", str(dest))
        assert p.returncode == 75 and "another dfzmq sync" in p.stderr, (p.returncode, p.stderr)
        waiter = subprocess.Popen([sys.executable, "-m", "dfzmq", "sync", "--source", lorigin.url("ov/"),
                                   "--dest", str(dest), "--daemon", lc.control("peer1"), "--lock-timeout", "60"],
                                  env=lc.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        assert waiter.poll() is None  # waiting, not failed
    finally:
        os.close(fd)
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert "3 fetched" in out
    # Two real runs at once on a slow origin: one syncs, the other reports busy; nothing is mixed.
    fill(src, "ov", {f"f{i}.bin": 1 << 20 for i in range(3)}, 50)  # new versions: the seed reads them
    # The origin crawls until the second run has answered (3 MiB at 128 KiB/s: 24 s), so the
    # first one surely still holds the lock however slowly the second process starts.
    lorigin.set_rate(128 << 10)
    try:
        args = [sys.executable, "-m", "dfzmq", "sync", "--source", lorigin.url("ov/"), "--dest", str(dest),
                "--daemon", lc.control("peer2")]
        first = subprocess.Popen(args, env=lc.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not _locked(dest) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.run(args, env=lc.env(), capture_output=True, text=True, timeout=60)
    finally:
        lorigin.set_rate(None)
    out, err = first.communicate(timeout=120)
    assert second.returncode == 75, (second.returncode, second.stderr)
    assert first.returncode == 0, err
    assert tree(dest) == {f.name: f.read_bytes() for f in (src / "ov").iterdir()}


def _locked(dest: Path) -> bool:
    try:
        fd = os.open(dest / ".dfzmq-sync.lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.mark.timeout(240)
def test_sigkill_mid_sync_then_rerun(lc, lorigin, src, tmp_path):
    data = fill(src, "kill", {f"k{i}.bin": 2 << 20 for i in range(4)}, 60)
    dest = tmp_path / "dest"
    lorigin.set_rate(3 << 20)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "dfzmq", "sync", "--source", lorigin.url("kill/"),
                                 "--dest", str(dest), "--daemon", lc.control("peer1"), "--jobs", "1"],
                                env=lc.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(dest.glob("k*.bin")):
            time.sleep(0.05)
        assert any(dest.glob("k*.bin")), "nothing arrived"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Whatever is at a final name is a whole file; partial bytes only live under *.dfzmq-part.
        for f in dest.glob("k*.bin"):
            assert f.read_bytes() == data[f.name]
    finally:
        lorigin.set_rate(None)
    p = run_sync(lc, "--source", lorigin.url("kill/"), "--dest", str(dest), "--json")
    assert p.returncode == 0, p.stderr
    assert tree(dest) == data
    p = run_sync(lc, "--source", lorigin.url("kill/"), "--dest", str(dest), "--json")
    assert report(p)["fetched"] == 0 and report(p)["skipped"] == 4


@pytest.mark.timeout(240)
def test_source_down_keeps_destination(lc, src, tmp_path):
    data = fill(src, "down", {"a.bin": 1 << 20, "b.bin": 4000}, 80)
    dest = tmp_path / "dest"
    o = Origin(src, listing=True).start()
    try:
        p = run_sync(lc, "--source", o.url("down/"), "--dest", str(dest), "--delete")
        assert p.returncode == 0, p.stderr
        # The origin answers 503 for the index: the run fails (3), nothing is deleted.
        o.set_status("/down/", 503)
        p = run_sync(lc, "--source", o.url("down/"), "--dest", str(dest), "--delete")
        assert p.returncode == 3 and "503" in p.stderr, (p.returncode, p.stderr)
        assert tree(dest) == data
        # Index fine, one file refused: a partial failure (1), the old copy stays.
        o.set_status("/down/", None)
        (src / "down" / "a.bin").write_bytes(b"new")
        o.set_status("/down/a.bin", 503)
        p = run_sync(lc, "--source", o.url("down/"), "--dest", str(dest), "--delete")
        assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
        assert "a.bin: origin answered 503" in p.stderr and "1 skipped" in p.stdout and "1 failed" in p.stdout
        assert tree(dest) == data
        url = o.url("down/")
    finally:
        o.stop()
    # The origin is gone altogether: a clear failure, destination untouched.
    p = run_sync(lc, "--source", url, "--dest", str(dest), "--delete")
    assert p.returncode == 3 and "cannot read index" in p.stderr
    assert tree(dest) == data
    # Bad usage is exit 2.
    p = run_sync(lc, "--source", "ftp://x/", "--dest", str(dest))
    assert p.returncode == 2


@pytest.mark.timeout(120)
def test_one_shot_peer_without_a_daemon(lc, lorigin, src, tmp_path):
    """No local daemon: `--manager` makes the run a one-shot peer of the cluster."""
    from typer.testing import CliRunner

    from dfzmq.cli import app

    data = fill(src, "oneshot", {"o.bin": 3 << 20}, 90)
    res = CliRunner().invoke(app, ["sync", "--source", lorigin.url("oneshot/"), "--dest", str(tmp_path / "d"),
                                   "--manager", lc.manager_addr, "--config", str(lc.config), "--json"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    r = json.loads(res.stdout)["entries"][0]
    assert r["fetched"] == 1 and r["peer_bytes"] == len(data["o.bin"]) and r["origin_bytes"] == 0
    assert tree(tmp_path / "d") == data
