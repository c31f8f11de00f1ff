"""What an SRE relies on from the running processes: every documented metric family on every
service's /metrics, no customer data in any label, /ready honest, OpenAPI published."""

from __future__ import annotations

import re

import httpx

from shared.pii import contains_pii
from tests.support.pipeline import SERVICES

# The families the README's Metrics table promises for every service (Prometheus names).
FAMILIES = ("events_consumed_total", "events_produced_total", "batch_size", "batch_seconds", "consumer_lag",
            "dlq_total", "transient_retries_total", "outbox_backlog", "outbox_oldest_age_seconds",
            "db_pool_in_use", "db_pool_size", "ready", "http_requests_total")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def test_every_service_exports_the_documented_families_without_customer_data(pipeline):
    for name in SERVICES:
        text = httpx.get(f"{pipeline.url(name)}/metrics", timeout=5).text
        declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
        for family in FAMILIES:
            assert f"omnicrm_{name}_{family}" in declared, f"{name} lacks omnicrm_{name}_{family}"
        # The process's own families, as the README lists them: its memory is read, not guessed.
        assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_gc_collections_total"} <= declared
        rss = next(float(line.split()[1]) for line in text.splitlines()
                   if line.startswith("process_resident_memory_bytes "))
        assert 20 * 2**20 < rss < 2**32, f"{name} reports {rss} bytes resident"
        labels = " ".join(line.split("{", 1)[1].rsplit("}", 1)[0] for line in text.splitlines()
                          if "{" in line and not line.startswith("#"))
        assert not contains_pii(labels), f"{name} has contact data in metric labels"
        assert not UUID.search(labels), f"{name} has an id (customer?) in metric labels"


def test_ready_health_and_openapi(pipeline):
    for name in SERVICES:
        base = pipeline.url(name)
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        ready = httpx.get(f"{base}/ready", timeout=5)
        assert ready.status_code == 200, ready.text
        doc = httpx.get(f"{base}/openapi.json", timeout=5).json()
        assert any(path.startswith("/v1/") for path in doc["paths"]), f"{name} publishes no /v1 API"
