"""The daemon's figures in the Prometheus text format (``prometheus_client``).

Nothing here runs on the READ path. The daemon already counts what it does (driver
and fill counters, log-scale latency histograms, cull totals, checkpoint counts) for
its ``stats`` line, and the core keeps its labelled counts where the events happen
(``counters.py``: bytes fetched and retries per source rule, failures by error kind);
:class:`DaemonCollector` reads those at scrape time and turns them into metric
families, so a scrape costs the scraper's thread a few microseconds per metric and a
READ nothing more (no second set of counters to keep in step).

The same text is served on the control socket (``metrics`` operation, read-only) and,
when ``metrics_listen`` names a loopback address, over HTTP by ``prometheus_client``'s
own server thread.

Names follow Prometheus conventions: ``cachefilesd_`` prefix, ``_total`` for
counters, base units (seconds, bytes). Latency histograms keep one bucket per power
of two of the daemon's own log-scale histograms (``engine/latency.py``: four per
octave), 1 µs to ~17 min.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from cachefilesd_py.config.parse import parse_listen
from cachefilesd_py.engine.latency import BOUNDS, LatencyHistogram

PREFIX = "cachefilesd_"
#: every 4th bound of engine/latency.py: one bucket per power of two
_EVERY = 4


@dataclass(frozen=True)
class CounterSpec:
    """A counter read from a stats dict: ``key`` there, ``name``/``help`` here."""

    key: str
    name: str
    help: str


#: counters the frontends and the engine keep (``DriverStats``, ``FillStats``)
COUNTERS = (
    CounterSpec("reads", "reads", "READ requests served (completed)"),
    CounterSpec("reads_failed", "reads_failed", "READ requests answered with an error"),
    CounterSpec("opens", "opens", "OPEN requests answered"),
    CounterSpec("opens_refused", "opens_refused", "OPEN requests refused"),
    CounterSpec("closes", "closes", "CLOSE requests"),
    CounterSpec("malformed", "malformed_messages", "malformed kernel messages dropped"),
    CounterSpec("bytes_fetched", "fetched_bytes", "bytes fetched from sources"),
    CounterSpec("chunks_fetched", "fetched_chunks", "chunks fetched from sources"),
    CounterSpec("runs", "fetch_runs", "source requests (runs of chunks)"),
    CounterSpec("failures", "fetch_failures", "fills that failed (source or write error)"),
    CounterSpec("waits", "fetch_waits", "fills that waited for another worker's chunk"),
    CounterSpec("culled", "culled_blobs", "blobs culled"),
    CounterSpec("trimmed", "trimmed_blobs", "blobs trimmed (tail chunks given back)"),
    CounterSpec("cull_freed", "cull_freed_bytes", "bytes freed by culls and trims"),
    CounterSpec(
        "checkpoints", "sidecar_checkpoints", "presence checkpoints that saved sidecars"
    ),
    CounterSpec("sidecars_saved", "sidecars_saved", "presence sidecars saved by checkpoints"),
    CounterSpec(
        "checkpoint_failures",
        "sidecar_checkpoint_failures",
        "presence checkpoints that failed (syncfs, or a bind's sidecar not saved)",
    ),
    CounterSpec(
        "sidecar_save_failures", "sidecar_save_failures", "sidecars that could not be saved"
    ),
    # fanotify mode (frontends/fanotify: the session's counts and DriverStats)
    CounterSpec("events", "fanotify_events", "fanotify pre-content events read"),
    CounterSpec(
        "allowed_present", "fanotify_allowed_present", "events allowed from the bitmap"
    ),
    CounterSpec("fills", "fanotify_fills", "events whose range had to be filled"),
    CounterSpec("filled", "fanotify_filled", "events allowed after their fill"),
    CounterSpec("fill_failed", "fanotify_fill_failed", "events denied: their fill failed"),
    CounterSpec(
        "denied_unknown", "fanotify_denied_unknown", "events on a file the daemon does not serve"
    ),
    CounterSpec(
        "responses_failed", "fanotify_responses_failed", "answers the kernel did not take"
    ),
    CounterSpec("silenced", "fanotify_silenced_blobs", "blobs given an ignore mark (all present)"),
    CounterSpec("overflows", "fanotify_queue_overflows", "fanotify queue overflow events"),
)

#: labelled counters the core keeps (``counters.py``): metric name, label, help
LABELLED = {
    "fetched_by_source": (
        "source_fetched_bytes",
        "source",
        "bytes fetched, by source rule (its URL template, or the origin)",
    ),
    "retries": ("source_retries", "source", "fetch attempts retried, by source rule"),
    "fetch_errors": ("fetch_errors", "kind", "fills that failed, by error kind"),
    "open_errors": ("open_errors", "kind", "OPENs whose source identity failed, by kind"),
}


@dataclass
class Figures:
    """Where the collector reads the daemon's figures; each callable is cheap."""

    counters: Callable[[], Mapping[str, Any]]
    histograms: Mapping[str, tuple[LatencyHistogram, str]] = field(default_factory=dict)
    gauges: Callable[[], Mapping[str, tuple[float, str]]] = dict
    labelled: Callable[[], Mapping[str, tuple[str, str, Mapping[str, float]]]] = dict
    #: the core's labelled counts by :data:`LABELLED` key (``LabelledCounts.snapshot``)
    counts: Callable[[], Mapping[str, Mapping[str, int]]] = dict


def _histogram(name: str, help_text: str, hist: LatencyHistogram) -> HistogramMetricFamily:
    counts, total, total_sum = hist.snapshot()
    buckets: list[tuple[str, float]] = []
    seen = 0
    for i, n in enumerate(counts[: len(BOUNDS)]):
        seen += n
        if (i + 1) % _EVERY == 0:
            buckets.append((repr(BOUNDS[i]), seen))
    buckets.append(("+Inf", total))
    return HistogramMetricFamily(
        PREFIX + name + "_seconds", help_text, buckets=buckets, sum_value=total_sum
    )


class DaemonCollector:
    """A ``prometheus_client`` collector over the daemon's own figures."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        stats = self.figures.counters()
        for spec in COUNTERS:
            value = stats.get(spec.key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield CounterMetricFamily(PREFIX + spec.name, spec.help, value=value)
        for name, (value, help_text) in self.figures.gauges().items():
            yield GaugeMetricFamily(PREFIX + name, help_text, value=value)
        counts = self.figures.counts()
        for key, (name, label, help_text) in LABELLED.items():
            if key in counts:
                counter = CounterMetricFamily(PREFIX + name, help_text, labels=[label])
                for value_label, value in sorted(counts[key].items()):
                    counter.add_metric([value_label], value)
                yield counter
        for name, (label, help_text, values) in self.figures.labelled().items():
            family = (
                CounterMetricFamily(PREFIX + name, help_text, labels=[label])
                if name.endswith("_total")
                else GaugeMetricFamily(PREFIX + name, help_text, labels=[label])
            )
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            yield family
        for name, (hist, help_text) in self.figures.histograms.items():
            yield _histogram(name, help_text, hist)


class Metrics:
    """The registry of one daemon, its text, and the optional loopback HTTP server."""

    def __init__(self, figures: Figures) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(figures))
        self._server: Any = None
        self._lock = threading.Lock()

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve_http(self, listen: str) -> None:
        """Serve ``/metrics`` on ``host:port`` (a loopback address only)."""
        from prometheus_client import start_http_server

        host, port = parse_listen(listen)
        started = start_http_server(port, addr=host, registry=self.registry)
        # prometheus_client >= 0.17 returns (server, thread)
        self._server = started[0] if isinstance(started, tuple) else started

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
