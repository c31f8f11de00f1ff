"""The compiled lean decoder (shared/avro_reader.py) gives exactly what the generic codec gives."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.avro import HEADER_LEN, AvroCodec, SchemaRegistry
from shared.avro_compiled import _full_name
from shared.avro_reader import Unsupported, compile_reader, lean_decoder
from shared.errors import SchemaError
from shared.events import for_encoding
from shared.topics import (
    IDENTITY_EVENTS,
    IDENTITY_MERGES,
    IDENTITY_PROFILES,
    INGEST_STORES,
    LOYALTY,
    LOYALTY_EVENTS,
    MERGE,
    NOTIFICATION_OUTCOMES,
    OUTCOME,
    PROFILE,
    RESOLVED,
    TRIGGER,
    TRIGGERS_FIRED,
    Topic,
)

CODEC = AvroCodec(SchemaRegistry.load())
LEAN_SUBJECTS = (RESOLVED, PROFILE, LOYALTY, TRIGGER, OUTCOME, MERGE)  # triggers' and notifications' inputs, and more
DECODE = lean_decoder(CODEC, LEAN_SUBJECTS)
TOPIC_OF = {RESOLVED: IDENTITY_EVENTS, PROFILE: IDENTITY_PROFILES, LOYALTY: LOYALTY_EVENTS,
            TRIGGER: TRIGGERS_FIRED, OUTCOME: NOTIFICATION_OUTCOMES, MERGE: IDENTITY_MERGES}
T0 = dt.datetime(2026, 6, 1, 14, 0, 0, 123000, tzinfo=dt.UTC)


# -- values of any schema, for hypothesis ------------------------------------------------------------

millis = st.integers(-62_135_596_800_000, 253_402_300_799_999)  # years 1 .. 9999


def values(node: Any, names: dict[str, Any], namespace: str | None = None) -> st.SearchStrategy:
    """Values fastavro writes for `node` (records in unions tagged with their name)."""
    if isinstance(node, list):
        branches = []
        for branch in node:
            inner = values(branch, names, namespace)
            record = names.get(branch) if isinstance(branch, str) else branch
            if isinstance(record, dict) and record.get("type") == "record":
                full = _full_name(record, namespace)
                inner = inner.map(lambda v, full=full: (full, v))
            branches.append(inner)
        return st.one_of(branches)
    if isinstance(node, dict):
        kind = node["type"]
        if node.get("logicalType") == "timestamp-millis":
            return millis.map(lambda ms: dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms))
        if kind == "record":
            full = _full_name(node, namespace)
            names[full] = node
            inner_ns = full.rpartition(".")[0] or None
            return st.fixed_dictionaries({f["name"]: st.deferred(lambda f=f: values(f["type"], names, inner_ns))
                                          for f in node["fields"]})
        if kind == "array":
            return st.lists(values(node["items"], names, namespace), max_size=3)
        if kind == "map":
            return st.dictionaries(st.text(max_size=8), values(node["values"], names, namespace), max_size=3)
        return values(kind, names, namespace)
    simple = {"null": st.none(), "boolean": st.booleans(), "int": st.integers(-(2 ** 31), 2 ** 31 - 1),
              "long": st.integers(-(2 ** 63), 2 ** 63 - 1), "string": st.text(max_size=20),
              "double": st.floats(allow_nan=False), "bytes": st.binary(max_size=8)}
    if node in simple:
        return simple[node]
    full = node if node in names else f"{namespace}.{node}"
    return st.deferred(lambda: values(names[full], names, namespace))


def records(subject: str) -> st.SearchStrategy:
    return values(CODEC.registry.latest(subject).schema, {})


READERS = {s: compile_reader(CODEC.registry.latest(s).schema)[0] for s in LEAN_SUBJECTS}


def assert_lean(subject: str, raw: bytes) -> None:
    """A well-formed record: the compiled reader itself reads it, to the last byte, as the codec does."""
    assert READERS[subject](raw, HEADER_LEN) == (CODEC.decode(raw, subject), len(raw))
    assert DECODE(TOPIC_OF[subject], raw) == CODEC.decode(raw, subject)


def assert_same(subject: str, raw: bytes) -> None:
    topic = TOPIC_OF[subject]
    try:
        expected: Any = CODEC.decode(raw, subject)
    except SchemaError as exc:
        with pytest.raises(SchemaError) as got:
            DECODE(topic, raw)
        assert got.value.reason == exc.reason
        return
    assert DECODE(topic, raw) == expected


# -- the lean path is in use --------------------------------------------------------------------------

@pytest.mark.parametrize("subject", LEAN_SUBJECTS)
def test_every_hot_subject_compiles(subject):
    reader, source = compile_reader(CODEC.registry.latest(subject).schema)
    assert "def _rec_" in source and callable(reader)


def test_a_type_the_compiler_does_not_read_is_refused():
    with pytest.raises(Unsupported):
        compile_reader({"type": "record", "name": "X", "fields": [
            {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["a"]}}]})
    with pytest.raises(Unsupported):
        compile_reader({"type": "record", "name": "X", "fields": [
            {"name": "d", "type": {"type": "int", "logicalType": "date"}}]})


def test_records_of_the_latest_schema_skip_the_codec(monkeypatch):
    raw = CODEC.encode(LOYALTY, _loyalty())

    def refuse(*_):
        raise AssertionError("decoded by the codec")

    monkeypatch.setattr(CODEC, "decode", refuse)
    assert DECODE(LOYALTY_EVENTS, raw)["event_id"] == "l-1"


# -- equal to the codec -----------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_lean_decoding_equals_the_codec_on_any_record(data):
    subject = data.draw(st.sampled_from(LEAN_SUBJECTS))
    assert_lean(subject, CODEC.encode(subject, data.draw(records(subject))))


def _event(kind: str, props: dict | None, at: dt.datetime = T0) -> dict:
    return {"customer_id": "c-Ω-1", "identifiers": [{"type": "loyalty_id", "value": "L-1"}],
            "event": for_encoding({"event_id": f"e-{kind}", "type": kind, "occurred_at": at, "utc_offset_minutes": -240,
                                   "received_at": at, "source": "pos", "store_id": "soho",
                                   "customer": {"email": "ann@example.com", "loyalty_id": "L-1"},
                                   "properties": props})}


def _loyalty(**kw) -> dict:
    return {"event_id": "l-1", "kind": "points_earned", "customer_id": "c-1", "occurred_at": T0, "points": 42,
            "balance": 42, "order_id": "o-1", "cause_event_id": "e-1", "old_tier": None, "new_tier": None,
            "trailing_spend": 4200, "currency": "USD", "expires_at": T0 + dt.timedelta(days=365), **kw}


LINE = {"sku": "s-1", "name": "Beans", "category": "coffee", "quantity": 2, "unit_price": 1250}
REAL = [
    (RESOLVED, _event("sale", {"order_id": "o-1", "currency": "USD", "total": 2500, "lines": [LINE, LINE],
                               "discount": 100, "coupon_codes": ["X"], "points_redeemed": 3, "channel": "in_store"})),
    (RESOLVED, _event("return", {"order_id": "o-1", "return_id": "r-1", "currency": "EUR", "total": 1250,
                                 "lines": [LINE]})),
    (RESOLVED, _event("cart_add", {"cart_id": "k", "sku": "s", "quantity": 1, "unit_price": 990, "currency": "USD",
                                   "category": "tea"})),
    (RESOLVED, _event("checkout_started", {"cart_id": "k", "total": None, "currency": None})),
    (RESOLVED, _event("signup", {"first_name": "Mei", "tags": ["vip"], "tags_removed": [],
                                 "address": {"city": "NYC", "lat": 40.7, "lon": -74.0}})),
    (RESOLVED, _event("consent_update", {"consents": {"sms": "opted_in"}})),
    (RESOLVED, _event("erase_request", {})),
    (RESOLVED, _event("page_view", None, dt.datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=dt.UTC))),
    (RESOLVED, _event("store_event", {"store_id": "soho", "title": "Tasting", "starts_at": T0, "radius_km": 2.5})),
    (PROFILE, {"customer_id": "c-1", "identifiers": {"loyalty_id": ["L-1"], "email": ["a@example.com", "b@x.org"]},
               "first_name": "Ann", "birthday": "--02-29", "timezone": "America/New_York",
               "address": {"city": "New York", "region": None, "postal_code": "10012", "country": "US",
                           "lat": 40.7233, "lon": -74.003},
               "tags": ["vip", "ü"], "preferred_channel": "sms", "consents": {"sms": "opted_in", "email": "opted_out"},
               "merged_from": ["c-2"], "quarantined": [{"type": "phone", "value": "+1", "reason": "shared"}],
               "erased": False, "created_at": T0, "updated_at": T0, "version": 7}),
    (PROFILE, {"customer_id": "c-2", "created_at": T0, "updated_at": T0, "version": 1, "erased": True,
               "identifiers": {}, "tags": [], "consents": {}, "merged_from": [], "quarantined": []}),
    (LOYALTY, _loyalty()),
    (LOYALTY, _loyalty(kind="tier_changed", points=0, old_tier="member", new_tier="gold", expires_at=None,
                       trailing_spend=1 << 50, balance=-3)),
]


@pytest.mark.parametrize(("subject", "value"), REAL)
def test_lean_decoding_equals_the_codec_on_real_records(subject, value):
    assert_lean(subject, CODEC.encode(subject, value))


@pytest.mark.parametrize(("subject", "value"), REAL)
def test_malformed_records_fail_as_the_codec_fails(subject, value):
    raw = CODEC.encode(subject, value)
    for cut in (HEADER_LEN, HEADER_LEN + 1, len(raw) // 2, len(raw) - 1):
        assert_same(subject, raw[:cut])
    assert_same(subject, raw[:HEADER_LEN] + b"\xff" * (len(raw) - HEADER_LEN))
    assert_same(subject, raw + b"\x00")  # the codec ignores what follows the record: so does this


def test_a_block_with_its_size_decodes_as_the_codec_does():
    value = REAL[9][1]
    raw = CODEC.encode(PROFILE, value)
    plain = b"\x04\x06vip\x04\xc3\xbc\x00"  # tags: a block of 2, then the end
    assert raw.count(plain) == 1
    sized = b"\x03\x0c\x06vip\x04\xc3\xbc\x00"  # the same block as -2 items of 6 bytes
    assert_lean(PROFILE, raw.replace(plain, sized))
    assert DECODE(IDENTITY_PROFILES, raw.replace(plain, sized))["tags"] == ["vip", "ü"]


def test_unusual_encodings_go_to_the_codec():
    raw = CODEC.encode(PROFILE, REAL[10][1])
    erased = HEADER_LEN + 4 + 13  # "c-2", then 13 empty maps, arrays and null branches
    assert raw[erased - 13:erased + 1] == b"\x00" * 13 + b"\x01"
    odd_boolean = raw[:erased] + b"\x02" + raw[erased + 1:]
    loyalty = CODEC.encode(LOYALTY, _loyalty(order_id=None))
    null_branch = HEADER_LEN + 4 + 14 + 4 + 6 + 2  # event_id, kind, customer_id, occurred_at, points, balance
    assert loyalty[null_branch - 2:null_branch + 1] == b"\x54\x54\x00"
    long_branch = loyalty[:null_branch] + b"\x80\x00" + loyalty[null_branch + 1:]  # branch 0 in two bytes
    for subject, odd in ((PROFILE, odd_boolean), (LOYALTY, long_branch)):
        reader, _ = compile_reader(CODEC.registry.latest(subject).schema)
        with pytest.raises((IndexError, ValueError)):  # the lean reader refuses what the codec decides
            reader(odd, HEADER_LEN)
        assert_same(subject, odd)


def test_other_subjects_tombstones_and_topics_without_a_schema_go_the_codec_way():
    merge = CODEC.encode(MERGE, {"merge_id": "m", "kind": "merged", "survivor": "a", "merged": "b",
                                 "reason": "r", "cause_event_id": None, "occurred_at": T0})
    assert DECODE(IDENTITY_MERGES, merge) == CODEC.decode(merge, MERGE)
    assert DECODE(IDENTITY_PROFILES, None) is None
    with pytest.raises(SchemaError) as wrong:
        DECODE(IDENTITY_EVENTS, merge)
    assert wrong.value.reason == "wrong_schema"
    with pytest.raises(SchemaError):
        DECODE(Topic("no.schema", None), CODEC.encode(LOYALTY, _loyalty()))
    store = CODEC.encode("omnicrm.ingest.Event", for_encoding({
        "event_id": "s", "type": "store_upsert", "occurred_at": T0, "utc_offset_minutes": 0, "received_at": T0,
        "customer": {}, "properties": {"store": {"store_id": "soho", "name": "SoHo", "timezone": "UTC",
                                                 "country": "US"}}}))
    assert DECODE(INGEST_STORES, store) == CODEC.decode(store, "omnicrm.ingest.Event")
