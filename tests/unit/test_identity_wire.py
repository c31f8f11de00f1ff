"""The lean Event decoder gives what the codec gives (properties decoded when first read)."""

from __future__ import annotations

import datetime as dt

import pytest

from services.identity.wire import LazyEvent, event_decoder
from shared.avro import AvroCodec, SchemaRegistry
from shared.errors import SchemaError
from shared.events import for_encoding
from shared.topics import EVENT, INGEST_PROFILES, INGEST_SALES

CODEC = AvroCodec(SchemaRegistry.load())
DECODE = event_decoder(CODEC)
T0 = dt.datetime(2026, 11, 22, 2, 15, 7, 123000, tzinfo=dt.UTC)


def event(kind: str, props: dict | None, **customer: str) -> dict:
    return {"event_id": "e-Ω-1", "type": kind, "occurred_at": T0, "utc_offset_minutes": -300,
            "received_at": T0 + dt.timedelta(days=400), "source": None, "store_id": "soho",
            "customer": customer, "properties": props}


@pytest.mark.parametrize("ev", [
    event("sale", {"order_id": "o-1", "currency": "USD", "total": 12990, "lines": []},
          email="Ann@Example.com", phone="+1 212 555 0100"),
    event("signup", {"first_name": "Mei", "tags": ["vip"]}, whatsapp_id="12125550100",
          web_customer_id="w-1"),
    event("page_view", {"url": "/p"}, anonymous_id="a" * 300),
])
def test_lean_decoding_matches_the_codec(ev: dict) -> None:
    raw = CODEC.encode(EVENT, for_encoding(ev))
    full = CODEC.decode(raw, EVENT)
    lean = DECODE(INGEST_SALES, raw)
    assert isinstance(lean, LazyEvent) and "properties" not in dict(lean)
    assert {k: v for k, v in full.items() if k != "properties"} == dict(lean)
    assert lean.get("properties") == full["properties"] == lean["properties"]
    assert dict(lean) == full


def test_garbage_and_tombstones_go_the_codec_way() -> None:
    assert DECODE(INGEST_PROFILES, None) is None
    raw = CODEC.encode(EVENT, for_encoding(event("sale", None, email="a@example.com")))
    with pytest.raises(SchemaError):
        DECODE(INGEST_SALES, raw[:14])
    with pytest.raises(SchemaError):
        DECODE(INGEST_SALES, b"\xc3\x01" + b"\x00" * 12)


def test_a_bad_union_branch_in_the_envelope_goes_the_codec_way() -> None:
    ev = event("sale", None, email="a@example.com")
    ev["source"] = "pos"
    raw = CODEC.encode(EVENT, for_encoding(ev))
    at = raw.index(b"\x02\x06pos")
    with pytest.raises(SchemaError):
        DECODE(INGEST_SALES, raw[:at] + b"\x04" + raw[at + 1:])


@pytest.mark.parametrize("ms", [0, 1, -1, 999, 1_000, 86_399_999, 1_764_547_200_123, -62_135_596_800_000,
                                253_402_300_799_999])
def test_timestamps_decode_exactly(ms: int) -> None:
    at = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)
    ev = event("sale", None, email="a@example.com")
    ev["occurred_at"] = ev["received_at"] = at
    raw = CODEC.encode(EVENT, for_encoding(ev))
    assert dict(DECODE(INGEST_SALES, raw)) == {k: v for k, v in CODEC.decode(raw, EVENT).items()
                                               if k != "properties"}
