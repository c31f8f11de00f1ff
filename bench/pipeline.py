"""End to end: all five services as processes on one broker and PostgreSQL on this machine.

1. sustained: N sales of new customers published over HTTP as fast as ingestion takes them; the rate
   is N over the time until the last service (notifications) has decided on every welcome trigger;
2. latency: a steady 1,000 events/s for a while; occurred_at -> notification decision, p50/p95/p99,
   read from the `notifications.outcomes.v1` records themselves;
3. peak RSS of every service process during the run.
Ceilings (plain aiokafka, COPY) are in bench.ceilings of the same `make bench` run.
Run: python -m bench.pipeline [N] [seconds_at_1000_per_s].
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import sys
import time
import uuid

import httpx
import psutil
from aiokafka import AIOKafkaConsumer

from bench.environment import ROOT, bench_environment, save
from shared.avro import AvroCodec, SchemaRegistry
from shared.kafka import ensure_topics
from shared.topics import NOTIFICATION_OUTCOMES, OUTCOME
from tests.support.pipeline import INGEST_KEY, Pipeline, auth

UTC = dt.UTC


def sale(tag: str, i: int, at: dt.datetime) -> dict:
    return {"event_id": f"b-{tag}-{i}", "type": "sale", "occurred_at": at.isoformat(timespec="milliseconds"),
            "source": "pos", "customer": {"loyalty_id": f"L-{tag}-{i}"},
            "properties": {"order_id": f"o-{tag}-{i}", "currency": "USD", "total": f"{20 + i % 400}.50",
                           "lines": [{"sku": f"sku-{i % 50}", "category": "coffee", "quantity": 1,
                                      "unit_price": f"{20 + i % 400}.50"}]}}


class Outcomes:
    """Reads notifications.outcomes.v1 from the start and keeps decision latencies per customer."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.codec = AvroCodec(SchemaRegistry.load())
        self.decided: dict[str, float] = {}  # trigger_id -> latency seconds
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(NOTIFICATION_OUTCOMES.name, bootstrap_servers=self.bootstrap,
                                    group_id=f"bench-{uuid.uuid4().hex[:6]}", auto_offset_reset="earliest",
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for msgs in batch.values():
                    for m in msgs:
                        o = self.codec.decode(m.value, OUTCOME)
                        if o["trigger_id"] in self.decided or o.get("trigger_occurred_at") is None:
                            continue
                        # wall time of reading minus occurred_at: what a customer would wait
                        self.decided[o["trigger_id"]] = (o["occurred_at"] - o["trigger_occurred_at"]).total_seconds()
        finally:
            await consumer.stop()


async def publish(http: httpx.AsyncClient, url: str, events: list[dict]) -> None:
    r = await http.post(f"{url}/v1/events", json={"events": events}, headers=auth(INGEST_KEY))
    r.raise_for_status()
    body = r.json()
    if body["accepted"] + body["duplicates"] != len(events):
        raise RuntimeError(f"rejected: {body['results'][:2]}")


async def wait_for(outcomes: Outcomes, count: int, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while len(outcomes.decided) < count:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{len(outcomes.decided)} of {count} decisions within {timeout:.0f}s")
        await asyncio.sleep(0.05)
    return time.perf_counter()


def sample_rss(p: Pipeline, peaks: dict[str, int]) -> None:
    for name, proc in p.procs.items():
        try:
            peaks[name] = max(peaks.get(name, 0), psutil.Process(proc.pid).memory_info().rss)
        except psutil.Error:
            pass


async def measure(p: Pipeline, n: int, steady_seconds: int) -> dict:
    outcomes = Outcomes(p.bootstrap)
    outcomes.task = asyncio.create_task(outcomes.run())
    peaks: dict[str, int] = {}
    url = p.url("ingestion")
    async with httpx.AsyncClient(timeout=60) as http:
        # warm up: one batch through everything (group joins, caches)
        tag = uuid.uuid4().hex[:6]
        await publish(http, url, [sale(tag, i, dt.datetime.now(UTC)) for i in range(100)])
        await wait_for(outcomes, 100, 180)
        base = len(outcomes.decided)

        tag = uuid.uuid4().hex[:6]
        started = time.perf_counter()
        for lo in range(0, n, 1000):
            now = dt.datetime.now(UTC)
            await publish(http, url, [sale(tag, i, now) for i in range(lo, min(lo + 1000, n))])
            sample_rss(p, peaks)
        accepted_s = time.perf_counter() - started
        while len(outcomes.decided) < base + n:
            sample_rss(p, peaks)
            await asyncio.sleep(0.2)
            if time.perf_counter() - started > 900:
                raise TimeoutError(f"{len(outcomes.decided) - base} of {n} decided in 900 s")
        drained_s = time.perf_counter() - started

        # steady 1,000 events/s: 100 every 0.1 s
        base = len(outcomes.decided)
        tag = uuid.uuid4().hex[:6]
        steady_ids = []
        tick_start = time.perf_counter()
        i = 0
        while time.perf_counter() - tick_start < steady_seconds:
            now = dt.datetime.now(UTC)
            batch = [sale(tag, i + k, now) for k in range(100)]
            i += 100
            await publish(http, url, batch)
            steady_ids += [e["event_id"] for e in batch]
            sample_rss(p, peaks)
            next_tick = tick_start + (i / 1000)
            await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
        achieved = i / (time.perf_counter() - tick_start)
        await wait_for(outcomes, base + i, 300)
    outcomes.task.cancel()
    latencies = sorted(list(outcomes.decided.values())[base:base + i])
    q = statistics.quantiles(latencies, n=100)
    return {
        "sustained": {"events": n, "http_accept_per_s": round(n / accepted_s),
                      "end_to_end_per_s": round(n / drained_s), "seconds_to_drain": round(drained_s, 1)},
        "steady_1000_per_s": {"seconds": steady_seconds, "achieved_per_s": round(achieved),
                              "latency_p50_s": round(q[49], 3), "latency_p95_s": round(q[94], 3),
                              "latency_p99_s": round(q[98], 3), "decisions": len(latencies)},
        "peak_rss_mb": {k: round(v / 2**20) for k, v in peaks.items()},
    }


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    steady = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    with bench_environment() as env:
        asyncio.run(ensure_topics(env.bootstrap, 4))
        p = Pipeline(env.bootstrap, env.dsn, ROOT / ".omnicrm" / "bench-logs",
                     env={"OMNICRM_RATE_LIMIT_PER_SECOND": "1000000", "OMNICRM_LOG_LEVEL": "warning"})
        try:
            p.start()
            p.wait_ready(timeout=120)
            result = asyncio.run(measure(p, n, steady))
        finally:
            p.stop()
    print(json.dumps(result, indent=2))
    save("pipeline", result)


if __name__ == "__main__":
    main()
