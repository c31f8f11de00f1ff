"""The services' pools convert timestamptz with shared.pg_timestamptz (when compiled): PostgreSQL
stores and returns what asyncpg's own codec would, by parameter, in arrays and through binary COPY."""

from __future__ import annotations

import datetime as dt
import random
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from shared.db import create_pool

pytestmark = pytest.mark.asyncio


def _values() -> list[dt.datetime]:
    rnd = random.Random(20261208)
    start = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
    span = (dt.datetime(9999, 12, 31, tzinfo=dt.UTC) - start) // dt.timedelta(microseconds=1)
    values = [start + dt.timedelta(microseconds=rnd.randrange(span)) for _ in range(2000)]
    values += [dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=dt.UTC),
               dt.datetime(1970, 1, 1, tzinfo=dt.UTC), dt.datetime(2024, 2, 29, 23, 0, tzinfo=dt.UTC),
               dt.datetime(1, 1, 1, tzinfo=dt.UTC), dt.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=dt.UTC),
               dt.datetime(2026, 3, 8, 1, 59, 59, 999_999, tzinfo=ZoneInfo("America/New_York"))]
    return values


async def test_pool_and_plain_asyncpg_agree_on_every_timestamptz(database, unique):
    values = _values()
    plain = await asyncpg.connect(database)
    await plain.execute(f"CREATE SCHEMA ts_{unique}")
    pool = await create_pool(database, f"ts_{unique}")
    try:
        await plain.execute(f"CREATE TABLE ts_{unique}.t (i int, at timestamptz, ats timestamptz[])")
        table = f"ts_{unique}.t"
        async with pool.acquire() as conn:
            # the pool's codec writes (COPY, a parameter, an array) ...
            await conn.copy_records_to_table("t", schema_name=f"ts_{unique}",
                                             records=[(i, v, [v, None]) for i, v in enumerate(values)])
            await conn.execute(f"INSERT INTO {table} SELECT -1, $1, $2", values[0], values[:3])
            # ... and reads what plain asyncpg wrote
            await plain.execute(f"INSERT INTO {table} SELECT -2, $1, $2", values[1], values[1:4])
            ours = await conn.fetch(f"SELECT i, at, ats, at::text AS txt FROM {table} ORDER BY i")
            infinities = await conn.fetchrow("SELECT 'infinity'::timestamptz, '-infinity'::timestamptz")
        theirs = await plain.fetch(f"SELECT i, at, ats, at::text AS txt FROM {table} ORDER BY i")
        plain_infinities = await plain.fetchrow("SELECT 'infinity'::timestamptz, '-infinity'::timestamptz")
    finally:
        await plain.close()
        await pool.close()
    assert [tuple(r) for r in ours] == [tuple(r) for r in theirs]
    # as asyncpg does, Python's first and last instants are stored as -infinity and infinity
    extremes = {dt.datetime(1, 1, 1, tzinfo=dt.UTC): dt.datetime.min,
                dt.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=dt.UTC): dt.datetime.max}
    assert [r["at"] for r in ours if r["i"] >= 0] == [extremes.get(v, v.astimezone(dt.UTC)) for v in values]
    assert [r["txt"] for r in ours if r["at"] in extremes.values()] == ["-infinity", "infinity"]
    assert tuple(infinities) == tuple(plain_infinities) == (dt.datetime.max, dt.datetime.min)

