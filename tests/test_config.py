"""Settings resolution: flag > DFZMQ_* environment > TOML section > TOML top level > default."""

from pathlib import Path

import pytest

from dfzmq.config import DaemonConfig, load_toml, resolve
from dfzmq.errors import ConfigError


def test_precedence(tmp_path):
    toml_path = tmp_path / "c.toml"
    toml_path.write_text('heartbeat_interval_s = 0.5\nmanager = "top:1"\n[daemon]\nmanager = "sect:2"\n'
                         'upload-slots = 7\nseed = true\n')
    toml = load_toml(toml_path)
    cfg = resolve(DaemonConfig, "daemon", {}, toml, env={})
    assert cfg.manager == "sect:2" and cfg.heartbeat_interval_s == 0.5 and cfg.upload_slots == 7 and cfg.seed
    cfg = resolve(DaemonConfig, "daemon", {}, toml, env={"DFZMQ_MANAGER": "env:3", "DFZMQ_SEED": "no"})
    assert cfg.manager == "env:3" and cfg.seed is False
    cfg = resolve(DaemonConfig, "daemon", {"manager": "flag:4", "data": "~/x"}, toml, env={"DFZMQ_MANAGER": "env:3"})
    assert cfg.manager == "flag:4" and cfg.data == Path("~/x").expanduser()
    assert cfg.control_addr().endswith("/x/control.sock")


def test_bad_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="upload-slots"):
        resolve(DaemonConfig, "daemon", {}, {"daemon": {"upload_slots": "many"}}, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\n")
    with pytest.raises(ConfigError):
        load_toml(bad)
