"""Triggers benchmark: time of a time-based scan over N customers' facts, and handler events/s per worker.

Facts are bulk-loaded with set-based SQL (birthdays over the year, last purchases over 200 days,
some open carts, category histories and expiring points), vacuumed and checkpointed (the state
autovacuum and the checkpointer keep a live table in), then `TriggersHandler.scan` runs at a
fixed instant on two connections (as the leader's timer job does; TRIGGERS_SCAN_CONNECTIONS=n for n),
twice (the second fires nothing new); the largest size three times from a fresh load (the median run
is reported, with every run's time: TRIGGERS_SCAN_REPEATS=n for n); the ceiling beside each size is a PostgreSQL
COPY of as many narrow rows as there are customers, measured in the same run. Beside the wall time,
the CPU the scan took (this process and, on a local server, its database backends) per fired trigger:
steadier than seconds on a shared machine. The handler is then fed batches of 1000 resolved sales in
one transaction each.
Run: python -m bench.triggers_scan [N ...] (default 10000 100000 1000000).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import os
import sys
import time
from pathlib import Path

import asyncpg

from bench.environment import bench_environment, copy_rate, save
from services.triggers.handlers import TriggersHandler
from services.triggers.rules import RuleConfig
from shared.avro import AvroCodec, SchemaRegistry
from shared.avro_reader import lean_decoder
from shared.batch_consumer import Record
from shared.clock import FixedClock
from shared.db import setup_database
from shared.events import for_encoding
from shared.rules import load_rules
from shared.runtime import tune_gc
from shared.topics import (
    IDENTITY_EVENTS,
    IDENTITY_PROFILES,
    LOYALTY,
    LOYALTY_EVENTS,
    PROFILE,
    RESOLVED,
)

CONNECTIONS = int(os.environ.get("TRIGGERS_SCAN_CONNECTIONS", "2"))
REPEATS = int(os.environ.get("TRIGGERS_SCAN_REPEATS", "3"))
MIGRATIONS = Path(__file__).resolve().parent.parent / "services" / "triggers" / "migrations"
AS_OF = dt.datetime(2026, 6, 15, 12, tzinfo=dt.UTC)

_FILL = """
INSERT INTO customer_facts (customer_id, birthday, birthday_month, birthday_day, timezone, tier, orders_count,
    lifetime_spend, first_purchase_at, last_purchase_at, last_event_at, winback_due_at, lat, lon, home_store_id)
SELECT 'c' || g,
       to_char(d, '"--"MM-DD'), extract(month FROM d)::int, extract(day FROM d)::int,
       (ARRAY['America/New_York','Asia/Shanghai','Europe/London','Asia/Tokyo'])[1 + g % 4],
       (ARRAY['member','member','member','silver','gold'])[1 + g % 5],
       1 + g % 7, 1000 * (g % 500), lp - interval '300 days', lp, lp, lp + interval '90 days',
       40.7 + (g % 100) / 1000.0, -74.0 + (g % 97) / 1000.0, 'soho'
FROM generate_series(1, $1) AS g,
     LATERAL (SELECT date '2000-01-01' + (g % 366) AS d, $2::timestamptz - (g % 200) * interval '1 day' AS lp) x
"""
_CHILDREN = """
INSERT INTO carts (customer_id, cart_id, last_activity_at, due_at, items, total, status)
SELECT 'c' || g, 'k' || g, $2::timestamptz - (g % 2000) * interval '1 minute',
       $2::timestamptz - (g % 2000) * interval '1 minute' + interval '60 minutes', 1, 2500, 'open'
FROM generate_series(1, $1, 20) AS g;
"""
_CATEGORIES = """
INSERT INTO category_facts (customer_id, category, purchases, quantity, last_at, remind_at)
SELECT 'c' || g, 'coffee', ARRAY[$2::timestamptz - (g % 200) * interval '1 day'], 1,
       $2::timestamptz - (g % 200) * interval '1 day', $2::timestamptz - (g % 200) * interval '1 day' + interval '18 days'
FROM generate_series(1, $1, 3) AS g
"""
_LOTS = """
INSERT INTO point_lots (customer_id, lot_id, points, expires_at)
SELECT 'c' || g, 'l' || g, 150, $2::timestamptz + (g % 60) * interval '1 day'
FROM generate_series(1, $1, 5) AS g
"""


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) of a local process, None when it cannot be read (a remote server)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _backends_cpu(conn) -> dict[int, float | None]:
    """CPU time so far of each client backend of this database (the scan's connections among them)."""
    pids = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                            "AND backend_type = 'client backend'")
    return {r["pid"]: _cpu_seconds(r["pid"]) for r in pids}


def _db_cpu(before: dict[int, float | None], after: dict[int, float | None]) -> float | None:
    """The database CPU the scan's backends spent between two readings (None when unreadable)."""
    if not after or any(v is None for v in after.values()):
        return None
    return sum(v - (before.get(pid) or 0.0) for pid, v in after.items() if v is not None)


async def scan_bench(dsn: str, n: int) -> dict:
    schema = f"trg_bench_{n}"
    # Loading a million customers takes longer than the services' 30 s statement timeout.
    pool = await setup_database(dsn, schema, MIGRATIONS, max_size=max(2, CONNECTIONS), statement_timeout_ms=900_000)
    cfg = RuleConfig.from_rules(load_rules(environ={}))
    handler = TriggersHandler(codec=AvroCodec(SchemaRegistry.load()), cfg=cfg, clock=FixedClock(AS_OF))
    try:
        async with pool.acquire() as conn:
            started = time.perf_counter()
            for sql in (_FILL, _CHILDREN, _CATEGORIES, _LOTS):
                await conn.execute(sql, n, AS_OF)
            # As autovacuum and the checkpointer leave a live table (pgbench vacuums before it measures
            # too): the scan does not pay for the bulk load's hint bits and dirty pages.
            await conn.execute("VACUUM ANALYZE")
            with contextlib.suppress(asyncpg.InsufficientPrivilegeError):  # not a superuser: no checkpoint
                await conn.execute("CHECKPOINT")
            load = time.perf_counter() - started
            db_before = await _backends_cpu(conn)
            started, cpu = time.perf_counter(), time.process_time()
            fired = await handler.scan(conn, AS_OF, pool=pool, connections=CONNECTIONS)
            first, first_cpu = time.perf_counter() - started, time.process_time() - cpu
            db_cpu = _db_cpu(db_before, await _backends_cpu(conn))
            started = time.perf_counter()
            again = await handler.scan(conn, AS_OF, pool=pool, connections=CONNECTIONS)
            second = time.perf_counter() - started
        copy = n / await copy_rate(dsn, [(f"c{i}", i, "x") for i in range(n)], ["id", "n", "note"],
                                   ["text", "bigint", "text"])
        return {"customers": n, "connections": CONNECTIONS, "load_seconds": round(load, 2), "scan_seconds": round(first, 3),
                "scan_python_cpu_seconds": round(first_cpu, 3),
                "scan_db_cpu_seconds": None if db_cpu is None else round(db_cpu, 3),
                "scan_cpu_us_per_fired": None if db_cpu is None or not fired
                else round((first_cpu + db_cpu) / fired * 1e6, 1), "fired": fired,
                "rescan_seconds": round(second, 3), "rescan_fired": again,
                "copy_ceiling_seconds": round(copy, 3), "scan_to_copy_ratio": round(first / copy, 1)}
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await pool.close()


def _sale_record(codec: AvroCodec, decode, i: int, cid: str, at: dt.datetime, store_id: str | None,
                 customer: dict) -> Record:
    ev = {"event_id": f"b{i}", "type": "sale", "occurred_at": at, "utc_offset_minutes": 0, "received_at": at,
          "source": "pos", "store_id": store_id, "customer": customer, "properties": {
              "order_id": f"o{i}", "currency": "USD", "total": 4200, "channel": "in_store",
              "lines": [{"sku": "s", "name": None, "category": "coffee", "quantity": 1, "unit_price": 4200}],
              "coupon_codes": [], "points_redeemed": 0, "discount": None}}
    raw = codec.encode(RESOLVED, {"customer_id": cid, "identifiers": [], "event": for_encoding(ev)})
    return Record(IDENTITY_EVENTS.name, 0, i, cid.encode(), decode(IDENTITY_EVENTS, raw), raw, 0)


def _pipeline_records(codec: AvroCodec, sales: int, lag: int) -> list[Record]:
    """What triggers reads per sale of a new customer in bench.pipeline, decoded as the service does
    (shared.avro_reader.lean_decoder): the resolved sale, the customer's new profile (both from
    identity), and loyalty's points_earned, `lag` records behind (loyalty is a hop behind identity)."""
    decode = lean_decoder(codec, (RESOLVED, PROFILE, LOYALTY))
    out: list[Record] = []
    loyalty: list[Record] = []
    for i in range(sales):
        cid, at = f"n{i}", AS_OF - dt.timedelta(seconds=sales - i)
        out.append(_sale_record(codec, decode, i, cid, at, None, {"loyalty_id": f"L-{cid}"}))
        raw = codec.encode(PROFILE, {
            "customer_id": cid, "identifiers": {"loyalty_id": [f"L-{cid}"]}, "consents": {}, "tags": [],
            "address": None, "created_at": at, "updated_at": at, "version": 1})
        out.append(Record(IDENTITY_PROFILES.name, 0, i, cid.encode(), decode(IDENTITY_PROFILES, raw), raw, 0))
        raw = codec.encode(LOYALTY, {
            "event_id": f"le{i}", "kind": "points_earned", "customer_id": cid, "occurred_at": at, "points": 42,
            "balance": 42, "order_id": f"o{i}", "cause_event_id": f"b{i}", "old_tier": None, "new_tier": None,
            "trailing_spend": 4200, "currency": "USD", "expires_at": at + dt.timedelta(days=365)})
        loyalty.append(Record(LOYALTY_EVENTS.name, 0, i, cid.encode(), decode(LOYALTY_EVENTS, raw), raw, 0))
        if len(loyalty) > lag:
            out.append(loyalty.pop(0))
    return out + loyalty


async def _feed(dsn: str, schema: str, records: list[Record], batch: int) -> dict:
    """Feed `records` to a fresh handler in batches (one transaction each): wall time, this process's
    CPU and its database backends' CPU (None on a remote server), and what fired."""
    pool = await setup_database(dsn, schema, MIGRATIONS, max_size=2)
    codec = AvroCodec(SchemaRegistry.load())
    handler = TriggersHandler(codec=codec, cfg=RuleConfig.from_rules(load_rules(environ={})), clock=FixedClock(AS_OF))
    threshold = gc.get_threshold()
    try:
        async with pool.acquire() as conn:  # both connections open, so the readings cover every backend
            async with pool.acquire() as other:
                await other.execute("SELECT 1")
            db_before = await _backends_cpu(conn)
        tune_gc()  # as the service runs (and the records made beforehand out of the collector's way)
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(records), batch):
            async with pool.acquire() as conn, conn.transaction():
                await handler(conn, records[i:i + batch])
        elapsed, py_cpu = time.perf_counter() - started, time.process_time() - cpu
        gc.unfreeze()
        gc.set_threshold(*threshold)
        async with pool.acquire() as conn:
            db_cpu = _db_cpu(db_before, await _backends_cpu(conn))
            fired = await conn.fetchval("SELECT count(*) FROM fired_triggers")
        return {"seconds": elapsed, "python_cpu": py_cpu, "db_cpu": db_cpu, "fired": fired}
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await pool.close()


def _us(seconds: float | None, n: int) -> float | None:
    return None if seconds is None else round(seconds / n * 1e6, 1)


async def handler_bench(dsn: str, events: int = 20000, batch: int = 1000) -> dict:
    """Sales of 5000 customers in batches of `batch`; then the records bench.pipeline feeds triggers
    for `events` sales of new customers (sale, profile, points earned), in batches of as many records."""
    codec = AvroCodec(SchemaRegistry.load())
    decode = lean_decoder(codec, (RESOLVED, PROFILE, LOYALTY))
    sales = [_sale_record(codec, decode, i, f"c{i % 5000}", AS_OF - dt.timedelta(seconds=events - i), "soho", {})
             for i in range(events)]
    s = await _feed(dsn, "trg_bench_events", sales, batch)
    mix = _pipeline_records(codec, events, lag=batch // 2)
    p = await _feed(dsn, "trg_bench_pipeline", mix, batch)
    return {"events": events, "batch": batch, "events_per_second": round(events / s["seconds"]),
            "fired": s["fired"], "python_cpu_us_per_event": _us(s["python_cpu"], events),
            "db_cpu_us_per_event": _us(s["db_cpu"], events),
            "note": "handler only (decode excluded), one worker, 5000 customers",
            "pipeline_mix": {
                "sales": events, "records": len(mix), "batch_records": batch,
                "sales_per_second": round(events / p["seconds"]), "fired": p["fired"],
                "python_cpu_us_per_sale": _us(p["python_cpu"], events), "db_cpu_us_per_sale": _us(p["db_cpu"], events),
                "cpu_us_per_sale": None if p["db_cpu"] is None else _us(p["python_cpu"] + p["db_cpu"], events),
                "note": "per sale of a new customer: its resolved sale, new profile and points_earned "
                        "(loyalty half a batch behind), as bench.pipeline feeds triggers; decode excluded"}}


def _median_of_runs(dsn: str, n: int, repeats: int) -> dict:
    """The scan of `n` customers `repeats` times, each from a fresh load: the median run, with every
    run's time beside it (this machine's speed drifts by a quarter or more within an hour)."""
    runs = [asyncio.run(scan_bench(dsn, n)) for _ in range(max(1, repeats))]
    median = sorted(runs, key=lambda r: r["scan_seconds"])[len(runs) // 2]
    if len(runs) > 1:
        median["runs"] = {"scan_seconds": [r["scan_seconds"] for r in runs],
                          "scan_to_copy_ratio": [r["scan_to_copy_ratio"] for r in runs]}
    return median


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 100_000, 1_000_000]
    with bench_environment() as env:
        # The largest size, whose time has a target, runs REPEATS times (the median run is reported).
        scans = [_median_of_runs(env.dsn, n, REPEATS if n == max(sizes) else 1) for n in sizes]
        events = asyncio.run(handler_bench(env.dsn))
    result = {"scan": scans, "handler": events, "scan_target": "1,000,000 customers under 10 s"}
    for s in scans:
        cpu = (f"; CPU python {s['scan_python_cpu_seconds']}s + database {s['scan_db_cpu_seconds']}s = "
               f"{s['scan_cpu_us_per_fired']} µs per fired trigger" if s["scan_db_cpu_seconds"] is not None else "")
        print(f"scan over {s['customers']:>9,} customers: {s['scan_seconds']:.3f}s, fired {s['fired']:,}; "
              f"re-scan {s['rescan_seconds']:.3f}s, fired {s['rescan_fired']}; load {s['load_seconds']}s; "
              f"COPY of {s['customers']:,} rows {s['copy_ceiling_seconds']:.3f}s (scan = {s['scan_to_copy_ratio']}x)"
              + cpu + (f"; median of {s['runs']['scan_seconds']}" if "runs" in s else ""))
    print(f"handler: {events['events_per_second']:,} events/s per worker")
    print(f"saved {save('triggers_scan', result)}")


if __name__ == "__main__":
    main()
