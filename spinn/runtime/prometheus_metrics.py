"""Prometheus metrics of the SPINN server (deploy/README.md).

Operators watch and autoscale a server fleet from these: requests, cancels, errors by
code, queue depth, batch sizes, compute time histograms and connections.  The counters
the server already keeps for its stats line (``ServerStats``) are read at scrape time
by a collector, so there is one count of each thing; what has no counterpart there
(per-request compute and queue-wait histograms, batch sizes, errors by code) is
observed here directly.  The HTTP endpoint (``prometheus_client``'s own server) is off
unless ``OperationsConfig.metrics_port`` is set, and binds loopback by default: the metrics
reveal load, so exposing them is the operator's choice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from spinn.runtime.run_summary import ServerStats

__all__ = ["BATCH_BUCKETS", "COMPUTE_BUCKETS_S", "ServerMetrics"]

COMPUTE_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
"""Histogram buckets of compute and queue-wait times, in seconds (0.5 ms to 5 s)."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Histogram buckets of batch sizes (requests per forward pass)."""


def _by_reason(name: str, documentation: str, **counts: int) -> CounterMetricFamily:
    """One counter family with a ``reason`` label per keyword."""
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, count in counts.items():
        family.add_metric([reason], count)
    return family


class _StatsCollector(Collector):
    """Counters and gauges read from ``ServerStats`` at scrape time."""

    def __init__(self, stats: ServerStats, queue_depth: Callable[[], int]) -> None:
        self._stats = stats
        self._queue_depth = queue_depth

    def collect(self) -> Iterator[Any]:
        s = self._stats
        yield GaugeMetricFamily(
            "spinn_server_connections", "Devices connected now.", value=s.connections
        )
        yield CounterMetricFamily(
            "spinn_server_connections", "Device connections accepted.", s.connections_total
        )
        yield CounterMetricFamily(
            "spinn_server_connections_refused",
            "Connections closed by a limit (too many, unauthenticated, timeouts).",
            s.connections_refused,
        )
        yield GaugeMetricFamily(
            "spinn_server_handshakes",
            "Connections in the handshake now (a pool of their own, --max-handshakes).",
            value=s.handshakes,
        )
        yield _by_reason(
            "spinn_server_handshakes_closed",
            "Connections closed before their handshake completed: shed (pool full), timed "
            "out, or evicted to make room in a full pool.",
            shed=s.handshakes_shed,
            timed_out=s.handshakes_timed_out,
            evicted=s.handshakes_evicted,
        )
        yield CounterMetricFamily(
            "spinn_server_rate_limited",
            "Connections closed for PINGs or unknown-id CANCELs above their rate.",
            s.rate_limited,
        )
        yield CounterMetricFamily(
            "spinn_server_cancels_unknown",
            "CANCELs of request ids the server did not hold (answered already, or never sent).",
            s.cancels_unknown,
        )
        yield CounterMetricFamily("spinn_server_requests", "INFER requests accepted.", s.requests)
        yield CounterMetricFamily(
            "spinn_server_results", "Requests computed to a RESULT.", s.computed
        )
        yield CounterMetricFamily(
            "spinn_server_stages", "Network stages run over all requests.", s.stages_run
        )
        yield CounterMetricFamily(
            "spinn_server_cancels_received",
            "CANCELs of a request the server held (queued or running).",
            s.cancels_received,
        )
        yield _by_reason(
            "spinn_server_requests_dropped",
            "Requests not answered with a RESULT: cancelled before or while running "
            "(DESIGN.md part 7), or past their deadline_ms unrun.",
            cancelled_queued=s.cancelled_queued,
            cancelled_running=s.cancelled_running,
            expired=s.expired_unrun,
        )
        yield GaugeMetricFamily(
            "spinn_server_queue_depth",
            "Requests accepted and not yet started (queued for compute or a batch).",
            value=self._queue_depth(),
        )


class ServerMetrics:
    """The server's metrics in their own registry (several servers may share a process)."""

    def __init__(self, stats: ServerStats, queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(stats, queue_depth))
        self.errors = Counter(
            "spinn_server_errors",
            "ERROR messages sent, by code (PROTOCOL.md §8).",
            ["code"],
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "spinn_server_compute_seconds",
            "Compute time of a request answered with a RESULT (its batch's forward passes).",
            buckets=COMPUTE_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "spinn_server_queue_wait_seconds",
            "Time from accepting a request to its compute starting.",
            buckets=COMPUTE_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "spinn_server_batch_size",
            "Requests run together in one forward pass (1 without batching).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    def observe(self, metric: str, value: float, label: str = "") -> None:
        """One observation the server core recorded (``server_core.Record``): ``errors``
        counts by ``label`` (the code); the histograms take ``value``."""
        if metric == "errors":
            self.errors.labels(label).inc(value)
        else:
            histogram: Histogram = getattr(self, metric)
            histogram.observe(value)

    def serve(self, host: str, port: int) -> int:
        """Expose ``/metrics`` over HTTP on ``host:port`` (0: a free port); returns the port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http, self._http_thread = server, thread
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP endpoint, if started."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(5)
            self._http_thread = None
