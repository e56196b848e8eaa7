"""Durable state of the manager's cluster operations (brokers/manager/ops.py) in LMDB: the
cluster settings, the jobs and the seq of their updates.

An environment of its own at DATA/ops (next to the membership store, which it never touches):
- `meta`: b"seq", and b"epoch": an id made when the store is created, so followers can tell
  a wiped store (seq back at 0) from a stale message;
- `config`: setting name -> msgpack value;
- `jobs`: job id -> msgpack map of JobInfo fields (a map, so older and newer records load).
Short transactions; open after any fork; never touches sockets or clocks.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import msgpack

from dfzmq import wire
from dfzmq.ids import new_id
from brokers.manager.store import load_records, open_env

log = logging.getLogger(__name__)

_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(wire.JobInfo))


class OpsStore:
    def __init__(self, path: Path, map_size: int = 1 << 32) -> None:
        self._env = open_env(path, map_size, "the manager's job store")
        self._meta = self._env.open_db(b"meta")
        self._config = self._env.open_db(b"config")
        self._jobs = self._env.open_db(b"jobs")

    def seq(self) -> int:
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(b"seq")
        return int(bytes(raw).decode()) if raw is not None else 0

    def epoch(self) -> str:
        """This store's creation id (made on first use)."""
        with self._env.begin(write=True, db=self._meta) as txn:
            raw = txn.get(b"epoch")
            if raw is None:
                raw = new_id("ops").encode()
                txn.put(b"epoch", raw)
        return bytes(raw).decode()

    def config(self) -> dict[str, Any]:
        with self._env.begin(db=self._config) as txn:
            return {bytes(k).decode(): msgpack.unpackb(v, raw=False) for k, v in txn.cursor()}

    def jobs(self) -> list[wire.JobInfo]:
        return load_records(self._env, self._jobs, wire.JobInfo, "job")

    def write(self, seq: int, config: dict[str, Any] | None, jobs: list[wire.JobInfo],
              drop: list[str] = ()) -> None:
        with self._env.begin(write=True) as txn:
            for job_id in drop:
                txn.delete(job_id.encode(), db=self._jobs)
            if config is not None:
                txn.drop(self._config, delete=False)
                for k, v in config.items():
                    txn.put(k.encode(), msgpack.packb(v, use_bin_type=True), db=self._config)
            for job in jobs:
                fields = {f: getattr(job, f) for f in _JOB_FIELDS}
                txn.put(job.job_id.encode(), msgpack.packb(fields, use_bin_type=True), db=self._jobs)
            txn.put(b"seq", str(seq).encode(), db=self._meta)

    def close(self) -> None:
        self._env.close()
