"""The transactional outbox: rows written in the service's transaction, published by a relay after commit.

A crash between commit and publish loses nothing (the row stays unsent); a crash between publish
and marking sent republishes the same bytes, which carry deterministic ids downstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from shared.db import TRANSIENT_DB_ERRORS, _lock_key
from shared.metrics import ServiceMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A record to publish: topic, key (UTF-8 string) and encoded value (None = tombstone).

    `at`: the event time the record stands for, where its value cannot carry it (a tombstone);
    published as the EVENT_AT_HEADER header."""

    topic: str
    key: str | None
    value: bytes | None
    at: dt.datetime | None = None


EVENT_AT_HEADER = "omnicrm-event-at"  # epoch milliseconds, ASCII
_NO_HEADERS: list[tuple[str, bytes]] = []  # aiokafka's builder wants a list; never appended to

# The most records one outbox row holds: a relay round takes whole rows (see OutboxRelay).
ROW_RECORDS = 10_000


def _insert_rows(count: int) -> str:
    values = ", ".join(f"(${i * 5 + 1}, ${i * 5 + 2}, ${i * 5 + 3}, ${i * 5 + 4}, ${i * 5 + 5})"
                       for i in range(count))
    return f"INSERT INTO outbox_batches (topic, n, keys, vals, event_ats) VALUES {values}"


_INSERT_ROWS = [_insert_rows(count) for count in range(1, 5)]


async def add_to_outbox(conn: asyncpg.Connection, messages: Sequence[OutboxMessage]) -> None:
    """Write messages in the caller's transaction: one row per topic (arrays of keys, values and event
    times, in the messages' order), one statement for the whole batch.

    Not a row per message: its insert, its mark as sent and its index entries cost the server ~17 us a
    message against ~2 us (shared/migrations/003_outbox_batches.sql).
    """
    if not messages:
        return
    by_topic: dict[str, list[OutboxMessage]] = {}
    for m in messages:
        group = by_topic.get(m.topic)
        if group is None:
            group = by_topic[m.topic] = []
        group.append(m)
    args: list[Any] = []
    for topic, group in by_topic.items():
        for start in range(0, len(group), ROW_RECORDS):
            part = group[start:start + ROW_RECORDS]
            keys = [m.key.encode() if m.key is not None else None for m in part]
            ats = [m.at for m in part] if any(m.at is not None for m in part) else None
            args += (topic, len(part), keys, [m.value for m in part], ats)
    rows = len(args) // 5
    if rows <= len(_INSERT_ROWS):
        await conn.execute(_INSERT_ROWS[rows - 1], *args)
    else:
        await conn.executemany(_INSERT_ROWS[0], [args[i:i + 5] for i in range(0, len(args), 5)])


def event_at_header(at: dt.datetime | None) -> list[tuple[str, bytes]]:
    if at is None:
        return []
    return [(EVENT_AT_HEADER, str((at - _EPOCH) // _MILLISECOND).encode())]


def event_at_of(headers: Sequence[tuple[str, bytes]] | None) -> dt.datetime | None:
    """The EVENT_AT_HEADER time of a consumed record, if it has one."""
    for name, value in headers or ():
        if name == EVENT_AT_HEADER:
            try:
                return _EPOCH + int(value) * _MILLISECOND
            except (TypeError, ValueError):
                return None
    return None


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MILLISECOND = dt.timedelta(milliseconds=1)
_RETRYABLE = (KafkaError, *TRANSIENT_DB_ERRORS)  # the relay retries these quietly


# Rows found through the partial index of unsent rows, which stays small however many sent rows the
# retention keeps. Joined to unnest (as before) or by `id = ANY($1)` alone, plans made without
# statistics hashed or scanned the whole outbox: 20 ms per 1000 rows at 50,000 kept rows and 50 ms at
# 300,000, against 7 ms flat this way (measured 2026-12-07).
MARK_SENT = "UPDATE outbox_batches SET sent_at = now() WHERE sent_at IS NULL AND id = ANY($1::bigint[])"
# The oldest unsent rows (their sizes), then the chosen ones' records: both through the index of
# unsent rows, as MARK_SENT.
_NEXT_ROWS = "SELECT id, n FROM outbox_batches WHERE sent_at IS NULL ORDER BY id LIMIT $1"
READ_ROWS = """
SELECT id, topic, keys, vals, event_ats FROM outbox_batches
WHERE sent_at IS NULL AND id = ANY($1::bigint[]) ORDER BY id
"""


class OutboxRelay:
    """Publishes unsent outbox rows in id order (each row's records in their order) and marks them
    sent once the broker acknowledged.

    One relay per schema publishes at a time (a transaction-scoped advisory lock), so records
    for one key keep their order even with several workers.

    `batch_size` records per round (whole rows, at least one; the next round starts at once while rows
    wait). The relay shares its worker's event loop, and each of a round's awaits waits behind the
    consumer's lanes, so under load the rounds, not the records, set its pace. With 2,000 (then a row
    per record), a saturated loyalty worker's relay had published about half of what the worker wrote
    by the end of bench.loyalty (110,000-126,000 of ~239,000 loyalty events); with 10,000, all but a
    few thousand, at the same events/s (measured 2026-12-07).
    """

    def __init__(self, pool: asyncpg.Pool, producer: AIOKafkaProducer, schema: str,
                 metrics: ServiceMetrics | None = None, batch_size: int = 10_000,
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
        self.more_waiting = False  # the last round left unsent rows behind

    def wake(self) -> None:
        """Tell the relay there is something new (after a commit)."""
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.1
        measure_at = purge_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.publish_once()
                self.healthy = True
                backoff = 0.1
                if loop.time() > measure_at:
                    # The backlog metrics every 5 s. The purge reads every row the retention keeps (an
                    # hour of them, no index on sent_at): once a minute, not twelve times.
                    purge = loop.time() > purge_at
                    await self._purge_and_measure(purge=purge)
                    measure_at = loop.time() + 5.0
                    if purge:
                        purge_at = loop.time() + 60.0
            except _RETRYABLE as exc:
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
            if not self.more_waiting:
                self._wake.clear()
                # Not wait_for: on Python 3.11 it swallows a cancel that arrives just as the
                # event is set (a wake right before stop), and the relay then never stops.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.idle_poll):
                        await self._wake.wait()

    async def publish_once(self) -> int:
        """Publish the oldest unsent rows, about `batch_size` records; returns how many records.

        Rows are marked sent in the same transaction, only after the broker acknowledged all of
        them; a failure anywhere rolls back and the rows go again (the same bytes, in id order).
        """
        self.more_waiting = False
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", self._lock_key):
                return 0
            ids, records = [], 0
            waiting = await conn.fetch(_NEXT_ROWS, self.batch_size)
            for row_id, n in waiting:
                if ids and records + n > self.batch_size:
                    break
                ids.append(row_id)
                records += n
            # rows left for the next round (or perhaps, when the look-ahead was full)
            self.more_waiting = len(ids) < len(waiting) or len(waiting) == self.batch_size
            if not ids:
                return 0
            rows = await conn.fetch(READ_ROWS, ids)
            if isinstance(self.producer, AIOKafkaProducer):
                futures, counts = await self._send_batches(rows)
            else:  # anything with aiokafka's `send` (tests wrap the producer)
                futures, counts = await self._send_each(rows)
            await asyncio.gather(*futures)
            await conn.execute(MARK_SENT, ids)
        sent = sum(counts.values())
        if self.metrics is not None:
            for topic, n in counts.items():
                self.metrics.events_produced.labels(topic=topic).inc(n)
        self.published += sent
        return sent

    async def _send_batches(self, rows: list[asyncpg.Record]) -> tuple[list[Any], dict[str, int]]:
        """One record batch per topic-partition instead of one `send` per record.

        `producer.send` costs ~10 us of Python per record (an await, a future, metadata look-ups
        and aiokafka's pure-Python murmur2); here a record costs a partition look-up and an append
        to a builder. Partitions are chosen exactly as the producer's default partitioner would
        (murmur2 of the key; random for a null key), and batches of one partition are queued in
        record order behind each other, so records of one key keep their order.
        """
        producer = self.producer
        custom = None if type(producer._partitioner) is DefaultPartitioner else producer._partitioner
        layouts: dict[str, tuple[list[int], list[int]]] = {}
        builders: dict[tuple[str, int], Any] = {}
        counts: dict[str, int] = {}
        futures: list[Any] = []
        for _id, topic, keys, values, ats in rows:
            layout = layouts.get(topic)
            if layout is None:
                all_partitions = sorted(await producer.partitions_for(topic))
                available = list(producer.client.cluster.available_partitions_for_topic(topic))
                layout = layouts[topic] = (all_partitions, available)
                counts[topic] = 0
            partitions, width = layout[0], len(layout[0])
            for i, key in enumerate(keys):
                if custom is not None:
                    partition = custom(key, *layout)
                elif key is None:
                    partition = random.choice(layout[1] or partitions)
                else:
                    partition = partitions[(murmur2(key) & 0x7FFFFFFF) % width]
                tp = (topic, partition)
                builder = builders.get(tp)
                if builder is None:
                    builder = builders[tp] = producer.create_batch()
                value = values[i]
                at = ats[i] if ats is not None else None
                headers = event_at_header(at) if at is not None else _NO_HEADERS
                if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    # full: ship it, start the next
                    futures.append(await self._ship(builder, tp))
                    builder = builders[tp] = producer.create_batch()
                    if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                        raise KafkaError(f"an outbox record for {topic} does not fit in a producer batch")
            counts[topic] += len(keys)
        for tp, builder in builders.items():
            futures.append(await self._ship(builder, tp))
        return futures, counts

    async def _ship(self, builder: Any, tp: tuple[str, int]) -> Any:
        builder.close()  # nothing else may append to it once queued
        return await self.producer.send_batch(builder, tp[0], partition=tp[1])

    async def _send_each(self, rows: list[asyncpg.Record]) -> tuple[list[Any], dict[str, int]]:
        counts: dict[str, int] = {}
        futures = []
        for _id, topic, keys, values, ats in rows:
            for i, key in enumerate(keys):
                at = ats[i] if ats is not None else None
                futures.append(await self.producer.send(topic, value=values[i], key=key,
                                                        headers=event_at_header(at) or None))
            counts[topic] = counts.get(topic, 0) + len(keys)
        return futures, counts

    async def _purge_and_measure(self, *, purge: bool = True) -> None:
        async with self.pool.acquire() as conn:
            if purge:
                await conn.execute(
                    "DELETE FROM outbox_batches WHERE sent_at < now() - make_interval(secs => $1)",
                    float(self.retention_seconds),
                )
            if self.metrics is not None:
                row = await conn.fetchrow(
                    "SELECT coalesce(sum(n), 0) AS n, extract(epoch FROM now() - min(created_at)) AS age "
                    "FROM outbox_batches WHERE sent_at IS NULL"
                )
                self.metrics.outbox_backlog.set(row["n"])
                self.metrics.outbox_oldest_age.set(float(row["age"] or 0.0))


_M = 0x5BD1E995
_WORDS: dict[int, struct.Struct] = {}


@functools.lru_cache(maxsize=1 << 16)
def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's and aiokafka's partitioner hash), about 5x faster than
    aiokafka's byte-by-byte version: whole 32-bit words, one mask per multiply. Keys repeat (one
    customer's records go to several topics), hence the cache."""
    length = len(data)
    n4 = length >> 2
    words = _WORDS.get(n4)
    if words is None:
        words = _WORDS[n4] = struct.Struct(f"<{n4}I")
    h = 0x9747B28C ^ length
    for k in words.unpack_from(data):
        k = (k * _M) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * _M) & 0xFFFFFFFF
        h = ((h * _M) ^ k) & 0xFFFFFFFF
    tail = length & 3
    if tail:
        base = length & ~3
        if tail >= 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * _M) & 0xFFFFFFFF
    return h ^ (h >> 15)


async def outbox_backlog(conn: asyncpg.Connection) -> int:
    """Unsent records (tests and readiness use it)."""
    return await conn.fetchval("SELECT coalesce(sum(n), 0) FROM outbox_batches WHERE sent_at IS NULL")
