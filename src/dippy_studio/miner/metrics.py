"""Prometheus metrics for /metrics: read from the job store and caches at scrape time, so
they cannot drift from reality; latencies are observed as jobs finish."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dippy_studio.miner.store import JobRecord, JobStore
from dippy_studio.protocol.schemas import JobKind, JobStatus

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)


class MinerMetrics:
    def __init__(self, store: JobStore, cache_stats: Callable[[], dict[str, int]], workers_alive) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "dippy_miner_job_duration_seconds",
            "Run time of finished jobs, from start to result",
            ["kind", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "dippy_miner_job_queue_seconds",
            "Time jobs waited in the queue before starting",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(store, cache_stats, workers_alive))

    def observe(self, record: JobRecord) -> None:
        if record.started_at is not None:
            self.queue_wait.labels(record.kind.value).observe(max(0.0, record.started_at - record.created_at))
            if record.finished_at is not None:
                duration = max(0.0, record.finished_at - record.started_at)
                self.latency.labels(record.kind.value, record.status.value).observe(duration)


class _StoreCollector(Collector):
    def __init__(self, store: JobStore, cache_stats, workers_alive) -> None:
        self.store = store
        self.cache_stats = cache_stats
        self.workers_alive = workers_alive

    def collect(self) -> Iterator:
        jobs = GaugeMetricFamily("dippy_miner_jobs", "Job records by type and status", labels=["kind", "status"])
        counts = self.store.counts()
        for kind in JobKind:
            for status in JobStatus:
                jobs.add_metric([kind.value, status.value], counts.get((kind.value, status.value), 0))
        yield jobs
        depth = GaugeMetricFamily("dippy_miner_queue_depth", "Queued jobs per lane", labels=["kind"])
        alive = GaugeMetricFamily("dippy_miner_workers_alive", "Live worker threads per lane", labels=["kind"])
        for kind in JobKind:
            depth.add_metric([kind.value], counts.get((kind.value, JobStatus.queued.value), 0))
            alive.add_metric([kind.value], self.workers_alive(kind))
        yield depth
        yield alive
        for name, value in self.cache_stats().items():
            yield CounterMetricFamily(f"dippy_miner_{name}", f"Cache statistic {name}", value=value)
