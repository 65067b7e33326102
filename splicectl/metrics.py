"""The Prometheus metrics of `splicectl proxy` (docs/observing.md lists them).

Built on `prometheus_client` (Debian: python3-prometheus-client), in a
registry of the proxy's own: two proxies in one process (tests) never
share a counter, and the process-wide default collectors (process_*,
python_*) are left out, as they say nothing about splicing. The proxy
serves `render()` from its own selectors loop: no thread of
prometheus_client's runs.

The proxy calls the `on_*` methods as things happen. The byte counters
and the active-connection gauge are read at each scrape through `live`,
so they include the bytes that live splices have moved so far.

Every connection that ends is counted exactly once among
`sosplice_connection_duration_seconds_count`: closed cleanly (both FINs
passed on), or in one of `sosplice_client_aborts_total`,
`sosplice_upstream_aborts_total` and `sosplice_resets_total{reason}`.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

UP, DOWN = "up", "down"

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Loopback connects take tens of microseconds, a far upstream tens of
# milliseconds, a struggling one up to --connect-timeout (3 s by default).
CONNECT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# From a refused request to a tunnel held for a day.
DURATION_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
                    3600.0, 21600.0, 86400.0)

# (active connections, bytes by direction, of which in-kernel by direction)
Live = Callable[[], tuple[int, dict[str, int], dict[str, int]]]


def version() -> str:
    """The sosplice version, as `splicectl --version` prints it."""
    import sosplice
    return sosplice.__version__


class _LiveCollector:
    """Counters of bytes and the gauge of connections, read at scrape time:
    what ended splices moved (kept by `Metrics`) plus what live ones have
    moved so far (asked of the engine through `live`)."""

    def __init__(self, metrics: Metrics, live: Live) -> None:
        self.m, self.live = metrics, live

    def collect(self) -> Iterator[Metric]:
        active, live_bytes, live_kernel = self.live()
        g = GaugeMetricFamily("sosplice_connections_active",
                              "Client connections open now (connecting, relayed or spliced).")
        g.add_metric([], active)
        yield g
        for name, doc, done, live in (
                ("sosplice_bytes", "Bytes relayed or spliced; up: client to upstream, down: "
                 "upstream to client.",
                 self.m.bytes_done, live_bytes),
                ("sosplice_kernel_bytes", "Of sosplice_bytes_total, the bytes moved without a copy "
                 "through the proxy process.", self.m.kernel_done, live_kernel)):
            c = CounterMetricFamily(name, doc, labels=["direction"])
            for d in (UP, DOWN):
                c.add_metric([d], done[d] + live.get(d, 0))
            yield c


class Metrics:
    """The proxy's counters, histograms and info, in `self.registry`."""

    def __init__(self, live: Live) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.bytes_done = {UP: 0, DOWN: 0}
        self.kernel_done = {UP: 0, DOWN: 0}
        self.info = Info("sosplice", "The proxy's engine backend (bpf or worker) and the "
                         "sosplice version; the value is always 1.", registry=r)
        self.connections = Counter("sosplice_connections", "Client connections accepted, by "
                                   "listening address.", ["listener"], registry=r)
        self.splice_ends = Counter("sosplice_splice_ends", "Directions of connections "
                                   "that ended, spliced or relayed, by the engine's reason "
                                   "(or the relay's same name): EOF, ECONNRESET, EPIPE, ...",
                                   ["reason"], registry=r)
        self.client_aborts = Counter("sosplice_client_aborts", "Connections the client reset "
                                     "or abandoned; the proxy passed the reset on.", registry=r)
        self.upstream_aborts = Counter("sosplice_upstream_aborts", "Connections the upstream "
                                       "reset after the splice; the proxy passed the reset on.",
                                       registry=r)
        self.resets = Counter("sosplice_resets", "Connections the proxy cut with a reset for "
                              "a reason of its own: idle, grace, no_upstream, splice_refused, "
                              "error, exit.", ["reason"], registry=r)
        self.connect_failures = Counter("sosplice_upstream_connect_failures", "Upstream "
                                        "connects that failed (refused, timed out, ...), by "
                                        "upstream.", ["upstream"], registry=r)
        self.duration = Histogram("sosplice_connection_duration_seconds", "From accept to "
                                  "close, every connection that ended.",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.connect_time = Histogram("sosplice_upstream_connect_seconds", "From connect() to "
                                      "established, every upstream connect that succeeded.",
                                      buckets=CONNECT_BUCKETS, registry=r)
        self._ends: dict[str, Counter] = {}
        r.register(_LiveCollector(self, live))

    def splice_ended(self, reason: str) -> None:
        """Count one splice end; the labelled child is looked up once per
        reason (labels() costs a lock and a dict build per call)."""
        child = self._ends.get(reason)
        if child is None:
            child = self._ends[reason] = self.splice_ends.labels(reason)
        child.inc()

    def set_backend(self, backend: str) -> None:
        self.info.info({"backend": backend, "version": version()})

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 if it has none yet): for tests and tools."""
        return self.registry.get_sample_value(name, labels) or 0.0
