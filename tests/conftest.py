"""Shared fixtures: a real HTTP origin and a real local cluster of dfzmq processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.cluster import LocalCluster
from tools.origin import Origin


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


def pytest_report_header(config):
    return f"dfzmq tests, pid {os.getpid()}"
