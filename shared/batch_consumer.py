"""The shared batch consumer every hot topic goes through (DESIGN "Service runtime").

getmany -> decode -> handler(conn, records) in ONE PostgreSQL transaction that also advances
the consumer positions stored in the database -> commit -> commit Kafka offsets.

The stored positions make effects exactly-once: the transaction locks the rows of the
partitions in the batch and skips records below the stored position, so a batch re-read after a
crash, or read by two workers across a rebalance, is applied once. Undecodable records and
records the handler rejects permanently go to the dead-letter topic (through the outbox, in the
same transaction) with their reason; the partition keeps moving. Transient failures (database
or broker away) are retried with capped back-off, up to a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata

from shared.avro import AvroCodec
from shared.clock import Clock, WallClock
from shared.db import TRANSIENT_DB_ERRORS
from shared.errors import PermanentError, SchemaError, TransientError
from shared.event_order import EventTimeOrder, PartitionState, event_time
from shared.logs import redact_text
from shared.metrics import ServiceMetrics
from shared.outbox import OutboxMessage, add_to_outbox, event_at_of
from shared.topics import DEAD_LETTER, Topic

log = logging.getLogger(__name__)
UTC = dt.UTC


@dataclass(slots=True)
class Record:
    """One consumed record, decoded."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: Any
    raw: bytes | None
    timestamp_ms: int
    # Event time as the event-time merge ordered it (OMNICRM_CLOCK=event only): the record's own
    # time, or for a tombstone the `omnicrm-event-at` header; None when it has neither.
    at: dt.datetime | None = None


Handler = Callable[[asyncpg.Connection, list[Record]], Awaitable[None]]
Decoder = Callable[[Topic, bytes | None], Any]


@dataclass
class DeadLetter:
    """Why a record was rejected."""

    record: Record
    reason: str
    errors: list[tuple[str, str]] = field(default_factory=list)
    event_id: str | None = None


TRANSIENT = (TransientError, KafkaError, *TRANSIENT_DB_ERRORS)

_CLAIM = """
INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
SELECT $1, t, p, 0 FROM unnest($2::text[], $3::int[]) AS u(t, p)
ON CONFLICT DO NOTHING
"""
_LOCK = """
SELECT o.topic, o.partition, o.next_offset FROM consumer_offsets o
JOIN unnest($2::text[], $3::int[]) AS u(t, p) ON o.topic = u.t AND o.partition = u.p
WHERE o.group_id = $1
ORDER BY o.topic, o.partition
FOR UPDATE OF o
"""
_ADVANCE_FROM = """
UPDATE consumer_offsets o SET next_offset = u.n, updated_at = now()
FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[]) AS u(t, p, was, n)
WHERE o.group_id = $1 AND o.topic = u.t AND o.partition = u.p AND o.next_offset = u.was
RETURNING o.topic, o.partition
"""
_ADVANCE = """
UPDATE consumer_offsets o SET next_offset = u.n, updated_at = now()
FROM unnest($2::text[], $3::int[], $4::bigint[]) AS u(t, p, n)
WHERE o.group_id = $1 AND o.topic = u.t AND o.partition = u.p AND o.next_offset < u.n
"""


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: BatchConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked) -> None:
        # Wait for the batches in flight so their offsets are stored before another worker takes over.
        async with self.owner._all_lanes():
            await self.owner._commit_kafka({}, force=True)  # still ours: bring them up to date
        self.owner._forget(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        self.owner._forget(assigned)
        await self.owner._position(list(assigned))


class BatchConsumer:
    """Consumes `topics` in consumer group `group_id` and applies batches through `handler`."""

    def __init__(self, *, service: str, bootstrap: str, group_id: str, topics: Sequence[Topic],
                 pool: asyncpg.Pool, handler: Handler, codec: AvroCodec, metrics: ServiceMetrics,
                 dlq_topic: str, decoder: Decoder | None = None, max_records: int = 1000,
                 max_transient_attempts: int = 60, on_committed: Callable[[], None] | None = None,
                 consumer_options: dict[str, Any] | None = None, clock: Clock | None = None,
                 event_order: bool = False, order_grace_ms: int = 500, lanes: int = 1) -> None:
        self.service = service
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.topics = {t.name: t for t in topics}
        self.pool = pool
        self.handler = handler
        self.codec = codec
        self.metrics = metrics
        self.dlq_topic = dlq_topic
        self.decoder = decoder or self._decode_avro
        self.max_records = max_records
        self.max_transient_attempts = max_transient_attempts
        self.on_committed = on_committed
        self.consumer_options = consumer_options or {}
        # Dead letters are stamped with operational (wall) time, also during event-time replays.
        self.clock = clock or WallClock()
        self.consumer: AIOKafkaConsumer | None = None
        # Partition p is applied in lane p % lanes: a lane applies its batches one at a time, in
        # order, on its own connection, while other lanes apply theirs. A lane is a worker that
        # owns those partitions, without the process: only for handlers that are safe with two
        # workers at once (they all must be, to scale out). A lane with few records waiting
        # shares one batch with the others that have few, so a light load is applied in batches
        # as large as with one lane. Event-time order uses one lane.
        self.lanes = 1 if event_order else max(1, lanes)
        self._in_flight = [asyncio.Lock() for _ in range(self.lanes)]
        self.commit_interval = 1.0
        # per lane, the batch being applied while the next is read (a shared batch in each of its lanes)
        self._applying: list[asyncio.Task | None] = [None] * self.lanes
        self._uncommitted: dict[tuple[str, int], int] = {}
        self._committed_at = 0.0
        self._claimed: set[tuple[str, int]] = set()  # partitions whose position row exists
        # partition -> the next offset this worker stored for it in its last committed batch
        self._known: dict[tuple[str, int], int] = {}
        # Under the event clock, records are applied in event-time order across partitions.
        self._order = EventTimeOrder(order_grace_ms) if event_order else None
        self.healthy = False
        self.applied = 0

    async def start(self) -> None:
        options = dict(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            client_id=f"omnicrm-{self.service}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 << 20,
            fetch_max_bytes=32 << 20,
            session_timeout_ms=6000,  # a killed worker's partitions move after 6 s, not 10
            heartbeat_interval_ms=1000,
            max_poll_interval_ms=300000,
            # A fetch lost on a half-dead connection is retried after this, not after 40 s.
            request_timeout_ms=10000,
            # The embedded broker holds a fetch for most of max_wait even when records arrive
            # (measured 2026-11-25: p50 136 ms at the default 500 ms, 11 ms at 50 ms), and every hop
            # of the pipeline pays it: keep it short. But each empty fetch costs the broker and this
            # process CPU: at 50 ms an idle pipeline kept a quarter of a core busy. Measured
            # 2026-12-07, bench.pipeline alternating 100 and 50 ms: CPU per event at 1,000 events/s
            # 1,309-1,334 against 1,577-1,580 us, p50 136-138 against 131-137 ms, p99 253-263
            # against 347-391 ms; at 200 ms the p50 doubled (257 ms).
            fetch_max_wait_ms=100,
            connections_max_idle_ms=60000,
        )
        options.update(self.consumer_options)
        self.consumer = AIOKafkaConsumer(**options)
        # Subscribing before start() lets the first metadata fetch include the topics, so the
        # group is joined at once instead of after the next metadata refresh.
        self.consumer.subscribe(list(self.topics), listener=_Rebalance(self))
        await self.consumer.start()
        self.healthy = True

    async def stop(self) -> None:
        if self.consumer is not None:
            async with self._all_lanes():
                await self._commit_kafka({}, force=True)
                await self.consumer.stop()
            self.consumer = None

    async def run(self) -> None:
        """Consume until cancelled.

        Batches are pipelined: while one batch is applied in PostgreSQL, the next is fetched and
        decoded here, so the database's work and this process's overlap on two cores. A lane's
        batches are still applied one at a time, in order.
        """
        assert self.consumer is not None, "start() first"
        self._applying = [None] * self.lanes
        try:
            await self._consume()
        finally:
            pending = [t for t in self._applying if t is not None and not t.done()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _wait_applied(self, lane: int | None = None) -> None:
        for n in range(self.lanes) if lane is None else (lane,):
            task, self._applying[n] = self._applying[n], None
            if task is not None:
                await task  # re-raises what the batch could not get past

    def _all_lanes(self):
        """Hold every lane: no batch is being applied meanwhile."""
        return self._holding(range(self.lanes))

    @contextlib.asynccontextmanager
    async def _holding(self, lanes):
        async with contextlib.AsyncExitStack() as stack:
            for lane in sorted(lanes):  # one order everywhere: no deadlock between holders
                await stack.enter_async_context(self._in_flight[lane])
            yield

    def _start(self, lanes: tuple[int, ...], messages: list[Any]) -> None:
        """Apply `messages` (of free `lanes`) in the background; their lanes wait for it."""
        task = asyncio.create_task(self._apply_batch(*self._prepare(messages), lanes=lanes))
        for lane in lanes:
            self._applying[lane] = task

    async def _consume(self) -> None:
        assert self.consumer is not None
        while True:
            if self.lanes > 1 and await self._feed_lanes():
                continue
            try:
                # While records wait for event-time order, look again soon: the wait ends by time.
                wait = 50 if self._order is not None and self._order.held() else 200
                batch = await self.consumer.getmany(timeout_ms=wait, max_records=self.max_records)
            except KafkaError as exc:
                self.healthy = False
                log.warning("fetch failed, retrying: %s", type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            self.healthy = True
            messages = [m for msgs in batch.values() for m in msgs]
            if not messages:
                await self._wait_applied()
                if self._uncommitted:
                    async with self._all_lanes():  # idle: bring the committed offsets up to date
                        await self._commit_kafka({}, force=True)
            if self._order is not None:
                if messages or self._order.held():
                    await self.process_in_event_order(messages)
            elif messages:
                if self.lanes == 1:  # the next batch is decoded while the last one is applied
                    prepared = self._prepare(messages)
                    await self._wait_applied(0)
                    self._applying[0] = asyncio.create_task(self._apply_batch(*prepared))
                    continue
                lanes = tuple(sorted({m.partition % self.lanes for m in messages}))
                for lane in lanes:
                    await self._wait_applied(lane)
                self._start(lanes, messages)

    async def _feed_lanes(self) -> bool:
        """Feed the free lanes, each from its own partitions' fetched records (getmany drains one
        partition before the next, so a batch of all partitions would mostly feed one lane). A busy
        lane is passed over, so a slow partition holds up only its own lane. True when a lane was
        fed or is still busy; False when all are idle and nothing was waiting: the caller then
        waits for records of any partition."""
        consumer = self.consumer
        assert consumer is not None
        assignment = consumer.assignment()
        fetched: dict[int, list[Any]] = {}
        busy: list[asyncio.Task] = []
        for lane in range(self.lanes):
            running = self._applying[lane]
            if running is not None:
                if not running.done():
                    busy.append(running)
                    continue
                await self._wait_applied(lane)  # re-raises what the batch could not get past
            mine = [tp for tp in assignment if tp.partition % self.lanes == lane]
            if not mine:
                continue
            try:
                batch = await consumer.getmany(*mine, timeout_ms=0, max_records=self.max_records)
            except KafkaError:  # e.g. a partition revoked meanwhile: the waiting fetch handles it
                break
            messages = [m for msgs in batch.values() for m in msgs]
            if messages:
                fetched[lane] = messages
        few = self.max_records // self.lanes
        shared = tuple(lane for lane, msgs in fetched.items() if len(msgs) < few)
        for lane, msgs in fetched.items():
            if lane not in shared:
                self._start((lane,), msgs)
        if shared:  # together at most max_records
            self._start(shared, [m for lane in shared for m in fetched[lane]])
        if fetched:
            return True
        if not busy:
            return False
        # Nothing for the free lanes yet: look again when a lane finishes, or soon.
        await asyncio.wait(set(busy), timeout=0.02, return_when=asyncio.FIRST_COMPLETED)
        return True

    async def process(self, messages: list[Any]) -> None:
        """Apply one fetched batch exactly once (public for tests and benchmarks)."""
        await self._apply_batch(*self._prepare(messages))

    def _prepare(self, messages: list[Any]) -> tuple:
        """Decode a fetched batch: records, dead letters, next positions, per-topic counts."""
        started = time.perf_counter()
        records: list[Record] = []
        dead: list[DeadLetter] = []
        positions: dict[tuple[str, int], int] = {}
        per_topic: dict[str, int] = {}
        topics, decoder = self.topics, self.decoder
        # One pass: decode, next positions and per-topic counts (this loop runs per record).
        for m in messages:
            topic, partition, offset = m.topic, m.partition, m.offset
            rec = Record(topic, partition, offset, m.key, None, m.value, m.timestamp)
            try:
                rec.value = decoder(topics[topic], m.value)
                records.append(rec)
            except PermanentError as exc:
                dead.append(DeadLetter(rec, exc.reason, [("value", str(exc))]))
            tp = (topic, partition)
            if offset >= positions.get(tp, 0):
                positions[tp] = offset + 1
            per_topic[topic] = per_topic.get(topic, 0) + 1
        return records, dead, positions, per_topic, started

    async def process_in_event_order(self, messages: list[Any]) -> None:
        """Buffer a fetched batch and apply what event-time order lets go (OMNICRM_CLOCK=event)."""
        started = time.perf_counter()
        order, topics, decoder = self._order, self.topics, self.decoder
        assert order is not None
        # Operational time, not business time: compared with aiokafka's last_poll_timestamp, which
        # is wall-clock milliseconds of the fetch answer (the event clock plays no part here).
        arrived_ms = int(time.time() * 1000)
        for m in messages:
            rec = Record(m.topic, m.partition, m.offset, m.key, None, m.value, m.timestamp)
            try:
                rec.value = decoder(topics[m.topic], m.value)
                at = event_time(rec.value)
                if at is None and m.headers:  # a tombstone that says when it happened
                    at = event_at_of(m.headers)
                rec.at = at
                order.add((m.topic, m.partition), m.offset, at, rec, arrived_ms)
            except PermanentError as exc:
                order.add((m.topic, m.partition), m.offset, None,
                          DeadLetter(rec, exc.reason, [("value", str(exc))]), arrived_ms)
        released = order.release(await self._partition_states(), self.max_records)
        self._pause_or_resume()
        if not released:
            return
        records: list[Record] = []
        dead: list[DeadLetter] = []
        positions: dict[tuple[str, int], int] = {}
        per_topic: dict[str, int] = {}
        for item in released:
            rec = item if isinstance(item, Record) else item.record
            (records if rec is item else dead).append(item)
            tp = (rec.topic, rec.partition)
            if rec.offset >= positions.get(tp, 0):
                positions[tp] = rec.offset + 1
            per_topic[rec.topic] = per_topic.get(rec.topic, 0) + 1
        await self._apply_batch(records, dead, positions, per_topic, started)

    async def _partition_states(self) -> dict[tuple[str, int], PartitionState]:
        consumer = self.consumer
        assert consumer is not None
        states = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            try:  # answers at once when the position is known; unknown means not caught up
                position = await asyncio.wait_for(consumer.position(tp), 0.05)
            except (TimeoutError, KafkaError):
                position = None
            caught_up = high is not None and position is not None and position >= high
            states[(tp.topic, tp.partition)] = PartitionState(caught_up, consumer.last_poll_timestamp(tp))
        return states

    def _pause_or_resume(self) -> None:
        """Bound the buffer: stop fetching a partition far ahead of the slowest one."""
        consumer, order = self.consumer, self._order
        assert consumer is not None and order is not None
        paused = consumer.paused()
        for tp in consumer.assignment():
            held = order.held((tp.topic, tp.partition))
            if held > 4 * self.max_records and tp not in paused:
                consumer.pause(tp)
            elif tp in paused and held <= self.max_records:
                consumer.resume(tp)

    async def _apply_batch(self, records: list[Record], dead: list[DeadLetter],
                           positions: dict[tuple[str, int], int], per_topic: dict[str, int],
                           started: float, lanes: tuple[int, ...] = (0,)) -> None:
        async with self._holding(lanes):
            await self._apply_with_retry(records, dead, positions)
            await self._commit_kafka(positions)
        for name, count in per_topic.items():
            self.metrics.events_consumed.labels(topic=name).inc(count)
        self.metrics.batch_size.observe(len(records) + len(dead))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self._measure_lag(positions)
        if self.on_committed is not None:
            self.on_committed()

    async def _apply_with_retry(self, records: list[Record], dead: list[DeadLetter],
                                positions: dict[tuple[str, int], int]) -> None:
        attempt = 0
        while True:
            try:
                await self._apply(records, dead, positions)
                self.healthy = True
                return
            except TRANSIENT as exc:
                attempt += 1
                self.healthy = False
                self.metrics.retries.labels(kind=type(exc).__name__).inc()
                if attempt >= self.max_transient_attempts:
                    raise
                delay = min(0.05 * (2 ** attempt), 5.0)
                log.warning("batch failed transiently (%s), retry %d in %.2fs",
                            type(exc).__name__, attempt, delay)
                await asyncio.sleep(delay)
            except Exception as exc:  # noqa: BLE001 - anything else: isolate the poison record(s)
                log.warning("batch failed (%s); applying records one by one", type(exc).__name__)
                await self._apply_one_by_one(records, dead, positions)
                self.healthy = True
                return

    async def _apply_one_by_one(self, records: list[Record], dead: list[DeadLetter],
                                positions: dict[tuple[str, int], int]) -> None:
        # Dead letters found while decoding go out with the first record's transaction.
        pending_dead = list(dead)
        for rec in records:
            single_pos = {(rec.topic, rec.partition): rec.offset + 1}
            for attempt in range(2):
                try:
                    await self._apply([rec], pending_dead, single_pos)
                    pending_dead = []
                    break
                except TRANSIENT:
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                except Exception as exc:  # noqa: BLE001
                    if attempt == 1:
                        reason = exc.reason if isinstance(exc, PermanentError) else "handler_error"
                        letter = DeadLetter(rec, reason, [("", _describe(exc))])
                        await self._apply_retrying([], [*pending_dead, letter], single_pos)
                        pending_dead = []
        # Positions for the whole batch (covers decode-only dead letters at the end).
        await self._apply_retrying([], pending_dead, positions)

    async def _apply_retrying(self, records, dead, positions) -> None:
        for attempt in range(self.max_transient_attempts):
            try:
                await self._apply(records, dead, positions)
                return
            except TRANSIENT:
                await asyncio.sleep(min(0.05 * (2 ** attempt), 5.0))
        raise TransientError("could not record dead letters")

    async def _apply(self, records: list[Record], dead: list[DeadLetter],
                     positions: dict[tuple[str, int], int]) -> None:
        known = self._known
        async with self.pool.acquire() as conn, conn.transaction():
            stored: dict[tuple[str, int], int] = {}
            rest = list(positions)
            if all(tp in known for tp in positions):
                # The positions this worker stored last: lock and advance them in one statement,
                # only where they are still what it stored (a worker that lost a partition and
                # wrote anyway, or an offsets reset, moved it: read those under lock below).
                moved = await conn.fetch(
                    _ADVANCE_FROM, self.group_id, [tp[0] for tp in positions], [tp[1] for tp in positions],
                    [known[tp] for tp in positions], [max(known[tp], positions[tp]) for tp in positions])
                for r in moved:
                    stored[(r[0], r[1])] = known[(r[0], r[1])]
                rest = [tp for tp in positions if tp not in stored]
            if rest:
                topics, parts = [tp[0] for tp in rest], [tp[1] for tp in rest]
                # A partition's position row is created once (the claim); rows found missing
                # (never claimed here) are claimed and locked.
                claimed = self._claimed.issuperset(rest)
                if not claimed:
                    await conn.execute(_CLAIM, self.group_id, topics, parts)
                rows = await conn.fetch(_LOCK, self.group_id, topics, parts)
                if claimed and len(rows) < len(rest):
                    await conn.execute(_CLAIM, self.group_id, topics, parts)
                    rows = await conn.fetch(_LOCK, self.group_id, topics, parts)
                stored.update({(r[0], r[1]): r[2] for r in rows})
            fresh = [r for r in records if r.offset >= stored.get((r.topic, r.partition), 0)]
            fresh_dead = [d for d in dead
                          if d.record.offset >= stored.get((d.record.topic, d.record.partition), 0)]
            if fresh:
                await self.handler(conn, fresh)
            if fresh_dead:
                await add_to_outbox(conn, [self._dead_letter_message(d) for d in fresh_dead])
                for d in fresh_dead:
                    self.metrics.dlq.labels(reason=d.reason).inc()
            if rest:
                await conn.execute(_ADVANCE, self.group_id, topics, parts, [positions[tp] for tp in rest])
        self._claimed.update(stored)
        for tp, was in stored.items():  # committed: what is stored now
            known[tp] = max(was, positions[tp])
        self.applied += len(fresh)

    def _dead_letter_message(self, d: DeadLetter) -> OutboxMessage:
        value = self.codec.encode(DEAD_LETTER, {
            "event_id": d.event_id,
            "service": self.service,
            "source_topic": d.record.topic,
            "partition": d.record.partition,
            "offset": d.record.offset,
            "key": d.record.key,
            "raw": d.record.raw or b"",
            "source": None,
            "reason": d.reason,
            "errors": [{"field": f, "message": m} for f, m in d.errors],
            "dead_lettered_at": self.clock.now(),
        })
        key = d.event_id or f"{d.record.topic}:{d.record.partition}:{d.record.offset}"
        return OutboxMessage(self.dlq_topic, key, value)

    def _forget(self, partitions) -> None:
        """Records held for event order of partitions that changed hands are read again later."""
        for tp in partitions:
            self._uncommitted.pop((tp.topic, tp.partition), None)
            self._known.pop((tp.topic, tp.partition), None)
        if self._order is not None:
            self._order.drop((tp.topic, tp.partition) for tp in partitions)

    async def _position(self, assigned: list[TopicPartition]) -> None:
        """Seek newly assigned partitions to the positions stored with the state."""
        if not assigned or self.consumer is None:
            return
        try:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT topic, partition, next_offset FROM consumer_offsets "
                    "WHERE group_id = $1 AND topic = ANY($2::text[])",
                    self.group_id, list({tp.topic for tp in assigned}),
                )
        except TRANSIENT_DB_ERRORS as exc:
            log.warning("could not read stored positions (%s); using committed offsets",
                        type(exc).__name__)
            return
        stored = {(r["topic"], r["partition"]): r["next_offset"] for r in rows}
        for tp in assigned:
            if (tp.topic, tp.partition) in stored:
                self.consumer.seek(tp, stored[(tp.topic, tp.partition)])

    async def _commit_kafka(self, positions: dict[tuple[str, int], int], *, force: bool = False) -> None:
        """Kafka's committed offsets serve lag monitoring and tooling; the database is authoritative.

        So they are committed at most every `commit_interval` seconds (and when the consumer goes
        idle or stops), not once per batch: a broker round trip per batch was a fifth of a batch's
        time at full speed.
        """
        for tp, offset in positions.items():
            if offset > self._uncommitted.get(tp, -1):
                self._uncommitted[tp] = offset
        if not self._uncommitted or self.consumer is None:
            return
        if not force and time.monotonic() - self._committed_at < self.commit_interval:
            return
        pending, self._uncommitted = self._uncommitted, {}
        self._committed_at = time.monotonic()
        try:
            await self.consumer.commit({
                TopicPartition(t, p): OffsetAndMetadata(o, "") for (t, p), o in pending.items()
            })
        except KafkaError as exc:
            log.info("kafka offset commit skipped: %s", type(exc).__name__)

    def _measure_lag(self, positions: dict[tuple[str, int], int]) -> None:
        if self.consumer is None:
            return
        for (t, p), nxt in positions.items():
            high = self.consumer.highwater(TopicPartition(t, p))
            if high is not None:
                self.metrics.consumer_lag.labels(topic=t, partition=str(p)).set(max(high - nxt, 0))

    def _decode_avro(self, topic: Topic, value: bytes | None) -> Any:
        if value is None:
            return None  # tombstone
        if topic.subject is None:
            raise SchemaError("no_schema", f"{topic.name} has no Avro subject")
        return self.codec.decode(value, topic.subject)


def _describe(exc: BaseException) -> str:
    # Exception text can carry values from the record; keep the class and a bounded message.
    return f"{type(exc).__name__}: {redact_text(str(exc))[:300]}"
