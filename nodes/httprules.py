"""The proxy's decisions that need no socket: which URLs go peer to peer, which request headers
reach the origin, which answer headers reach the client, and how a Range header is answered.

Pure functions (no I/O, no clock), so every decision is a unit test.

Decisions worth knowing:
- A rule is a Python regex searched (`re.search`) in the whole URL, query included; only GET
  requests for http:// URLs that match go peer to peer. Everything else (other methods, no
  match, CONNECT tunnels) passes through untouched.
- The origin gets the client's end-to-end headers (Authorization, Cookie, User-Agent, ...)
  minus hop-by-hop ones, `Host` (set from the URL), and the headers that shape one answer
  rather than the content (Range, conditionals, Accept-Encoding): a task is the whole content,
  shared by every client of the cluster.
- Range: one `bytes=` range is answered 206 (suffix and open ranges too); several ranges, or
  a unit other than bytes, are answered 200 with the whole body (RFC 9110 allows it); a range
  starting past the end is 416.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# Request headers that never go into a task's back-to-source request.
NOT_FOR_ORIGIN = HOP_BY_HOP | {
    "host", "content-length", "range", "if-range", "if-none-match", "if-modified-since",
    "if-match", "if-unmodified-since", "accept-encoding",
}
TAG_HEADER = "x-dfzmq-tag"  # a client may pick a task tag / application per request
APPLICATION_HEADER = "x-dfzmq-application"


class Rules:
    """Compiled proxy rules. Raises ValueError naming the first bad regex."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = []
        for p in patterns:
            try:
                self.patterns.append(re.compile(p))
            except re.error as e:
                raise ValueError(f"bad proxy rule {p!r}: {e}") from None

    def match(self, method: str, url: str) -> bool:
        if method != "GET" or not url.lower().startswith("http://"):
            return False
        return any(p.search(url) for p in self.patterns)


def connection_tokens(headers: list[tuple[str, str]]) -> set[str]:
    """Header names listed in Connection (hop-by-hop for this message only)."""
    out = set()
    for name, value in headers:
        if name.lower() == "connection":
            out.update(t.strip().lower() for t in value.split(",") if t.strip())
    return out


def end_to_end(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers to forward, in order: without hop-by-hop ones and those Connection names."""
    drop = HOP_BY_HOP | connection_tokens(headers)
    return [(n, v) for n, v in headers if n.lower() not in drop]


def origin_headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Headers a P2P task's back-to-source request carries (credentials, cookies, agent ...)."""
    drop = NOT_FOR_ORIGIN | connection_tokens(headers)
    out: dict[str, str] = {}
    for name, value in headers:
        low = name.lower()
        if low in drop or low.startswith("x-dfzmq-"):
            continue
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


@dataclass(frozen=True, slots=True)
class Answer:
    status: int  # 200, 206 or 416
    start: int = 0
    end: int = 0  # exclusive


def answer_range(range_header: str | None, if_range: str | None, etag: str, length: int) -> Answer:
    """How to answer a GET of a `length`-byte body given its Range and If-Range headers."""
    full = Answer(200, 0, length)
    if range_header is None:
        return full
    if if_range is not None and (not etag or if_range.strip() != etag or etag.startswith("W/")):
        return full  # the client's copy is another version (or we cannot tell): whole body
    unit, sep, spec = range_header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return full
    first, dash, last = (x.strip() for x in spec.partition("-"))
    if not dash or not (first.isdigit() or (not first and last.isdigit())) or (last and not last.isdigit()):
        return full
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0:
            return Answer(416)
        return Answer(206, max(0, length - n), length)
    start = int(first)
    if start >= length:
        return Answer(416)
    end = length if not last else min(length, int(last) + 1)
    if end <= start:
        return full  # last < first: syntactically invalid, ignored
    return Answer(206, start, end)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match against our ETag (weak comparison, as RFC 9110 says for GET)."""
    if not if_none_match or not etag:
        return False
    if if_none_match.strip() == "*":
        return True
    ours = etag.removeprefix("W/")
    return any(t.strip().removeprefix("W/") == ours for t in if_none_match.split(","))
