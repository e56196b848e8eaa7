"""Resolve a container image reference to the blobs a preheat job should fetch: a client-side
reader of the registry API (distribution spec v2), with aiohttp.

`resolve_image("registry.example:5000/team/app:1.2", "linux/amd64")` returns the blob URLs
(config first, then layers), each blob's sha256 digest, and the headers the daemons need to
read them (a Bearer token when the registry asked for one).

- References: `[REGISTRY/]NAME[:TAG][@DIGEST]`; no registry part means Docker Hub
  (`registry-1.docker.io`, `library/` for one-part names), no tag means `latest`.
- Scheme: https, except for `localhost` and `127.0.0.1` registries (plain http, as docker's
  default insecure list) or when `plain_http` says so.
- Authentication: anonymous first; a 401 with `WWW-Authenticate: Bearer realm=...,service=...,
  scope=...` is answered by asking the realm for a token (anonymously, or with basic
  credentials when given) and retrying with `Authorization: Bearer TOKEN`; a `Basic` challenge
  is answered with the credentials themselves, when given. The token travels in
  the job to the daemons (registries give short-lived pull tokens; the manager keeps jobs, so
  `dfzmq jobs` never shows header values).
- Manifest lists / OCI indexes: the entry for `--platform` os/arch[/variant] is chosen; none
  matching is an error naming the platforms there are.
Errors are one-line `SourceError`s; nothing here talks to dfzmq services.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field

import aiohttp

from dfzmq.errors import ConfigError, SourceError
from dfzmq.oci import DOCKER_HUB, DOCKER_HUB_ALIASES, SHA256_DIGEST

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[:2]
_DIGEST = SHA256_DIGEST
MAX_MANIFEST = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ImageRef:
    registry: str
    repository: str
    reference: str  # a tag or a digest

    @property
    def base(self) -> str:
        return f"{self.registry}/v2/{self.repository}"


@dataclass
class ResolvedImage:
    ref: ImageRef
    manifest_digest: str
    urls: list[str]
    digests: dict[str, str]  # url -> sha256:...
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0


def parse_ref(text: str) -> ImageRef:
    ref = text.strip()
    if not ref or any(c.isspace() for c in ref) or "://" in ref:
        raise ConfigError(f"bad image reference {text!r}: expected [REGISTRY/]NAME[:TAG][@DIGEST]")
    name, _, digest = ref.partition("@")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, name
    if registry.lower() in DOCKER_HUB_ALIASES:  # docker.io/nginx is Docker Hub's library/nginx
        registry = DOCKER_HUB
        if "/" not in path:
            path = "library/" + path
    tag = "latest"
    if ":" in path.rpartition("/")[2]:
        path, _, tag = path.rpartition(":")
    if not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*", path):
        raise ConfigError(f"bad image name {path!r} in {text!r}")
    if digest and not _DIGEST.match(digest):
        raise ConfigError(f"bad image digest {digest!r}: expected sha256:64 hex digits")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", tag):
        raise ConfigError(f"bad image tag {tag!r}")
    return ImageRef(registry, path, digest or tag)


def parse_platform(text: str) -> tuple[str, str, str]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"bad platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def parse_challenge(header: str) -> dict[str, str]:
    """The parameters of a `Bearer realm="...",service="..."` challenge ({} if not Bearer)."""
    scheme, _, params = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return {}
    return {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', params)}


class _Client:
    def __init__(self, session: aiohttp.ClientSession, ref: ImageRef, scheme: str,
                 auth: aiohttp.BasicAuth | None) -> None:
        self.session, self.ref, self.scheme, self.auth = session, ref, scheme, auth
        self.headers: dict[str, str] = {}

    async def get_json(self, url: str, accept: tuple[str, ...]) -> tuple[dict, str, str]:
        """(document, media type, docker-content-digest) of a registry JSON document."""
        for attempt in range(2):
            async with self.session.get(url, headers={**self.headers, "Accept": ", ".join(accept)}) as resp:
                if resp.status == 401 and attempt == 0:
                    await self._login(resp.headers.get("WWW-Authenticate", ""))
                    continue
                if resp.status == 404:
                    raise SourceError(f"{self.ref.repository}:{self.ref.reference} not found at {self.ref.registry}", final=True)
                if resp.status != 200:
                    raise SourceError(f"registry {self.ref.registry} answered {resp.status} for {url}", final=True)
                body = await resp.content.read(MAX_MANIFEST + 1)
                if len(body) > MAX_MANIFEST:
                    raise SourceError(f"manifest at {url} is too large")
                try:
                    doc = json.loads(body)
                except ValueError:
                    raise SourceError(f"registry {self.ref.registry} sent a manifest that is not JSON") from None
                if not isinstance(doc, dict):
                    raise SourceError(f"registry {self.ref.registry} sent a manifest that is not an object")
                mtype = doc.get("mediaType") or resp.headers.get("Content-Type", "").split(";")[0]
                return doc, mtype, resp.headers.get("Docker-Content-Digest", "")
        raise SourceError(f"registry {self.ref.registry} refused the token it issued (401)", final=True)

    async def _login(self, challenge: str) -> None:
        if challenge.strip().lower().startswith("basic") and self.auth is not None:
            self.headers["Authorization"] = self.auth.encode()  # a registry with plain basic auth
            return
        params = parse_challenge(challenge)
        realm = params.pop("realm", "")
        if not realm:
            raise SourceError(f"registry {self.ref.registry} wants credentials dfzmq cannot give "
                              f"(WWW-Authenticate: {challenge[:100]!r})", final=True)
        params.setdefault("scope", f"repository:{self.ref.repository}:pull")
        async with self.session.get(realm, params=params, auth=self.auth) as resp:
            if resp.status != 200:
                raise SourceError(f"token service {realm} answered {resp.status}", final=True)
            try:
                doc = await resp.json(content_type=None)
            except ValueError:
                raise SourceError(f"token service {realm} sent no JSON") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise SourceError(f"token service {realm} sent no token", final=True)
        self.headers["Authorization"] = f"Bearer {token}"


def _pick(index: dict, platform: tuple[str, str, str]) -> str:
    os_, arch, variant = platform
    seen = []
    for m in index.get("manifests") or []:
        p = m.get("platform") or {}
        seen.append("/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x))
        if p.get("os") == os_ and p.get("architecture") == arch and (not variant or p.get("variant") == variant):
            digest = m.get("digest", "")
            if _DIGEST.match(digest):
                return digest
    raise SourceError(f"no {'/'.join(x for x in platform if x)} image in the index "
                      f"(platforms: {', '.join(s for s in seen if s) or 'none'})", final=True)


async def resolve_image(text: str, platform: str = "linux/amd64", plain_http: bool | None = None,
                        username: str = "", password: str = "", timeout_s: float = 30.0) -> ResolvedImage:
    ref = parse_ref(text)
    plat = parse_platform(platform)
    host = ref.registry.rpartition(":")[0] or ref.registry
    if plain_http is None:
        plain_http = host in ("localhost", "127.0.0.1", "[::1]")
    scheme = "http" if plain_http else "https"
    auth = aiohttp.BasicAuth(username, password) if username else None
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            client = _Client(session, ref, scheme, auth)
            url = f"{scheme}://{ref.base}/manifests/{ref.reference}"
            doc, mtype, digest = await client.get_json(url, MANIFEST_TYPES)
            if mtype in INDEX_TYPES or "manifests" in doc:
                digest = _pick(doc, plat)
                doc, mtype, _ = await client.get_json(f"{scheme}://{ref.base}/manifests/{digest}", MANIFEST_TYPES[2:])
            blobs = [doc.get("config") or {}] + list(doc.get("layers") or [])
            if not doc.get("layers"):
                raise SourceError(f"{text}: the manifest lists no layers ({mtype or 'unknown type'})")
    except aiohttp.ClientError as e:
        raise SourceError(f"registry {ref.registry}: {e}") from None
    except asyncio.TimeoutError:
        raise SourceError(f"registry {ref.registry} did not answer within {timeout_s:.0f}s") from None
    urls, digests, size = [], {}, 0
    for b in blobs:
        d = b.get("digest", "") if isinstance(b, dict) else ""
        if not _DIGEST.match(d):
            raise SourceError(f"{text}: a blob digest in the manifest is not sha256 ({d[:80]!r})")
        u = f"{scheme}://{ref.base}/blobs/{d}"
        if u not in digests:
            urls.append(u)
            digests[u] = d
            size += int(b.get("size") or 0)
    return ResolvedImage(ref, digest, urls, digests, dict(client.headers), size)
