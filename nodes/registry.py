"""The registry mirror: the daemon answers the registry API (`/v2/...`) for configured upstreams.

A pull-through mirror as containerd and docker expect one (`hosts.toml` mirrors,
`registry-mirrors`): the upstream is the registry named by containerd's `?ns=` query parameter
(`docker.io`, `ghcr.io`, `127.0.0.1:5000`), or the first configured one when there is none
(docker and plain registry clients such as skopeo pointed at the mirror).

- Blobs (`GET /v2/<name>/blobs/sha256:...`) go peer to peer. The task id is the blob digest
  alone, so one blob pulled through two registries or two mirrors is one task; the body is
  hashed as it streams and the last bytes go out only when the sha256 matched
  (nodes/stream.py). The client's headers (its bearer token or basic credentials) go with the
  task to whoever reads the upstream.
- Everything else (the `/v2/` ping, manifests by tag or digest, tag lists, HEAD requests)
  passes through untouched, so the registry's own authentication works for the client: its
  401 and `WWW-Authenticate` challenge reach the client, which gets a token from the realm
  the registry names and retries with it through the mirror.
- A blob the upstream refuses (401, 404) is asked again directly and the registry's own answer
  is relayed, so clients see the registry's error body and challenge.

It never rewrites manifests and never caches anything but blobs (a tag can move; a digest
cannot). An `ns` that is not configured is refused: the mirror is not an open proxy.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit

from dfzmq.oci import SHA256, blob_task_id, registry_server

if TYPE_CHECKING:
    from nodes.proxy import Exchange, ProxyServer

BLOB = re.compile(r"^/v2/(?P<name>[a-z0-9]+(?:[._/-][a-z0-9]+)*)/blobs/" f"(?P<digest>{SHA256})$")


def upstream_map(upstreams: list[str]) -> dict[str, str]:
    """ns (registry host[:port]; `docker.io` for every Docker Hub alias) -> upstream base URL.
    Raises ConfigError on a bad URL."""
    out: dict[str, str] = {}
    for u in upstreams:
        ns, base = registry_server(u)
        out.setdefault(ns, base)
    return out


def upstream_url(upstreams: dict[str, str], default: str, target: str) -> str | None:
    """The upstream URL for a mirror request target (path and query), or None if refused."""
    parts = urlsplit(target)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ns = [v for k, v in query if k == "ns"]
    rest = [(k, v) for k, v in query if k != "ns"]
    base = upstreams.get(ns[0]) if ns else default
    if not base:
        return None
    return base + parts.path + (f"?{urlencode(rest)}" if rest else "")


class RegistryMirror:
    def __init__(self, proxy: "ProxyServer", upstreams: list[str]) -> None:
        self.proxy = proxy
        self.upstreams = upstream_map(upstreams)
        self.default = registry_server(upstreams[0])[1] if upstreams else ""

    @property
    def enabled(self) -> bool:
        return bool(self.upstreams)

    async def handle(self, ex: "Exchange", method: str, target: str, headers: list[tuple[str, str]]) -> None:
        url = upstream_url(self.upstreams, self.default, target)
        if url is None:
            self.proxy.counters["registry.refused"] += 1
            body = json.dumps({"errors": [{"code": "DENIED", "message": "dfzmq mirror: registry not configured"}]})
            await ex.respond(403, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            import h11
            await ex.send(h11.Data(data=body.encode()))
            await ex.send(h11.EndOfMessage())
            return
        m = BLOB.match(urlsplit(target).path)
        if m is not None and method == "GET":
            digest = m["digest"]
            self.proxy.counters["registry.blob"] += 1
            tid = blob_task_id(digest)
            await self.proxy.serve_task(ex, tid, url, headers, expected=digest,
                                        extra=[("Docker-Content-Digest", digest)])
            return
        self.proxy.counters["registry.passthrough"] += 1
        await self.proxy.passthrough(ex, method, url, headers)
