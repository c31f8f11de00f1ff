"""A broker and a database for a benchmark run, started like the test fixtures, and ceilings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer

from shared.config import load_settings
from shared.kafka import make_producer
from shared.stack import Broker, Postgres, create_database, drop_database, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass
class BenchEnv:
    bootstrap: str
    server_dsn: str
    dsn: str
    database: str


@contextlib.contextmanager
def bench_environment() -> Iterator[BenchEnv]:
    """Broker (KAFKA_BOOTSTRAP_SERVERS or an embedded one) and a fresh database."""
    broker = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        broker = Broker(port=free_port(), log_path=None).start()
        bootstrap = broker.bootstrap
    pg = Postgres(dsn=os.environ.get("DATABASE_URL"), home=ROOT / ".omnicrm" / "bench-pg", try_local=True).start()
    name = f"omnicrm_bench_{uuid.uuid4().hex[:8]}"
    dsn = asyncio.run(create_database(pg.dsn, name))
    try:
        yield BenchEnv(bootstrap, pg.dsn, dsn, name)
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(drop_database(pg.dsn, name))
        pg.stop()
        if broker is not None:
            broker.stop()


def consumer_lanes() -> int:
    """The lanes a service's batch consumer applies with (OMNICRM_CONSUMER_LANES), for the
    benchmarks that wire a BatchConsumer themselves."""
    return load_settings().consumer_lanes


async def produce_values(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes] | None = None) -> float:
    """Publish values with the project's producer settings; returns records/s (the produce ceiling)."""
    producer = make_producer(bootstrap, "bench-producer")
    await producer.start()
    started = time.perf_counter()
    try:
        futures = []
        for i, v in enumerate(values):
            futures.append(await producer.send(topic, v, key=keys[i] if keys else None))
            if len(futures) >= 5000:
                await asyncio.gather(*futures)
                futures = []
        await asyncio.gather(*futures)
    finally:
        elapsed = time.perf_counter() - started
        await producer.stop()
    return len(values) / elapsed


async def plain_consume_rate(bootstrap: str, topic: str, expected: int, max_records: int = 1000) -> float:
    """Records/s of a plain aiokafka getmany consumer reading the topic from the start (the read ceiling)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"plain-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                max_partition_fetch_bytes=4 << 20, fetch_max_bytes=32 << 20)
    await consumer.start()
    seen = 0
    started = None
    try:
        while seen < expected:
            batch = await consumer.getmany(timeout_ms=500, max_records=max_records)
            if started is None and batch:
                started = time.perf_counter()
            seen += sum(len(v) for v in batch.values())
        return expected / (time.perf_counter() - (started or time.perf_counter()))
    finally:
        await consumer.stop()


async def copy_rate(dsn: str, rows: list[tuple], columns: list[str], types: list[str]) -> float:
    """Rows/s of PostgreSQL COPY into a fresh table (the write ceiling)."""
    conn = await asyncpg.connect(dsn)
    table = f"copy_{uuid.uuid4().hex[:6]}"
    try:
        await conn.execute(f"CREATE TABLE {table} ({', '.join(f'{c} {t}' for c, t in zip(columns, types, strict=True))})")
        started = time.perf_counter()
        for i in range(0, len(rows), 1000):
            await conn.copy_records_to_table(table, records=rows[i:i + 1000], columns=columns)
        return len(rows) / (time.perf_counter() - started)
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2, default=str) + "\n")
    return path
