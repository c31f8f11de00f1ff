"""Prometheus metrics with one naming scheme, `omnicrm_<service>_<what>`, built on a registry passed in.

No label ever carries a customer id, email or phone: labels are topics, partitions, reasons,
kinds, channels and statuses only.
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# `*_created` series double the exposition and no dashboard or alert here reads them.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 5, 10, 50, 100, 250, 500, 1000, 2500, 5000)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class ServiceMetrics:
    """The metric families every service exposes, plus `extra` ones a service registers."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        if registry is None:
            registry = CollectorRegistry()
            # The process's memory, CPU and file descriptors (process_*) and the cyclic collector's
            # passes (python_gc_*), as the default registry has them: memory under load is what an
            # SRE watches first, and garbage left for the collector showed there (tests/support/cycles.py).
            registry.register(PROCESS_COLLECTOR)
            registry.register(GC_COLLECTOR)
        self.registry = registry
        p = f"omnicrm_{service}"
        r = self.registry
        self.events_consumed = Counter(f"{p}_events_consumed", "Records consumed, per topic.", ["topic"], registry=r)
        self.events_produced = Counter(f"{p}_events_produced", "Records published, per topic.", ["topic"], registry=r)
        self.batch_size = Histogram(f"{p}_batch_size", "Records per consumed batch.", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram(f"{p}_batch_seconds", "Time to apply one batch (database transaction included).", buckets=LATENCY_BUCKETS, registry=r)
        self.consumer_lag = Gauge(f"{p}_consumer_lag", "Records behind the end of the partition.", ["topic", "partition"], registry=r)
        self.dlq = Counter(f"{p}_dlq", "Records dead-lettered, per reason.", ["reason"], registry=r)
        self.retries = Counter(f"{p}_transient_retries", "Batches retried after a transient failure.", ["kind"], registry=r)
        self.outbox_backlog = Gauge(f"{p}_outbox_backlog", "Outbox records not yet published.", registry=r)
        self.outbox_oldest_age = Gauge(f"{p}_outbox_oldest_age_seconds", "Age of the oldest unpublished outbox record.", registry=r)
        self.db_pool_in_use = Gauge(f"{p}_db_pool_in_use", "Database connections in use.", registry=r)
        self.db_pool_size = Gauge(f"{p}_db_pool_size", "Database connections open.", registry=r)
        self.ready = Gauge(f"{p}_ready", "1 when connected to broker and database.", registry=r)
        self.http_requests = Counter(f"{p}_http_requests", "HTTP requests by route and status.", ["route", "status"], registry=r)

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(f"omnicrm_{self.service}_{name}", doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(f"omnicrm_{self.service}_{name}", doc, list(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
        return Histogram(f"omnicrm_{self.service}_{name}", doc, list(labels), buckets=buckets,
                         registry=self.registry)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
