"""Debian's Prometheus, run with deploy/prometheus/ config and alert rules, scrapes the five services'
runtimes and sees them up and ready, sees the pipeline counters advance after traffic, evaluates
every alert rule without error and answers every dashboard query.

The services here are the shared Runtime of each (HTTP with /health, /ready and /metrics, database
pool, producer, outbox relay), opened on the real broker and PostgreSQL; one of them consumes a
test topic and re-publishes each record through its outbox, which moves the shared families.
Prometheus is installed with `apt-get install prometheus` when missing (tests/support/prometheus.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from shared.batch_consumer import Record
from shared.config import SERVICE_PORTS, load_settings
from shared.kafka import ensure_topics, make_producer
from shared.outbox import OutboxMessage, add_to_outbox
from shared.runtime import Runtime
from shared.stack import free_port
from shared.topics import Topic
from tests.conftest import ROOT
from tests.support.polling import eventually
from tests.support.prometheus import ensure_prometheus

pytestmark = pytest.mark.asyncio

PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "omnicrm.json"
SERVICES = tuple(SERVICE_PORTS)
LIVE = "loyalty"  # the runtime that also consumes and produces
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[a-z]{2,}", re.I)
PHONE = re.compile(r"\+?\d[\d\s().-]{7,}\d")


@dataclass
class Stack:
    """The running runtimes and Prometheus, and what the test named."""

    prometheus: str
    in_topic: str
    out_topic: str
    broker: str
    ports: dict[str, int]
    runtimes: dict[str, Runtime] = field(default_factory=dict)

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=5) as client:
            reply = await client.get(f"{self.prometheus}/api/v1/query", params={"query": expr})
        body = reply.json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    async def value(self, expr: str) -> float:
        result = await self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    async def api(self, path: str, **params: str) -> Any:
        async with httpx.AsyncClient(timeout=5) as client:
            reply = await client.get(f"{self.prometheus}{path}", params=params)
        reply.raise_for_status()
        return reply.json()["data"]


def prometheus_config(ports: dict[str, int], tmp: Path) -> Path:
    """deploy/prometheus/prometheus.yml with the test's ports, a 1 s interval and absolute rule paths."""
    config = yaml.safe_load((PROM / "prometheus.yml").read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM / name) for name in config["rule_files"]]
    assert {job["job_name"] for job in config["scrape_configs"]} == set(SERVICES)
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [f"{t.rsplit(':', 1)[0]}:{ports[job['job_name']]}"
                                 for t in static["targets"]]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def build_runtime(service: str, broker: str, database: str, port: int, unique: str) -> Runtime:
    settings = load_settings({
        "KAFKA_BOOTSTRAP_SERVERS": broker, "DATABASE_URL": database, "OMNICRM_EMBEDDED": "1",
        f"OMNICRM_{service.upper()}_PORT": str(port),
    })
    return Runtime(service, settings, schema=f"scrape_{service}_{unique}", pool_size=3)


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    return ensure_prometheus()[0]


@pytest.fixture(scope="module")
async def stack(prometheus_bin: str, broker: str, database: str,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    unique = uuid.uuid4().hex[:8]
    tmp = tmp_path_factory.mktemp("prometheus")
    in_topic, out_topic = f"scrape.in.{unique}", f"scrape.out.{unique}"
    await ensure_topics(broker, 2, [Topic(in_topic, None), Topic(out_topic, None)])
    ports = {service: free_port() for service in SERVICES}
    prom_port = free_port()
    s = Stack(f"http://127.0.0.1:{prom_port}", in_topic, out_topic, broker, ports)

    async def republish(conn, records: list[Record]) -> None:
        await add_to_outbox(conn, [OutboxMessage(out_topic, f"k{r.offset}", r.raw) for r in records])

    tasks: list[asyncio.Task] = []
    for service in SERVICES:
        runtime = build_runtime(service, broker, database, ports[service], unique)
        if service == LIVE:
            runtime.consume([Topic(in_topic, None)], republish, group=f"scrape-{unique}",
                            decoder=lambda _topic, value: value)
        s.runtimes[service] = runtime
        tasks.append(asyncio.create_task(runtime.run(runtime.http()), name=f"runtime-{service}"))

    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [prometheus_bin, f"--config.file={prometheus_config(ports, tmp)}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
         "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        async def answering() -> bool:
            for task in tasks:
                if task.done():
                    task.result()  # a runtime that failed to start: raise its error
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    if (await client.get(f"{s.prometheus}/-/ready")).status_code != 200:
                        return False
                    for port in ports.values():
                        if (await client.get(f"http://127.0.0.1:{port}/health")).status_code != 200:
                            return False
            except httpx.TransportError:
                assert proc.poll() is None, (tmp / "prometheus.log").read_text()
                return False
            return True

        await eventually(answering, timeout=30, message="runtimes and prometheus answering")
        yield s
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
        log.close()
        for runtime in s.runtimes.values():
            runtime.stopping.set()
        await asyncio.wait(tasks, timeout=30)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # Runtime.run installed them on this loop
            loop.remove_signal_handler(sig)


async def probe_ready(stack: Stack) -> None:
    """What a kubelet does: /ready sets each service's ready gauge and pool gauges."""
    async with httpx.AsyncClient(timeout=5) as client:
        for port in stack.ports.values():
            await client.get(f"http://127.0.0.1:{port}/ready")


async def produce(broker: str, topic: str, count: int, start: int) -> None:
    producer = make_producer(broker, "scrape-test")
    await producer.start()
    try:
        futures = [await producer.send(topic, f"record-{i}".encode(), key=f"k{i}".encode())
                   for i in range(start, start + count)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_prometheus_sees_every_service_up_and_ready(stack: Stack) -> None:
    async def all_up() -> bool:
        targets = (await stack.api("/api/v1/targets"))["activeTargets"]
        return (len(targets) == len(SERVICES)
                and {t["labels"]["job"] for t in targets} == set(SERVICES)
                and all(t["health"] == "up" for t in targets))

    await eventually(all_up, timeout=15, message="every target up")
    up = await stack.query("up")
    assert {r["metric"]["job"]: r["value"][1] for r in up} == dict.fromkeys(SERVICES, "1")

    async def all_ready() -> bool:
        await probe_ready(stack)
        rows = await stack.query('{__name__=~"omnicrm_[a-z]+_ready"} == 1')
        return {r["metric"]["job"] for r in rows} == set(SERVICES)

    await eventually(all_ready, timeout=15, message="every service ready in Prometheus")


async def test_pipeline_counters_advance_after_traffic(stack: Stack) -> None:
    consumed = f'sum(omnicrm_{LIVE}_events_consumed_total{{topic="{stack.in_topic}"}})'
    produced = f'sum(omnicrm_{LIVE}_events_produced_total{{topic="{stack.out_topic}"}})'
    before = await stack.value(consumed)

    await produce(stack.broker, stack.in_topic, 40, 0)

    async def seen(expr: str, at_least: float) -> bool:
        return await stack.value(expr) >= at_least

    await eventually(lambda: seen(consumed, before + 40), timeout=15, message="40 consumed in Prometheus")
    await eventually(lambda: seen(produced, 40), timeout=15, message="40 re-published in Prometheus")
    await produce(stack.broker, stack.in_topic, 60, 40)
    await eventually(lambda: seen(consumed, before + 100), timeout=15, message="100 consumed")
    await eventually(lambda: seen(produced, 100), timeout=15, message="100 re-published")

    assert await stack.value(f"sum(omnicrm_{LIVE}_batch_seconds_count)") >= 1
    assert await stack.value(f"sum(omnicrm_{LIVE}_batch_size_sum)") >= 100
    lag = await stack.query(f'omnicrm_{LIVE}_consumer_lag{{topic="{stack.in_topic}"}}')
    assert lag and all(float(r["value"][1]) >= 0 for r in lag)
    assert await stack.query(f"omnicrm_{LIVE}_outbox_backlog")


async def test_every_alert_rule_loads_and_evaluates_without_error(stack: Stack) -> None:
    defined = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
               for r in g["rules"]}

    async def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in (await stack.api("/api/v1/rules"))["groups"] for r in g["rules"]]
        done = all(r["health"] != "unknown" for r in rules) and len(rules) == len(defined)
        return rules if done else None

    rules = await eventually(evaluated, timeout=15, message="every rule evaluated once")
    assert {r["name"] for r in rules} == defined
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert broken == {}


async def test_every_dashboard_query_runs(stack: Stack) -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [p for p in board["panels"] if p["type"] != "row"]
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$job", ".*")
            await stack.query(expr)  # asserts status success: the query parses and evaluates
    variable = next(v for v in board["templating"]["list"] if v["name"] == "job")
    jobs = await stack.api("/api/v1/label/job/values")
    assert set(SERVICES) <= set(jobs), variable["definition"]


async def test_no_label_value_looks_like_contact_data(stack: Stack) -> None:
    series = await stack.api("/api/v1/series", **{"match[]": '{__name__=~"omnicrm_.+"}'})
    assert series, "no omnicrm series scraped"
    for labels in series:
        for name, value in labels.items():
            if name in {"__name__", "instance", "le", "quantile"}:
                continue
            assert not EMAIL.search(value), f"{labels['__name__']}{{{name}}} looks like an email"
            assert not PHONE.search(value), f"{labels['__name__']}{{{name}}} looks like a phone"
