"""Notifications privacy on real PostgreSQL: contact points sealed at rest in every table, opened
only by the dispatcher; key rotation and `rekey`; erasures recorded and served to admins."""

from __future__ import annotations

import base64
import datetime as dt
import os
from pathlib import Path

import httpx
import orjson
import pytest

from services.notifications import store
from services.notifications.api import install_routes
from services.notifications.contacts import contact_from_row, reveal
from services.notifications.handlers import NotificationHandler
from services.notifications.metrics import NotificationMetrics
from services.notifications.policy import NotificationRules
from services.notifications.providers import OutgoingMessage, ProviderConfig, SendResult
from services.notifications.sender import Dispatcher
from services.notifications.templates import Templates
from shared.auth import KeyRing
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import Record
from shared.clock import FixedClock
from shared.config import ApiKey
from shared.crypto import DecryptionError, Vault
from shared.db import setup_database
from shared.http import create_app
from shared.metrics import ServiceMetrics
from shared.pii import contains_pii
from shared.rules import load_rules
from shared.topics import IDENTITY_PROFILES, PROFILE, TRIGGER, TRIGGERS_FIRED
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "notifications" / "migrations"
CODEC = AvroCodec(SchemaRegistry.load())
RULES = NotificationRules.from_rules(load_rules(environ={}))
TEMPLATES = Templates(RULES.kinds, RULES.locales)
NOON = dt.datetime(2026, 6, 10, 12, 0, tzinfo=dt.UTC)
EMAIL, PHONE, WHATSAPP = "mei.chen@example.com", "+8613812345678", "+8613987654321"
CLEAR = (EMAIL, PHONE, PHONE.lstrip("+"), WHATSAPP, WHATSAPP.lstrip("+"), "13812345678")


def vault(*kids: str) -> Vault:
    """A vault from the environment variables an operator sets; key ids name fixed test keys."""
    keys = ",".join(f"{k}:{base64.b64encode(k.encode().ljust(32, b'.')).decode()}" for k in kids)
    return Vault.from_env({"OMNICRM_DATA_KEYS": keys,
                           "OMNICRM_INDEX_KEY": base64.b64encode(os.urandom(32)).decode()},
                          embedded=False)


def record(topic, subject, value, key: str) -> Record:
    raw = CODEC.encode(subject, value) if value is not None else None
    return Record(topic.name, 0, 0, key.encode(), CODEC.decode(raw, subject) if raw else None, raw, 0)


def profile(cid: str, *, consents=None) -> Record:
    return record(IDENTITY_PROFILES, PROFILE, {
        "customer_id": cid,
        "identifiers": {"email": [EMAIL], "phone": [PHONE], "whatsapp_id": [WHATSAPP]},
        "first_name": "Mei", "locale": "en", "timezone": "UTC",
        "consents": consents if consents is not None else {"sms": "opted_in", "email": "opted_in"},
        "created_at": NOON, "updated_at": NOON, "version": 1}, cid)


def tombstone(cid: str) -> Record:
    return record(IDENTITY_PROFILES, PROFILE, None, cid)


def trigger(tid: str, cid: str, kind: str = "welcome", at: dt.datetime = NOON) -> Record:
    return record(TRIGGERS_FIRED, TRIGGER, {
        "trigger_id": tid, "kind": kind, "customer_id": cid, "fired_at": at, "period": "",
        "context": {}, "offer": None, "cause_event_id": None, "occurred_at": at}, cid)


class Recorder:
    """A provider that keeps what it was asked to send: proves the dispatcher opened the address."""

    def __init__(self, channel: str) -> None:
        self.name = f"recorder-{channel}"
        self.channel = channel
        self.sent: list[OutgoingMessage] = []

    async def send(self, message: OutgoingMessage) -> SendResult:
        self.sent.append(message)
        return SendResult(self.name, f"rec-{message.notification_id}")


class Env:
    def __init__(self, pool) -> None:
        self.pool = pool
        self.clock = FixedClock(NOON)
        self.metrics = NotificationMetrics(ServiceMetrics("notifications"))
        self.providers = {ch: Recorder(ch) for ch in ("whatsapp", "sms", "email")}

    async def apply(self, v: Vault, *records: Record) -> None:
        handler = NotificationHandler(codec=CODEC, clock=self.clock, rules=RULES, templates=TEMPLATES,
                                      metrics=self.metrics, vault=v)
        async with self.pool.acquire() as conn, conn.transaction():
            await handler(conn, list(records))

    async def send_due(self, v: Vault) -> None:
        """Run a dispatcher with vault `v` until nothing is left pending."""
        d = Dispatcher(self.pool, None, providers=self.providers, codec=CODEC, clock=self.clock,
                       rules=RULES, metrics=self.metrics, idle_poll=0.05, vault=v)
        await d.start()
        try:
            async def done() -> bool:
                await d.dispatch_once()
                await d.drain()
                return await self.pool.fetchval(
                    "SELECT count(*) FROM notifications WHERE status IN ('pending', 'deferred')") == 0
            await eventually(done, timeout=10, interval=0.05, message="due sends dispatched")
        finally:
            await d.stop()

    def sent_to(self, channel: str) -> list[str]:
        return [m.to for m in self.providers[channel].sent]


@pytest.fixture
async def env(database, unique):
    pool = await setup_database(database, f"notif_{unique}", MIGRATIONS)
    try:
        yield Env(pool)
    finally:
        await pool.close()


async def clear_contact_data(db) -> list[str]:
    """Every email/phone found in clear in any table of the schema, as `table.column: value`."""
    found: list[str] = []
    tables = [r["table_name"] for r in await db.fetch(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'")]
    assert {"contacts", "notifications", "erasures", "outbox_batches"} <= set(tables)
    for table in tables:
        for row in await db.fetch(f'SELECT * FROM "{table}"'):
            for column, value in row.items():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes | bytearray | memoryview):
                        hits = [v for v in CLEAR if v.encode() in bytes(item)]
                    else:
                        text = item if isinstance(item, str) else orjson.dumps(
                            item, default=str).decode()
                        hits = contains_pii(text) + [v for v in CLEAR if v in text]
                    found += [f"{table}.{column}: {h}" for h in hits]
    return found


async def test_no_clear_email_or_phone_in_any_table_and_the_sender_still_reaches_them(env):
    await env.apply(vault("k1"), profile("c1"), trigger("t1", "c1"),
                    profile("c2", consents={"email": "opted_in"}), trigger("t2", "c2"),
                    profile("c3", consents={"whatsapp": "opted_in"}), trigger("t3", "c3"))
    await env.send_due(vault("k1"))
    assert env.sent_to("sms") == [PHONE]
    assert env.sent_to("email") == [EMAIL]
    assert env.sent_to("whatsapp") == [WHATSAPP]
    bodies = [r["body"] for r in await env.pool.fetch("SELECT body FROM notifications")]
    assert len(bodies) == 3 and all(b.startswith("Welcome, Mei!") for b in bodies)
    assert await env.pool.fetchval("SELECT count(*) FROM contacts WHERE key_id = 'k1'") == 3
    assert await clear_contact_data(env.pool) == []
    # The scan does see clear values, in text and in bytes (so its empty answer means something).
    async with env.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute("INSERT INTO stores VALUES ($1, 'UTC')", f"note {WHATSAPP}")
            await conn.execute("UPDATE contacts SET emails_sealed = ARRAY[$1::bytea] "
                               "WHERE customer_id = 'c2'", EMAIL.encode())
            assert sorted(await clear_contact_data(conn)) == sorted([
                f"stores.store_id: {WHATSAPP}", f"stores.store_id: {WHATSAPP}",
                f"stores.store_id: {WHATSAPP.lstrip('+')}", f"contacts.emails_sealed: {EMAIL}"])
        finally:
            await tx.rollback()
    # A sealed value is bound to its row: copied to another customer it does not open.
    rows = {r["customer_id"]: r for r in await env.pool.fetch("SELECT * FROM contacts")}
    await env.pool.execute("UPDATE contacts SET phones_sealed = $1 WHERE customer_id = 'c2'",
                           rows["c1"]["phones_sealed"])
    stolen = contact_from_row(await env.pool.fetchrow("SELECT * FROM contacts WHERE customer_id = 'c2'"))
    with pytest.raises(DecryptionError):
        reveal(stolen.phones[0], vault("k1"))


async def test_key_rotation_opens_old_rows_and_rekey_moves_them_to_the_new_key(env):
    old, rotated, new_only = vault("k1"), vault("k2", "k1"), vault("k2")
    await env.apply(old, *[profile(f"c{i}") for i in range(7)], trigger("t0", "c0"))
    # New key first, old second: rows sealed under k1 still open when sending.
    await env.send_due(rotated)
    assert env.sent_to("sms") == [PHONE]
    await env.apply(rotated, profile("c-new"))
    keys = {r["customer_id"]: r["key_id"] for r in await env.pool.fetch("SELECT customer_id, key_id FROM contacts")}
    assert keys.pop("c-new") == "k2" and set(keys.values()) == {"k1"}

    async with env.pool.acquire() as conn:
        report = await store.rekey(conn, rotated, batch_size=3)  # several batches
        assert (report.active_key_id, report.resealed, report.unreadable) == ("k2", 7, 0)
        assert (await store.rekey(conn, rotated)).resealed == 0  # nothing left to do
    rows = await env.pool.fetch("SELECT * FROM contacts")
    assert {r["key_id"] for r in rows} == {"k2"}
    blobs = [b for r in rows for c in ("emails_sealed", "phones_sealed", "whatsapp_ids_sealed")
             for b in r[c]]
    assert len(blobs) == 8 * 3 and {new_only.key_id_of(bytes(b)) for b in blobs} == {"k2"}
    # The old key can be dropped: the new key alone opens every row, the old one none.
    for r in rows:
        c = contact_from_row(r)
        assert (reveal(c.emails[0], new_only), reveal(c.phones[0], new_only),
                reveal(c.whatsapp_ids[0], new_only)) == (EMAIL, PHONE, WHATSAPP)
        with pytest.raises(DecryptionError):
            reveal(c.emails[0], old)
    await env.apply(new_only, trigger("t1", "c1"))
    await env.send_due(new_only)
    assert env.sent_to("sms") == [PHONE, PHONE]
    assert await clear_contact_data(env.pool) == []
    # Rows under a key the vault does not hold are left alone and reported.
    async with env.pool.acquire() as conn:
        report = await store.rekey(conn, vault("k3"))
    assert (report.resealed, report.unreadable) == (0, 8)
    assert {r["key_id"] for r in await env.pool.fetch("SELECT key_id FROM contacts")} == {"k2"}


async def test_a_contact_sealed_with_a_dropped_key_fails_the_channel_without_sending(env):
    await env.apply(vault("k1"), profile("c1"), trigger("t1", "c1"))
    await env.send_due(vault("k2"))
    rows = {r["channel"]: r for r in await env.pool.fetch("SELECT channel, status, reason FROM notifications")}
    assert (rows["sms"]["status"], rows["sms"]["reason"]) == ("failed", "contact_unreadable")
    assert (rows["email"]["status"], rows["email"]["reason"]) == ("failed", "contact_unreadable")
    assert env.sent_to("sms") == env.sent_to("email") == []


async def test_tombstone_deletes_sealed_values_records_the_erasure_and_admins_can_read_it(env):
    v = vault("k1")
    env.clock.set(dt.datetime(2026, 6, 10, 22, 0, tzinfo=dt.UTC))  # quiet hours: the send waits
    await env.apply(v, profile("c1"), trigger("t1", "c1", at=env.clock.now()), profile("c2"))
    assert await env.pool.fetchval("SELECT status FROM notifications") == "deferred"
    erased_at = env.clock.now()
    await env.apply(v, tombstone("c1"), tombstone("never-seen"))
    assert await env.pool.fetch("SELECT * FROM contacts WHERE customer_id = 'c1'") == []
    assert await env.pool.fetchval("SELECT count(*) FROM contacts") == 1  # c2 untouched
    assert await env.pool.fetchval("SELECT body FROM notifications WHERE customer_id = 'c1'") is None
    env.clock.set(erased_at + dt.timedelta(hours=1))
    await env.apply(v, tombstone("c1"))  # a replayed tombstone keeps the first record

    keys = KeyRing([ApiKey("ops", "admin-secret", frozenset({"admin"})),
                    ApiKey("reader", "read-secret", frozenset({"read", "read_pii"}))])
    app = create_app("notifications", keyring=keys, metrics=env.metrics.base, ready=lambda: None)
    install_routes(app, pool=lambda: env.pool, codec=CODEC, clock=env.clock, config=ProviderConfig(),
                   metrics=env.metrics)
    admin = {"Authorization": "Bearer admin-secret"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        r = await client.get("/v1/erasures/c1", headers=admin)
        assert r.status_code == 200
        assert r.json() == {"service": "notifications", "customer_id": "c1",
                            "erased_at": erased_at.isoformat(),
                            "what": ["contact", "message_content", "pending_notifications"]}
        # Seen only as a tombstone: the erasure was applied, there was nothing to drop.
        assert (await client.get("/v1/erasures/never-seen", headers=admin)).json()["what"] == []
        missing = await client.get("/v1/erasures/c2", headers=admin)
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        forbidden = await client.get("/v1/erasures/c1", headers={"Authorization": "Bearer read-secret"})
        assert forbidden.status_code == 403
        assert (await client.get("/v1/erasures/c1")).status_code == 401
    assert await clear_contact_data(env.pool) == []
