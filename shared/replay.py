"""Developer tools over topics: export a time range, replay a file into a cluster, show and reset a
service's consumer positions for reprocessing.

Exports are JSONL (one `{"topic", "partition", "offset", "timestamp", "key", "value"}` per record,
the value decoded from Avro) or an Avro object container file of the topic's latest schema.
Positions live in two places: the service's `consumer_offsets` table (authoritative: the batch
consumer resumes from it) and the Kafka group (lag and tooling); `reset_offsets` moves both.
"""

from __future__ import annotations

import base64
import datetime as dt
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import fastavro
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from shared.avro import AvroCodec, SchemaRegistry
from shared.clock import WallClock
from shared.events import for_encoding
from shared.kafka import make_producer
from shared.topics import BY_NAME, EVENT, Topic

UTC = dt.UTC


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    raise TypeError(type(value).__name__)


def _revive(value: Any) -> Any:
    """Undo `_json_default`: datetimes from ISO strings where the schema wants them is the codec's job,
    so only bytes are revived here; timestamps are revived by `_revive_times`."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return base64.b64decode(value["$bytes"])
        return {k: _revive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_revive(v) for v in value]
    return value


_TIME_FIELDS = {"occurred_at", "received_at", "fired_at", "created_at", "updated_at", "expires_at",
                "scheduled_for", "sent_at", "dead_lettered_at", "starts_at", "trigger_occurred_at"}


def _revive_times(value: Any, shift: dt.timedelta = dt.timedelta(0)) -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in _TIME_FIELDS and isinstance(v, str):
                try:
                    out[k] = dt.datetime.fromisoformat(v) + shift
                    continue
                except ValueError:
                    pass
            out[k] = _revive_times(v, shift)
        return out
    if isinstance(value, list):
        return [_revive_times(v, shift) for v in value]
    return value


@dataclass
class ExportedRecord:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: str | None
    value: Any


async def read_range(bootstrap: str, topic: Topic, since: dt.datetime | None = None,
                     until: dt.datetime | None = None, codec: AvroCodec | None = None,
                     idle_timeout: float = 10.0) -> list[ExportedRecord]:
    """Every record of `topic` whose broker timestamp is in [since, until), decoded, in partition order."""
    codec = codec or AvroCodec(SchemaRegistry.load())
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        parts = [TopicPartition(topic.name, p) for p in sorted(consumer.partitions_for_topic(topic.name) or [])]
        if not parts:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - a fresh client may not know the topic yet
            parts = [TopicPartition(topic.name, p) for p in sorted(consumer.partitions_for_topic(topic.name) or [])]
        consumer.assign(parts)
        ends = await high_watermarks(bootstrap, parts)
        starts = await consumer.beginning_offsets(parts)
        if since is not None:
            wanted = int(since.timestamp() * 1000)
            found = await consumer.offsets_for_times({tp: wanted for tp in parts})
            starts = {tp: _found_offset(found.get(tp), wanted, ends[tp]) for tp in parts}
        for tp in parts:
            consumer.seek(tp, starts[tp])
        out: list[ExportedRecord] = []
        pending = {tp for tp in parts if starts[tp] < ends[tp]}
        stop_ms = int(until.timestamp() * 1000) if until else None
        last_progress = time.monotonic()
        while pending and time.monotonic() - last_progress < idle_timeout:
            batch = await consumer.getmany(*pending, timeout_ms=500, max_records=5000)
            for tp, msgs in batch.items():
                last_progress = time.monotonic()
                for m in msgs:
                    if m.offset >= ends[tp]:
                        break
                    if stop_ms is None or m.timestamp < stop_ms:
                        value = m.value
                        if value is not None:
                            value = codec.decode(value, topic.subject) if topic.subject else orjson.loads(value)
                        out.append(ExportedRecord(m.topic, m.partition, m.offset, m.timestamp,
                                                  m.key.decode() if m.key else None, value))
                if msgs and msgs[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()


def _found_offset(found, wanted_ms: int, end: int) -> int:
    """The offset of the first record at or after the time; the end when there is none.

    Tansu answers a time after the last record with a record before it; Kafka answers none.
    """
    if found is None or found.timestamp < wanted_ms:
        return end
    return min(found.offset, end)


async def high_watermarks(bootstrap: str, parts: list[TopicPartition]) -> dict[TopicPartition, int]:
    """End offsets as a fetch reports them.

    The embedded Tansu broker answers ListOffsets(latest) with the number of record *batches*, not
    records (seen 2026-11-25: 40 records produced in one batch -> end offset 1), while its fetch
    responses carry the right high watermark; so ask the fetch.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, 0)
        marks: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + 10
        while len(marks) < len(parts) and time.monotonic() < deadline:
            await consumer.getmany(*[tp for tp in parts if tp not in marks], timeout_ms=200, max_records=1)
            for tp in parts:
                high = consumer.highwater(tp)
                if high is not None:
                    marks[tp] = high
        missing = [tp for tp in parts if tp not in marks]
        if missing:
            marks.update(await consumer.end_offsets(missing))
        return marks
    finally:
        await consumer.stop()


def write_export(records: Iterable[ExportedRecord], path: Path, fmt: str, topic: Topic,
                 registry: SchemaRegistry | None = None) -> int:
    """Write records as JSONL, or as an Avro object container file of the topic's latest schema."""
    records = list(records)
    if fmt == "jsonl":
        with path.open("wb") as fh:
            for r in records:
                fh.write(orjson.dumps(r.__dict__, default=_json_default) + b"\n")
        return len(records)
    if fmt == "avro":
        if topic.subject is None:
            raise ValueError(f"{topic.name} holds JSON, not Avro: export it as jsonl")
        registry = registry or SchemaRegistry.load()
        schema = fastavro.parse_schema(registry.latest(topic.subject).schema)
        values = [for_encoding(r.value) if topic.subject == EVENT else r.value
                  for r in records if r.value is not None]
        with path.open("wb") as fh:
            fastavro.writer(fh, schema, values, metadata={"omnicrm.topic": topic.name})
        return len(values)
    raise ValueError(f"unknown format {fmt!r}: jsonl or avro")


def read_export(path: Path) -> Iterator[dict[str, Any]]:
    """Records of an export file as `{"topic", "key", "value"}` (JSONL or Avro container)."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if head == b"Obj\x01":
        with path.open("rb") as fh:
            reader = fastavro.reader(fh)
            topic = reader.metadata.get("omnicrm.topic")
            for value in reader:
                yield {"topic": topic, "key": None, "value": value}
        return
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                yield orjson.loads(line)


async def replay_export(path: Path, bootstrap: str, *, speed: float | None = None, rebase: bool = False,
                        to_topic: Topic | None = None,
                        now: Callable[[], dt.datetime] = WallClock().now,
                        progress: Callable[[int], None] = lambda n: None) -> int:
    """Publish an export back to its topics, re-encoded with the current schemas, keys kept.

    `speed`: None = as fast as possible, else event-time seconds per wall second (1 = real time).
    `rebase`: shift every timestamp so the first record happens now.
    `to_topic`: publish everything to this topic instead of the one each record came from.
    """
    codec = AvroCodec(SchemaRegistry.load())
    rows = list(read_export(path))
    times = [_first_time(r["value"]) for r in rows]
    known = [t for t in times if t is not None]
    shift = (now() - min(known)) if rebase and known else dt.timedelta(0)
    producer = make_producer(bootstrap, "omnicrm-replay")
    await producer.start()
    sent = 0
    began = time.monotonic()
    first = min(known) if known else None
    try:
        futures = []
        for row, at in zip(rows, times, strict=True):
            topic = to_topic or BY_NAME[row["topic"]]
            if speed and first is not None and at is not None:
                due = (at - first).total_seconds() / speed
                wait = due - (time.monotonic() - began)
                if wait > 0:
                    await _flush(futures)
                    await _sleep(wait)
            value = row["value"]
            if value is not None:
                value = _revive_times(_revive(value), shift)
                if topic.subject is None:
                    data = orjson.dumps(value, default=_json_default)
                else:
                    data = codec.encode(topic.subject, for_encoding(value) if topic.subject == EVENT else value)
            else:
                data = None
            key = row.get("key")
            futures.append(await producer.send(topic.name, data, key=key.encode() if key else None))
            sent += 1
            if len(futures) >= 1000:
                await _flush(futures)
                progress(sent)
        await _flush(futures)
        progress(sent)
    finally:
        await producer.stop()
    return sent


async def _flush(futures: list) -> None:
    import asyncio

    if futures:
        await asyncio.gather(*futures)
        futures.clear()


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def _first_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dict):
        for k in ("occurred_at", "fired_at"):
            v = value.get(k)
            if isinstance(v, str):
                try:
                    return dt.datetime.fromisoformat(v)
                except ValueError:
                    return None
            if isinstance(v, dt.datetime):
                return v
    return None


def rebase_events(events: Iterable[dict[str, Any]], to: dt.datetime) -> Iterator[dict[str, Any]]:
    """Shift JSONL envelopes' `occurred_at` so the first one happens at `to`, offsets kept."""
    shift: dt.timedelta | None = None
    for event in events:
        at = event.get("occurred_at")
        if isinstance(at, str):
            try:
                when = dt.datetime.fromisoformat(at)
            except ValueError:
                yield event
                continue
            if shift is None:
                shift = to - when
            event = {**event, "occurred_at": (when + shift).isoformat(timespec="milliseconds")}
        yield event


@dataclass
class Position:
    topic: str
    partition: int
    stored: int | None     # next offset in the service's consumer_offsets table
    committed: int | None  # next offset committed to the Kafka group
    end: int

    @property
    def lag(self) -> int:
        pos = self.stored if self.stored is not None else (self.committed or 0)
        return max(self.end - pos, 0)


async def show_offsets(bootstrap: str, dsn: str | None, schema: str, group: str,
                       topics: list[str]) -> list[Position]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])]
        ends = await high_watermarks(bootstrap, parts) if parts else {}
        committed = {tp: await consumer.committed(tp) for tp in parts}
    finally:
        await consumer.stop()
    stored: dict[tuple[str, int], int] = {}
    if dsn:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                f'SELECT topic, partition, next_offset FROM "{schema}".consumer_offsets WHERE group_id = $1', group)
            stored = {(r["topic"], r["partition"]): r["next_offset"] for r in rows}
        finally:
            await conn.close()
    return [Position(tp.topic, tp.partition, stored.get((tp.topic, tp.partition)), committed[tp], ends[tp])
            for tp in parts]


async def reset_offsets(bootstrap: str, dsn: str, schema: str, group: str, topics: list[str],
                        to: dt.datetime) -> list[Position]:
    """Move the group (database positions and Kafka) to the first record at or after `to`.

    Stop the service's workers first: a running worker would store its own positions over these.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or [])]
        ends = await high_watermarks(bootstrap, parts)
        wanted = int(to.timestamp() * 1000)
        found = await consumer.offsets_for_times({tp: wanted for tp in parts})
        target = {tp: _found_offset(found.get(tp), wanted, ends[tp]) for tp in parts}
    finally:
        await consumer.stop()
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.executemany(
                f'INSERT INTO "{schema}".consumer_offsets (group_id, topic, partition, next_offset) '
                "VALUES ($1, $2, $3, $4) ON CONFLICT (group_id, topic, partition) "
                "DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
                [(group, tp.topic, tp.partition, off) for tp, off in target.items()])
    finally:
        await conn.close()
    committer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await committer.start()
    try:
        committer.assign(list(target))
        await committer.commit({tp: OffsetAndMetadata(off, "") for tp, off in target.items()})
    finally:
        await committer.stop()
    return await show_offsets(bootstrap, dsn, schema, group, topics)
