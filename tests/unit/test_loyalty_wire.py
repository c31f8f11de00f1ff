"""The fast LoyaltyEvent encoder writes exactly the bytes the generic Avro codec writes."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from services.loyalty.ledger import Notice
from services.loyalty.wire import loyalty_encoder
from shared.avro import AvroCodec, SchemaRegistry
from shared.topics import LOYALTY

CODEC = AvroCodec(SchemaRegistry.load())
ENCODE = loyalty_encoder(CODEC)
times = st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1),
                     timezones=st.just(dt.UTC))
longs = st.integers(-(2 ** 63), 2 ** 63 - 1)
text = st.text(max_size=40)


def test_the_fast_encoder_is_in_use():
    assert ENCODE.__name__ == "encode"


@settings(max_examples=400, deadline=None)
@given(st.builds(Notice, text, st.sampled_from(["points_earned", "tier_changed"]), text, times,
                 longs, longs, st.none() | text, st.none() | text, st.none() | text,
                 st.none() | text, longs, text, st.none() | times))
def test_fast_encoding_equals_the_codec(notice):
    fast = ENCODE(notice)
    assert fast == CODEC.encode(LOYALTY, notice.as_record())
    back = CODEC.decode(fast, LOYALTY)
    assert back["customer_id"] == notice.customer_id and back["points"] == notice.points


# -- the lean decoder of identity.events.v1 ---------------------------------------------------------

from services.loyalty.handlers import parse  # noqa: E402
from services.loyalty.rules import LoyaltyRules  # noqa: E402
from services.loyalty.wire import IGNORED, resolved_decoder  # noqa: E402
from shared.errors import PermanentError  # noqa: E402
from shared.events import for_encoding  # noqa: E402
from shared.rules import load_rules  # noqa: E402
from shared.topics import IDENTITY_EVENTS, IDENTITY_MERGES, MERGE, RESOLVED  # noqa: E402

DECODE = resolved_decoder(CODEC)
RULES = LoyaltyRules.from_config(load_rules())
# Strings of 64 bytes and more take two length bytes (the lean reader's slower path).
short = st.text(max_size=12) | st.text(alphabet="ab", min_size=64, max_size=70)
opt = st.none() | short
amounts = st.integers(-(2 ** 40), 2 ** 40)
lines = st.lists(st.fixed_dictionaries({"sku": short, "name": opt, "category": opt,
                                        "quantity": st.integers(-5, 50), "unit_price": amounts}),
                 max_size=4)
sale_props = st.fixed_dictionaries({
    "order_id": short, "currency": st.sampled_from(["USD", "eur", "JPY", "XXX", "ABC", "usd"]),
    "total": amounts, "lines": lines, "discount": st.none() | amounts,
    "coupon_codes": st.lists(short, max_size=3), "points_redeemed": st.integers(-5, 10_000),
    "channel": opt})
return_props = st.fixed_dictionaries({
    "order_id": short, "return_id": short, "currency": st.sampled_from(["USD", "EUR", "QQQ"]),
    "total": amounts, "lines": lines})
events = st.one_of(
    st.tuples(st.just("sale"), sale_props), st.tuples(st.just("return"), return_props),
    st.tuples(st.just("erase_request"), st.just({})), st.tuples(st.just("signup"), st.none()),
    st.tuples(st.just("page_view"), st.just({"url": "/x", "sku": None, "category": None})),
    st.tuples(st.just("sale"), st.none()))


def _outcome(value):
    try:
        return parse(value, RULES)
    except PermanentError as exc:
        return ("rejected", exc.reason)


def test_the_lean_decoder_is_in_use():
    assert DECODE.__name__ == "decode"


@settings(max_examples=400, deadline=None)
@given(events, text, times, st.lists(st.tuples(short, short), max_size=3),
       st.fixed_dictionaries({"email": opt, "loyalty_id": opt}))
def test_lean_decoding_gives_the_commands_of_the_codec(event, customer_id, at, identifiers, customer):
    kind, props = event
    raw = CODEC.encode(RESOLVED, {
        "customer_id": customer_id,
        "identifiers": [{"type": t, "value": v} for t, v in identifiers],
        "event": for_encoding({"event_id": f"e-{customer_id}", "type": kind, "occurred_at": at,
                               "source": "pos", "store_id": None, "customer": customer,
                               "properties": props})})
    lean = DECODE(IDENTITY_EVENTS, raw)
    assert _outcome(lean) == _outcome(CODEC.decode(raw, RESOLVED))
    if kind == "page_view":
        assert lean is IGNORED


def test_merges_and_garbage_go_through_the_codec():
    at = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    raw = CODEC.encode(MERGE, {"merge_id": "m", "kind": "merged", "survivor": "a", "merged": "b",
                               "reason": "r", "cause_event_id": None, "occurred_at": at})
    assert DECODE(IDENTITY_MERGES, raw) == CODEC.decode(raw, MERGE)
    good = CODEC.encode(RESOLVED, {"customer_id": "c", "identifiers": [], "event": for_encoding({
        "event_id": "e", "type": "sale", "occurred_at": at, "customer": {},
        "properties": {"order_id": "o", "currency": "USD", "total": 5, "lines": [],
                       "points_redeemed": 0}})})
    for bad in (good[:-3], good[:12] + b"\xff" * 8):
        try:
            CODEC.decode(bad, RESOLVED)
        except Exception as exc:  # noqa: BLE001 - the codec's error is what the lean path must give
            expected = type(exc)
        else:
            expected = None
        try:
            DECODE(IDENTITY_EVENTS, bad)
        except Exception as exc:  # noqa: BLE001
            assert type(exc) is expected
        else:
            assert expected is None
