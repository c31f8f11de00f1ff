"""The transactional outbox: rows written in the service's transaction, published by a relay after commit.

A crash between commit and publish loses nothing (the row stays unsent); a crash between publish
and marking sent republishes the same bytes, which carry deterministic ids downstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from shared.db import TRANSIENT_DB_ERRORS, _lock_key
from shared.metrics import ServiceMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A record to publish: topic, key (UTF-8 string) and encoded value (None = tombstone)."""

    topic: str
    key: str | None
    value: bytes | None


_INSERT = """
INSERT INTO outbox (topic, key, value)
SELECT t, k, v FROM unnest($1::text[], $2::bytea[], $3::bytea[]) AS u(t, k, v)
"""


async def add_to_outbox(conn: asyncpg.Connection, messages: Sequence[OutboxMessage]) -> None:
    """Write messages in the caller's transaction: one round trip for the whole batch."""
    if not messages:
        return
    await conn.execute(
        _INSERT,
        [m.topic for m in messages],
        [m.key.encode() if m.key is not None else None for m in messages],
        [m.value for m in messages],
    )


class OutboxRelay:
    """Publishes unsent outbox rows in id order and marks them sent once the broker acknowledged.

    One relay per schema publishes at a time (a transaction-scoped advisory lock), so records
    for one key keep their order even with several workers.
    """

    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, schema: str,
                 metrics: ServiceMetrics | None = None, batch_size: int = 2000,
                 idle_poll: float = 0.25, retention_seconds: int = 3600) -> None:
        self.pool = pool
        self.producer = producer
        self.metrics = metrics
        self.batch_size = batch_size
        self.idle_poll = idle_poll
        self.retention_seconds = retention_seconds
        self._lock_key = _lock_key(f"omnicrm-outbox-{schema}")
        self._wake = asyncio.Event()
        self.healthy = True
        self.published = 0

    def wake(self) -> None:
        """Tell the relay there is something new (after a commit)."""
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.1
        purge_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                sent = await self.publish_once()
                self.healthy = True
                backoff = 0.1
                if loop.time() > purge_at:
                    await self._purge_and_measure()
                    purge_at = loop.time() + 5.0
            except (KafkaError, *TRANSIENT_DB_ERRORS) as exc:
                self.healthy = False
                log.warning("outbox relay retrying after %s", type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception:  # noqa: BLE001 - the relay must outlive any one failure; rows stay unsent
                self.healthy = False
                log.exception("outbox relay failed; retrying")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if sent < self.batch_size:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.idle_poll)

    async def publish_once(self) -> int:
        """Publish one batch of unsent rows; returns how many were published."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", self._lock_key):
                return 0
            rows = await conn.fetch(
                "SELECT id, topic, key, value FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1",
                self.batch_size,
            )
            if not rows:
                return 0
            futures = [
                await self.producer.send(r["topic"], value=r["value"], key=r["key"]) for r in rows
            ]
            await asyncio.gather(*futures)
            await conn.execute(
                "UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])",
                [r["id"] for r in rows],
            )
        if self.metrics is not None:
            counts: dict[str, int] = {}
            for r in rows:
                counts[r["topic"]] = counts.get(r["topic"], 0) + 1
            for topic, n in counts.items():
                self.metrics.events_produced.labels(topic=topic).inc(n)
        self.published += len(rows)
        return len(rows)

    async def _purge_and_measure(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM outbox WHERE sent_at < now() - make_interval(secs => $1)",
                float(self.retention_seconds),
            )
            if self.metrics is not None:
                row = await conn.fetchrow(
                    "SELECT count(*) AS n, extract(epoch FROM now() - min(created_at)) AS age "
                    "FROM outbox WHERE sent_at IS NULL"
                )
                self.metrics.outbox_backlog.set(row["n"])
                self.metrics.outbox_oldest_age.set(float(row["age"] or 0.0))


async def outbox_backlog(conn: asyncpg.Connection) -> int:
    """Unsent rows (tests and readiness use it)."""
    return await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
