"""Run `dfzmq ...` in this process (typer's CliRunner), much cheaper than a subprocess per
command; the result looks like subprocess.CompletedProcess (returncode, stdout, stderr).
An unexpected exception inside a command is raised, not turned into exit code 1."""

from __future__ import annotations

from types import SimpleNamespace

from typer.testing import CliRunner

from dfzmq.cli import app


def run_cli(*args: str) -> SimpleNamespace:
    r = CliRunner().invoke(app, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)
