"""Validated events in, decisions applied: dedupe, publish to the typed topics, dead-letter the rest.

Two paths share the rules and the `seen_events` table:

- HTTP (and Shopify): in ONE database transaction the event ids are claimed (new ones only), the new
  events are produced with the runtime's producer and every ack awaited, rejected ones are written
  to the outbox for `ingest.dlq.v1`; then commit. A broker failure rolls everything back, so an
  event answered `accepted` is in Kafka and one that is not was never marked seen.
- The raw topic `ingest.raw.v1`: a batch-consumer handler; accepted and rejected events leave
  through the outbox in the batch's transaction (exactly once with the stored offsets).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from aiokafka.errors import KafkaError

from services.ingestion import routing, store
from services.ingestion.config import IngestionConfig
from services.ingestion.encoding import EventEncoder
from services.ingestion.publishing import BatchProducer
from services.ingestion.validation import (
    RequestShapeError,
    Validated,
    events_of,
    exceeds_depth,
    validate_event,
)
from shared.avro import AvroCodec
from shared.batch_consumer import Record
from shared.clock import Clock
from shared.db import TRANSIENT_DB_ERRORS
from shared.errors import PermanentError, SchemaError
from shared.metrics import ServiceMetrics
from shared.outbox import OutboxMessage, add_to_outbox
from shared.topics import DEAD_LETTER, INGEST_DLQ, Topic

log = logging.getLogger(__name__)
SERVICE = "ingestion"
REASON = "validation"


class Unavailable(Exception):
    """The broker or database could not take the events now; nothing was marked seen (503)."""


class DuplicateDelivery(Exception):
    """A webhook delivery that was processed before (raised inside the transaction to undo it)."""


@dataclass
class Result:
    """What happened to one input event."""

    event_id: str | None
    status: str  # accepted | duplicate | rejected | ignored
    errors: list[dict[str, str]] = field(default_factory=list)
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event_id": self.event_id, "status": self.status, "errors": self.errors}
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class Outcome:
    """The answer to one request: one result per event, in order."""

    results: list[Result]

    def counts(self) -> dict[str, int]:
        """Results per status (every status present, zero when none)."""
        out = dict.fromkeys(("accepted", "duplicate", "rejected", "ignored"), 0)
        for r in self.results:
            out[r.status] += 1
        return out

    def count(self, status: str) -> int:
        return self.counts()[status]

    @property
    def all_rejected(self) -> bool:
        return bool(self.results) and all(r.status == "rejected" for r in self.results)

    def as_json(self) -> dict[str, Any]:
        counts = self.counts()
        body: dict[str, Any] = {
            "accepted": counts["accepted"],
            "duplicates": counts["duplicate"],
            "rejected": counts["rejected"],
            "results": [r.as_json() for r in self.results],
        }
        if counts["ignored"]:
            body["ignored"] = counts["ignored"]
        return body


@dataclass
class _Encoded:
    index: int
    event_id: str
    topic: Topic
    key: str
    value: bytes


def decode_raw(topic: Topic, value: bytes | None, *, max_depth: int = 32) -> Any:
    """The batch consumer's decoder for `ingest.raw.v1`: JSON, bounded nesting, else dead-lettered."""
    if value is None:
        raise PermanentError("malformed_json", "empty record value")
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise PermanentError("malformed_json", "the value is not valid UTF-8 JSON") from None
    if exceeds_depth(parsed, max_depth):
        raise PermanentError("too_deep", f"JSON nesting deeper than {max_depth} levels")
    return parsed


class Ingestor:
    """The ingestion decisions, wired to a pool, a producer, the codec and the clock by app.py."""

    def __init__(self, *, codec: AvroCodec, clock: Clock, metrics: ServiceMetrics,
                 config: IngestionConfig, pool: Callable[[], asyncpg.Pool | None],
                 producer: Callable[[], Any], wake_relay: Callable[[], None]) -> None:
        self.codec = codec
        self.encoder = EventEncoder(codec)  # == codec.encode(EVENT, for_encoding(event)), compiled
        self.clock = clock
        self.metrics = metrics
        self.config = config
        self._pool = pool
        self._producer = producer
        self._wake_relay = wake_relay
        self._batcher: BatchProducer | None = None
        self.events_total = metrics.counter(
            "events", "Input events by path (http, shopify, raw) and result.", ("via", "status"))
        self.produce_seconds = metrics.histogram(
            "produce_seconds", "Time to produce a request's events and get every broker ack.")

    def _batches(self, producer: Any) -> BatchProducer:
        """The shared record batches of the runtime's (current) producer."""
        if self._batcher is None or self._batcher.producer is not producer:
            self._batcher = BatchProducer(producer)
        return self._batcher

    # -- pure-ish steps -----------------------------------------------------------------------
    def validate(self, items: Sequence[Any], source: str | None) -> list[Validated]:
        now = self.clock.now()
        return [validate_event(item, received_at=now, default_source=source) for item in items]

    def _encode(self, checked: list[Validated]) -> tuple[list[_Encoded], list[Validated]]:
        encoded: list[_Encoded] = []
        out = list(checked)
        for i, v in enumerate(checked):
            if v.event is None:
                continue
            topic, key = routing.route(v.event)
            try:
                value = self.encoder.encode(v.event)
            except SchemaError as exc:  # validation let through what Avro refuses: a bug, reject safely
                log.error("validated event %d not encodable: %s", i, exc.reason)
                out[i] = Validated(v.event_id, None, [{"field": "", "message": "cannot be encoded"}])
                continue
            encoded.append(_Encoded(i, v.event["event_id"], topic, key, value))
        return encoded, out

    def _dead_letter(self, v: Validated, raw: bytes, *, source: str | None, source_topic: str,
                     partition: int | None = None, offset: int | None = None,
                     key: bytes | None = None) -> OutboxMessage:
        value = self.codec.encode(DEAD_LETTER, {
            "event_id": v.event_id,
            "service": SERVICE,
            "source_topic": source_topic,
            "partition": partition,
            "offset": offset,
            "key": key,
            "raw": raw,
            "source": source,
            "reason": REASON,
            "errors": v.errors,
            "dead_lettered_at": self.clock.now(),
        })
        dlq_key = v.event_id or (f"{source_topic}:{partition}:{offset}" if offset is not None
                                 else f"{source_topic}:{self.clock.now().isoformat()}")
        return OutboxMessage(INGEST_DLQ.name, dlq_key, value)

    @staticmethod
    def _fresh_first(encoded: list[_Encoded], fresh: set[str]) -> list[_Encoded]:
        """The encoded events to publish: new ids, first occurrence in the request only."""
        taken: set[str] = set()
        out = []
        for e in encoded:
            if e.event_id in fresh and e.event_id not in taken:
                taken.add(e.event_id)
                out.append(e)
        return out

    # -- HTTP path ----------------------------------------------------------------------------
    async def publish(self, checked: list[Validated], raws: Sequence[bytes], *, source: str | None,
                      source_topic: str, via: str,
                      in_transaction: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
                      ) -> Outcome:
        """Accept what is valid and new, answer duplicates, dead-letter the rest (one transaction)."""
        pool, producer = self._pool(), self._producer()
        if pool is None or producer is None:
            raise Unavailable("not started")
        encoded, checked = self._encode(checked)
        dead = [self._dead_letter(v, raws[i], source=source, source_topic=source_topic)
                for i, v in enumerate(checked) if v.event is None]
        sent: list[_Encoded] = []
        try:
            async with pool.acquire() as conn, conn.transaction():
                if in_transaction is not None:
                    await in_transaction(conn)
                fresh = await store.claim_event_ids(conn, [e.event_id for e in encoded])
                sent = self._fresh_first(encoded, fresh)
                await add_to_outbox(conn, dead)
                if sent:
                    started = asyncio.get_running_loop().time()
                    async with asyncio.timeout(self.config.produce_timeout_seconds):
                        await self._batches(producer).produce_acked(
                            [(e.topic.name, e.key.encode(), e.value) for e in sent])
                    self.produce_seconds.observe(asyncio.get_running_loop().time() - started)
        except (KafkaError, TimeoutError, *TRANSIENT_DB_ERRORS, asyncpg.DeadlockDetectedError) as exc:
            log.warning("publishing %d events failed (%s); rolled back", len(sent), type(exc).__name__)
            raise Unavailable(type(exc).__name__) from exc
        if dead:
            self._wake_relay()
        return self._outcome(checked, {e.index for e in sent}, via, len(dead), sent)

    def _outcome(self, checked: list[Validated], sent_indexes: set[int], via: str, dead: int,
                 sent: list[_Encoded]) -> Outcome:
        results = []
        for i, v in enumerate(checked):
            if v.event is None:
                results.append(Result(v.event_id, "rejected", v.errors))
            elif i in sent_indexes:
                results.append(Result(v.event_id, "accepted"))
            else:
                results.append(Result(v.event_id, "duplicate"))
        outcome = Outcome(results)
        counts = outcome.counts()
        for status in ("accepted", "duplicate", "rejected"):
            n = counts[status]
            if n:
                self.events_total.labels(via=via, status=status).inc(n)
        if dead:
            self.metrics.dlq.labels(reason=REASON).inc(dead)
        per_topic: dict[str, int] = {}
        for e in sent:
            per_topic[e.topic.name] = per_topic.get(e.topic.name, 0) + 1
        for name, n in per_topic.items():
            self.metrics.events_produced.labels(topic=name).inc(n)
        return outcome

    # -- raw topic path -----------------------------------------------------------------------
    async def handle_raw(self, conn: asyncpg.Connection, records: list[Record]) -> None:
        """Batch handler for `ingest.raw.v1`: same validation; out through the outbox."""
        checked: list[Validated] = []
        origins: list[tuple[Record, bytes]] = []
        now = self.clock.now()
        for rec in records:
            try:
                items, batch = events_of(rec.value, self.config.max_events)
            except RequestShapeError as exc:
                checked.append(Validated(None, None, [{"field": exc.field, "message": exc.message}]))
                origins.append((rec, rec.raw or b""))
                continue
            for item in items:
                checked.append(validate_event(item, received_at=now, default_source=None))
                origins.append((rec, orjson.dumps(item) if batch else (rec.raw or b"")))
        encoded, checked = self._encode(checked)
        fresh = await store.claim_event_ids(conn, [e.event_id for e in encoded])
        sent = self._fresh_first(encoded, fresh)
        messages = [OutboxMessage(e.topic.name, e.key, e.value) for e in sent]
        dead = 0
        for v, (rec, raw) in zip(checked, origins, strict=True):
            if v.event is None:
                dead += 1
                messages.append(self._dead_letter(v, raw, source=None, source_topic=rec.topic,
                                                  partition=rec.partition, offset=rec.offset,
                                                  key=rec.key))
        await add_to_outbox(conn, messages)
        self._outcome(checked, {e.index for e in sent}, "raw", dead, [])
