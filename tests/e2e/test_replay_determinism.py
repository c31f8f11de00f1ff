"""The developer's promise (DESIGN "Time"): the same generated month, replayed twice from scratch into
fresh clusters with OMNICRM_CLOCK=event, fires exactly the same triggers (same ids) and makes exactly
the same notification decisions. Also the story of that month: customers resolved and merged, every
accepted event resolved once, triggers of many kinds, a decision for each trigger."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import httpx
import pytest

from shared.generator import MALFORMED, generate
from shared.kafka import ensure_topics
from shared.publish import publish_http
from shared.replay import read_range
from shared.stack import Broker, create_database, drop_database, free_port
from shared.topics import IDENTITY_EVENTS, IDENTITY_MERGES, NOTIFICATION_OUTCOMES, TRIGGERS_FIRED
from tests.conftest import ROOT
from tests.support.oracle import Oracle
from tests.support.pipeline import ADMIN_KEY, INGEST_KEY, SERVICES, Pipeline, auth
from tests.support.polling import eventually

SEED, CUSTOMERS, DAYS = 424242, 150, 30
START = dt.datetime(2026, 9, 1, tzinfo=dt.UTC)


async def drained(p: Pipeline) -> bool:
    async with httpx.AsyncClient(timeout=5) as http:
        for name in SERVICES:
            text = (await http.get(f"{p.url(name)}/metrics")).text
            for line in text.splitlines():
                if line.startswith(f"omnicrm_{name}_consumer_lag{{") and float(line.rsplit(" ", 1)[1]) > 0:
                    return False
    conn = await asyncpg.connect(p.dsn)
    try:
        for schema in SERVICES:
            if await conn.fetchval("SELECT to_regclass($1)", f"{schema}.outbox") and \
                    await conn.fetchval(f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL"):
                return False
    finally:
        await conn.close()
    return True


async def settled(p: Pipeline, last: dict) -> bool:
    """Drained, and the number of decisions did not move since the previous look."""
    if not await drained(p):
        return False
    outcomes = len(await read_range(p.bootstrap, NOTIFICATION_OUTCOMES))
    stable = last.get("n") == outcomes
    last["n"] = outcomes
    return stable


def run_world(pg_server: str, events: list[dict], label: str) -> dict:
    log_dir = ROOT / ".omnicrm" / "test-logs" / f"replay-{label}-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir(parents=True, exist_ok=True)
    broker = Broker(port=free_port(), log_path=log_dir / "broker.log").start()
    name = f"omnicrm_replay_{uuid.uuid4().hex[:8]}"
    dsn = asyncio.run(create_database(pg_server, name))
    p = Pipeline(broker.bootstrap, dsn, Path(log_dir), env={"OMNICRM_CLOCK": "event",
                                                            "OMNICRM_RATE_LIMIT_PER_SECOND": "0"})
    try:
        asyncio.run(ensure_topics(broker.bootstrap, 4))
        p.start()
        p.wait_ready(timeout=90)

        async def feed_and_collect() -> dict:
            result = await publish_http(events, p.url("ingestion"), INGEST_KEY)
            last: dict = {}
            await eventually(lambda: settled(p, last), timeout=240, interval=1.0, message=f"{label} settled")
            async with httpx.AsyncClient(timeout=30) as http:
                # the month is over: time-based rules see its end (the event clock's watermark)
                r = await http.post(f"{p.url('triggers')}/v1/triggers/scan", json={}, headers=auth(ADMIN_KEY))
                assert r.status_code == 200, r.text
            last = {}
            await eventually(lambda: settled(p, last), timeout=240, interval=1.0, message=f"{label} settled after scan")
            fired = [r.value for r in await read_range(p.bootstrap, TRIGGERS_FIRED)]
            outcomes = [r.value for r in await read_range(p.bootstrap, NOTIFICATION_OUTCOMES)]
            resolved = [r.value for r in await read_range(p.bootstrap, IDENTITY_EVENTS)]
            merges = [r.value for r in await read_range(p.bootstrap, IDENTITY_MERGES)]
            # The decision per trigger: its latest outcome, leaving out a hold while the profile was
            # on its way (`awaiting_profile`), which the real decision replaces.
            final: dict[str, tuple] = {}
            for o in sorted(outcomes, key=lambda o: (o["trigger_id"], o["occurred_at"], o["attempt"])):
                if o["reason"] == "awaiting_profile" and o["trigger_id"] in final:
                    continue
                final[o["trigger_id"]] = (o["notification_id"], o["channel"], o["status"], o["reason"],
                                          o["scheduled_for"])
            return {"accepted": result.accepted, "rejected": result.rejected,
                    "triggers": {t["trigger_id"]: (t["kind"], t["customer_id"], t["period"]) for t in fired},
                    "decisions": final, "resolved": resolved, "merges": merges}

        return asyncio.run(feed_and_collect())
    finally:
        p.stop()
        broker.stop()
        asyncio.run(drop_database(pg_server, name))


@pytest.mark.xfail(strict=True, reason=(
    "known gap (issue 8 left open): identity names a new customer after the first event it processes "
    "and interleaves its input partitions as they arrive, so customer ids (and the trigger ids built "
    "on them) depend on read order; the fix is event-time-ordered consumption across partitions in "
    "the batch consumer under OMNICRM_CLOCK=event. Strict: the day it passes, this marker must go."))
def test_a_generated_month_replayed_twice_fires_the_same_triggers_and_decisions(pg_server):
    events = list(generate(SEED, CUSTOMERS, DAYS, START))
    oracle = Oracle(events)
    clean = [{k: v for k, v in e.items() if k != MALFORMED} for e in events]
    first = run_world(pg_server, clean, "first")
    second = run_world(pg_server, clean, "second")

    # the month's story
    assert first["accepted"] == len(oracle.events) and first["rejected"] == len(oracle.malformed)
    customer_events = {e["event_id"] for e in oracle.events if e["type"] not in ("store_upsert", "store_event")}
    per_event = Counter(r["event"]["event_id"] for r in first["resolved"])
    assert set(per_event) == customer_events, "every accepted customer event resolved"
    assert first["merges"], "a month of omnichannel traffic merges some customers"
    kinds = Counter(kind for kind, _, _ in first["triggers"].values())
    assert {"welcome", "geo_thank_you", "abandoned_cart"} <= set(kinds), kinds
    assert len(kinds) >= 5, kinds
    assert set(first["decisions"]) == set(first["triggers"]), "every trigger got a notification decision"

    # determinism
    assert second["triggers"] == first["triggers"]
    assert second["decisions"] == first["decisions"]
    print(f"\nreplayed {len(clean)} events twice: {len(first['triggers'])} triggers {dict(kinds)}, "
          f"{len(first['decisions'])} decisions, {len(first['merges'])} merges; identical")

