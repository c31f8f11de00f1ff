"""Whole-pipeline journeys through the public interfaces only (CONTRACTS §2-§3): five service
processes, a real broker and PostgreSQL. Each test uses its own customers, so tests share the stack."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
import pytest

from shared.pii import contains_pii
from tests.support.pipeline import ADMIN_KEY, INGEST_KEY, PII_KEY, READ_KEY, Pipeline, auth
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio
UTC = dt.UTC
USED_CONTACTS: set[str] = set()  # every email/phone this module sent, to scan the logs for


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        yield client


def rfc3339(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds")


def email(tag: str) -> str:
    value = f"{tag}-{uuid.uuid4().hex[:8]}@example.com"
    USED_CONTACTS.add(value)
    return value


def us_phone() -> tuple[str, str]:
    """A US number written as a till types it, and its E.164 form."""
    n = uuid.uuid4().int % 10_000
    local, e164 = f"(212) 555-{n:04d}", f"+1212555{n:04d}"
    USED_CONTACTS.update({local, e164})
    return local, e164


async def publish(http: httpx.AsyncClient, p: Pipeline, *events: dict) -> dict:
    r = await http.post(f"{p.url('ingestion')}/v1/events", json={"events": list(events)},
                        headers=auth(INGEST_KEY))
    assert r.status_code in (202, 422), r.text
    return r.json()


async def lookup(http: httpx.AsyncClient, p: Pipeline, kind: str, value: str) -> str | None:
    r = await http.get(f"{p.url('identity')}/v1/customers/lookup?{kind}={quote(value)}", headers=auth(READ_KEY))
    return r.json()["customer_id"] if r.status_code == 200 else None


async def get_json(http: httpx.AsyncClient, url: str, key: str = READ_KEY) -> dict | list | None:
    r = await http.get(url, headers=auth(key))
    return r.json() if r.status_code == 200 else None


def store(store_id: str, name: str) -> dict:
    return {"event_id": f"store-{store_id}", "type": "store_upsert", "occurred_at": rfc3339(dt.datetime.now(UTC)),
            "source": "admin",
            "properties": {"store": {
                "store_id": store_id, "name": name, "timezone": "America/New_York", "country": "US",
                "city": "New York", "lat": 40.7233, "lon": -74.0030, "currency": "USD"}}}


def _clean(event: dict) -> dict:
    return {k: v for k, v in event.items() if v is not None}


async def test_soho_story_till_web_and_whatsapp_become_one_customer(pipeline, http):
    p = pipeline
    now = dt.datetime.now(UTC)
    tag = uuid.uuid4().hex[:6]
    soho = f"soho-{tag}"
    local_phone, e164 = us_phone()
    mail = email("soho")
    answer = await publish(http, p, _clean(store(soho, "SoHo")))
    assert answer["accepted"] == 1
    sale = {"event_id": f"pos-{tag}-1", "type": "sale", "occurred_at": rfc3339(now - dt.timedelta(hours=1)),
            "source": "pos", "store_id": soho, "customer": {"phone": local_phone},
            "properties": {"order_id": f"o-{tag}-1", "currency": "USD", "total": "129.90", "channel": "in_store",
                           "lines": [{"sku": "boots-1", "name": "Chelsea boots", "category": "shoes",
                                      "quantity": 1, "unit_price": "129.90"}]}}
    signup = {"event_id": f"web-{tag}-signup", "type": "signup", "occurred_at": rfc3339(now - dt.timedelta(minutes=30)),
              "source": "web", "customer": {"email": f"  {mail.upper()} ", "phone": f"+1 {local_phone}",
                                            "web_customer_id": f"w-{tag}"},
              "properties": {"first_name": "Ada", "locale": "en", "timezone": "America/New_York"}}
    consent = {"event_id": f"web-{tag}-consent", "type": "consent_update",
               "occurred_at": rfc3339(now - dt.timedelta(minutes=29)), "source": "web",
               "customer": {"email": mail}, "properties": {"consents": {"whatsapp": "opted_in", "email": "opted_in"}}}
    chat = {"event_id": f"wa-{tag}-1", "type": "message_received", "occurred_at": rfc3339(now - dt.timedelta(minutes=5)),
            "source": "whatsapp", "customer": {"whatsapp_id": e164, "phone": e164},
            "properties": {"channel": "whatsapp", "text": "do you have these boots in 39?"}}
    answer = await publish(http, p, sale)
    assert answer["accepted"] == 1, answer
    # the till's customer exists before the web signup arrives
    till_id = await eventually(lambda: lookup(http, p, "phone", e164), timeout=60, message="till customer resolved")

    async def thank_you() -> dict | None:
        fired = await get_json(http, f"{p.url('triggers')}/v1/customers/{till_id}/triggers") or []
        items = fired.get("triggers", fired) if isinstance(fired, dict) else fired
        return next((t for t in items if t["kind"] == "geo_thank_you"), None)

    trigger = await eventually(thank_you, timeout=60, message="geo_thank_you fired for the SoHo sale")
    assert "SoHo" in str(trigger.get("context"))

    async def decided() -> dict | None:
        got = await get_json(http, f"{p.url('notifications')}/v1/customers/{till_id}/notifications") or []
        items = got.get("notifications", got) if isinstance(got, dict) else got
        return next((n for n in items if n["trigger_id"] == trigger["trigger_id"]), None)

    note = await eventually(decided, timeout=60, message="a notification decision for the thank-you")
    # the thank-you fired when the till customer had consented to nothing yet
    assert (note["status"], note["reason"]) == ("suppressed", "no_consent"), note

    answer = await publish(http, p, signup, consent, chat)
    assert answer["accepted"] == 3, answer

    async def one_customer() -> bool:
        ids = {await lookup(http, p, "email", mail), await lookup(http, p, "whatsapp_id", e164),
               await lookup(http, p, "web_customer_id", f"w-{tag}"), await lookup(http, p, "phone", e164)}
        return ids == {till_id}

    await eventually(one_customer, timeout=60, message="till, web and WhatsApp identifiers on one customer")
    profile = await get_json(http, f"{p.url('identity')}/v1/customers/{till_id}")
    assert profile["identifiers"]["email"] != [mail], "contact data must be masked without read_pii"
    full = await get_json(http, f"{p.url('identity')}/v1/customers/{till_id}", key=PII_KEY)
    assert mail in full["identifiers"]["email"] and e164 in full["identifiers"]["phone"]

    loyalty = await eventually(
        lambda: _loyalty_with_balance(http, p, till_id, 129), timeout=60, message="129 points for 129.90 USD")
    assert loyalty["tier"] == "member"

    # After the web consent, the next store visit's thank-you goes out on WhatsApp (first in order).
    hudson = f"hudson-{tag}"
    second = {**sale, "event_id": f"pos-{tag}-2", "store_id": hudson,
              "occurred_at": rfc3339(now - dt.timedelta(minutes=1)),
              "properties": {**sale["properties"], "order_id": f"o-{tag}-2", "total": "20.00", "lines": []}}
    answer = await publish(http, p, _clean(store(hudson, "Hudson Yards")), second)
    assert answer["accepted"] == 2, answer

    async def hudson_thank_you() -> dict | None:
        fired = await get_json(http, f"{p.url('triggers')}/v1/customers/{till_id}/triggers") or []
        items = fired.get("triggers", fired) if isinstance(fired, dict) else fired
        return next((t for t in items if t["kind"] == "geo_thank_you" and "Hudson Yards" in str(t.get("context"))), None)

    hudson_trigger = await eventually(hudson_thank_you, timeout=60, message="geo_thank_you for Hudson Yards")

    async def second_thank_you() -> dict | None:
        got = await get_json(http, f"{p.url('notifications')}/v1/customers/{till_id}/notifications") or []
        items = got.get("notifications", got) if isinstance(got, dict) else got
        note = next((n for n in items if n["trigger_id"] == hudson_trigger["trigger_id"]), None)
        # decided `pending` first; the dispatcher sends it a moment later
        return note if note and note["status"] != "pending" else None

    note = await eventually(second_thank_you, timeout=60, message="the Hudson Yards thank-you decided and sent")
    assert note["channel"] == "whatsapp", note
    assert note["status"] in ("sent", "deferred", "delivered"), note
    if note["status"] != "deferred":
        assert "Hudson Yards" in (note.get("body") or ""), note


async def _loyalty_with_balance(http, p, customer_id: str, points: int) -> dict | None:
    got = await get_json(http, f"{p.url('loyalty')}/v1/customers/{customer_id}/loyalty")
    return got if got and got["points_balance"] == points else None


async def test_resent_sale_is_a_duplicate_and_earns_once(pipeline, http):
    p = pipeline
    tag = uuid.uuid4().hex[:6]
    sale = {"event_id": f"pos-dup-{tag}", "type": "sale", "occurred_at": rfc3339(dt.datetime.now(UTC)),
            "source": "pos", "customer": {"loyalty_id": f"L-{tag}"},
            "properties": {"order_id": f"o-dup-{tag}", "currency": "USD", "total": "250.00"}}
    first = await publish(http, p, sale)
    again = await publish(http, p, sale)
    assert first["results"][0]["status"] == "accepted"
    assert again["results"][0]["status"] == "duplicate"
    cid = await eventually(lambda: lookup(http, p, "loyalty_id", f"L-{tag}"), timeout=60, message="resolved")
    await eventually(lambda: _loyalty_with_balance(http, p, cid, 250), timeout=60, message="250 points once")
    ledger = await get_json(http, f"{p.url('loyalty')}/v1/customers/{cid}/loyalty/ledger")
    entries = ledger.get("entries", ledger) if isinstance(ledger, dict) else ledger
    assert [e["kind"] for e in entries] == ["earn"]


async def test_customer_without_consent_gets_no_message(pipeline, http):
    p = pipeline
    tag = uuid.uuid4().hex[:6]
    mail = email("noconsent")
    signup = {"event_id": f"web-nc-{tag}", "type": "signup", "occurred_at": rfc3339(dt.datetime.now(UTC)),
              "source": "web", "customer": {"email": mail}, "properties": {"first_name": "Bo", "locale": "zh-Hans"}}
    optout = {"event_id": f"web-nc-{tag}-c", "type": "consent_update", "occurred_at": rfc3339(dt.datetime.now(UTC)),
              "source": "web", "customer": {"email": mail}, "properties": {"consents": {"email": "opted_out"}}}
    assert (await publish(http, p, signup, optout))["accepted"] == 2
    cid = await eventually(lambda: lookup(http, p, "email", mail), timeout=60, message="resolved")

    async def welcome_decision() -> dict | None:
        got = await get_json(http, f"{p.url('notifications')}/v1/customers/{cid}/notifications") or []
        items = got.get("notifications", got) if isinstance(got, dict) else got
        return next((n for n in items if n["kind"] == "welcome"), None)

    note = await eventually(welcome_decision, timeout=60, message="the welcome trigger decided")
    assert note["status"] == "suppressed" and note["reason"] == "no_consent", note


async def test_erase_request_forgets_the_person_everywhere(pipeline, http):
    p = pipeline
    tag = uuid.uuid4().hex[:6]
    mail = email("erase")
    now = dt.datetime.now(UTC)
    signup = {"event_id": f"web-er-{tag}", "type": "signup", "occurred_at": rfc3339(now - dt.timedelta(minutes=3)),
              "source": "web", "customer": {"email": mail}, "properties": {"first_name": "Erin"}}
    sale = {"event_id": f"web-er-{tag}-sale", "type": "sale", "occurred_at": rfc3339(now - dt.timedelta(minutes=2)),
            "source": "web", "customer": {"email": mail},
            "properties": {"order_id": f"o-er-{tag}", "currency": "USD", "total": "40.00", "channel": "online"}}
    assert (await publish(http, p, signup, sale))["accepted"] == 2
    old = await eventually(lambda: lookup(http, p, "email", mail), timeout=60, message="resolved")
    await eventually(lambda: _loyalty_with_balance(http, p, old, 40), timeout=60, message="points earned")
    erase = {"event_id": f"web-er-{tag}-erase", "type": "erase_request", "occurred_at": rfc3339(now - dt.timedelta(minutes=1)),
             "source": "web", "customer": {"email": mail}}
    assert (await publish(http, p, erase))["accepted"] == 1

    async def forgotten() -> bool:
        return await lookup(http, p, "email", mail) is None

    await eventually(forgotten, timeout=60, message="identity forgot the email")
    profile = await get_json(http, f"{p.url('identity')}/v1/customers/{old}", key=PII_KEY)
    assert profile is None or mail not in str(profile)

    async def notifications_forgotten() -> bool:
        got = await get_json(http, f"{p.url('notifications')}/v1/customers/{old}/notifications", key=PII_KEY)
        return got is None or mail not in str(got)

    await eventually(notifications_forgotten, timeout=60, message="notifications forgot the contact")

    async def every_service_recorded_it() -> dict | None:
        answers = {}
        for name in ("identity", "loyalty", "triggers", "notifications"):
            got = await get_json(http, f"{p.url(name)}/v1/erasures/{old}", key=ADMIN_KEY)
            if got is None:
                return None
            answers[name] = got
        return answers

    report = await eventually(every_service_recorded_it, timeout=60, message="an erasure record in every service")
    assert all(r["customer_id"] == old and r["what"] for r in report.values()), report
    assert mail not in str(report)
    r = await http.get(f"{p.url('identity')}/v1/erasures/{old}", headers=auth(READ_KEY))
    assert r.status_code == 403
    again = {"event_id": f"web-er-{tag}-again", "type": "signup", "occurred_at": rfc3339(now),
             "source": "web", "customer": {"email": mail}, "properties": {"first_name": "Erin"}}
    assert (await publish(http, p, again))["accepted"] == 1
    new = await eventually(lambda: lookup(http, p, "email", mail), timeout=60, message="new customer")
    assert new != old


async def test_rejected_events_answer_per_event_and_good_ones_still_flow(pipeline, http):
    p = pipeline
    tag = uuid.uuid4().hex[:6]
    good = {"event_id": f"ok-{tag}", "type": "page_view", "occurred_at": rfc3339(dt.datetime.now(UTC)),
            "customer": {"anonymous_id": f"anon-{tag}"}, "properties": {"url": "/boots"}}
    float_money = {"event_id": f"bad-{tag}", "type": "sale", "occurred_at": rfc3339(dt.datetime.now(UTC)),
                   "customer": {"loyalty_id": f"L-bad-{tag}"},
                   "properties": {"order_id": "x", "currency": "USD", "total": 12.5}}
    answer = await publish(http, p, good, float_money)
    assert [r["status"] for r in answer["results"]] == ["accepted", "rejected"]
    assert any(e["field"] == "properties.total" for e in answer["results"][1]["errors"])
    await eventually(lambda: lookup(http, p, "anonymous_id", f"anon-{tag}"), timeout=60, message="good event resolved")
    r = await http.post(f"{p.url('ingestion')}/v1/events", json=float_money, headers=auth(READ_KEY))
    assert r.status_code == 403
    r = await http.post(f"{p.url('ingestion')}/v1/events", json=good)
    assert r.status_code == 401


async def test_admin_scan_and_segments_answer(pipeline, http):
    p = pipeline
    r = await http.post(f"{p.url('triggers')}/v1/triggers/scan", json={}, headers=auth(ADMIN_KEY))
    assert r.status_code == 200 and "fired" in r.json()
    r = await http.post(f"{p.url('triggers')}/v1/triggers/scan", json={}, headers=auth(READ_KEY))
    assert r.status_code == 403
    r = await http.post(f"{p.url('triggers')}/v1/segments/query",
                        json={"all": [{"field": "orders_count", "op": "gte", "value": 1}]}, headers=auth(READ_KEY))
    assert r.status_code == 200 and r.json()["count"] >= 1


async def test_zz_no_contact_data_in_any_service_log(pipeline):
    """Runs last in this module: everything the services logged while serving these journeys."""
    leaks = []
    for path in pipeline.log_dir.glob("*.log"):
        text = path.read_text(errors="replace")
        leaks += [(path.name, c) for c in USED_CONTACTS if c in text]
        leaks += [(path.name, c) for c in contains_pii(text) if "example.com" in c]
    assert not leaks, leaks[:5]
