"""`dfzmq init containerd|docker`: point container runtimes at the daemon's registry mirror.

- containerd: one `hosts.toml` per configured registry under its `config_path`
  (`/etc/containerd/certs.d/<registry host>/hosts.toml`): the registry stays the `server`, and
  the daemon's mirror is a host with the `pull` and `resolve` capabilities, so containerd asks the
  mirror first (with `?ns=<registry>`, which the mirror uses to pick the upstream) and falls back
  to the registry itself when the daemon is down. Pushes never go through the mirror.
  An existing `hosts.toml` is replaced only with `--force` (it may hold the operator's settings).
- docker: dockerd only mirrors Docker Hub, through `registry-mirrors` in daemon.json; the
  setting is printed, not written (daemon.json holds much else and dockerd must be restarted).

Both read the daemon's settings (`registry_mirrors`, `proxy_listen`) the way `dfzmq daemon` does:
flags, DFZMQ_* environment, `--config` TOML.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dfzmq.cli import ConfigOpt, err_console, fail, run_guarded
from dfzmq.cli import app
from dfzmq.config import DaemonConfig, load_toml, resolve
from dfzmq.errors import ConfigError
from dfzmq.oci import registry_server

init_app = typer.Typer(no_args_is_help=True, help="Write or print container runtime settings for the registry mirror.")
app.add_typer(init_app, name="init")

DEFAULT_CONFIG_PATH = Path("/etc/containerd/certs.d")


def mirror_url(cfg: DaemonConfig) -> str:
    if not cfg.proxy_listen:
        raise ConfigError("proxy_listen is not set: the daemon serves no registry mirror (e.g. proxy_listen = \"65001\")")
    from nodes.proxy import parse_listen  # here, not at the top: aiohttp costs every command ~0.2 s to import

    host, port = parse_listen(cfg.proxy_listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def registries(cfg: DaemonConfig) -> list[tuple[str, str]]:
    """(containerd's name for the registry, its server URL) for each configured upstream."""
    if not cfg.registry_mirrors:
        raise ConfigError("registry_mirrors is empty: name the registries to mirror "
                          "(e.g. registry_mirrors = [\"https://index.docker.io\"])")
    return [registry_server(u) for u in cfg.registry_mirrors]


def hosts_toml(server: str, mirror: str) -> str:
    return (f'# Written by dfzmq init containerd: pulls go through the dfzmq daemon\'s mirror first.\n'
            f'server = "{server}"\n\n'
            f'[host."{mirror}"]\n'
            f'  capabilities = ["pull", "resolve"]\n')


def _cfg(config: Optional[Path], proxy_listen: Optional[str]) -> DaemonConfig:
    return run_guarded(resolve, DaemonConfig, "daemon", {"proxy_listen": proxy_listen}, run_guarded(load_toml, config))


@init_app.command("containerd")
def init_containerd(
    config_path: Annotated[Path, typer.Option(help="containerd's registry config_path.")] = DEFAULT_CONFIG_PATH,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the files instead of writing them.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace existing hosts.toml files.")] = False,
    proxy_listen: Annotated[Optional[str], typer.Option(help="The daemon's proxy address (default: from its config).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Write containerd hosts.toml files that send pulls of the configured registries to the mirror."""
    cfg = _cfg(config, proxy_listen)
    mirror = run_guarded(mirror_url, cfg)
    files = [(config_path / name / "hosts.toml", hosts_toml(server, mirror)) for name, server in run_guarded(registries, cfg)]
    if dry_run:
        for path, text in files:
            typer.echo(f"# {path}\n{text}")
        return
    for path, _ in files:
        if path.exists() and not force:
            raise fail(f"{path} exists (use --force to replace it)", 2)
    for path, text in files:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as e:
            raise fail(f"cannot write {path}: {e.strerror}", 3) from None
        typer.echo(f"wrote {path}")
    err_console.print(f"containerd reads these when its CRI registry config_path is {config_path} "
                      "(config.toml: [plugins.\"io.containerd.grpc.v1.cri\".registry] config_path); "
                      "ctr needs --hosts-dir.", highlight=False)


@init_app.command("docker")
def init_docker(
    proxy_listen: Annotated[Optional[str], typer.Option(help="The daemon's proxy address (default: from its config).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Print the daemon.json `registry-mirrors` setting for dockerd (Docker Hub pulls only)."""
    cfg = _cfg(config, proxy_listen)
    mirror = run_guarded(mirror_url, cfg)
    regs = run_guarded(registries, cfg)
    typer.echo(json.dumps({"registry-mirrors": [mirror]}, indent=2))
    if regs[0][0] != "docker.io":
        err_console.print("warning: dockerd sends only Docker Hub pulls to a mirror, and the mirror sends "
                          f"requests without ?ns= to the first of registry_mirrors ({regs[0][1]}): put "
                          "https://index.docker.io first", highlight=False)
    err_console.print("Merge this into /etc/docker/daemon.json and restart dockerd.", highlight=False)
