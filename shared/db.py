"""PostgreSQL: one asyncpg pool per service, its own schema, and its SQL migrations applied at start."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from shared import pg_timestamptz
from shared.errors import ConfigError, TransientError

log = logging.getLogger(__name__)
RUNTIME_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Errors worth retrying: the server went away, is starting, or the pool could not connect.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.InterfaceError,
    # A backend terminated mid-query can leave the client protocol in a state it reports this way
    # (seen with pg_terminate_backend under load); the pool replaces the connection on release.
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)


def check_schema_name(schema: str) -> str:
    if not _SCHEMA_NAME.match(schema):
        raise ConfigError("schema", f"{schema!r} is not a plain lower-case identifier")
    return schema


def _jsonb_out(value: Any) -> bytes:
    return b"\x01" + orjson.dumps(value)


def _jsonb_in(data: bytes) -> Any:
    return orjson.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in its binary form (a version byte, 1, and the JSON text): what binary COPY requires, and
    # no text decoding on either side.
    await conn.set_type_codec("jsonb", encoder=_jsonb_out, decoder=_jsonb_in, schema="pg_catalog",
                              format="binary")
    await conn.set_type_codec("json", encoder=lambda v: orjson.dumps(v).decode(),
                              decoder=orjson.loads, schema="pg_catalog")
    if pg_timestamptz.COMPILED:  # as source, asyncpg's own codec is the faster one
        await conn.set_type_codec("timestamptz", encoder=pg_timestamptz.encode,
                                  decoder=pg_timestamptz.decode, schema="pg_catalog", format="tuple")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's reset query (advisory unlock all, CLOSE ALL, UNLISTEN, RESET ALL).

    That query is a round trip on every release, i.e. on every batch of every service, for state
    this code never leaves on a pooled connection: settings are SET LOCAL, locks are transaction
    locks (the one session lock, `Runtime.as_leader`, is released in a finally), nothing LISTENs or
    keeps a cursor. asyncpg still rolls back a transaction left open before this is called.
    """


async def create_pool(dsn: str, schema: str, *, min_size: int = 1, max_size: int = 10,
                      statement_timeout_ms: int = 30000) -> asyncpg.Pool:
    """A pool whose connections work in `schema` (then public) with JSON codecs registered."""
    check_schema_name(schema)
    try:
        return await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, init=_init_connection, reset=_keep_session,
            server_settings={
                "search_path": f"{schema},public",
                "statement_timeout": str(statement_timeout_ms),
                "application_name": f"omnicrm-{schema}",
                # Every statement here is a short batch statement, and JIT compiles one for 5-10 ms when
                # its estimated cost passes jit_above_cost, as an unnest-fed statement's estimate easily
                # does (seen 2026-12-07: identity's probe JIT-compiled for 7 ms of its 25; notifications'
                # and triggers' statements too): each run of a custom plan compiles again.
                "jit": "off",
            },
        )
    except TRANSIENT_DB_ERRORS as exc:
        raise TransientError(f"database unreachable: {type(exc).__name__}") from exc


def json_rows(rows: Iterable[Sequence[Any]]) -> str:
    """Rows as one JSON array of arrays, the parameter of a batch statement that reads them back with
    `jsonb_array_elements($1::text::jsonb) AS u(e)` and `(e->>i)::type` per column.

    Why not one array parameter per column for `unnest`: asyncpg checks every element of an array
    parameter in Python (an `isinstance` against collections.abc per element), a third of the triggers
    handler's Python in a py-spy profile; orjson writes the rows in C. Datetimes must carry their zone
    (orjson writes a naive one without an offset, which PostgreSQL would read in the session's zone);
    bytes go as `.hex()` (read with `decode(e->>i, 'hex')`); dicts and lists become JSON (`e->i`)."""
    return orjson.dumps(rows).decode()


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def migration_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.sql") if p.is_file())


async def migrate(pool: asyncpg.Pool, schema: str, directories: Iterable[Path]) -> list[str]:
    """Apply each not-yet-applied `NNN_name.sql` in order, once, under an advisory lock.

    Two workers starting together serialise on the lock; the second finds nothing to do.
    """
    check_schema_name(schema)
    applied_now: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(f"omnicrm-migrate-{schema}"))
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET LOCAL search_path TO "{schema}", public')
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        for directory in directories:
            prefix = directory.parent.name if directory.name == "migrations" else directory.name
            for path in migration_files(directory):
                name = f"{prefix}/{path.name}"
                if name in done:
                    continue
                await conn.execute(path.read_text(encoding="utf-8"))
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                applied_now.append(name)
    if applied_now:
        log.info("applied migrations", extra={"schema": schema, "migrations": applied_now})
    return applied_now


async def setup_database(dsn: str, schema: str, service_migrations: Path | None,
                         **pool_options) -> asyncpg.Pool:
    """Pool + runtime tables + the service's own migrations."""
    pool = await create_pool(dsn, schema, **pool_options)
    dirs = [RUNTIME_MIGRATIONS]
    if service_migrations is not None and service_migrations.is_dir():
        dirs.append(service_migrations)
    await migrate(pool, schema, dirs)
    return pool
