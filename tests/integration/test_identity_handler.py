"""Identity against real PostgreSQL: the handler applied in the consumer's transaction, outbox
records decoded with the real Avro codec, and the HTTP API on the resulting graph."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import httpx
import pytest

from services.identity import api, store
from services.identity.handlers import IdentityHandler, IdentityMetrics, handle_stores
from services.identity.normalise import Normaliser
from services.identity.resolution import Guard, customer_id_for
from shared.auth import KeyRing
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import Record
from shared.clock import FixedClock
from shared.config import ApiKey
from shared.db import setup_database
from shared.errors import PermanentError
from shared.events import for_encoding
from shared.http import create_app
from shared.metrics import ServiceMetrics
from shared.rules import load_rules
from shared.topics import EVENT, ROUTES
from tests.support.cycles import cyclic_garbage

pytestmark = pytest.mark.asyncio
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "identity" / "migrations"
CODEC = AvroCodec(SchemaRegistry.load())
RULES = load_rules(environ={})["identity"]
T0 = dt.datetime(2026, 11, 22, 2, 15, tzinfo=dt.UTC)
KEYS = [ApiKey("reader", "reader-secret", frozenset({"read"})),
        ApiKey("support", "pii-secret", frozenset({"read", "read_pii"})),
        ApiKey("ops", "admin-secret", frozenset({"read", "read_pii", "admin"}))]


def event(event_id: str, kind: str, minutes: int = 0, store_id: str | None = None,
          props: dict | None = None, **customer: str) -> dict:
    return {"event_id": event_id, "type": kind, "occurred_at": T0 + dt.timedelta(minutes=minutes),
            "utc_offset_minutes": -300, "received_at": T0, "source": "pos", "store_id": store_id,
            "customer": customer, "properties": props}


def record(ev: dict, offset: int = 0) -> Record:
    topic = ROUTES[ev["type"]].name
    raw = CODEC.encode(EVENT, for_encoding(ev))
    return Record(topic, 0, offset, None, CODEC.decode(raw, EVENT), raw, 0)


SALE = {"order_id": "o-1", "currency": "USD", "total": 12990, "lines": []}


class Identity:
    """A fresh identity schema with its handler, applying batches like the batch consumer does."""

    def __init__(self, pool, guard: Guard | None = None) -> None:
        self.pool = pool
        self.metrics = ServiceMetrics("identity")
        self.imetrics = IdentityMetrics(self.metrics)
        self.normaliser = Normaliser.from_rules(RULES)
        self.handler = IdentityHandler(codec=CODEC, normaliser=self.normaliser,
                                       guard=guard or Guard.from_rules(RULES),
                                       metrics=self.imetrics, clock=FixedClock(T0))

    async def apply(self, *events: dict) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await self.handler(conn, [record(e, i) for i, e in enumerate(events)])

    async def outbox(self, topic: str) -> list[tuple[str, dict | None]]:
        rows = await self.pool.fetch(
            "SELECT key, value FROM outbox WHERE topic = $1 ORDER BY id", topic)
        return [(r["key"].decode(), CODEC.decode(r["value"]) if r["value"] is not None else None)
                for r in rows]

    def client(self) -> httpx.AsyncClient:
        app = create_app("identity", keyring=KeyRing(KEYS), metrics=self.metrics,
                         ready=lambda: asyncio.sleep(0, {"ok": True}))
        app.include_router(api.router(api.ApiDeps(
            pool=lambda: self.pool, codec=CODEC, clock=FixedClock(T0 + dt.timedelta(days=1)),
            normaliser=self.normaliser, metrics=self.imetrics)))
        return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://identity")


@pytest.fixture
async def identity(database, unique):
    pool = await setup_database(database, f"identity_{unique}", MIGRATIONS, max_size=6)
    try:
        yield Identity(pool)
    finally:
        await pool.close()


def auth(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


async def test_soho_story_ends_as_one_customer(identity: Identity) -> None:
    # The store is in New York: a number typed without + is read as a US number.
    async with identity.pool.acquire() as conn, conn.transaction():
        await handle_stores(identity.handler, conn, [record(event(
            "st-soho", "store_upsert", props={"store": {"store_id": "soho", "name": "SoHo",
                                                         "timezone": "America/New_York",
                                                         "country": "US"}}))])
    await identity.apply(event("pos-1", "sale", 0, "soho", SALE, phone="(212) 555-0100"))
    await identity.apply(event("web-1", "signup", 60, None,
                               {"first_name": "Mei", "locale": "zh-Hans", "tags": ["vip"]},
                               email=" Mei.Chen@Example.com "))
    await identity.apply(event("wa-1", "message_received", 120, None,
                               {"channel": "whatsapp", "text": "hi"},
                               whatsapp_id="12125550100", email="mei.chen@example.com"))
    pos, web = customer_id_for("pos-1"), customer_id_for("web-1")
    resolved = await identity.outbox("identity.events.v1")
    assert [(k, v["event"]["event_id"]) for k, v in resolved] == [
        (pos, "pos-1"), (web, "web-1"), (pos, "wa-1")]
    assert {"type": "phone", "value": "+12125550100"} in resolved[0][1]["identifiers"]
    merges = await identity.outbox("identity.merges.v1")
    assert len(merges) == 1
    key, m = merges[0]
    assert key == pos and (m["kind"], m["survivor"], m["merged"], m["cause_event_id"]) == (
        "merged", pos, web, "wa-1")
    profiles = await identity.outbox("identity.profiles.v1")
    assert (web, None) in profiles  # the merged-away profile is tombstoned
    final = [v for k, v in profiles if k == pos][-1]
    assert final["identifiers"] == {"email": ["mei.chen@example.com"], "phone": ["+12125550100"],
                                    "whatsapp_id": ["+12125550100"]}
    assert final["first_name"] == "Mei" and final["merged_from"] == [web] and final["tags"] == ["vip"]
    assert [v["version"] for k, v in profiles if k == pos and v] == [1, 2]

    async with identity.client() as http:
        r = await http.get("/v1/customers/lookup", params={"email": "MEI.CHEN@example.com"},
                           headers=auth("reader-secret"))
        assert r.json() == {"customer_id": pos}
        r = await http.get("/v1/customers/lookup", params={"phone": "+1 212-555-0100"},
                           headers=auth("reader-secret"))
        assert r.json() == {"customer_id": pos}
        masked = (await http.get(f"/v1/customers/{web}", headers=auth("reader-secret"))).json()
        assert masked["customer_id"] == pos and masked["merged_from"] == [web]
        assert masked["identifiers"]["email"] == ["m***@example.com"]
        assert "555" not in masked["identifiers"]["phone"][0][2:]
        full = (await http.get(f"/v1/customers/{pos}", headers=auth("pii-secret"))).json()
        assert full["identifiers"]["phone"] == ["+12125550100"]
        assert (await http.get("/v1/customers/nope", headers=auth("reader-secret"))).status_code == 404
        assert (await http.get("/v1/customers/lookup", params={"email": "x@y.example"},
                               headers=auth("reader-secret"))).status_code == 404
        assert (await http.get(f"/v1/customers/{pos}")).status_code == 401


async def test_redelivered_events_are_not_emitted_again(identity: Identity) -> None:
    batch = [event("d-1", "sale", 0, None, SALE, email="d@example.com"),
             event("d-2", "page_view", 1, None, {"url": "/x"}, email="d@example.com")]
    await identity.apply(*batch)
    await identity.apply(*batch, batch[0])
    resolved = await identity.outbox("identity.events.v1")
    assert sorted(v["event"]["event_id"] for _, v in resolved) == ["d-1", "d-2"]
    assert len(await identity.outbox("identity.profiles.v1")) == 1


async def test_claim_answers_the_events_not_seen_before(identity: Identity) -> None:
    """All new (the answer the query leaves out), some seen, none new, repeats within a batch."""
    async with identity.pool.acquire() as conn, conn.transaction():
        assert await store.claim_events(conn, ["c-1", "c-2", "c-1"]) == {"c-1", "c-2"}
        assert await store.claim_events(conn, ["c-2", "c-3", "c-3", "c-4"]) == {"c-3", "c-4"}
        assert await store.claim_events(conn, ["c-4", "c-1"]) == set()
        assert await store.claim_events(conn, []) == set()


async def test_event_without_identifier_is_a_permanent_error(identity: Identity) -> None:
    with pytest.raises(PermanentError) as err:
        await identity.apply(event("n-1", "sale", 0, None, SALE))
    assert err.value.reason == "no_identifier"
    with pytest.raises(PermanentError):
        await identity.apply(event("n-2", "sale", 0, None, SALE, email="test@test.com"))


async def test_store_country_is_the_default_region_for_phones(identity: Identity) -> None:
    async with identity.pool.acquire() as conn, conn.transaction():
        await handle_stores(identity.handler, conn, [record(event(
            "st-sh", "store_upsert", props={"store": {"store_id": "sh", "name": "Jing'an",
                                                       "timezone": "Asia/Shanghai",
                                                       "country": "CN"}}))])
    identity.handler.countries.clear()  # read it back from the table, as a fresh worker would
    await identity.apply(event("cn-1", "sale", 0, "sh", SALE, phone="138 1234 5678"))
    (_, resolved), = await identity.outbox("identity.events.v1")
    assert resolved["identifiers"] == [{"type": "phone", "value": "+8613812345678"}]


async def test_erase_forgets_the_person_and_a_later_event_is_a_stranger(identity: Identity) -> None:
    await identity.apply(event("e-1", "signup", 0, None, {"first_name": "Ann"},
                               email="ann@example.com", phone="+12125550111"))
    await identity.apply(event("e-2", "erase_request", 5, None, {}, email="ann@example.com"))
    cid = customer_id_for("e-1")
    resolved = await identity.outbox("identity.events.v1")
    assert [(k, v["event"]["type"]) for k, v in resolved] == [(cid, "signup"), (cid, "erase_request")]
    assert (await identity.outbox("identity.profiles.v1"))[-1] == (cid, None)
    assert await identity.pool.fetchval("SELECT count(*) FROM identifiers") == 0
    row = await identity.pool.fetchrow("SELECT erased, golden FROM customers WHERE customer_id = $1", cid)
    assert row["erased"] and not any(row["golden"].values())
    await identity.apply(event("e-3", "sale", 10, None, SALE, email="ann@example.com"))
    key, _ = (await identity.outbox("identity.events.v1"))[-1]
    assert key == customer_id_for("e-3") != cid
    async with identity.client() as http:
        erased = (await http.get(f"/v1/customers/{cid}", headers=auth("pii-secret"))).json()
    assert erased["erased"] and erased["identifiers"] == {} and erased["first_name"] is None


async def test_unmerge_splits_the_customer_and_it_stays_split(identity: Identity) -> None:
    await identity.apply(event("u-1", "signup", 0, None, {"first_name": "Ann"},
                               phone="+12125550122", loyalty_id="L-1"))
    await identity.apply(event("u-2", "signup", 5, None, {"first_name": "Bob"}, email="bob@example.com"))
    await identity.apply(event("u-3", "sale", 10, None, SALE, phone="+12125550122",
                               email="bob@example.com"))
    a, b = customer_id_for("u-1"), customer_id_for("u-2")
    async with identity.client() as http:
        r = await http.post(f"/v1/customers/{a}/unmerge", json={"merged": b},
                            headers=auth("reader-secret"))
        assert r.status_code == 403
        r = await http.post(f"/v1/customers/{a}/unmerge", json={"merged": b},
                            headers=auth("admin-secret"))
        assert r.status_code == 200, r.text
        assert r.json()["survivor"] == a and r.json()["merged"] == b
        again = await http.post(f"/v1/customers/{a}/unmerge", json={"merged": b},
                                headers=auth("admin-secret"))
        assert again.status_code == 409
        assert (await http.get("/v1/customers/lookup", params={"email": "bob@example.com"},
                               headers=auth("reader-secret"))).json() == {"customer_id": b}
        bob = (await http.get(f"/v1/customers/{b}", headers=auth("pii-secret"))).json()
        assert bob["customer_id"] == b and bob["first_name"] == "Bob"
        assert bob["identifiers"] == {"email": ["bob@example.com"]}
        ann = (await http.get(f"/v1/customers/{a}", headers=auth("pii-secret"))).json()
        assert ann["first_name"] == "Ann" and ann["merged_from"] == []
    merges = await identity.outbox("identity.merges.v1")
    assert [(m["kind"], m["survivor"], m["merged"]) for _, m in merges] == [
        ("merged", a, b), ("unmerged", a, b)]
    assert merges[0][1]["merge_id"] == merges[1][1]["merge_id"]
    # The same two identifiers together again do not re-merge what an admin split.
    await identity.apply(event("u-4", "sale", 20, None, SALE, phone="+12125550122",
                               email="bob@example.com"))
    assert len(await identity.outbox("identity.merges.v1")) == 2
    ann_profile = [v for k, v in await identity.outbox("identity.profiles.v1") if k == a][-1]
    assert {"type": "email", "value": "bob@example.com", "reason": "unmerged_pair"} in ann_profile["quarantined"]


async def test_shared_store_phone_is_quarantined(identity: Identity) -> None:
    for i in range(1, 6):
        await identity.apply(event(f"q-{i}", "sale", i, None, SALE, loyalty_id=f"LQ-{i}",
                                   phone="+12125550999"))
    owners = await identity.pool.fetch("SELECT DISTINCT customer_id FROM identifiers "
                                       "WHERE id_type = 'loyalty_id'")
    assert len(owners) >= 2  # quarantined before it could pull everyone into one customer
    token = identity.handler.sealer.token(("phone", "+12125550999"))
    assert await identity.pool.fetchval(
        "SELECT reason FROM quarantined_identifiers WHERE token = $1", token) == "shared_identifier"
    body, _ = identity.metrics.exposition()
    assert b'omnicrm_identity_quarantined_total{reason="shared_identifier"}' in body


async def test_replay_into_a_fresh_graph_gives_the_same_ids(database, unique) -> None:
    events = [event("r-1", "sale", 0, None, SALE, phone="+12125550133"),
              event("r-2", "signup", 1, None, {"first_name": "Z"}, email="z@example.com"),
              event("r-3", "cart_add", 2, None, {"cart_id": "c", "sku": "s"},
                    email="z@example.com", phone="+12125550133")]
    seen = []
    for n in range(2):
        pool = await setup_database(database, f"identity_{unique}_{n}", MIGRATIONS, max_size=2)
        try:
            ident = Identity(pool)
            await ident.apply(*events)
            seen.append([(k, v["merge_id"]) for k, v in await ident.outbox("identity.merges.v1")]
                        + [(k, v["event"]["event_id"]) for k, v in await ident.outbox("identity.events.v1")])
        finally:
            await pool.close()
    assert seen[0] == seen[1] and len(seen[0]) == 4


async def test_two_workers_resolving_the_same_people_at_once_stay_consistent(database, unique) -> None:
    pool = await setup_database(database, f"identity_{unique}", MIGRATIONS, max_size=8)
    try:
        workers = [Identity(pool), Identity(pool)]
        people = 60
        batches: list[list[dict]] = [[], []]
        for p in range(people):
            email, phone = f"p{p}@example.com", f"+1212556{p:04d}"
            # Each worker sees a different pair of the same person's identifiers, at once.
            batches[0].append(event(f"w0-{p}", "sale", p, None, SALE, email=email, loyalty_id=f"LP{p}"))
            batches[1].append(event(f"w1-{p}", "page_view", p, None, {"url": "/"}, phone=phone,
                                    loyalty_id=f"LP{p}"))
            batches[p % 2].append(event(f"w2-{p}", "cart_add", p + 1, None, {"cart_id": "c", "sku": "s"},
                                        email=email, phone=phone))
        for chunk in range(0, 90, 30):
            await asyncio.gather(*(w.apply(*b[chunk:chunk + 30]) for w, b in zip(workers, batches, strict=True)))
        # Each person's three identifiers (email, phone and loyalty id) sit with one customer.
        owners = {r["value"]: r["customer_id"] for r in await pool.fetch(
            "SELECT value, customer_id FROM identifiers WHERE id_type = 'loyalty_id'")}
        token = workers[0].handler.sealer.token
        for p in range(people):
            of = await pool.fetch(
                "SELECT DISTINCT customer_id FROM identifiers WHERE (id_type, token) IN "
                "(('email', $1::bytea), ('phone', $2::bytea))",
                token(("email", f"p{p}@example.com")), token(("phone", f"+1212556{p:04d}")))
            assert [r["customer_id"] for r in of] == [owners[f"LP{p}"]]
        groups = await pool.fetchval("SELECT count(DISTINCT customer_id) FROM identifiers")
        assert groups == people
        assert await pool.fetchval("SELECT count(*) FROM identifiers") == 3 * people
        resolved = await pool.fetch("SELECT value FROM outbox WHERE topic = 'identity.events.v1'")
        ids = [CODEC.decode(r["value"])["event"]["event_id"] for r in resolved]
        assert len(ids) == len(set(ids)) == 3 * people
        roots = await pool.fetchval("SELECT count(*) FROM customers WHERE merged_into IS NULL")
        assert roots == people
        conflicts = sum(w.imetrics.conflicts._value.get() for w in workers)
        print(f"graph conflicts resolved by retry: {conflicts}")
    finally:
        await pool.close()



async def test_resolved_value_reuses_the_event_body_byte_for_byte(identity: Identity) -> None:
    from services.identity.handlers import _Item
    from services.identity.resolution import Incoming
    from shared.topics import RESOLVED

    e = event("b-1", "sale", 0, "soho", SALE, email="b@example.com", phone="+12125550100")
    rec = record(e)
    idents = (("email", "b@example.com"), ("phone", "+12125550100"))
    item = _Item(rec.value, Incoming("b-1", "sale", e["occurred_at"], idents), rec.raw)
    fast = identity.handler.resolved_bytes("c-1", idents, item)
    slow = CODEC.encode(RESOLVED, {"customer_id": "c-1",
                                   "identifiers": [{"type": t, "value": v} for t, v in idents],
                                   "event": for_encoding(rec.value)})
    assert fast == slow
    assert identity.handler.resolved_bytes("c-1", (), item) == CODEC.encode(
        RESOLVED, {"customer_id": "c-1", "identifiers": [], "event": for_encoding(rec.value)})


async def test_batches_are_freed_without_the_cyclic_collector(identity: Identity) -> None:
    """Everything a batch builds, merges included, is freed by reference counting as it ends,
    compiled or not: none of it waits for the collector, which the service runs rarely
    (tests/support/cycles.py)."""
    def batch(n: int) -> list[dict]:
        out = []
        for i in range(20):
            email, phone = f"gc{n}.{i}@example.com", f"+1212555{n:01d}{i:03d}"
            out += [event(f"gc-{n}-{i}-a", "sale", i, None, {**SALE, "order_id": f"gc-o{n}-{i}"}, email=email),
                    event(f"gc-{n}-{i}-b", "page_view", i, None, {"url": "/x"}, phone=phone),
                    event(f"gc-{n}-{i}-c", "signup", i, None, {"first_name": None, "tags": []},
                          email=email, phone=phone)]  # the two become one: a merge
        return out

    await identity.apply(*batch(0))  # statements prepared, caches filled
    with cyclic_garbage() as left:
        for n in (1, 2, 3):
            await identity.apply(*batch(n))
    assert len(await identity.outbox("identity.merges.v1")) == 80
    assert sum(left.values()) == 0, left.most_common(8)
