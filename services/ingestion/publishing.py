"""Producing a request's events with one record batch per partition, and waiting for every ack.

aiokafka's per-record `send()` costs more CPU than validating the event; building the batches here
keeps each key on the partition the default partitioner (which the outbox relay uses) would pick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

_PARTITIONER = DefaultPartitioner()


async def produce_acked(producer: AIOKafkaProducer, records: Sequence[tuple[str, bytes, bytes]]) -> None:
    """Produce (topic, key, value) records, in order per partition; return once all are acked."""
    partitions: dict[str, list[int]] = {}
    batches: dict[tuple[str, int], object] = {}
    futures = []
    for topic, key, value in records:
        parts = partitions.get(topic)
        if parts is None:
            parts = partitions[topic] = sorted(await producer.partitions_for(topic))
        partition = _PARTITIONER(key, parts, parts)
        batch = batches.get((topic, partition))
        if batch is None:
            batch = batches[(topic, partition)] = producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start another
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            batch = batches[(topic, partition)] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send(topic, value=value, key=key, partition=partition))
                del batches[(topic, partition)]
    for (topic, partition), batch in batches.items():
        if batch.record_count():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
    await asyncio.gather(*futures)
