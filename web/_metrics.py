"""Operability: ``/metrics`` (Prometheus, with prometheus-client), ``/readyz`` and a minimal
``/healthz``.

Counters that live in the store and the pool (commits, rows, finished generations, upstream
errors) are read at scrape time by a collector, so those layers know nothing of Prometheus;
what only the web layer sees (SSE events, open readers, refusals) is counted here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ._json import JSONResponse
from ._schemas import Health, Readiness
from ._timeouts import timeout_counts

if TYPE_CHECKING:
    from ._generations import AppState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
READY_WRITE_TIMEOUT = 2.0
PROTOCOLS = ("native", "session", "durable_sse", "durable_long_poll", "responses", "ai-sdk")
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_ROWS_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class Metrics:
    """One app's metrics, in a registry of its own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._engine: _EngineCollector | None = None
        self.commit_seconds = Histogram(
            "keepstream_commit_seconds",
            "Time from BEGIN to COMMIT of each writer transaction",
            buckets=COMMIT_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.commit_rows = Histogram(
            "keepstream_commit_batch_rows",
            "Message rows written by each writer transaction",
            buckets=BATCH_ROWS_BUCKETS,
            registry=self.registry,
        )
        self.sse_events = Counter(
            "keepstream_sse_events",
            "SSE events sent to clients, by protocol",
            ["protocol"],
            registry=self.registry,
        )
        self.open_readers = Gauge(
            "keepstream_open_readers",
            "Readers following a stream now, by protocol",
            ["protocol"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "keepstream_limit_refusals",
            "Requests refused by a limit, by the limit's setting",
            ["limit"],
            registry=self.registry,
        )
        self.errors = Counter(
            "keepstream_error_responses",
            "Error responses, by status and error type",
            ["status", "type"],
            registry=self.registry,
        )
        for protocol in PROTOCOLS:  # present from the first scrape
            self.sse_events.labels(protocol)
            self.open_readers.labels(protocol)

    def observe_commit(self, seconds: float, rows: int) -> None:
        """The writer committed a transaction (called on the writer thread)."""
        self.commit_seconds.observe(seconds)
        self.commit_rows.observe(rows)

    def watch(self, state: AppState) -> None:
        """Expose the store's and the pool's own counters from now on (in place of those
        of an earlier run of the same app)."""
        if self._engine is not None:
            self.registry.unregister(self._engine)
        self._engine = _EngineCollector(state)
        self.registry.register(self._engine)

    async def count_events(
        self, chunks: AsyncIterator[bytes], protocol: str
    ) -> AsyncIterator[bytes]:
        """``chunks`` of SSE, counted: the reader is open while it runs, and each event
        (each ``event:`` line, which only starts a line at a real event) is counted."""
        events = self.sse_events.labels(protocol)
        readers = self.open_readers.labels(protocol)
        readers.inc()
        try:
            async for chunk in chunks:
                events.inc(chunk.count(b"\nevent:") + chunk.startswith(b"event:"))
                yield chunk
        finally:
            readers.dec()


class _EngineCollector(Collector):
    """Reads the pool's, the store's and the slow-client counters at scrape time."""

    def __init__(self, state: AppState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        pool, store = self._state.pool, self._state.store
        stats = store.stats
        generations = GaugeMetricFamily(
            "keepstream_generations", "Generations this process holds, by state", labels=["state"]
        )
        generations.add_metric(["running"], pool.running)
        generations.add_metric(["queued"], pool.queued)
        yield generations
        yield GaugeMetricFamily(
            "keepstream_queue_depth", "Generations waiting for a slot", value=pool.queued
        )
        yield GaugeMetricFamily(
            "keepstream_pool_saturation",
            "Running generations as a fraction of --max-running",
            value=pool.running / pool.max_running,
        )
        finished = CounterMetricFamily(
            "keepstream_generations_finished",
            "Generations this process ended, by final status",
            labels=["status"],
        )
        for status in ("completed", "failed", "cancelled", "interrupted"):
            finished.add_metric([status], pool.stats.finished[status])
        yield finished
        yield CounterMetricFamily(
            "keepstream_provider_chunks",
            "Text chunks (deltas) received from model providers",
            value=pool.stats.chunks,
        )
        upstream = CounterMetricFamily(
            "keepstream_upstream_errors", "Upstream failures, by kind", labels=["kind"]
        )
        for kind, count in sorted(pool.stats.upstream_errors.items()):
            upstream.add_metric([kind], count)
        yield upstream
        yield CounterMetricFamily(
            "keepstream_commits", "Writer transactions committed", value=stats["commits"]
        )
        yield CounterMetricFamily(
            "keepstream_messages_written", "Stream messages committed", value=stats["rows_written"]
        )
        yield CounterMetricFamily(
            "keepstream_messages_compacted",
            "Messages of closed streams packed into compressed blocks",
            value=stats["messages_compacted"],
        )
        retries = CounterMetricFamily(
            "keepstream_retries",
            "Operations retried after a transient fault, by kind",
            labels=["kind"],
        )
        retries.add_metric(["store_write"], stats["write_retries"])
        yield retries
        yield GaugeMetricFamily(
            "keepstream_pending_writes",
            "Writes waiting for the writer",
            value=stats["pending_writes"],
        )
        yield GaugeMetricFamily(
            "keepstream_wal_bytes", "Size of the SQLite write-ahead log", value=stats["wal_bytes"]
        )
        yield GaugeMetricFamily(
            "keepstream_live_streams",
            "Streams this process holds state for (written recently, or followed)",
            value=stats["live_streams"],
        )
        yield GaugeMetricFamily(
            "keepstream_tail_bytes",
            "Bytes held in in-memory stream tails",
            value=stats["tail_bytes"],
        )
        slow = CounterMetricFamily(
            "keepstream_slow_client_closes",
            "Connections closed because a request head or body came too slowly",
            labels=["phase"],
        )
        slow.add_metric(["head"], timeout_counts.head_timeouts)
        slow.add_metric(["body"], timeout_counts.body_timeouts)
        yield slow


def metrics_of(request: Request) -> Metrics:
    """The running app's metrics."""
    metrics: Metrics = request.app.state.metrics
    return metrics


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format."""
    return Response(generate_latest(metrics_of(request).registry), media_type=CONTENT_TYPE)


async def healthz(request: Request) -> Response:
    """``GET /healthz``: liveness only; the process answers. Details are in ``/metrics``."""
    return JSONResponse(Health(status="ok"))


async def readyz(request: Request) -> Response:
    """``GET /readyz``: 200 when the store is writable, its schema current and the pool
    accepting work; 503 (while starting, draining or when the disk fails) otherwise."""
    runtime = request.app.state.runtime
    if not runtime.started:
        return JSONResponse(Readiness(status="starting"), 503)
    state: AppState = runtime.state
    checks = await state.store.readiness(write_within=READY_WRITE_TIMEOUT)
    checks["pool_accepting"] = state.pool.accepting
    ready = all(checks.values())
    return JSONResponse(
        Readiness(status="ready" if ready else "not_ready", checks=checks), 200 if ready else 503
    )


routes = [
    Route("/metrics", metrics_endpoint, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
