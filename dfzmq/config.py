"""Settings of every service, and how they are resolved: flag > DFZMQ_* env > TOML > default.

The TOML file (`--config`) may hold a section per command (`[daemon]`, `[scheduler]`,
`[manager]`, `[fetch]`) and top-level keys shared by all; keys are the long option names with
dashes or underscores (`heartbeat-interval-s`). Environment variables are `DFZMQ_` plus the
option name in upper case with underscores (`DFZMQ_MANAGER`, `DFZMQ_DATA`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfzmq.errors import ConfigError

DEFAULT_MANAGER = "127.0.0.1:8900"
DEFAULT_SCHEDULER = "127.0.0.1:8910"


@dataclass(slots=True)
class ManagerConfig:
    listen: str = DEFAULT_MANAGER
    data: Path = Path("/var/lib/dfzmq/manager")
    advertise: str = ""
    heartbeat_interval_s: float = 1.0
    liveness: int = 5  # missed heartbeats before a member is declared down
    curve_public: str = ""  # the cluster's CURVE key pair (Z85, `dfzmq keygen`): encrypts every link
    curve_secret: str = ""
    metrics: str = ""  # HOST:PORT of the Prometheus /metrics endpoint; "" = off


@dataclass(slots=True)
class SchedulerConfig:
    manager: str = DEFAULT_MANAGER
    listen: str = DEFAULT_SCHEDULER
    advertise: str = ""
    heartbeat_interval_s: float = 1.0
    liveness: int = 5
    max_parents: int = 6
    # Parents are the best of this many qualifying peers sampled at random: 8 rather than 15, so
    # that one wave of registrations does not group peers by registration order (README,
    # "Registration order": N=32 slow half registering last 1.35 -> 1.25 of the bound).
    candidate_parents: int = 8
    # A trial, off: count free upload slots in this many steps when choosing a peer's parents
    # at registration (brokers/scheduler/parents.py, README "Registration order").
    choose_free_steps: int = 0
    curve_public: str = ""
    curve_secret: str = ""
    metrics: str = ""  # HOST:PORT of the Prometheus /metrics endpoint; "" = off


@dataclass(slots=True)
class DaemonConfig:
    manager: str = DEFAULT_MANAGER
    data: Path = Path("/var/lib/dfzmq/daemon")
    seed: bool = False
    listen: str = "0.0.0.0:0"  # upload server
    advertise: str = ""
    control: str = ""  # default ipc://DATA/control.sock
    scheduler: str = ""  # a fixed scheduler instead of asking the manager (tests, tiny setups)
    hostname: str = ""
    idc: str = ""
    location: str = ""
    heartbeat_interval_s: float = 1.0
    liveness: int = 4
    upload_slots: int = 32
    window_bytes: int = 1024 * 1024  # outstanding bytes per parent (credit window; 2 pieces while it holds 2)
    source_connections: int = 4  # parallel Range requests to the origin
    # Longest piece of a task this daemon cuts first (reads from the origin or imports; others
    # follow its manifest); 0 = by file size only (about 512 pieces, 64 KiB-16 MiB). For slow
    # links: "256KiB" took a 512 MiB file to 16 peers on 12.5 Mbit/s links in 1.08 of the bound
    # against 1.26, and costs CPU per piece on fast ones (nodes/source.py). Set it cluster-wide.
    max_piece_length: int = 0
    source_timeout_s: float = 60.0  # the origin sending nothing for this long is a failure
    concurrent_tasks: int = 0  # tasks downloading at once (0 = no limit); others wait their turn
    concurrent_pieces: int = 0  # piece requests outstanding per task (0 = the windows decide)
    schedule_timeout_s: float = 10.0  # no answer from any scheduler for this long: go to source
    stall_timeout_s: float = 15.0  # no piece for this long from any parent: reschedule
    map_size: int = 1 << 40
    # Bandwidth limits in bytes per second ("50MiB", "100M" accepted); 0 = unlimited.
    download_rate: int = 0  # all downloads of this daemon together (parents and origin)
    upload_rate: int = 0  # all uploads to other peers together
    source_rate: int = 0  # back-to-source reads
    task_download_rate: int = 0  # each task on its own
    # Storage garbage collection (nodes/gc.py). The quota counts piece bytes in the store only.
    disk_quota: int = 0  # bytes ("50GiB" accepted); 0 = no quota
    gc_high_watermark: float = 0.9  # usage above this fraction of the quota starts eviction...
    gc_low_watermark: float = 0.7  # ...which goes on until usage is at or below this fraction
    task_ttl_s: float = 0.0  # finished tasks not read for this long are evicted; 0 = keep forever
    gc_interval_s: float = 30.0
    curve_public: str = ""
    curve_secret: str = ""
    # HTTP proxy and registry mirror (nodes/proxy.py, nodes/registry.py); off while proxy_listen
    # is empty. Lists come from TOML arrays, or whitespace-separated in env and flags.
    proxy_listen: str = ""  # HOST:PORT, or just PORT for 127.0.0.1:PORT (Dragonfly uses 65001)
    proxy_rules: list[str] = field(default_factory=list)  # URL regexes served peer to peer
    proxy_prefetch: bool = False  # a Range request also fetches the whole task in the background
    proxy_filter_params: list[str] = field(default_factory=list)  # more query params left out of task ids
    proxy_hold_bytes: int = 256 << 20  # kept in memory for clients behind the download (nodes/stream.py)
    registry_mirrors: list[str] = field(default_factory=list)  # upstream registries; the first is the default
    metrics: str = ""  # HOST:PORT of the Prometheus /metrics endpoint; "" = off
    # Each parent's credit window is what it sent us in this many seconds while busy (at
    # least 2 pieces, at most window_bytes, which wins for pieces over half of it): a slow
    # parent's queue stays short (nodes/picker.py).
    # 0 = every parent gets window_bytes.
    window_target_s: float = 1.0
    window_mode: str = "aimd"  # "aimd" (children of a parent converge to equal shares) or "rate"
    # Output files of `dfzmq fetch`/`sync` written with O_DIRECT (nodes/directio.py): the piece
    # store caches the bytes already. false: through the page cache (a slow disk under a fast
    # network, where the page cache absorbing the writes matters more than memory).
    output_direct: bool = True
    # Pieces of piece_file_threshold bytes or more are files under DATA/pieces, written and read
    # with O_DIRECT (nodes/piecefiles.py: no page-cache copy of every byte received); smaller
    # ones and all metadata stay in LMDB. false: new pieces go into LMDB (old files stay readable).
    piece_files: bool = True
    piece_file_threshold: int = 1 << 20
    piece_cache_bytes: int = 64 << 20  # recently stored/read file pieces kept in memory for children
    # Once this host's uplink queues (a slow link), children's connections get small send
    # buffers and the children furthest behind are served first (nodes/uplink.py). false: the
    # kernel's TCP autotuning and equal per-child slots decide, as before.
    upload_share: bool = True

    def control_addr(self) -> str:
        return self.control or f"ipc://{Path(self.data).resolve()}/control.sock"


_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def parse_size(value: Any) -> int:
    """An int, or a string with an optional unit: 10M = 10*1000^2, 10MiB = 10*1024^2 (a 'B'
    or '/s' after the unit is ignored)."""
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().removesuffix("/s").removesuffix("b").strip()
    num = text.rstrip("kmgi")
    unit = text[len(num):]
    if unit not in _UNITS:
        raise ValueError(value)
    return int(float(num) * _UNITS[unit])


def curve_of(cfg: Any) -> Any:
    """The cluster's CURVE keys from a config, or None when the cluster runs in the clear."""
    from dfzmq.net import Curve

    pub, sec = getattr(cfg, "curve_public", ""), getattr(cfg, "curve_secret", "")
    if not pub and not sec:
        return None
    if len(pub) != 40 or (sec and len(sec) != 40):
        raise ConfigError("curve_public and curve_secret must be 40-character Z85 keys (dfzmq keygen)")
    return Curve(pub.encode(), sec.encode())


def load_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def _coerce(value: Any, default: Any, name: str) -> Any:
    try:
        if isinstance(default, list):
            items = value.split() if isinstance(value, str) else list(value)
            return [str(v) for v in items]
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, Path):
            return Path(value).expanduser()
        if isinstance(default, int):
            return parse_size(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name}: cannot use {value!r}") from None


def resolve(cls: type, section: str, flags: dict[str, Any], toml: dict[str, Any],
            env: dict[str, str] | None = None) -> Any:
    """Build `cls` from flags (None = not given), environment, TOML and defaults."""
    env = os.environ if env is None else env
    sect = toml.get(section, {}) if isinstance(toml.get(section, {}), dict) else {}
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        dashed = f.name.replace("_", "-")
        value = flags.get(f.name)
        if value is None:
            value = env.get("DFZMQ_" + f.name.upper())
        for source in (sect, toml):
            if value is None:
                value = source.get(f.name, source.get(dashed))
        out[f.name] = default if value is None else _coerce(value, default, dashed)
    return cls(**out)


__all__ = ["ManagerConfig", "SchedulerConfig", "DaemonConfig", "load_toml", "resolve", "field"]
