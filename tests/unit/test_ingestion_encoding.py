"""Ingestion's hot-path shortcuts give exactly the answers of the general code they stand in for:
the compiled Event encoder writes fastavro's bytes, events that validate nest no deeper than the
schema (so the nesting walk can be skipped for them), a refunded token bucket is as if untouched."""

from __future__ import annotations

import datetime as dt

import pytest

from services.ingestion.encoding import EventEncoder
from services.ingestion.ratelimit import TokenBuckets
from services.ingestion.validation import (
    _valid_depth,
    exceeds_depth,
    valid_events_within,
    validate_event,
)
from shared.avro import AvroCodec, SchemaRegistry
from shared.errors import SchemaError
from shared.events import for_encoding
from shared.generator import World, WorldConfig
from shared.topics import EVENT

CODEC = AvroCodec(SchemaRegistry.load())
ENCODER = EventEncoder(CODEC)
RECEIVED = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def world_events() -> list[dict]:
    world = World(seed=11, customers=120, days=14, start=dt.datetime(2026, 10, 1, tzinfo=dt.UTC),
                  config=WorldConfig.simple())
    return list(world.events())


def validated(raws: list[dict]) -> list[dict]:
    out = []
    for raw in raws:
        v = validate_event(raw, received_at=RECEIVED, default_source="pos",
                           max_future=dt.timedelta(days=3650))
        assert v.event is not None, v.errors
        out.append(v.event)
    return out


def test_compiled_encoder_writes_fastavros_bytes_for_every_event_type():
    events = validated(world_events())
    assert {e["type"] for e in events} >= {"sale", "return", "signup", "consent_update", "store_upsert",
                                           "store_event", "cart_add", "page_view"}
    for event in events:
        assert ENCODER.encode(event) == CODEC.encode(EVENT, for_encoding(event)), event["event_id"]
        assert ENCODER.encode(for_encoding(event)) == CODEC.encode(EVENT, for_encoding(event))


def test_compiled_encoder_edge_values():
    (event,) = validated(world_events()[:1])
    cases = [
        {**event, "utc_offset_minutes": -720, "source": None, "store_id": "ü-ストア-" + "x" * 300},
        {**event, "occurred_at": dt.datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=dt.UTC),
         "received_at": dt.datetime(2026, 1, 1, 8, 0, 0, 123_456, tzinfo=dt.timezone(dt.timedelta(hours=8)))},
        {**event, "received_at": 0},
        {**event, "properties": None},
    ]
    for case in cases:
        assert ENCODER.encode(case) == CODEC.encode(EVENT, for_encoding(case))
    sale = validated([{"event_id": "e-1", "type": "sale", "occurred_at": "2026-11-30T10:00:00+08:00",
                       "customer": {"email": "a@example.com"},
                       "properties": {"order_id": "o", "currency": "JPY", "total": "92233720368547758",
                                      "lines": [], "coupon_codes": ["A", "Ω" * 5000],
                                      "points_redeemed": 2_147_483_647}}])[0]
    assert ENCODER.encode(sale) == CODEC.encode(EVENT, for_encoding(sale))


def test_compiled_encoder_refuses_what_fastavro_refuses_and_is_stricter():
    (event,) = validated(world_events()[:1])
    for bad in ({**event, "event_id": 5}, {k: v for k, v in event.items() if k != "event_id"},
                {**event, "customer": {**event["customer"], "email": b"bytes"}}):
        with pytest.raises(SchemaError):
            CODEC.encode(EVENT, for_encoding(bad))
        with pytest.raises(SchemaError):
            ENCODER.encode(bad)
    # fastavro writes these (an int field beyond 32 bits, a naive time read as local time);
    # validation never produces them, and the compiled encoder refuses them.
    for bad in ({**event, "utc_offset_minutes": 1 << 40}, {**event, "occurred_at": dt.datetime(2026, 1, 1)},
                {**event, "type": "not-a-type"}):
        with pytest.raises(SchemaError):
            ENCODER.encode(bad)


def test_events_that_validate_nest_no_deeper_than_the_schema():
    bound, derived = _valid_depth()
    assert bound is not None and bound + 2 <= 32
    assert set(derived) == {"utc_offset_minutes", "received_at"}
    raws = world_events()
    for raw in raws:
        assert not exceeds_depth(raw, bound)
    checked = [validate_event(raw, received_at=RECEIVED, max_future=dt.timedelta(days=3650)) for raw in raws]
    assert valid_events_within(raws, checked, bound)
    assert not valid_events_within(raws, checked, bound - 1)


def test_a_deep_value_in_an_ignored_field_is_not_vouched_for():
    raw = world_events()[0]
    hidden = {**raw, "received_at": [[[[[[["x"]]]]]]]}
    checked = [validate_event(hidden, received_at=RECEIVED, max_future=dt.timedelta(days=3650))]
    assert checked[0].ok  # validation ignores the derived field's input...
    assert not valid_events_within([hidden], checked, 30)  # ...so the nesting must be walked
    rejected = [validate_event({**raw, "type": 1}, received_at=RECEIVED)]
    assert not valid_events_within([raw], rejected, 30)


def test_give_back_leaves_the_bucket_as_if_the_request_had_not_come():
    for spent_before in (0, 5, 19):
        a, b = TokenBuckets(rate=10, burst=20), TokenBuckets(rate=10, burst=20)
        for buckets in (a, b):
            if spent_before:
                assert buckets.take("k", spent_before, 0.0) == 0.0
        assert a.take("k", 1, 0.3) == 0.0
        a.give_back("k", 1)
        for now in (0.3, 0.35, 5.0):
            assert a.take("k", 20, now) == b.take("k", 20, now)
    fresh = TokenBuckets(rate=10, burst=20)
    assert fresh.take("new", 50, 1.0) == 0.0  # larger than the bucket: from a full one
    fresh.give_back("new", 50)
    assert fresh.take("new", 20, 1.0) == 0.0
