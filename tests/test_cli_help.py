"""Every command and subcommand prints its --help (rich markup in a help text can break it)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from dfzmq.cli import app


def _paths(cmd, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, sub in getattr(cmd, "commands", {}).items():  # a group's subcommands
        out += _paths(sub, prefix + (name,))
    return out


PATHS = _paths(typer.main.get_command(app))


def test_the_cli_has_every_command_group():
    names = {p[0] for p in PATHS if p}
    assert {"fetch", "daemon", "sync", "monitor", "preheat", "cache", "config", "init", "hosts"} <= names


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "dfzmq")
def test_help(path):
    r = CliRunner().invoke(app, [*path, "--help"])
    assert r.exit_code == 0, r.output
    assert "usage" in r.output.lower()
