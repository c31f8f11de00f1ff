"""shared.db.json_rows: rows sent as one JSON document arrive in PostgreSQL exactly as the typed
arrays they replace would have delivered them (the services' batch writes depend on it)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from shared.db import create_pool, json_rows

pytestmark = pytest.mark.asyncio

NEW_YORK = ZoneInfo("America/New_York")


async def test_values_of_every_kind_the_services_send_arrive_unchanged(database, unique):
    rows = [
        ("quote \" backslash \\ newline \n tab \t", dt.datetime(2026, 3, 8, 1, 59, 59, 999_999, tzinfo=NEW_YORK),
         dt.date(1990, 2, 28), 0.1, 2**62, True, {"email": True, "ß": "✓"}, b"\x00\xff\xc3\x01".hex()),
        ("Zoë 東京 🛍", dt.datetime(2026, 11, 1, 6, 30, tzinfo=dt.UTC), None, -1e-300, -(2**62), False, {}, None),
        (None, None, None, None, None, None, None, None),
    ]
    pool = await create_pool(database, f"jr_{unique}")
    try:
        async with pool.acquire() as conn:
            got = await conn.fetch(
                "SELECT e->>0 AS t, (e->>1)::timestamptz AS at, (e->>2)::date AS d, (e->>3)::float8 AS f,"
                " (e->>4)::bigint AS n, (e->>5)::boolean AS b, nullif(e->6, 'null'::jsonb) AS j,"
                " decode(e->>7, 'hex') AS raw"
                " FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS u(e, i) ORDER BY i",
                json_rows(rows))
    finally:
        await pool.close()
    assert [tuple(r) for r in got] == [
        (*rows[0][:7], b"\x00\xff\xc3\x01"),
        (*rows[1][:7], None),
        rows[2],
    ]
    # The instant, not just the wall time: the zone's offset travelled with it.
    assert got[0]["at"] == dt.datetime(2026, 3, 8, 6, 59, 59, 999_999, tzinfo=dt.UTC)
