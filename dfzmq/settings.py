"""Cluster-wide settings that the manager keeps and pushes to running members: which keys
exist, what values they take, and how a member's effective value is found.

Precedence, for every key below (written down here and in the README):
1. a cluster setting (`dfzmq config set KEY VALUE`), kept in the manager's LMDB, wins;
2. otherwise the member's own setting: flag > DFZMQ_* environment > TOML > built-in default
   (dfzmq/config.py);
3. `dfzmq config unset KEY` removes the cluster setting and every member falls back to (2)
   within seconds, without a restart.
A member that cannot reach the manager keeps the last settings it applied.

Values are validated where they are set (the manager answers a bad one with an error, so
`config set` fails with one line and a non-zero exit) and again where they are applied, so a
member never applies a value it does not understand (it logs and keeps its own setting).

This module is pure: no sockets, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from dfzmq.config import parse_size
from dfzmq.errors import ConfigError
from dfzmq.wire import MAX_PIECE, MIN_PIECE


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    role: str  # who applies it: "daemon" or "scheduler"
    parse: Callable[[Any], Any]
    help: str


def _int_in(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError("not an integer")
        v = int(str(value).strip()) if not isinstance(value, int) else value
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return v
    return parse


def _rate(value: Any) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError("not a byte count")
    v = parse_size(value)
    if v < 0:
        raise ValueError("must not be negative")
    return v


def _piece_cap(value: Any) -> int:
    v = _rate(value)
    if v and not MIN_PIECE <= v <= MAX_PIECE:
        raise ValueError(f"must be 0 or between {MIN_PIECE >> 10}KiB and {MAX_PIECE >> 20}MiB")
    return v


def _weight(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number")
    v = float(value)
    if not 0.0 <= v <= 100.0 or v != v:
        raise ValueError("must be between 0 and 100")
    return v


KEYS: dict[str, Key] = {k.name: k for k in (
    Key("upload_slots", "daemon", _int_in(1, 100_000),
        "load limit: children the scheduler may give one host at once"),
    Key("download_rate", "daemon", _rate, "bytes/s all downloads of a daemon together (0 = unlimited)"),
    Key("upload_rate", "daemon", _rate, "bytes/s all uploads of a daemon to other peers (0 = unlimited)"),
    Key("source_rate", "daemon", _rate, "bytes/s back-to-source reads of a daemon (0 = unlimited)"),
    Key("task_download_rate", "daemon", _rate, "bytes/s each task on its own (0 = unlimited)"),
    Key("max_piece_length", "daemon", _piece_cap,
        "longest piece of a task a daemon cuts from its origin (0 = by file size only)"),
    Key("max_parents", "scheduler", _int_in(1, 64), "parents a scheduler hands one peer"),
    Key("candidate_parents", "scheduler", _int_in(1, 1000), "candidates a scheduler samples per decision"),
    Key("weight_pieces", "scheduler", _weight, "parent score: share of the task the parent holds"),
    Key("weight_free_slots", "scheduler", _weight, "parent score: the parent host's free upload slots"),
    Key("weight_idc", "scheduler", _weight, "parent score: same IDC as the child"),
    Key("weight_location", "scheduler", _weight, "parent score: shared location prefix"),
    Key("weight_seed", "scheduler", _weight, "parent score: the parent is a seed peer"),
)}


def parse(key: str, value: Any) -> Any:
    """The canonical value of `key` (an int or float), or ConfigError with a one-line reason."""
    spec = KEYS.get(key.replace("-", "_"))
    if spec is None:
        raise ConfigError(f"unknown setting {key!r} (known: {', '.join(sorted(KEYS))})")
    try:
        return spec.parse(value)
    except (TypeError, ValueError, OverflowError) as e:
        detail = str(e) if str(e) and not str(e).startswith(("invalid literal", "could not")) else "bad value"
        raise ConfigError(f"setting {spec.name}: cannot use {value!r}: {detail}") from None


def valid(config: dict[str, Any], role: str) -> dict[str, Any]:
    """The entries of a received `config` that apply to `role`, parsed; others are dropped."""
    out = {}
    for key, value in config.items():
        spec = KEYS.get(key)
        if spec is None or spec.role != role:
            continue
        try:
            out[key] = spec.parse(value)
        except (TypeError, ValueError, OverflowError):
            continue
    return out
