"""Ingestion throughput: accepted events/s over HTTP (batches of 1, 100 and 1000) and through the raw
topic, next to the ceiling of the same producer writing the same Avro records straight to the broker.

The service runs as its own process (`python -m services.ingestion`), as in production; this process
is the client. Run: python -m bench.ingestion [EVENTS_PER_RUN]  (results in bench/results/ingestion.json)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import orjson
import psutil

from bench.environment import ROOT, bench_environment, produce_values, save
from services.ingestion.validation import validate_event
from shared.avro import AvroCodec, SchemaRegistry
from shared.events import for_encoding
from shared.kafka import ensure_topics
from shared.stack import free_port
from shared.topics import EVENT, INGEST_RAW, Topic

KEY = "bench-ingest-secret-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def sale(run: str, i: int) -> dict:
    at = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat(timespec="seconds")
    return {"event_id": f"{run}-{i}", "type": "sale", "occurred_at": at, "store_id": "soho",
            "customer": {"email": f"c{i % 5000}@example.com", "loyalty_id": f"L-{i % 5000}"},
            "properties": {"order_id": f"o-{run}-{i}", "currency": "USD", "total": "129.90", "channel": "in_store",
                           "lines": [{"sku": "sku-1", "name": "Leash", "category": "pet", "quantity": 1,
                                      "unit_price": "129.90"}]}}


def cpu_seconds(procs: list[subprocess.Popen]) -> float:
    """User + system CPU the worker processes have used so far."""
    total = 0.0
    for proc in procs:
        times = psutil.Process(proc.pid).cpu_times()
        total += times.user + times.system
    return total


async def http_rate(bases: list[str], run: str, total: int, batch: int, concurrency: int,
                    procs: list[subprocess.Popen] | None = None) -> dict:
    """Accepted events/s posting `total` events in batches of `batch` with `concurrency` clients,
    spread over the service workers at `bases`; with `procs`, their CPU time per accepted event."""
    requests = [[sale(run, r * batch + j) for j in range(batch)] for r in range(total // batch)]
    bodies = [orjson.dumps(events[0] if batch == 1 else {"events": events}) for events in requests]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    accepted = 0
    statuses: dict[int, int] = {}

    async def worker(base: str) -> None:
        nonlocal accepted
        async with httpx.AsyncClient(base_url=base, timeout=60,
                                     limits=httpx.Limits(max_connections=1)) as client:
            while not queue.empty():
                body = queue.get_nowait()
                r = await client.post("/v1/events", content=body,
                                      headers={**AUTH, "content-type": "application/json"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 202:
                    accepted += r.json()["accepted"]

    cpu_before = cpu_seconds(procs) if procs else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(worker(bases[i % len(bases)]) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    out = {"batch": batch, "events": total, "workers": len(bases), "concurrency": concurrency,
           "accepted": accepted,
           "statuses": statuses, "seconds": round(elapsed, 2), "accepted_per_s": round(accepted / elapsed)}
    if procs and accepted:
        out["worker_cpu_us_per_event"] = round((cpu_seconds(procs) - cpu_before) / accepted * 1e6, 1)
    return out


async def raw_rate(bootstrap: str, dsn: str, run: str, total: int) -> dict:
    """Events/s from producing JSON to ingest.raw.v1 until all are validated, deduped and published."""
    values = [orjson.dumps(sale(run, i)) for i in range(total)]
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        await produce_values(bootstrap, INGEST_RAW.name, values, [str(i % 997).encode() for i in range(total)])
        while True:
            seen = await conn.fetchval("SELECT count(*) FROM ingestion.seen_events WHERE event_id LIKE $1",
                                       f"{run}-%")
            unsent = await conn.fetchval("SELECT count(*) FROM ingestion.outbox WHERE sent_at IS NULL")
            if seen >= total and unsent == 0:
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return {"events": total, "seconds": round(elapsed, 2), "published_per_s": round(total / elapsed)}


async def ceiling(bootstrap: str, n: int) -> float:
    """The project's producer writing the same Avro Event records (already encoded) to a topic."""
    codec = AvroCodec(SchemaRegistry.load())
    now = dt.datetime.now(dt.UTC)
    values = [codec.encode(EVENT, for_encoding(validate_event(sale("ceil", i), received_at=now).event))
              for i in range(n)]
    topic = f"bench.ingest.ceiling.{uuid.uuid4().hex[:6]}"
    await ensure_topics(bootstrap, 4, [Topic(topic, EVENT)])
    return await produce_values(bootstrap, topic, values, [f"email:c{i % 5000}@example.com".encode()
                                                           for i in range(n)])


@contextlib.contextmanager
def profiled(proc: subprocess.Popen, name: str) -> Iterator[None]:
    """With BENCH_PY_SPY=DIR (and py-spy installed), a py-spy flame graph of the worker for the block."""
    out = os.environ.get("BENCH_PY_SPY")
    if not out:
        yield
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "py-spy"
    spy = subprocess.Popen([str(exe) if exe.exists() else "py-spy", "record", "--nonblocking", "--pid", str(proc.pid), "--rate", "250", "--format",
                            os.environ.get("BENCH_PY_SPY_FORMAT", "raw"), "--output", f"{out}/ingestion-{name}.txt"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # attached before the load starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)


async def start_worker(env, log) -> tuple[subprocess.Popen, str]:
    """One `python -m services.ingestion` process on a free port, once it answers /ready."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OMNICRM_")}
    environ.update(KAFKA_BOOTSTRAP_SERVERS=env.bootstrap, DATABASE_URL=env.dsn,
                   OMNICRM_API_KEYS=f"bench:{KEY}:ingest", OMNICRM_INGESTION_PORT=str(port),
                   OMNICRM_RATE_LIMIT_PER_SECOND="0", OMNICRM_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "services.ingestion"], cwd=ROOT, env=environ,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=2) as c:
        for _ in range(300):
            try:
                if (await c.get("/ready")).status_code == 200:
                    return proc, base
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    raise RuntimeError("ingestion did not become ready (see .omnicrm/bench-ingestion.log)")


async def run(env, n: int) -> dict:
    await ensure_topics(env.bootstrap, 4)
    # The ceiling is sampled at the start, right before batch_1000 and at the end: on a shared
    # machine one sample can land in a quiet or a busy moment; the ratios use the highest.
    ceilings = [await ceiling(env.bootstrap, n)]
    (Path(ROOT) / ".omnicrm").mkdir(exist_ok=True)
    log = open(Path(ROOT) / ".omnicrm" / "bench-ingestion.log", "ab")  # noqa: SIM115 - owned by the children
    procs: list[subprocess.Popen] = []
    try:
        proc, base = await start_worker(env, log)
        procs.append(proc)
        await http_rate([base], "warmup", 2000, 100, 4)
        results = {
            "batch_1": await http_rate([base], "b1", min(n // 10, 5000), 1, 16, procs),
            "batch_100": await http_rate([base], "b100", n, 100, 8, procs),
        }
        ceilings.append(await ceiling(env.bootstrap, n))
        with profiled(proc, "batch_1000"):
            results["batch_1000"] = await http_rate([base], "b1000", n, 1000, 8, procs)
        results |= {
            "raw_topic": await raw_rate(env.bootstrap, env.dsn, "raw", n),
        }
        # Scale-out as in production: a second worker (same database and consumer group).
        proc2, base2 = await start_worker(env, log)
        procs.append(proc2)
        await http_rate([base2], "warmup2", 2000, 100, 4)
        results["batch_1000_two_workers"] = await http_rate([base, base2], "b1000x2", n, 1000, 8, procs)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        log.close()
    ceilings.append(await ceiling(env.bootstrap, n))
    ceiling_rate = max(ceilings)
    one = results["batch_1000"]["accepted_per_s"]
    two = results["batch_1000_two_workers"]["accepted_per_s"]
    return {"events_per_run": n, "producer_ceiling_per_s": round(ceiling_rate),
            "producer_ceiling_samples_per_s": [round(c) for c in ceilings], **results,
            "batch_1000_ratio_to_ceiling": round(one / ceiling_rate, 3),
            "batch_1000_two_workers_ratio_to_ceiling": round(two / ceiling_rate, 3),
            "raw_ratio_to_ceiling": round(results["raw_topic"]["published_per_s"] / ceiling_rate, 3),
            "target": "batch_1000 >= 0.30 of the producer ceiling"}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    with bench_environment() as env:
        result = asyncio.run(run(env, n))
    path = save("ingestion", result)
    for k, v in result.items():
        print(f"{k:>30}: {v}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
