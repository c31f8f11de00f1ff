"""The synthetic world: deterministic, plausible, valid except where it means not to be."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from decimal import Decimal

import phonenumbers
import pytest

from shared.generator import MALFORMED, STORES, WorldConfig, generate, to_jsonl_line
from tests.support.oracle import Oracle

START = dt.date(2026, 3, 2)
TYPES = {"sale", "return", "cart_add", "cart_remove", "checkout_started", "page_view",
         "product_view", "store_checkin", "message_received", "signup", "profile_update",
         "consent_update", "erase_request", "store_upsert", "store_event"}
STORE_TYPES = {"store_upsert", "store_event"}
MONEY = re.compile(r"^\d+\.\d{2}$")
ISO_CURRENCIES = {"USD", "GBP", "CNY", "HKD", "SGD"}


@pytest.fixture(scope="module")
def month() -> list[dict]:
    return list(generate(7, 800, 30, START))


def lines(events) -> list[str]:
    return [to_jsonl_line(e) for e in events]


def test_same_seed_same_world_byte_for_byte() -> None:
    assert lines(generate(11, 300, 10, START)) == lines(generate(11, 300, 10, START))


def test_different_seed_different_world() -> None:
    a, b = lines(generate(11, 300, 10, START)), lines(generate(12, 300, 10, START))
    assert a != b
    ids_a = {e["event_id"] for e in generate(11, 300, 10, START) if "event_id" in e}
    ids_b = {e["event_id"] for e in generate(12, 300, 10, START) if "event_id" in e}
    assert not ids_a & ids_b, "worlds of different seeds can share a cluster"


def test_stores_first_then_time_order_within_the_window(month) -> None:
    assert [e["type"] for e in month[:len(STORES)]] == ["store_upsert"] * len(STORES)
    assert {e["properties"]["store"]["timezone"] for e in month[:len(STORES)]} >= {
        "America/New_York", "Europe/London", "Asia/Shanghai", "Asia/Hong_Kong", "Asia/Singapore"}
    valid = [e for e in month if MALFORMED not in e]
    times = [dt.datetime.fromisoformat(e["occurred_at"]) for e in valid]
    assert times == sorted(times)
    begin = dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
    assert times[0] >= begin and times[-1] < begin + dt.timedelta(days=30)
    offsets = {t.utcoffset() for t in times}
    assert len(offsets) >= 5, "occurred_at carries each store's own offset"


def test_every_valid_event_passes_basic_envelope_checks(month) -> None:
    ids = Counter()
    for e in month:
        if MALFORMED in e:
            continue
        ids[e["event_id"]] += 1
        assert 1 <= len(e["event_id"]) <= 128
        assert e["type"] in TYPES
        at = dt.datetime.fromisoformat(e["occurred_at"])
        assert at.tzinfo is not None and "T" in e["occurred_at"]
        props = e["properties"]
        if e["type"] in STORE_TYPES:
            assert "customer" not in e
        else:
            assert any(e["customer"].values()), e
        if e["type"] == "sale":
            assert props["order_id"] and props["currency"] in ISO_CURRENCIES
            assert MONEY.match(props["total"]) and props["lines"]
            for line in props["lines"]:
                assert MONEY.match(line["unit_price"]) and line["quantity"] >= 1 and line["sku"]
            subtotal = sum(Decimal(li["unit_price"]) * li["quantity"] for li in props["lines"])
            assert Decimal(props["total"]) == subtotal - Decimal(props.get("discount", "0"))
            assert props["channel"] in ("in_store", "online", "pickup")
        if e["type"] == "return":
            assert props["return_id"] and MONEY.match(props["total"])
        if e["type"] in ("cart_add", "checkout_started"):
            assert props["cart_id"]
        if e["type"] == "consent_update":
            assert set(props["consents"].values()) <= {"opted_in", "opted_out"}
        if e["type"] == "signup":
            assert props.get("locale") in ("en", "zh-Hans", "zh-Hant")
    assert max(ids.values()) == 1, "event ids are unique"


def test_returns_refer_to_earlier_sales_of_the_same_customer(month) -> None:
    sales = {}
    returns = 0
    for e in month:
        if MALFORMED in e:
            continue
        if e["type"] == "sale":
            sales[e["properties"]["order_id"]] = e
        elif e["type"] == "return":
            returns += 1
            sale = sales[e["properties"]["order_id"]]
            assert e["customer"] == sale["customer"]
            assert Decimal(e["properties"]["total"]) <= Decimal(sale["properties"]["total"])
    assert returns > 10


def test_proportions_are_sane(month) -> None:
    valid = [e for e in month if MALFORMED not in e]
    types = Counter(e["type"] for e in valid)
    assert types["signup"] > 600 and types["sale"] > 800
    assert 0.02 < types["return"] / types["sale"] < 0.12
    assert types["store_event"] == len(STORES)
    for kind in ("cart_add", "checkout_started", "page_view", "product_view", "store_checkin",
                 "consent_update", "profile_update", "message_received"):
        assert types[kind] > 0, kind
    sales = [e["properties"] for e in valid if e["type"] == "sale"]
    channels = Counter(p["channel"] for p in sales)
    assert channels["in_store"] > channels["online"] > channels["pickup"] > 0
    assert sum(1 for p in sales if p.get("points_redeemed")) > 5
    categories = Counter(li["category"] for p in sales for li in p["lines"])
    assert categories["pet-food"] and categories["coffee"] and categories["skincare"]
    locales = Counter(e["properties"]["locale"] for e in valid if e["type"] == "signup")
    assert all(locales[x] > 30 for x in ("en", "zh-Hans", "zh-Hant"))
    opts = Counter(v for e in valid if e["type"] == "consent_update"
                   for v in e["properties"]["consents"].values())
    assert opts["opted_in"] > 300 and opts["opted_out"] > 5


def test_spend_is_heavy_tailed(month) -> None:
    oracle = Oracle(month)
    spend = sorted(oracle.expected_spend().values(), reverse=True)
    top = sum(spend[: max(1, len(spend) // 10)])
    assert top / sum(spend) > 0.3, "the top 10% of customers carry a large share of spend"


def test_consumables_are_repurchased_on_a_cycle() -> None:
    events = [e for e in generate(5, 300, 90, START, WorldConfig.simple()) if e["type"] == "sale"]
    oracle = Oracle(events)
    dates: dict[tuple[str, str], list[dt.datetime]] = {}
    for e in events:
        for line in e["properties"]["lines"]:
            if line["category"] in ("pet-food", "coffee"):
                key = (oracle.key_of(e), line["category"])
                dates.setdefault(key, []).append(dt.datetime.fromisoformat(e["occurred_at"]))
    repeat = [d for d in dates.values() if len(d) >= 3]
    assert len(repeat) > 10, "customers buy consumables again and again"


def test_households_share_a_phone_and_simple_worlds_do_not() -> None:
    def phones_by_email(events):
        owners: dict[str, set[str]] = {}
        for e in events:
            c = e.get("customer") or {}
            if e["type"] == "signup" and c.get("phone") and c.get("email"):
                e164 = phonenumbers.format_number(phonenumbers.parse(c["phone"], "US"),
                                                  phonenumbers.PhoneNumberFormat.E164)
                owners.setdefault(e164, set()).add(c["email"])
        return owners

    shared = [o for o in phones_by_email(generate(3, 500, 3, START)).values() if len(o) > 1]
    assert len(shared) > 10 and max(len(o) for o in shared) <= 3
    assert not [o for o in phones_by_email(
        generate(3, 500, 3, START, WorldConfig.simple())).values() if len(o) > 1]


def test_anonymous_visitor_signs_up_then_shows_phone_at_the_till() -> None:
    events = [e for e in generate(9, 400, 30, START, WorldConfig.simple())]
    oracle = Oracle(events)
    by_person: dict[str, list[dict]] = {}
    for e in events:
        if (key := oracle.key_of(e)) is not None:
            by_person.setdefault(key, []).append(e)
    journeys = 0
    for mine in by_person.values():
        kinds = [set(e["customer"]) for e in mine]
        anon_only = next((i for i, k in enumerate(kinds) if k == {"anonymous_id"}), None)
        signup = next((i for i, e in enumerate(mine) if e["type"] == "signup"
                       and {"anonymous_id", "email"} <= kinds[i]), None)
        till = next((i for i, e in enumerate(mine) if e.get("source") == "pos"
                     and "phone" in kinds[i]), None)
        if anon_only is not None and signup is not None and till is not None:
            assert anon_only < signup < till
            journeys += 1
    assert journeys >= 3


def test_simple_world_has_one_person_per_email() -> None:
    oracle = Oracle(generate(4, 400, 14, START, WorldConfig.simple()))
    people_with_email = Counter(key for key in oracle.people() if key.startswith("email:"))
    emails = {i for i in oracle._key if i.startswith("email:")}
    assert len(people_with_email) == len(emails) > 300
    points = oracle.expected_points()
    assert points and min(points.values()) >= 0


@pytest.mark.parametrize("share", [0.01, 0.05])
def test_malformed_share_near_target(share: float) -> None:
    events = list(generate(21, 1000, 7, START, malformed_share=share))
    bad = [e for e in events if MALFORMED in e]
    assert abs(len(bad) / len(events) - share) < share * 0.35
    assert len({e[MALFORMED] for e in bad}) >= 5
    for e in bad:
        problems = (e.get("event_id") is None, "occurred_at" not in e,
                    "T" not in e.get("occurred_at", "T"),
                    e.get("customer") == {},
                    any(isinstance(v, float) for v in (e.get("properties") or {}).values()),
                    (e.get("properties") or {}).get("currency") not in (None, *ISO_CURRENCIES),
                    "occurred_at" in e and "T" in e["occurred_at"]
                    and dt.datetime.fromisoformat(e["occurred_at"]).year >= 2035,
                    e["type"] in ("sale", "return") and "total" not in e["properties"],
                    e["type"] in ("cart_add", "checkout_started") and "cart_id" not in e["properties"])
        assert any(problems), e


def test_malformed_share_zero_and_world_unchanged_by_it() -> None:
    clean = [e for e in generate(5, 200, 5, START, malformed_share=0.0)]
    noisy = [e for e in generate(5, 200, 5, START, malformed_share=0.05) if MALFORMED not in e]
    assert not [e for e in clean if MALFORMED in e]
    assert lines(clean) == lines(noisy)


def test_oracle_counts_distinct_valid_ids(month) -> None:
    oracle = Oracle(month)
    counts = oracle.counts_by_type()
    assert sum(counts.values()) == len({e["event_id"] for e in month if MALFORMED not in e})
    assert oracle.malformed and oracle.opted_out()


def test_no_event_after_the_world_ends() -> None:
    """Regression: a web session begun just before the end ran past it, so the demo's "day that
    just ended" sent an event from the future and ingestion (rightly) rejected it."""
    import datetime as _dt

    from shared.generator import generate as _generate

    start = _dt.datetime(2026, 11, 24, 9, 40, tzinfo=_dt.UTC)
    end = start + _dt.timedelta(days=1)
    times = [_dt.datetime.fromisoformat(e["occurred_at"]) for e in _generate(77, 400, 1, start)
             if isinstance(e.get("occurred_at"), str) and "_malformed" not in e]
    assert times and max(times) <= end
