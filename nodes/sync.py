"""`dfzmq sync`, the pure half: spec entries, index parsing, filters, versions, the plan, cron.

No sockets, no files, no clock: `nodes/syncer.py` does the I/O and calls these.

Decisions (the issue is silent on them; this is what rsync, rclone and Dragonfly users expect):
- An entry names a destination directory and either a list of URLs or an index URL: an HTTP
  directory listing (nginx/Apache/`python -m http.server` style `<a href>` pages, followed
  into subdirectories below the index), a JSON manifest (`{"files": [{"path", "size",
  "digest", "url"}]}` or a bare list of those) or a text manifest (`path [size [digest]]` per
  line, or `sha256sum` output). Relative manifest paths resolve against the manifest's URL.
- Include/exclude globs match the path relative to the destination (`fnmatch`: `*` also
  crosses `/`); a file must match an include (when any is given) and no exclude.
- A file's version is, in order of preference: the manifest's digest; the origin's ETag; its
  Last-Modified plus size; its size alone (an origin with no validator at all: like rsync
  `--size-only`). A file is skipped when its version equals the one recorded at the last sync
  and the local file still has the size and mtime recorded then (so a file edited or
  truncated locally is fetched again).
- Each version is its own cluster task: the task tag is `cdc/<hash of the version>`, so a
  changed file is a new task (cached tasks are never revalidated) and is cut at
  content-defined boundaries, and peers holding the old version take unchanged pieces locally.
- `delete` removes only files this sync put there (recorded in the state file) that the source
  no longer lists; files others put in the destination are never touched. An index that lists
  nothing while files were synced before deletes nothing (a broken index must not wipe hosts).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from dfzmq.errors import ConfigError, DfzmqError
from nodes.cdc import cdc_tag

STATE_FILE = ".dfzmq-sync.json"
LOCK_FILE = ".dfzmq-sync.lock"
PART_SUFFIX = ".dfzmq-part"
FORMATS = ("auto", "html", "json", "text")


class IndexUnreadable(DfzmqError):
    """An index could not be read or parsed (the entry fails, nothing is deleted)."""

    exit_code = 3


@dataclass(frozen=True)
class Entry:
    name: str
    dest: Path
    index: str = ""
    format: str = "auto"
    urls: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    delete: bool = False
    schedule: str = ""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Remote:
    """One file the source offers: where it goes (relative path) and where it comes from."""

    path: str
    url: str
    size: int = -1
    digest: str = ""  # "sha256:HEX" or "blake3:HEX", from a manifest


# -- spec ----------------------------------------------------------------------------------------

_ENTRY_KEYS = {"name", "dest", "index", "source", "format", "urls", "include", "exclude", "delete",
               "schedule", "headers"}


def _strs(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what} must be a string or a list of strings")
    return tuple(value)


def entry_from(raw: dict[str, Any], defaults: dict[str, Any], n: int) -> Entry:
    d = {**defaults, **raw}
    unknown = set(d) - _ENTRY_KEYS
    name = str(d.get("name") or f"entry{n}")
    if unknown:
        raise ConfigError(f"sync entry {name!r}: unknown keys {sorted(unknown)}")
    if not d.get("dest"):
        raise ConfigError(f"sync entry {name!r}: 'dest' is required")
    index = d.get("index") or d.get("source") or ""
    urls = _strs(d.get("urls", []), f"sync entry {name!r}: urls")
    if bool(index) == bool(urls):
        raise ConfigError(f"sync entry {name!r}: give either 'index' (a listing or manifest URL) or 'urls'")
    for u in (index, *urls):
        if u and urlsplit(u).scheme not in ("http", "https", "file"):
            raise ConfigError(f"sync entry {name!r}: not an http(s):// or file:// URL: {u!r}")
    fmt = d.get("format", "auto")
    if fmt not in FORMATS:
        raise ConfigError(f"sync entry {name!r}: format must be one of {', '.join(FORMATS)}")
    headers = d.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ConfigError(f"sync entry {name!r}: headers must be a table of strings")
    if not isinstance(d.get("delete", False), bool):
        raise ConfigError(f"sync entry {name!r}: delete must be true or false")
    schedule = str(d.get("schedule", ""))
    if schedule:
        cron_fields(schedule)
    return Entry(name, Path(str(d["dest"])).expanduser(), index, fmt, urls,
                 _strs(d.get("include", []), "include"), _strs(d.get("exclude", []), "exclude"),
                 d.get("delete", False), schedule, dict(headers))


def entries_from_spec(spec: dict[str, Any]) -> list[Entry]:
    """A parsed TOML spec: `[defaults]` plus `[[sync]]` tables (or one top-level entry)."""
    defaults = spec.get("defaults", {})
    raw = spec.get("sync")
    if raw is None:
        raw = [{k: v for k, v in spec.items() if k != "defaults"}]
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw or not all(isinstance(r, dict) for r in raw):
        raise ConfigError("a sync spec needs [[sync]] tables with dest and index (or urls)")
    out = [entry_from(r, defaults, i + 1) for i, r in enumerate(raw)]
    names = [e.name for e in out]
    dests = [str(e.dest.absolute()) for e in out]
    if len(set(names)) != len(names):
        raise ConfigError("sync entries need distinct names")
    if len(set(dests)) != len(dests):
        raise ConfigError("two sync entries share a destination; give each its own directory")
    return out


# -- indexes -------------------------------------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            for k, v in attrs:
                if k == "href" and v:
                    self.hrefs.append(v)


def parse_listing(page: str, page_url: str, root_url: str) -> tuple[list[Remote], list[str]]:
    """Files and subdirectory URLs linked from an HTML listing, below `root_url` only (no
    parent links, sort links, other hosts)."""
    p = _Links()
    p.feed(page)
    files, dirs, seen = [], [], set()
    for href in p.hrefs:
        url = urljoin(page_url, href)
        parts = urlsplit(url)
        if parts.query or parts.fragment or not url.startswith(root_url) or url == page_url or url in seen:
            continue
        seen.add(url)
        rel = unquote(url[len(root_url):])
        if url.endswith("/"):
            dirs.append(url)
        elif safe_path(rel):
            files.append(Remote(rel, url))
    return files, dirs


def parse_json_manifest(text: str, base_url: str) -> list[Remote]:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise IndexUnreadable(f"manifest is not JSON: {e}") from None
    items = doc.get("files") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise IndexUnreadable("JSON manifest needs a list of files (or {\"files\": [...]})")
    out = []
    for it in items:
        if isinstance(it, str):
            it = {"path": it}
        if not isinstance(it, dict) or not isinstance(it.get("path"), str):
            raise IndexUnreadable(f"JSON manifest entry without a path: {it!r}")
        size = it.get("size", -1)
        dig = it.get("digest") or (f"sha256:{it['sha256']}" if it.get("sha256") else "")
        if not isinstance(size, int) or not isinstance(dig, str):
            raise IndexUnreadable(f"JSON manifest entry with a bad size or digest: {it!r}")
        out.append(_manifest_remote(it["path"], base_url, size, dig, it.get("url")))
    return out


_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def parse_text_manifest(text: str, base_url: str) -> list[Remote]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tok = line.split()
        if len(tok) >= 2 and _HEX64.match(tok[0]):  # sha256sum output: "HEX  path" ("*path" in binary mode)
            path = line[64:].strip().lstrip("*")
            out.append(_manifest_remote(path, base_url, -1, f"sha256:{tok[0].lower()}"))
            continue
        if len(tok) > 3 or (len(tok) >= 2 and not tok[1].isdigit()):
            raise IndexUnreadable(f"text manifest line {n}: expected 'path [size [digest]]': {line!r}")
        out.append(_manifest_remote(tok[0], base_url, int(tok[1]) if len(tok) > 1 else -1,
                                    tok[2] if len(tok) > 2 else ""))
    return out


def _manifest_remote(path: str, base_url: str, size: int, dig: str, url: str | None = None) -> Remote:
    if dig and not re.match(r"^(sha256|blake3):[0-9a-fA-F]{64}$", dig):
        raise IndexUnreadable(f"manifest digest for {path!r} is not sha256:HEX or blake3:HEX")
    rel = path.lstrip("/") if url else path
    if not safe_path(rel):
        raise IndexUnreadable(f"manifest path {path!r} leaves the destination")
    return Remote(rel, url or urljoin(base_url, quote(rel)), size, dig.lower())


def sniff_format(fmt: str, url: str, content_type: str, body: str) -> str:
    if fmt != "auto":
        return fmt
    ct = content_type.split(";")[0].strip().lower()
    if ct.endswith("json") or url.endswith(".json"):
        return "json"
    if ct == "text/html" or body.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
        return "html"
    return "text"


def safe_path(rel: str) -> bool:
    """A relative path that stays under the destination and is not one of sync's own files."""
    if not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return False
    name = parts[-1]
    return name not in (STATE_FILE, LOCK_FILE) and not name.endswith(PART_SUFFIX)


def select(remotes: list[Remote], include: tuple[str, ...], exclude: tuple[str, ...]) -> list[Remote]:
    out, seen = [], set()
    for r in remotes:
        if r.path in seen:
            continue
        if include and not any(fnmatch.fnmatchcase(r.path, g) for g in include):
            continue
        if any(fnmatch.fnmatchcase(r.path, g) for g in exclude):
            continue
        seen.add(r.path)
        out.append(r)
    return out


def remotes_from_urls(urls: tuple[str, ...]) -> list[Remote]:
    out = []
    for u in urls:
        name = unquote(posixpath.basename(urlsplit(u).path))
        if not safe_path(name):
            raise ConfigError(f"cannot name a file after {u!r}")
        out.append(Remote(name, u))
    return out


# -- versions and the plan -------------------------------------------------------------------------


def version_of(remote: Remote, size: int = -1, etag: str = "", last_modified: str = "") -> str:
    if remote.digest:
        return remote.digest
    if etag:
        return f"etag:{etag}"
    if last_modified:
        return f"lm:{last_modified}:{size}"
    return f"size:{size}"


def task_tag(version: str) -> str:
    return cdc_tag(hashlib.sha256(version.encode()).hexdigest()[:20])


def unchanged(record: dict | None, version: str, local: tuple[int, int] | None) -> bool:
    """The file is as the last sync left it: same version at the source, same size and mtime
    here. `local` is (size, mtime_ns) of the destination file, or None when it is missing."""
    return (record is not None and local is not None and record.get("version") == version
            and record.get("size") == local[0] and record.get("mtime_ns") == local[1])


def deletions(state_files: dict[str, dict], wanted: set[str]) -> list[str]:
    """Files the last syncs put here that the source no longer lists (none if it lists none)."""
    if not wanted:
        return []
    return sorted(p for p in state_files if p not in wanted)


# -- cron and systemd ---------------------------------------------------------------------------

_NICKNAMES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
              "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *"}


def cron_fields(schedule: str) -> list[str]:
    s = _NICKNAMES.get(schedule.strip(), schedule.strip())
    f = s.split()
    if len(f) != 5 or not all(re.match(r"^[0-9*/,\-]+$", x) for x in f):
        raise ConfigError(f"schedule {schedule!r} is not a 5-field crontab schedule (or @hourly, @daily, ...)")
    return f


def cron_line(entry: Entry, command: list[str]) -> str:
    return " ".join(cron_fields(entry.schedule)) + " " + shlex.join(command)


def on_calendar(schedule: str) -> str:
    """A systemd OnCalendar= for the common crontab forms; ConfigError for others."""
    m, h, dom, mon, dow = cron_fields(schedule)
    if (dom, mon) != ("*", "*"):
        if dow != "*" or not (dom.isdigit() and mon in ("*",) and m.isdigit() and h.isdigit()):
            raise ConfigError(f"schedule {schedule!r}: no systemd equivalent printed; use the crontab line")
        return f"*-*-{int(dom):02d} {int(h):02d}:{int(m):02d}:00"
    days = {"0": "Sun", "1": "Mon", "2": "Tue", "3": "Wed", "4": "Thu", "5": "Fri", "6": "Sat", "7": "Sun"}
    prefix = ""
    if dow != "*":
        if dow not in days:
            raise ConfigError(f"schedule {schedule!r}: no systemd equivalent printed; use the crontab line")
        prefix = days[dow] + " "

    def part(x: str) -> str:
        if x == "*":
            return "*"
        if x.startswith("*/") and x[2:].isdigit():
            return f"0/{int(x[2:])}"
        if re.match(r"^\d+(,\d+)*$", x):
            return ",".join(f"{int(v):02d}" for v in x.split(","))
        raise ConfigError(f"schedule {schedule!r}: no systemd equivalent printed; use the crontab line")

    return f"{prefix}*-*-* {part(h)}:{part(m)}:00"


def systemd_units(entry: Entry, command: list[str]) -> str:
    unit = f"dfzmq-sync-{re.sub(r'[^A-Za-z0-9_.-]', '-', entry.name)}"
    return (f"# /etc/systemd/system/{unit}.service\n[Unit]\nDescription=dfzmq sync {entry.name}\n"
            f"After=network-online.target\n\n[Service]\nType=oneshot\nExecStart={shlex.join(command)}\n\n"
            f"# /etc/systemd/system/{unit}.timer\n[Unit]\nDescription=dfzmq sync {entry.name} on schedule\n\n"
            f"[Timer]\nOnCalendar={on_calendar(entry.schedule)}\nRandomizedDelaySec=30\nPersistent=true\n\n"
            f"[Install]\nWantedBy=timers.target\n# enable with: systemctl enable --now {unit}.timer\n")
