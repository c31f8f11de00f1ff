"""The whole pipeline under faults: generated traffic through five service processes while each is
SIGKILLed at random moments, the broker's connections are dropped and stalled, and the services'
database backends are terminated; then invariants computed independently from the input.

OMNICRM_FAULTS_LONG=1 runs a bigger world with more kills (the default run exercises every fault).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from shared.generator import MALFORMED, WorldConfig, generate
from shared.kafka import ensure_topics
from shared.publish import Pacer, publish_http
from shared.replay import read_range
from shared.stack import Broker, create_database, drop_database, free_port
from shared.topics import IDENTITY_EVENTS, TRIGGERS_FIRED, Topic
from tests.conftest import ROOT
from tests.support import fault_report as report
from tests.support.oracle import Oracle
from tests.support.pipeline import INGEST_KEY, PII_KEY, READ_KEY, SERVICES, Pipeline, auth
from tests.support.polling import eventually
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.asyncio
LONG = os.environ.get("OMNICRM_FAULTS_LONG") == "1"
SCHEMAS = ("ingestion", "identity", "loyalty", "triggers", "notifications")


@pytest.fixture
def faulty_pipeline(pg_server: str) -> Iterator[tuple[Pipeline, TcpProxy]]:
    log_dir = ROOT / ".omnicrm" / "test-logs" / f"faults-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir(parents=True, exist_ok=True)
    broker_port, proxy_port = free_port(), free_port()
    broker = Broker(port=broker_port, advertised=f"127.0.0.1:{proxy_port}",
                    log_path=log_dir / "broker.log").start()
    proxy = TcpProxy(proxy_port, "127.0.0.1", broker_port).start()
    name = f"omnicrm_faults_{uuid.uuid4().hex[:8]}"
    dsn = asyncio.run(create_database(pg_server, name))
    asyncio.run(ensure_topics(f"127.0.0.1:{proxy_port}", 4))
    p = Pipeline(f"127.0.0.1:{proxy_port}", dsn, log_dir,
                 env={"OMNICRM_RATE_LIMIT_PER_SECOND": "100000"})
    try:
        p.start()
        p.wait_ready(timeout=90)
        yield p, proxy
    finally:
        p.stop()
        proxy.stop()
        broker.stop()
        asyncio.run(drop_database(pg_server, name))


async def topic_values(bootstrap: str, topic: Topic) -> list[dict]:
    """Everything on a topic right now (read to its end)."""
    return [r.value for r in await read_range(bootstrap, topic) if r.value is not None]


async def outbox_backlog(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        total = 0
        for schema in SCHEMAS:
            if await conn.fetchval("SELECT to_regclass($1)", f"{schema}.outbox"):
                total += await conn.fetchval(f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL")
        return total
    finally:
        await conn.close()


async def lag(p: Pipeline) -> float:
    total = 0.0
    async with httpx.AsyncClient(timeout=5) as http:
        for name in SERVICES:
            text = (await http.get(f"{p.url(name)}/metrics")).text
            for line in text.splitlines():
                if line.startswith(f"omnicrm_{name}_consumer_lag{{"):
                    total += float(line.rsplit(" ", 1)[1])
    return total


async def terminate_backends(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
    finally:
        await conn.close()


async def test_pipeline_survives_kills_broker_and_database_faults(faulty_pipeline):
    p, proxy = faulty_pipeline
    seed = 20261125
    customers, days = (1500, 14) if LONG else (300, 7)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=days + 1)
    cfg = WorldConfig.simple(redeem_share=0.0, malformed_share=0.02)
    events = list(generate(seed, customers, days, start, cfg))
    oracle = Oracle(events)
    for e in events:
        e.pop(MALFORMED, None)
    rng = random.Random(seed)
    injected: Counter[str] = Counter()

    # Paced so that the traffic spans every fault below (about 25 s in the default run).
    began = time.monotonic()
    publisher = asyncio.create_task(publish_http(events, p.url("ingestion"), INGEST_KEY, batch_size=50,
                                                 attempts=40, pacer=Pacer(rate=len(events) / 25)))
    kills = 15 if LONG else 10  # every service killed twice in the default run
    order = [SERVICES[i % len(SERVICES)] for i in range(kills)]
    for victim in order:
        await asyncio.sleep(rng.uniform(0.3, 1.5))  # a random moment: the faults' spacing, not synchronisation
        assert injected or not publisher.done(), "traffic must still flow while faults are injected"
        p.kill(victim)
        injected[f"sigkill:{victim}"] += 1
        if rng.random() < 0.5:
            proxy.drop_all()
            injected["broker_connections_dropped"] += 1
        p.restart(victim)
        await asyncio.to_thread(p.wait_ready, victim, timeout=90)
    proxy.stall(True)
    injected["broker_stalled_2s"] += 1
    await asyncio.sleep(2.0)
    proxy.stall(False)
    injected["database_backends_terminated"] += await terminate_backends(p.dsn)
    faults_done = time.monotonic() - began
    result = await publisher
    assert result.sent == len(events)
    assert result.rejected == len(events) - len(oracle.events), "exactly the malformed events are rejected"

    valid = {x["event_id"] for x in oracle.events}
    expected_resolved = {e["event_id"] for e in oracle.events
                         if e["type"] not in ("store_upsert", "store_event")}

    # invariants --------------------------------------------------------------------------
    published = time.monotonic() - began
    await eventually(lambda: _drained(p), timeout=180, message="lag and outbox drained")
    drained = time.monotonic() - began
    resolved = await topic_values(p.bootstrap, IDENTITY_EVENTS)
    by_event: dict[str, set[str]] = {}
    for r in resolved:
        by_event.setdefault(r["event"]["event_id"], set()).add(r["customer_id"])
    assert report.invariant("every accepted event resolved exactly once", set(by_event) == expected_resolved)
    assert report.invariant("a re-delivery never resolves differently",
                            all(len(ids) == 1 for ids in by_event.values()))

    fired = await topic_values(p.bootstrap, TRIGGERS_FIRED)
    periods = Counter((t["kind"], t["customer_id"], t["period"]) for t in {t["trigger_id"]: t for t in fired}.values())
    assert report.invariant("no trigger fired twice", max(periods.values(), default=1) == 1)

    balances = await _balances(p, oracle)
    mismatched = {k: v for k, v in balances.items() if v[0] != v[1]}
    assert report.invariant("ledgers equal the independent computation", not mismatched,
                            str(list(mismatched.items())[:5])), mismatched

    conn = await asyncpg.connect(p.dsn)
    try:
        sends = await conn.fetchval(
            "SELECT count(*) FROM notifications.notifications n WHERE n.status IN ('sent', 'delivered')")
        dup_notes = await conn.fetchval(
            "SELECT count(*) FROM (SELECT trigger_id FROM notifications.notifications "
            "WHERE status IN ('sent','delivered') GROUP BY trigger_id HAVING count(*) > 1) d")
        sent_rows = await conn.fetch(
            "SELECT customer_id, channel FROM notifications.notifications WHERE status IN ('sent', 'delivered')")
    finally:
        await conn.close()
    unconsented = await _sends_never_consented(p, oracle, [(r["customer_id"], r["channel"]) for r in sent_rows])
    assert report.invariant("no send duplicated", dup_notes == 0)
    assert report.invariant("no message without consent", unconsented == 0, f"{unconsented} sends")
    for name in SERVICES:
        assert report.invariant("no service left unready",
                                httpx.get(f"{p.url(name)}/ready", timeout=5).status_code == 200), name
    report.invariant("lag and outbox drained", True)
    for kind, n in injected.items():
        report.fault(kind, n)
    report.events("pipeline events published", len(events))
    report.events("customer events resolved", len(by_event))
    print(f"\nfault summary: injected {dict(injected)}; events {len(events)} "
          f"({len(valid)} valid, {len(events) - len(oracle.events)} malformed); resolved {len(by_event)}; "
          f"triggers {len(periods)}; sends {sends}; ledgers checked {len(balances)}; violations 0; "
          f"faults over {faults_done:.0f}s, published by {published:.0f}s, drained by {drained:.0f}s")


async def _drained(p: Pipeline) -> bool:
    for name, proc in p.procs.items():
        assert proc.poll() is None, f"{name} died:\n{p.tail(name)}"
    try:
        behind = await lag(p)
    except httpx.HTTPError:
        return False  # a service busy restarting its listener: look again
    return behind == 0 and await outbox_backlog(p.dsn) == 0


async def _sends_never_consented(p: Pipeline, oracle: Oracle, sends: list[tuple[str, str]]) -> int:
    """Sends on a channel the person (per the generated input) never opted in to."""
    ever_in: dict[str, set[str]] = {}
    for event in oracle.events:
        if event["type"] == "consent_update" and (key := oracle.key_of(event)):
            for channel, state in event["properties"]["consents"].items():
                if state == "opted_in":
                    ever_in.setdefault(key, set()).add(channel)
    bad = 0
    async with httpx.AsyncClient(timeout=10) as http:
        for customer_id, channel in sends:
            profile = (await http.get(f"{p.url('identity')}/v1/customers/{customer_id}",
                                      headers=auth(PII_KEY))).json()
            keys = {oracle._key.get(f"{kind}:{v}") for kind, values in profile.get("identifiers", {}).items()
                    for v in values} - {None}
            if not any(channel in ever_in.get(k, set()) for k in keys):
                bad += 1
    return bad


async def _balances(p: Pipeline, oracle: Oracle) -> dict[str, tuple[int, int]]:
    """Per person: (points the pipeline holds, points the oracle computed)."""
    expected = oracle.expected_points()
    out: dict[str, tuple[int, int]] = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for key, points in expected.items():
            kind, value = key.split(":", 1)
            r = await http.get(f"{p.url('identity')}/v1/customers/lookup?{kind}={quote(value)}",
                               headers=auth(READ_KEY))
            assert r.status_code == 200, f"{kind} of a person not found"
            cid = r.json()["customer_id"]
            got = (await http.get(f"{p.url('loyalty')}/v1/customers/{cid}/loyalty",
                                  headers=auth(READ_KEY))).json()
            out[key] = (got["points_balance"], points)
    return out
