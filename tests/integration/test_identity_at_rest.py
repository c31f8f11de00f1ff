"""Contact data at rest (issue 12): what identity keeps in PostgreSQL holds no clear email or phone,
lookups go through the blind index, a rotated data key still opens old rows and `rekey` moves them
to the new key, and a database from before the encryption migration is converted in place."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import pytest

from services.identity import store
from services.identity.handlers import IdentityHandler
from services.identity.resolution import customer_id_for
from shared.crypto import DecryptionError, Vault
from shared.db import setup_database
from tests.integration.test_identity_handler import (
    CODEC,
    MIGRATIONS,
    SALE,
    T0,
    Identity,
    auth,
    event,
)

pytestmark = pytest.mark.asyncio
EMAILS = ("mei.chen@example.com", "bob@example.com", "ann@example.com")
PHONES = ("+12125550100", "+12125550122", "+12125550999", "+8613812345678")
# Written forms as well as normalised ones, and the digits alone (a WhatsApp id is the number sans +).
CLEAR = re.compile(r"[a-z0-9.]+@example\.com|2125550\d{3}|13812345678", re.IGNORECASE)


@pytest.fixture
async def identity(database, unique):
    pool = await setup_database(database, f"identity_{unique}", MIGRATIONS, max_size=6)
    try:
        yield Identity(pool)
    finally:
        await pool.close()


def b64key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def vault(keys: list[tuple[str, str]], index: str) -> Vault:
    return Vault.from_env({"OMNICRM_DATA_KEYS": ",".join(f"{k}:{v}" for k, v in keys),
                           "OMNICRM_INDEX_KEY": index}, embedded=False)


def use_vault(identity: Identity, v: Vault) -> None:
    identity.handler = IdentityHandler(codec=CODEC, normaliser=identity.normaliser,
                                       guard=identity.handler.guard, metrics=identity.imetrics,
                                       clock=identity.handler.clock, vault=v)
    identity.vault = v


async def dump_tables(pool) -> str:
    """Every row of every identity table except the outbox's (the topic payload staging area) as
    text; bytea columns render as hex, so their UTF-8 decoding is added too."""
    tables = [r["table_name"] for r in await pool.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
        "AND table_type = 'BASE TABLE' AND table_name <> 'outbox_batches'")]
    parts = []
    for t in tables:
        for row in await pool.fetch(f'SELECT * FROM "{t}"'):  # noqa: S608 - names from the catalog
            for v in row.values():
                if isinstance(v, bytes):
                    parts.append(v.decode("latin-1"))
                parts.append(str(v))
    return "\n".join(parts)


async def story(identity: Identity) -> None:
    await identity.apply(event("pos-1", "sale", 0, None, SALE, phone="+1 (212) 555-0100"))
    await identity.apply(event("web-1", "signup", 60, None, {"first_name": "Mei"},
                               email=" Mei.Chen@Example.com "))
    await identity.apply(event("wa-1", "message_received", 120, None, {"channel": "whatsapp"},
                               whatsapp_id="12125550100", email="mei.chen@example.com"))
    await identity.apply(event("cn-1", "sale", 130, None, SALE, phone="+86 138 1234 5678",
                               email="bob@example.com"))
    for i in range(1, 6):  # a shared store phone: quarantine entries, sightings and profile notes
        await identity.apply(event(f"q-{i}", "sale", 140 + i, None, SALE, loyalty_id=f"LQ-{i}",
                                   phone="+12125550999"))


async def test_identity_tables_hold_no_clear_contact_data(identity: Identity) -> None:
    await story(identity)
    text = await dump_tables(identity.pool)
    assert await identity.pool.fetchval("SELECT count(*) FROM identifiers WHERE sealed IS NOT NULL") >= 5
    assert await identity.pool.fetchval("SELECT count(*) FROM quarantined_identifiers") == 1
    assert await identity.pool.fetchval("SELECT count(*) FROM sightings") > 0
    assert "LQ-1" in text  # non-contact ids stay clear (the dump really covers the tables)
    found = CLEAR.findall(text)
    assert not found, f"{len(found)} clear contact values at rest"
    # ... yet everything still resolves and reads back in clear for a read_pii key.
    pos = customer_id_for("pos-1")
    async with identity.client() as http:
        r = await http.get("/v1/customers/lookup", params={"email": "MEI.CHEN@example.com"},
                           headers=auth("reader-secret"))
        assert r.json() == {"customer_id": pos}
        full = (await http.get(f"/v1/customers/{pos}", headers=auth("pii-secret"))).json()
    assert full["identifiers"]["email"] == ["mei.chen@example.com"]
    assert full["identifiers"]["whatsapp_id"] == ["+12125550100"]
    q_owner = await identity.pool.fetchval(
        "SELECT customer_id FROM identifiers WHERE id_type = 'loyalty_id' AND value = 'LQ-1'")
    async with identity.client() as http:
        q = (await http.get(f"/v1/customers/{q_owner}", headers=auth("pii-secret"))).json()
    assert {"type": "phone", "value": "+12125550999", "reason": "shared_identifier"} in q["quarantined"]


async def test_rotated_key_opens_old_rows_and_rekey_moves_them(identity: Identity) -> None:
    index, k1, k2 = b64key(), b64key(), b64key()
    old, rotated, new_only = vault([("k1", k1)], index), vault([("k2", k2), ("k1", k1)], index), \
        vault([("k2", k2)], index)
    use_vault(identity, old)
    await story(identity)
    kids = "SELECT DISTINCT substring(sealed FROM 3 FOR get_byte(sealed, 1)) FROM identifiers " \
           "WHERE sealed IS NOT NULL"
    assert [bytes(r[0]) for r in await identity.pool.fetch(kids)] == [b"k1"]

    # New key first, old second: old rows still open, new rows are sealed with k2.
    use_vault(identity, rotated)
    await identity.apply(event("new-1", "sale", 200, None, SALE, email="mei.chen@example.com",
                               phone="+12125550177"))
    assert {bytes(r[0]) for r in await identity.pool.fetch(kids)} == {b"k1", b"k2"}
    pos = customer_id_for("pos-1")
    async with identity.pool.acquire() as conn:
        c = await store.customer_with_identifiers(conn, pos, identity.handler.sealer)
        assert c is not None and ("email", "mei.chen@example.com") in c.identifiers
        assert ("phone", "+12125550177") in c.identifiers and ("phone", "+12125550100") in c.identifiers
        # Without k1 the old rows cannot be opened (so the old key must stay until rekey ran) ...
        with pytest.raises(DecryptionError):
            await store.customer_with_identifiers(conn, pos, IdentityHandler(
                codec=CODEC, normaliser=identity.normaliser, guard=identity.handler.guard,
                metrics=identity.imetrics, clock=identity.handler.clock, vault=new_only).sealer)
        # ... rekey re-seals every old row and profile note under k2, in batches ...
        counts = await store.rekey(conn, rotated, batch=2)
        assert counts["identifiers"] >= 5 and counts["customers_notes"] >= 1
        assert [bytes(r[0]) for r in await conn.fetch(kids)] == [b"k2"]
        assert (await store.rekey(conn, rotated))["identifiers"] == 0
    # ... after which the old key can go.
    use_vault(identity, new_only)
    async with identity.pool.acquire() as conn:
        c = await store.customer_with_identifiers(conn, pos, identity.handler.sealer)
        assert c is not None and ("whatsapp_id", "+12125550100") in c.identifiers
        q_owner = await conn.fetchval(
            "SELECT customer_id FROM identifiers WHERE id_type = 'loyalty_id' AND value = 'LQ-1'")
        q = await store.customer_with_identifiers(conn, q_owner, identity.handler.sealer)
        assert q is not None and q.quarantined[0]["value"] == "+12125550999"
    await identity.apply(event("new-2", "page_view", 210, None, {"url": "/"}, email="bob@example.com"))
    resolved = await identity.outbox("identity.events.v1")
    assert resolved[-1][0] == customer_id_for("cn-1")  # the blind index did not change


async def test_database_from_before_encryption_is_converted(database, unique, tmp_path: Path) -> None:
    old_dir = tmp_path / "identity" / "migrations"
    old_dir.mkdir(parents=True)
    shutil.copy(MIGRATIONS / "001_identity.sql", old_dir)
    schema = f"identity_{unique}"
    pool = await setup_database(database, schema, old_dir, max_size=2)
    try:  # what 001 kept in clear
        await pool.execute(
            "INSERT INTO customers (customer_id, created_at, updated_at, quarantined) "
            "VALUES ('c-old', $1, $1, $2)", T0,
            [{"type": "phone", "value": "+12125550999", "reason": "type_limit"}])
        await pool.execute(
            "INSERT INTO identifiers VALUES ('email', 'ann@example.com', 'c-old', 'c-old', $1, 'e0'),"
            " ('loyalty_id', 'L-9', 'c-old', 'c-old', $1, 'e0')", T0)
        await pool.execute("INSERT INTO sightings VALUES ('phone', '+12125550999', 'c-x', $1)", T0)
    finally:
        await pool.close()
    pool = await setup_database(database, schema, MIGRATIONS, max_size=2)
    try:
        identity = Identity(pool)
        await identity.apply(event("later-1", "sale", 10, None, SALE, email="ann@example.com"))
        assert (await identity.outbox("identity.events.v1"))[0][0] == "c-old"
        assert await pool.fetchval("SELECT to_regclass('identifiers_v1')") is None
        assert not CLEAR.findall(await dump_tables(pool))
        assert await pool.fetchval("SELECT count(*) FROM sightings") == 1
        async with pool.acquire() as conn:
            c = await store.customer_with_identifiers(conn, "c-old", identity.handler.sealer)
        assert c is not None and c.identifiers == {("email", "ann@example.com"), ("loyalty_id", "L-9")}
        assert c.quarantined == [{"type": "phone", "value": "+12125550999", "reason": "type_limit"}]
        # A second worker (fresh process) finds nothing left to convert.
        async with pool.acquire() as conn:
            assert await store.convert_legacy(conn, identity.handler.sealer) is None
    finally:
        await pool.close()
