"""Prometheus metrics for every service: one HTTP endpoint per service, one registry per service.

Each service (manager, scheduler, daemon) builds a `MetricsServer` from its `metrics` setting
("HOST:PORT", "" = off) and a `collect()` function returning metric families made with the
helpers below from plain numbers the service already keeps (its Counters, its core's view).
Histograms (task durations) are real prometheus_client Histograms in the same registry, observed
by the service. A per-service `CollectorRegistry` (never the global one) keeps services that
share a process (tests, `fetch` with an embedded peer) apart.

Names follow Prometheus conventions: `dfzmq_<service>_<what>_<unit>`, counters end in
`_total`, units in seconds and bytes, labels for bounded sets only (source, state, kind).

The HTTP server runs in a thread of its own: `collect()` is called on that thread, so it must
only read values that are safe to read there (copies made with one C call such as `dict(c)`,
or a dict of numbers the service loop replaces whole).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dfzmq.errors import ConfigError

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_ERROR_WORDS = ("error", "dropped", "failed", "refused", "bad", "missing", "mismatch", "expired")
_LABEL_RE = re.compile(r"[^a-zA-Z0-9_.:-]")


def counter(name: str, doc: str, value: float | Mapping[str, float] = 0,
            label: str = "") -> CounterMetricFamily:
    """A counter family; with `label`, `value` maps label values to counts."""
    if not label:
        return CounterMetricFamily(name, doc, value=float(value))  # type: ignore[arg-type]
    fam = CounterMetricFamily(name, doc, labels=[label])
    for k, v in sorted(value.items()):  # type: ignore[union-attr]
        fam.add_metric([_LABEL_RE.sub("_", k)], float(v))
    return fam


def gauge(name: str, doc: str, value: float | Mapping[str, float] = 0,
          label: str = "") -> GaugeMetricFamily:
    if not label:
        return GaugeMetricFamily(name, doc, value=float(value))  # type: ignore[arg-type]
    fam = GaugeMetricFamily(name, doc, labels=[label])
    for k, v in sorted(value.items()):  # type: ignore[union-attr]
        fam.add_metric([_LABEL_RE.sub("_", k)], float(v))
    return fam


def prefixed(counters: Mapping[str, int], prefix: str) -> dict[str, int]:
    """{rest: n} for every counter named prefix + rest."""
    return {k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix)}


def errors(counters: Mapping[str, int]) -> dict[str, int]:
    """Counters that count something going wrong, by their own name (the `kind` label)."""
    return {k: v for k, v in counters.items() if any(w in k for w in _ERROR_WORDS)}


class _Collector:
    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self.fn = fn

    def collect(self) -> Iterable[Metric]:
        try:
            yield from self.fn()
        except Exception:  # a scrape must never take the service down, nor hide the rest
            log.exception("metrics collection failed")


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"metrics: expected HOST:PORT, got {addr!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    """A /metrics endpoint over HTTP for one service. `url` is where it ended up listening."""

    def __init__(self, addr: str, collect: Callable[[], Iterable[Metric]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(collect))
        host, port = parse_addr(addr)
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {addr}: {e}") from e
        bound_host, bound_port = self._server.server_address[:2]
        self.url = f"http://{bound_host}:{bound_port}/metrics"
        log.info("metrics at %s", self.url)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = DURATION_BUCKETS) -> Histogram:
        return Histogram(name, doc, labelnames=labels, buckets=buckets, registry=self.registry)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2.0)


def maybe_serve(addr: str, collect: Callable[[], Iterable[Metric]]) -> MetricsServer | None:
    return MetricsServer(addr, collect) if addr else None


def info_url(server: MetricsServer | None) -> dict[str, Any]:
    """For a service's ready line and stats."""
    return {"metrics": server.url} if server is not None else {}
