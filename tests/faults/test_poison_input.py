"""Poison, hostile and duplicated input against the five running services (the session pipeline):
every bad record goes to its service's dead-letter topic with its reason, every partition keeps
moving, and input published twice (over HTTP and again through the raw topic) counts once."""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections import defaultdict
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from shared.avro import AvroCodec, SchemaRegistry
from shared.generator import MALFORMED, WorldConfig, generate
from shared.kafka import make_producer
from shared.publish import publish_http, publish_kafka
from shared.replay import read_range
from shared.topics import (
    BY_NAME,
    DLQ_OF_SERVICE,
    IDENTITY_MERGES,
    IDENTITY_PROFILES,
    INGEST_RAW,
    INGEST_SALES,
    LOYALTY_EVENTS,
    MERGE,
    TRIGGERS_FIRED,
)
from tests.support import fault_report as report
from tests.support.oracle import Oracle
from tests.support.pipeline import INGEST_KEY, READ_KEY, Pipeline, auth
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio
CODEC = AvroCodec(SchemaRegistry.load())
AVRO_REASONS = {"not_single_object", "unknown_schema", "malformed_avro"}
# Which service dead-letters a poison record on which topic (each consumer of a topic does).
CONSUMERS = {
    INGEST_SALES.name: ["identity"],
    IDENTITY_MERGES.name: ["loyalty", "triggers", "notifications"],
    IDENTITY_PROFILES.name: ["triggers", "notifications"],
    LOYALTY_EVENTS.name: ["triggers"],
    TRIGGERS_FIRED.name: ["notifications"],
}


def poison_values(subject: str) -> list[tuple[str, bytes]]:
    valid = CODEC.encode(MERGE, {"merge_id": "m", "kind": "merged", "survivor": "s", "merged": "m",
                                 "reason": "poison-test", "cause_event_id": None,
                                 "occurred_at": dt.datetime(2026, 11, 1, tzinfo=dt.UTC)})
    header = CODEC.registry.latest(subject).header  # C3 01 + this subject's fingerprint
    return [
        ("not_single_object", b"this is not avro"),
        ("unknown_schema", b"\xc3\x01" + os.urandom(8) + b"\x02xx"),
        ("malformed_avro", header + b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f"),
        ("oversized", b"\xc3\x01" + os.urandom(8) + os.urandom(900_000)),
        ("other_subject", valid if subject != MERGE else b"\xc3\x01" + os.urandom(8)),
    ]


async def produce_everywhere(bootstrap: str, topic: str, values: list[bytes]) -> int:
    producer = make_producer(bootstrap, "poison", max_request_size=4 << 20)
    await producer.start()
    try:
        parts = sorted(await producer.partitions_for(topic))
        for value in values:
            for part in parts:
                await (await producer.send(topic, value, key=b"poison", partition=part))
        return len(parts)
    finally:
        await producer.stop()


async def dlq_reasons(bootstrap: str) -> dict[str, dict[str, set[str]]]:
    """service -> source topic -> reasons seen on its dead-letter topic."""
    out: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for service, topic in DLQ_OF_SERVICE.items():
        for r in await read_range(bootstrap, topic):
            if r.value is not None:
                out[service][r.value["source_topic"]].add(r.value["reason"])
    return out


async def canary_flows(http: httpx.AsyncClient, p: Pipeline) -> None:
    """A fresh customer's sale goes all the way: resolved, points earned, welcome decided."""
    tag = uuid.uuid4().hex[:8]
    sale = {"event_id": f"canary-{tag}", "type": "sale", "occurred_at": dt.datetime.now(dt.UTC).isoformat(),
            "customer": {"loyalty_id": f"C-{tag}"},
            "properties": {"order_id": f"oc-{tag}", "currency": "USD", "total": "10.00"}}
    r = await http.post(f"{p.url('ingestion')}/v1/events", json=sale, headers=auth(INGEST_KEY))
    assert r.status_code == 202, r.text

    async def through() -> bool:
        r = await http.get(f"{p.url('identity')}/v1/customers/lookup?loyalty_id=C-{tag}", headers=auth(READ_KEY))
        if r.status_code != 200:
            return False
        cid = r.json()["customer_id"]
        bal = await http.get(f"{p.url('loyalty')}/v1/customers/{cid}/loyalty", headers=auth(READ_KEY))
        notes = await http.get(f"{p.url('notifications')}/v1/customers/{cid}/notifications", headers=auth(READ_KEY))
        items = notes.json() if notes.status_code == 200 else []
        items = items.get("notifications", items) if isinstance(items, dict) else items
        return bal.status_code == 200 and bal.json()["points_balance"] == 10 and any(
            n["kind"] == "welcome" for n in items)

    await eventually(through, timeout=90, message="a canary sale through every service after the poison")


async def test_poison_on_every_consumed_topic_is_dead_lettered_and_partitions_keep_moving(pipeline):
    p = pipeline
    sent: dict[str, list[str]] = {}
    for topic_name in CONSUMERS:
        topic = BY_NAME[topic_name]
        labelled = poison_values(topic.subject)
        await produce_everywhere(p.bootstrap, topic_name, [v for _, v in labelled])
        sent[topic_name] = [label for label, _ in labelled]
    # JSON poison on the raw topic: not JSON, too deep, an event that fails validation.
    deep = b"[" * 200 + b"]" * 200
    invalid = json.dumps({"event_id": f"raw-bad-{uuid.uuid4().hex[:6]}", "type": "sale",
                          "occurred_at": "1970-01-01T00:00:00+00:00",
                          "customer": {"email": "x\u0000y@example.com"}}).encode()
    await produce_everywhere(p.bootstrap, INGEST_RAW.name, [b"{not json", deep, invalid])

    async with httpx.AsyncClient(timeout=10) as http:
        await canary_flows(http, p)

    async def all_dead_lettered() -> dict | None:
        reasons = await dlq_reasons(p.bootstrap)
        for topic_name, services in CONSUMERS.items():
            for service in services:
                if not AVRO_REASONS <= reasons[service][topic_name]:
                    return None
        return reasons if reasons["ingestion"][INGEST_RAW.name] else None

    reasons = await eventually(all_dead_lettered, timeout=60, message="every poison record dead-lettered")
    for topic_name, labels in sent.items():
        report.fault(f"poison records on {topic_name}", len(labels))
    report.fault("poison JSON on ingest.raw.v1", 3)
    report.invariant("poison dead-lettered with its reason, partitions moving", True)
    for service in ("identity", "loyalty", "triggers", "notifications"):
        text = httpx.get(f"{p.url(service)}/metrics", timeout=5).text
        assert f'omnicrm_{service}_dlq_total{{reason="unknown_schema"}}' in text
    print(f"\npoison dead-lettered: { {s: {t: sorted(r) for t, r in v.items()} for s, v in reasons.items()} }")


async def test_hostile_events_at_the_edge_are_rejected_with_their_reason(pipeline):
    p = pipeline
    now = dt.datetime.now(dt.UTC)
    tag = uuid.uuid4().hex[:6]
    base = {"type": "page_view", "customer": {"anonymous_id": f"a-{tag}"}, "properties": {"url": "/"}}
    hostile = [
        {**base, "event_id": f"far-future-{tag}", "occurred_at": (now + dt.timedelta(days=400)).isoformat()},
        {**base, "event_id": f"far-past-{tag}", "occurred_at": "1970-01-01T00:00:00+00:00"},
        {**base, "event_id": f"ctrl-{tag}", "occurred_at": now.isoformat(),
         "customer": {"anonymous_id": "evil\u0007\u001b[31mred"}},
    ]
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"{p.url('ingestion')}/v1/events", json={"events": hostile}, headers=auth(INGEST_KEY))
    assert r.status_code == 422, r.text
    fields = [sorted(e["field"] for e in res["errors"]) for res in r.json()["results"]]
    assert fields == [["occurred_at"], ["occurred_at"], ["customer.anonymous_id"]]

    async def in_dlq() -> bool:
        ids = {rec.value["event_id"] for rec in await read_range(p.bootstrap, DLQ_OF_SERVICE["ingestion"])
               if rec.value is not None}
        return {e["event_id"] for e in hostile} <= ids

    await eventually(in_dlq, timeout=30, message="hostile events on ingest.dlq.v1")
    report.fault("hostile events at the edge", len(hostile))
    report.invariant("hostile input rejected with its field", True)


async def test_the_same_input_twice_over_http_and_the_raw_topic_counts_once(pipeline):
    p = pipeline
    events = list(generate(int(uuid.uuid4().int % 100000), 60, 4,
                           dt.datetime.now(dt.UTC) - dt.timedelta(days=5),
                           WorldConfig.simple(redeem_share=0.0)))
    oracle = Oracle(events)
    clean = [{k: v for k, v in e.items() if k != MALFORMED} for e in events]
    # The world's stores first, known to identity before their tills' events arrive, as a retailer's
    # stores are: identity reads a national-format phone in its store's country, and a store it has not
    # heard of yet (announcements travel on their own topic) leaves the number to the default region.
    stores = [e for e in clean if e["type"] in ("store_upsert", "store_event")]
    announced = await publish_http(stores, p.url("ingestion"), INGEST_KEY, batch_size=200)
    store_ids = sorted({e["properties"]["store"]["store_id"] for e in stores if e["type"] == "store_upsert"})
    assert store_ids, "the world announces its stores"

    async def stores_known() -> bool:
        conn = await asyncpg.connect(p.dsn)
        try:
            return await conn.fetchval("SELECT count(*) FROM identity.stores WHERE store_id = ANY($1::text[])",
                                       store_ids) == len(store_ids)
        finally:
            await conn.close()

    await eventually(stores_known, timeout=60, interval=0.2, message="identity knows the world's stores")
    rest = [e for e in clean if e["type"] not in ("store_upsert", "store_event")]
    first = await publish_http(rest, p.url("ingestion"), INGEST_KEY, batch_size=200)
    first.accepted += announced.accepted
    # again, in another order (partitions interleave differently), through the raw topic
    shuffled = list(reversed(clean))
    await publish_kafka(shuffled, p.bootstrap)
    second = await publish_http(clean, p.url("ingestion"), INGEST_KEY, batch_size=37)
    assert first.accepted == len(clean) and second.duplicates == len(clean)
    expected = oracle.expected_points()

    mismatch = ""  # the first customer that differed at the last look, for the failure message

    async def ledgers_match() -> bool:
        nonlocal mismatch
        async with httpx.AsyncClient(timeout=10) as http:
            for n, (key, points) in enumerate(expected.items()):
                kind, value = key.split(":", 1)
                r = await http.get(f"{p.url('identity')}/v1/customers/lookup?{kind}={quote(value)}",
                                   headers=auth(READ_KEY))
                if r.status_code != 200:
                    mismatch = f"customer {n} ({kind}) not resolved: {r.status_code}"
                    return False
                cid = r.json()["customer_id"]
                got = await http.get(f"{p.url('loyalty')}/v1/customers/{cid}/loyalty", headers=auth(READ_KEY))
                if got.status_code != 200 or got.json()["points_balance"] != points:
                    mismatch = (f"customer {n} ({kind}, {cid}): expected {points} points, got "
                                f"{got.json().get('points_balance') if got.status_code == 200 else got.status_code}")
                    return False
        return True

    try:
        await eventually(ledgers_match, timeout=90, interval=1.0,
                         message="ledgers equal the oracle, input counted once")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; at the last look {mismatch}") from None
    report.fault("duplicate publications (HTTP twice + raw topic)", 2 * len(clean))
    report.events("duplicated-input events", len(clean))
    report.invariant("input published twice counts once", True)
