"""Loyalty's erasure record on real PostgreSQL: an applied erase_request is recorded once (what was
dropped, when) and served to admins by `GET /v1/erasures/{customer_id}`; amounts stay."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import httpx
import pytest

from services.loyalty.api import router
from services.loyalty.handlers import LoyaltyHandler
from services.loyalty.rules import LoyaltyRules
from shared.auth import KeyRing
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import Record
from shared.clock import FixedClock
from shared.config import ApiKey
from shared.db import setup_database
from shared.events import for_encoding
from shared.http import create_app
from shared.metrics import ServiceMetrics
from shared.rules import load_rules
from shared.topics import IDENTITY_EVENTS, RESOLVED

pytestmark = pytest.mark.asyncio
MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "loyalty" / "migrations"
CODEC = AvroCodec(SchemaRegistry.load())
RULES = LoyaltyRules.from_config(load_rules())
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
_offsets = itertools.count()
READ = ApiKey("reader", "read-secret", frozenset({"read"}))
ADMIN = ApiKey("ops", "admin-secret", frozenset({"read", "admin"}))


def resolved(customer_id: str, event_type: str, event_id: str, at: dt.datetime, **props) -> Record:
    event = {"event_id": event_id, "type": event_type, "occurred_at": at, "source": "pos",
             "store_id": "soho", "customer": {"loyalty_id": f"L-{customer_id}"},
             "properties": props or ({} if event_type == "erase_request" else None)}
    raw = CODEC.encode(RESOLVED, {"customer_id": customer_id, "identifiers": [],
                                  "event": for_encoding(event)})
    return Record(IDENTITY_EVENTS.name, 0, next(_offsets), customer_id.encode(),
                  CODEC.decode(raw, RESOLVED), raw, 0)


def sale(cid: str, eid: str, total: int, order: str, at: dt.datetime = T0) -> Record:
    return resolved(cid, "sale", eid, at, order_id=order, currency="USD", total=total, lines=[],
                    points_redeemed=0)


@pytest.fixture
async def pool(database, unique):
    pool = await setup_database(database, f"loyalty_erase_{unique}", MIGRATIONS)
    try:
        yield pool
    finally:
        await pool.close()


async def test_erase_request_is_recorded_once_and_served_to_admins(pool, unique):
    handler = LoyaltyHandler(RULES, CODEC, FixedClock(T0))
    gus, ida = f"gus-{unique}", f"ida-{unique}"

    async def feed(*records: Record) -> None:
        async with pool.acquire() as conn, conn.transaction():
            await handler(conn, list(records))

    await feed(sale(gus, "s1", 120_00, "ORD-gus-1"), sale(ida, "s2", 80_00, "ORD-ida-1"))
    erased_at = T0 + dt.timedelta(hours=2)
    await feed(resolved(gus, "erase_request", "erase-1", erased_at))
    # A re-delivered erase_request (and a later one) keeps the first record.
    await feed(resolved(gus, "erase_request", "erase-1", erased_at),
               resolved(gus, "erase_request", "erase-2", erased_at + dt.timedelta(days=1)))

    rows = await pool.fetch("SELECT customer_id, erased_at, what FROM erasures")
    assert [(r["customer_id"], r["erased_at"], list(r["what"])) for r in rows] == [
        (gus, erased_at, ["order_refs"])]
    # Amounts kept, anonymised; the other customer untouched.
    assert await pool.fetchval("SELECT balance FROM accounts WHERE customer_id = $1", gus) == 120
    assert await pool.fetchval("SELECT count(*) FROM ledger WHERE order_id IS NOT NULL "
                               "AND customer_id = $1", gus) == 0
    assert await pool.fetchval("SELECT order_id FROM orders WHERE owner = $1", ida) == "ORD-ida-1"

    app = create_app("loyalty", keyring=KeyRing([READ, ADMIN]), metrics=ServiceMetrics("loyalty_erase"),
                     ready=lambda: None)
    app.include_router(router(lambda: pool, RULES, FixedClock(T0)))
    admin = {"Authorization": "Bearer admin-secret"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        r = await client.get(f"/v1/erasures/{gus}", headers=admin)
        assert r.status_code == 200, r.text
        assert r.json() == {"service": "loyalty", "customer_id": gus,
                            "erased_at": erased_at.isoformat(), "what": ["order_refs"]}
        missing = await client.get(f"/v1/erasures/{ida}", headers=admin)
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        assert (await client.get(f"/v1/erasures/{gus}")).status_code == 401
        assert (await client.get(f"/v1/erasures/{gus}",
                                 headers={"Authorization": "Bearer read-secret"})).status_code == 403
