"""End to end: all five services as processes on one broker and PostgreSQL on this machine.

1. sustained: N sales of new customers published over HTTP as fast as ingestion takes them; the rate
   is N over the time until the last service (notifications) has decided on every welcome trigger;
2. latency: once the burst is fully done (no lag, no unsent outbox row, no due notification left),
   a steady 1,000 events/s for a while; occurred_at -> notification decision, p50/p95/p99, read
   from the `notifications.outcomes.v1` records themselves;
3. peak RSS of every service process during the run.
Ceilings (plain aiokafka, COPY) are in bench.ceilings of the same `make bench` run.
Run: python -m bench.pipeline [N] [seconds_at_1000_per_s].
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import statistics
import sys
import time
import uuid

import asyncpg
import httpx
import psutil
from aiokafka import AIOKafkaConsumer

from bench.environment import ROOT, bench_environment, save
from shared.avro import AvroCodec, SchemaRegistry
from shared.kafka import ensure_topics
from shared.topics import NOTIFICATION_OUTCOMES, OUTCOME
from tests.support.pipeline import INGEST_KEY, SERVICES, Pipeline, auth
from tests.support.polling import eventually

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
    try:
        r = await http.post(f"{url}/v1/events", json={"events": events}, headers=auth(INGEST_KEY))
    except (httpx.ReadError, httpx.RemoteProtocolError):
        # a kept-alive connection the server closed as it was reused: send again (event ids
        # make the retry a duplicate, never a second event)
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


async def quiet(p: Pipeline) -> bool:
    """No consumer lag, no unsent outbox row and no notification due but unsent: nothing left over."""
    async with httpx.AsyncClient(timeout=5) as http:
        for name in SERVICES:
            for line in (await http.get(f"{p.url(name)}/metrics")).text.splitlines():
                if line.startswith(f"omnicrm_{name}_consumer_lag{{") and float(line.rsplit(" ", 1)[1]) > 0:
                    return False
    conn = await asyncpg.connect(p.dsn)
    try:
        for schema in SERVICES:
            if await conn.fetchval(f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL"):
                return False
        return not await conn.fetchval("SELECT count(*) FROM notifications.notifications "
                                       "WHERE status IN ('pending', 'deferred') AND due_at <= now()")
    finally:
        await conn.close()


async def postmaster_of(dsn: str) -> int:
    """The pid of the PostgreSQL server the pipeline uses (the parent of any of its backends)."""
    conn = await asyncpg.connect(dsn)
    try:
        return psutil.Process(await conn.fetchval("SELECT pg_backend_pid()")).ppid()
    finally:
        await conn.close()


def listener_of(bootstrap: str) -> int:
    """The pid of the process listening on the broker's port (this pipeline's broker, not another)."""
    port = int(bootstrap.rsplit(":", 1)[1])
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return c.pid
    raise RuntimeError(f"nothing listens on {bootstrap}")


async def cpu_seconds(p: Pipeline, postmaster: int, broker: int) -> dict[str, float]:
    """CPU time so far of each service process, the broker and the pipeline's PostgreSQL server.

    PostgreSQL: only the server the pipeline uses (not another one on this machine): the postmaster
    and its live processes. A backend whose application_name is a service's pool
    (`omnicrm-<service>`) is that service's; the rest (other clients of the pipeline's database,
    WAL writer, checkpointer, autovacuum) is `postgres.other`; clients of other databases are left
    out, and so is a backend that exited between the two looks (the services' pooled connections
    live throughout).
    """
    out: dict[str, float] = {}
    for name, proc in p.procs.items():
        try:
            t = psutil.Process(proc.pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            pass
    conn = await asyncpg.connect(p.dsn)
    try:
        clients = {r["pid"]: (r["datname"], r["application_name"]) for r in await conn.fetch(
            "SELECT pid, datname, application_name FROM pg_stat_activity WHERE backend_type = 'client backend'")}
        database = await conn.fetchval("SELECT current_database()")
    finally:
        await conn.close()
    services = {f"omnicrm-{name}": name for name in SERVICES}
    server = psutil.Process(postmaster)
    t = server.cpu_times()
    total = t.user + t.system
    attributed = 0.0
    for proc in server.children():
        with contextlib.suppress(psutil.Error):
            ct = proc.cpu_times()
            used = ct.user + ct.system
            datname, app = clients.get(proc.pid, (None, None))
            who = services.get(app or "")
            if datname is not None and datname != database:
                continue  # another database's client (a test run beside the bench)
            total += used
            if who:
                out[f"postgres.{who}"] = out.get(f"postgres.{who}", 0.0) + used
                attributed += used
    out["postgres"] = total
    out["postgres.other"] = total - attributed
    with contextlib.suppress(psutil.Error):
        bt = psutil.Process(broker).cpu_times()
        out["broker"] = bt.user + bt.system
    busy = psutil.cpu_times()
    out["machine_busy"] = busy.user + busy.system + busy.nice + getattr(busy, "irq", 0) + getattr(busy, "softirq", 0)
    return out


async def batch_totals(p: Pipeline) -> dict[str, tuple[float, float]]:
    """Each service's consumed records and batches so far (its batch-size histogram's sum, count)."""
    out: dict[str, tuple[float, float]] = {}
    async with httpx.AsyncClient(timeout=5) as http:
        for name in SERVICES:
            total = count = 0.0
            for line in (await http.get(f"{p.url(name)}/metrics")).text.splitlines():
                if line.startswith(f"omnicrm_{name}_batch_size_sum"):
                    total += float(line.rsplit(" ", 1)[1])
                elif line.startswith(f"omnicrm_{name}_batch_size_count"):
                    count += float(line.rsplit(" ", 1)[1])
            out[name] = (total, count)
    return out


def per_batch(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict:
    """Mean records per consumed batch of each service over a phase (small batches cost more each)."""
    return {"records_per_batch": {k: round((after[k][0] - before[k][0]) / max(1.0, after[k][1] - before[k][1]), 1)
                                  for k in after}}


def cpu_per_event(before: dict[str, float], after: dict[str, float], events: int, seconds: float) -> dict:
    """µs of CPU per event per process over a phase, and how busy the machine's cores were."""
    us = {k: round((after[k] - before.get(k, 0.0)) * 1e6 / events) for k in after if k != "machine_busy"}
    cores = psutil.cpu_count() or 1
    return {"cpu_us_per_event": us,
            "machine_cpu_busy": round((after["machine_busy"] - before["machine_busy"]) / (seconds * cores), 2)}


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
    postmaster, broker = await postmaster_of(p.dsn), listener_of(p.bootstrap)
    async with httpx.AsyncClient(timeout=60) as http:
        # warm up: one batch through everything (group joins, caches)
        tag = uuid.uuid4().hex[:6]
        await publish(http, url, [sale(tag, i, dt.datetime.now(UTC)) for i in range(100)])
        await wait_for(outcomes, 100, 180)
        base = len(outcomes.decided)

        tag = uuid.uuid4().hex[:6]
        cpu_before, batches_before = await cpu_seconds(p, postmaster, broker), await batch_totals(p)
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
        sustained_cpu = cpu_per_event(cpu_before, await cpu_seconds(p, postmaster, broker), n, drained_s)
        sustained_cpu.update(per_batch(batches_before, await batch_totals(p)))
        # the steady phase starts from a quiet pipeline: the burst's sends and relays are done
        await eventually(lambda: quiet(p), timeout=600, interval=0.5, message="pipeline quiet after the burst")

        # steady 1,000 events/s: 100 every 0.1 s
        base = len(outcomes.decided)
        tag = uuid.uuid4().hex[:6]
        steady_ids = []
        cpu_before, batches_before = await cpu_seconds(p, postmaster, broker), await batch_totals(p)
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
        steady_cpu = cpu_per_event(cpu_before, await cpu_seconds(p, postmaster, broker), i, time.perf_counter() - tick_start)
        steady_cpu.update(per_batch(batches_before, await batch_totals(p)))
    outcomes.task.cancel()
    latencies = sorted(list(outcomes.decided.values())[base:base + i])
    q = statistics.quantiles(latencies, n=100)
    return {
        "sustained": {"events": n, "http_accept_per_s": round(n / accepted_s),
                      "end_to_end_per_s": round(n / drained_s), "seconds_to_drain": round(drained_s, 1),
                      **sustained_cpu},
        "steady_1000_per_s": {"seconds": steady_seconds, "achieved_per_s": round(achieved),
                              "latency_p50_s": round(q[49], 3), "latency_p95_s": round(q[94], 3),
                              "latency_p99_s": round(q[98], 3), "decisions": len(latencies), **steady_cpu},
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
