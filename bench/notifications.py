"""Notifications benchmark (not a test): decisions/s of one worker's batch handler on PostgreSQL
(decode excluded: records are pre-decoded), and sends/s through the sandbox provider by one
dispatcher. Run: python -m bench.notifications [N]."""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time

from bench.environment import ROOT, bench_environment, save
from services.notifications.handlers import NotificationHandler
from services.notifications.metrics import NotificationMetrics
from services.notifications.policy import NotificationRules
from services.notifications.providers import build_providers
from services.notifications.sender import Dispatcher
from services.notifications.templates import Templates
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import Record
from shared.clock import FixedClock
from shared.db import setup_database
from shared.metrics import ServiceMetrics
from shared.rules import load_rules
from shared.topics import IDENTITY_PROFILES, PROFILE, TRIGGER, TRIGGERS_FIRED

NOON = dt.datetime(2026, 6, 10, 12, 0, tzinfo=dt.UTC)
KINDS = ("welcome", "birthday_coupon", "win_back", "tier_upgrade", "geo_thank_you")


def _records(codec: AvroCodec, n: int) -> tuple[list[Record], list[Record]]:
    def rec(topic, subject, value, key):
        raw = codec.encode(subject, value)
        return Record(topic.name, 0, 0, key.encode(), codec.decode(raw, subject), raw, 0)

    profiles, triggers = [], []
    for i in range(n):
        cid = f"b{i}"
        profiles.append(rec(IDENTITY_PROFILES, PROFILE, {
            "customer_id": cid, "identifiers": {"email": [f"b{i}@example.com"], "phone": [f"+1212{i:07d}"]},
            "first_name": "Ann", "locale": ("en", "zh-CN", "zh-TW")[i % 3], "timezone": "UTC",
            "consents": {"sms": "opted_in", "email": "opted_in"}, "created_at": NOON,
            "updated_at": NOON, "version": 1}, cid))
        kind = KINDS[i % len(KINDS)]
        triggers.append(rec(TRIGGERS_FIRED, TRIGGER, {
            "trigger_id": f"bt{i}", "kind": kind, "customer_id": cid, "fired_at": NOON, "period": "p",
            "context": {"store_name": "SoHo"},
            "offer": {"code": f"C{i}", "description": "Gift", "amount": 5000, "min_spend": 30000,
                      "currency": "USD", "expires_at": NOON + dt.timedelta(days=14)},
            "occurred_at": NOON}, cid))
    return profiles, triggers


async def run(dsn: str, n: int, batch: int = 1000) -> dict:
    codec = AvroCodec(SchemaRegistry.load())
    rules = NotificationRules.from_rules(load_rules())
    templates = Templates(rules.kinds, rules.locales)
    metrics = NotificationMetrics(ServiceMetrics("notifications"))
    clock = FixedClock(NOON)
    pool = await setup_database(dsn, "notifications_bench", ROOT / "services" / "notifications" / "migrations",
                                max_size=12)
    handler = NotificationHandler(codec=codec, clock=clock, rules=rules, templates=templates, metrics=metrics)
    profiles, triggers = _records(codec, n)
    for i in range(0, n, batch):
        async with pool.acquire() as conn, conn.transaction():
            await handler(conn, profiles[i:i + batch])
    started = time.perf_counter()
    for i in range(0, n, batch):
        async with pool.acquire() as conn, conn.transaction():
            await handler(conn, triggers[i:i + batch])
    decide_s = time.perf_counter() - started
    due = await pool.fetchval("SELECT count(*) FROM notifications WHERE status = 'pending'")

    dispatcher = Dispatcher(pool, dsn, providers=build_providers("sandbox", None, None), codec=codec,
                            clock=clock, rules=rules, metrics=metrics, idle_poll=0.01)
    await dispatcher.start()
    started = time.perf_counter()
    while dispatcher.sent < due:
        if await dispatcher.dispatch_once() == 0:
            await asyncio.sleep(0.001)
            if not dispatcher._in_flight:
                await dispatcher.drain()
    await dispatcher.drain()
    send_s = time.perf_counter() - started
    await dispatcher.stop()
    await pool.close()
    return {"triggers": n, "batch": batch, "decisions_per_s_one_worker": round(n / decide_s),
            "sent_via_sandbox": due, "sandbox_sends_per_s_one_dispatcher": round(due / send_s),
            "provider_concurrency": dict(rules.provider_concurrency)}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    with bench_environment() as env:
        result = asyncio.run(run(env.dsn, n))
    path = save("notifications", result)
    for k, v in result.items():
        print(f"{k:>36}: {v}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
