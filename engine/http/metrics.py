"""Prometheus metrics for `GET /metrics`, in a registry of their own (one per app).

Request outcomes, latency, queue time, images and steps come from each finished request's
output (every front door's, through `AsyncEngine.request_observers`; the gateway observes its
own). Step batches come from the engine core's per-batch record (`EngineStats.batch_observers`).
Queue depths, worker idle time and "engine up" are read from the engine when scraped.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.contract.outputs import RequestOutput
from engine.request_outcome import OUTCOMES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """The metrics one HTTP front door exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stepweave_requests", "Finished requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every outcome is listed from the start, at 0
        self.http_responses = Counter(
            "stepweave_http_responses", "HTTP responses by route and status code", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "stepweave_request_latency_seconds",
            "Arrival to final output of successful requests",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "stepweave_request_queue_time_seconds",
            "Arrival to first scheduled step of successful requests",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("stepweave_images_generated", "Images generated", registry=r)
        self.steps = Counter("stepweave_steps_generated", "Denoising steps of generated images", registry=r)

    def observe_request(self, outcome: str, output: RequestOutput | None) -> None:
        self.requests.labels(outcome).inc()
        if outcome != "ok" or output is None:
            return
        count = len(output.images) if output.images is not None else 1
        self.images.inc(count)
        self.steps.inc(count * output.num_steps)
        if output.metrics is not None:
            if output.metrics.latency_s is not None:
                self.latency.observe(output.metrics.latency_s)
            if output.metrics.queue_time_s is not None:
                self.queue_time.observe(output.metrics.queue_time_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def attach_engine(metrics: ServiceMetrics, engine, serving: Callable[[], bool]) -> None:
    """Add an in-process AsyncEngine's metrics: every request it finishes, every step batch,
    and its queues, worker time and liveness at each scrape."""
    engine.request_observers.append(metrics.observe_request)
    batch_size = Histogram(
        "stepweave_step_batch_size", "Request rows per step batch", buckets=BATCH_BUCKETS, registry=metrics.registry
    )
    step_duration = Histogram(
        "stepweave_step_duration_seconds",
        "Worker time per step batch",
        buckets=STEP_BUCKETS,
        registry=metrics.registry,
    )

    def observe_batch(rows: int, seconds: float) -> None:
        batch_size.observe(rows)
        step_duration.observe(seconds)

    engine.core.stats.batch_observers.append(observe_batch)
    metrics.registry.register(_EngineCollector(engine, serving))


class _EngineCollector:
    """Gauges read from the engine when scraped (counts the core thread keeps)."""

    def __init__(self, engine, serving: Callable[[], bool]):
        self.engine, self.serving = engine, serving

    def collect(self):
        scheduler, stats = self.engine.core.scheduler, self.engine.core.stats
        yield _gauge("stepweave_requests_waiting", "Requests queued for a batch slot", len(scheduler.waiting))
        yield _gauge("stepweave_requests_running", "Requests holding a batch slot", len(scheduler.running))
        yield _gauge("stepweave_engine_up", "1 while the engine takes requests", 1 if self.serving() else 0)
        busy, idle = stats.execute_s, stats.worker_idle_s
        fraction = idle / (busy + idle) if busy + idle > 0 else 0.0
        yield _gauge(
            "stepweave_worker_idle_fraction",
            "Share of the reporting worker's time between consecutive batches while requests ran",
            fraction,
        )
        yield _counter("stepweave_worker_busy_seconds", "Worker time spent running step batches", busy)
        yield _counter("stepweave_worker_idle_seconds", "Worker time waiting between batches while busy", idle)
        yield _counter("stepweave_worker_restarts", "Worker grids restarted after a crash", stats.restarts)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
