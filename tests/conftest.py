"""Shared fixtures: a real HTTP origin and a real local cluster of dfzmq processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import contextlib
import queue
import socket
import threading
import time

import zmq

from dfzmq import net
from dfzmq.service import StopFlag
from tools.cluster import LocalCluster
from tools.origin import Origin

TIMEOUT_S = 3.0  # how long socket tests wait for any one answer


def make_file(path: Path, size: int, seed: int = 0) -> bytes:
    """A file of `size` pseudo-random bytes (not compressible, not repeated)."""
    import random

    data = random.Random(seed).randbytes(size) if size else b""
    path.write_bytes(data)
    return data


@pytest.fixture(scope="module")
def www(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("www")


@pytest.fixture(scope="module")
def origin(www):
    with Origin(www) as o:
        yield o


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Manager, scheduler, one seed peer and eight peer daemons, shared by a module's tests."""
    root = tmp_path_factory.mktemp("cluster")
    with LocalCluster(root, peers=8) as c:
        yield c


@pytest.fixture
def outdir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (a disk that fills up), mounted for the test and unmounted after;
    skips where it cannot be mounted (needs root)."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield small
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.fixture
def o_direct_refused(monkeypatch):
    """os.open refuses O_DIRECT with EINVAL, as tmpfs before Linux 6.6 and some FUSE and
    network filesystems do."""
    real = os.open

    def refuse(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real(path, flags, *a)

    monkeypatch.setattr(os, "open", refuse)


def pytest_report_header(config):
    return f"dfzmq tests, pid {os.getpid()}"


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@contextlib.contextmanager
def serving(target, cfg, **kw):
    """Run a service's serve() in a thread with its own context; yield its on_ready dict."""
    sctx, stop, ready = zmq.Context(), StopFlag(), queue.Queue()

    def run():
        try:
            target(cfg, sctx, stop, ready.put, **kw)
        except BaseException as e:  # surface startup failures instead of a ready timeout
            ready.put(e)

    t = threading.Thread(target=run, name=target.__module__, daemon=True)
    t.start()
    info = ready.get(timeout=TIMEOUT_S)
    if isinstance(info, BaseException):
        raise info
    try:
        yield info
    finally:
        stop.set()
        t.join(TIMEOUT_S)
        assert not t.is_alive(), "serve() did not stop"
        sctx.term()  # returns only if serve() closed every socket


def accepted_priorities(port: int) -> list[int]:
    """SO_PRIORITY of every connection this process accepted on `port` (the services run in
    threads here, so their descriptors are ours to look at)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue
        try:
            s = socket.socket(fileno=fd)
        except OSError:  # not a socket
            os.close(fd)
            continue
        with s:
            try:
                if s.type != socket.SOCK_STREAM or s.getsockname()[1] != port:
                    continue
                s.getpeername()  # the listener has no peer
            except (OSError, IndexError, TypeError):
                continue
            out.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY))
    return out


def wait_priorities(port: int, count: int) -> list[int]:
    """accepted_priorities(port) once `count` connections have the low-delay priority, or
    whatever they have after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        got = accepted_priorities(port)
        if (len(got) >= count and all(p == net.LOW_DELAY_PRIORITY for p in got)) or time.monotonic() > deadline:
            return got
        time.sleep(0.02)
