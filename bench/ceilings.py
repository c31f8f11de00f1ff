"""Ceilings every other benchmark is read against, measured in the same run: the broker written and
read by plain aiokafka clients, PostgreSQL COPY versus one batched `unnest` upsert per 1000 rows, and a
faust-streaming no-op agent. Run: python -m bench.ceilings [N]."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import asyncpg

from bench.environment import (
    ROOT,
    bench_environment,
    copy_rate,
    plain_consume_rate,
    produce_values,
    save,
)
from shared.kafka import ensure_topics
from shared.topics import MERGE, Topic


async def upsert_rate(dsn: str, rows: list[tuple]) -> float:
    """Rows/s of `INSERT ... SELECT FROM unnest ... ON CONFLICT DO UPDATE`, 1000 rows per statement."""
    conn = await asyncpg.connect(dsn)
    table = f"ups_{uuid.uuid4().hex[:6]}"
    try:
        await conn.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, n bigint, note text)")
        started = time.perf_counter()
        for i in range(0, len(rows), 1000):
            chunk = rows[i:i + 1000]
            await conn.execute(
                f"INSERT INTO {table} SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[]) "
                f"ON CONFLICT (id) DO UPDATE SET n = {table}.n + EXCLUDED.n, note = EXCLUDED.note",
                [r[0] for r in chunk], [r[1] for r in chunk], [r[2] for r in chunk])
        return len(rows) / (time.perf_counter() - started)
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


def faust_noop_rate(bootstrap: str, topic: str, n: int, timeout: float = 120.0) -> dict:
    env = dict(os.environ, BENCH_BOOTSTRAP=bootstrap, BENCH_TOPIC=topic, BENCH_N=str(n))
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.faust_noop"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f}s (the agent did not finish consuming)"}
    # faust routes stdout through its logger, so the JSON line may carry a log prefix.
    for line in (proc.stdout + proc.stderr).splitlines():
        if '{"records"' in line:
            return json.loads(line[line.index('{"records"'):])
    return {"error": f"exit code {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"}


async def measure(env, n: int) -> dict:
    topic = f"bench.ceil.{uuid.uuid4().hex[:6]}"
    await ensure_topics(env.bootstrap, 4, [Topic(topic, MERGE)])
    values = [b"x" * 200 for _ in range(n)]
    produce = await produce_values(env.bootstrap, topic, values, [str(i % 997).encode() for i in range(n)])
    consume = await plain_consume_rate(env.bootstrap, topic, n)
    rows = [(f"id-{i}", i, "note") for i in range(n)]
    copy = await copy_rate(env.dsn, rows, ["id", "n", "note"], ["text", "bigint", "text"])
    upsert = await upsert_rate(env.dsn, rows)
    return {"records": n, "kafka_produce_per_s": round(produce), "kafka_consume_per_s": round(consume),
            "pg_copy_rows_per_s": round(copy), "pg_unnest_upsert_rows_per_s": round(upsert),
            "upsert_to_copy_ratio": round(upsert / copy, 3), "topic": topic}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with bench_environment() as env:
        result = asyncio.run(measure(env, n))
        faust_n = min(n, 50_000)
        result["faust_noop_agent"] = faust_noop_rate(env.bootstrap, result.pop("topic"), faust_n)
    print(json.dumps(result, indent=2))
    save("ceilings", result)


if __name__ == "__main__":
    main()
