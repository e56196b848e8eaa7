"""Container registry facts shared by the mirror (nodes/registry.py), the image resolver
(dfzmq/registry.py), `dfzmq init` (dfzmq/cli_init.py) and preheat (nodes/ops.py).

- `SHA256_DIGEST`: the one blob digest form we accept (`sha256:` and 64 lower-case hex).
- `blob_task_id(digest)`: the task id of a registry blob. It is the digest alone: no URL, no
  tag, no application, so a blob pulled through the mirror, preheated with `--image` (with or
  without `--tag`) or fetched via two registries is one task, read from the origin once.
- `registry_server(text)`: (containerd's name, server URL) for a configured registry. Docker Hub
  has several names (`docker.io`, `index.docker.io`, `registry-1.docker.io`, with or without a
  scheme); containerd calls it `docker.io` (`?ns=docker.io`) and its registry API is served at
  `https://registry-1.docker.io` (`docker.io` itself answers the web site), so every alias maps
  there, always over https.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from dfzmq import ids
from dfzmq.errors import ConfigError

DOCKER_HUB = "registry-1.docker.io"
DOCKER_HUB_NS = "docker.io"  # containerd's name for Docker Hub
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", DOCKER_HUB})
SHA256 = r"sha256:[0-9a-f]{64}"  # a blob digest as the registry API writes it
SHA256_DIGEST = re.compile(f"^{SHA256}$")


def blob_task_id(digest: str) -> str:
    """The task id of the registry blob with this content digest (`sha256:...`)."""
    return ids.task_id("", content_digest=digest)


def registry_server(text: str) -> tuple[str, str]:
    """(containerd namespace, base URL) for a `registry_mirrors` entry. Raises ConfigError."""
    parts = urlsplit(text if "://" in text else f"https://{text}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"registry mirror {text!r}: expected http(s)://HOST[:PORT]")
    if parts.netloc.lower() in DOCKER_HUB_ALIASES:
        return DOCKER_HUB_NS, f"https://{DOCKER_HUB}"
    return parts.netloc, f"{parts.scheme}://{parts.netloc}"


def blob_digest_of(task_id: str, url: str) -> str:
    """The sha256 hex a task's content must have, when the task is a registry blob named by
    its digest (its URL ends in `/blobs/sha256:HEX` and its id is that digest's); else ""."""
    _, sep, tail = urlsplit(url).path.rpartition("/blobs/")
    if sep and SHA256_DIGEST.match(tail) and blob_task_id(tail) == task_id:
        return tail.removeprefix("sha256:")
    return ""
