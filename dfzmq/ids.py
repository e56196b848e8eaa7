"""Identifiers: task ids, peer ids, host ids, and rendezvous hashing of tasks onto schedulers.

Pure functions; no I/O, no clock. A task id is the sha256 of the URL with its signing query
parameters removed (so two presigned URLs of one object are one task), plus tag and
application, as Dragonfly does. A blob addressed by its own digest (a registry blob) can pass
`content_digest`, which then is the whole identity: the same blob from two registries is one task.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Query parameters that only sign or expire a URL (S3, GCS, Azure, OSS, CloudFront).
SIGNATURE_PARAMS = re.compile(
    r"^(x-amz-.*|x-goog-.*|x-oss-.*|awsaccesskeyid|signature|expires|"
    r"ossaccesskeyid|googleaccessid|key-pair-id|policy|se|sig|sp|spr|sr|srt|ss|st|sv|skoid|"
    r"sktid|skt|ske|sks|skv)$",
    re.IGNORECASE,
)


def normalize_url(url: str, extra_filters: tuple[str, ...] = ()) -> str:
    """The URL without signature query parameters and fragment, with sorted remaining params."""
    parts = urlsplit(url)
    extra = {p.lower() for p in extra_filters}
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if not SIGNATURE_PARAMS.match(k) and k.lower() not in extra
    ]
    query.sort()
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, urlencode(query), ""))


def task_id(
    url: str,
    tag: str = "",
    application: str = "",
    content_digest: str = "",
    extra_filters: tuple[str, ...] = (),
) -> str:
    """A 64-hex task id. `content_digest` ("sha256:..."), when given, replaces the URL."""
    h = hashlib.sha256()
    if content_digest:
        h.update(b"digest\0" + content_digest.lower().encode())
    else:
        h.update(b"url\0" + normalize_url(url, extra_filters).encode())
    h.update(b"\0" + tag.encode() + b"\0" + application.encode())
    return h.hexdigest()


def new_id(prefix: str) -> str:
    """A random id with a readable prefix, e.g. peer ids."""
    return f"{prefix}-{os.urandom(6).hex()}"


def host_id(hostname: str | None = None, salt: str = "") -> str:
    """A stable id for a host (hostname plus a salt, so several daemons on one machine differ)."""
    name = hostname or socket.gethostname()
    return f"{name}-{hashlib.sha256((name + chr(0) + salt).encode()).hexdigest()[:10]}"


def rendezvous(task: str, members: list[str]) -> list[str]:
    """Members ordered by highest-random-weight for `task`: the first owns it, the rest follow.

    Consistent: removing a member only moves the tasks it owned.
    """

    def weight(member: str) -> bytes:
        return hashlib.blake2b(f"{member}\0{task}".encode(), digest_size=8).digest()

    return sorted(members, key=weight, reverse=True)


def short(task: str) -> str:
    return task[:12]
