"""A broker and a database for a benchmark run, started like the test fixtures, and ceilings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import threading
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


class LoopThreadTime:
    """Where this thread's wall time went between start() and shares(): on a core, waiting in the
    run queue for one, or neither (blocked: the event loop waiting for the broker or PostgreSQL).
    A worker whose loop thread is on a core or queued for one nearly all the time is bound by its
    one Python thread, whatever its database does. From /proc/thread-self/schedstat (Linux)."""

    def __init__(self) -> None:
        self._path = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")
        self._start: tuple[float, float, float] | None = None

    def _read(self) -> tuple[float, float, float] | None:
        try:
            on_cpu, queued = (int(v) / 1e9 for v in self._path.read_text().split()[:2])
        except (OSError, ValueError):
            return None
        return time.perf_counter(), on_cpu, queued

    def start(self) -> None:
        self._start = self._read()

    def shares(self) -> dict[str, float] | None:
        end = self._read()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        wall = end[0] - self._start[0]
        on_cpu, queued = (end[i] - self._start[i] for i in (1, 2))
        return {"on_cpu": round(on_cpu / wall, 2), "waiting_for_a_core": round(queued / wall, 2),
                "blocked": round(max(0.0, 1 - (on_cpu + queued) / wall), 2)}


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
