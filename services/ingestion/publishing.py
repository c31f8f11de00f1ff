"""Producing requests' events in shared record batches, and waiting for every ack.

aiokafka's per-record `send()` costs more CPU than validating the event, so records are appended to
record batches here. Each key goes to the partition the default partitioner (which the outbox relay
uses) would pick: murmur2 of the key (the outbox's word-wise version, equal to aiokafka's byte-wise
one) modulo the topic's partitions.

Batches are shared between concurrent requests, as the producer's own accumulator shares them
between `send()` calls: each partition has at most one batch with the broker; records that come
while it is out wait in the partition's open batch and leave together when it is acknowledged. A
batch per request instead queued behind each other (aiokafka takes one batch per partition per
broker round trip), so eight concurrent requests took eight round trips.

A request returns once every batch holding one of its records is acknowledged, and raises the
producer's error when one failed (the caller rolls back and answers 503).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer

from shared.outbox import murmur2


@dataclass(eq=False)
class _Batch:
    """Records bound for one partition, and the future every request with a record in it awaits."""

    builder: Any  # aiokafka BatchBuilder; None for a record too large for any batch
    done: asyncio.Future[None]
    oversize: tuple[bytes, bytes] | None = None  # (key, value) when builder is None
    records: int = field(default=0)


class BatchProducer:
    """Shared per-partition record batches over one producer, one batch in flight per partition."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self._open: dict[tuple[str, int], _Batch] = {}
        self._queued: dict[tuple[str, int], deque[_Batch]] = {}  # sealed, before the open one
        self._busy: set[tuple[str, int]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def _new_batch(self, builder: Any, oversize: tuple[bytes, bytes] | None = None) -> _Batch:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A request that gave up (timeout, cancel) no longer reads its batch's error.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        return _Batch(builder, done, oversize)

    async def produce_acked(self, records: Sequence[tuple[str, bytes, bytes]]) -> None:
        """Produce (topic, key, value) records, in order per partition; return once all are acked."""
        waits: set[asyncio.Future[None]] = set()
        touched: dict[tuple[str, int], None] = {}
        partitions: dict[str, list[int]] = {}  # read per request: topics can gain partitions
        for topic, key, value in records:
            parts = partitions.get(topic)
            if parts is None:
                parts = partitions[topic] = sorted(await self.producer.partitions_for(topic))
            tp = (topic, parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)])
            touched[tp] = None
            batch = self._open.get(tp)
            if batch is None:
                batch = self._open[tp] = self._new_batch(self.producer.create_batch())
            appended = batch.builder.append(key=key, value=value, timestamp=None)
            if appended is None and batch.records:  # full: it leaves first, a new one opens
                self._queued.setdefault(tp, deque()).append(batch)
                batch = self._open[tp] = self._new_batch(self.producer.create_batch())
                appended = batch.builder.append(key=key, value=value, timestamp=None)
            if appended is None:  # larger than an empty batch: it goes alone, in its turn
                single = self._new_batch(None, (key, value))
                self._queued.setdefault(tp, deque()).append(single)
                waits.add(single.done)
                continue
            batch.records += 1
            waits.add(batch.done)
        for tp in touched:
            self._kick(tp)
        if waits:
            await asyncio.wait(waits)  # never cancels the shared futures
        for f in waits:
            f.result()

    def _kick(self, tp: tuple[str, int]) -> None:
        """Hand the partition's next batch to the producer unless one of its batches is out."""
        if tp in self._busy:
            return
        queued = self._queued.get(tp)
        if queued:
            batch = queued.popleft()
        else:
            batch = self._open.get(tp)
            if batch is None or not batch.records:
                return
            del self._open[tp]
        self._busy.add(tp)
        task = asyncio.get_running_loop().create_task(self._send(tp, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, tp: tuple[str, int], batch: _Batch) -> None:
        topic, partition = tp
        try:
            if batch.builder is not None:
                delivery = await self.producer.send_batch(batch.builder, topic, partition=partition)
            else:
                key, value = batch.oversize  # type: ignore[misc]
                delivery = await self.producer.send(topic, value=value, key=key, partition=partition)
            await delivery
        except asyncio.CancelledError:  # the loop is closing
            batch.done.cancel()
            raise
        except Exception as exc:  # every request with a record in the batch gets the producer's error
            if not batch.done.done():
                batch.done.set_exception(exc)
        else:
            if not batch.done.done():
                batch.done.set_result(None)
        finally:
            self._busy.discard(tp)
            self._kick(tp)
