"""Shared record batches at ingestion (services/ingestion/publishing.py), against a fake producer
whose acks the test releases: one batch per partition with the broker, requests arriving meanwhile
leave together in the next, order per partition kept, every waiter sees a failure, and a request
returns only when all of its records are acknowledged."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import KafkaConnectionError

from services.ingestion.publishing import BatchProducer
from shared.outbox import murmur2


class FakeBuilder:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[tuple[bytes, bytes]] = []

    def append(self, *, key: bytes, value: bytes, timestamp: None) -> object | None:
        if sum(len(v) for _, v in self.records) + len(value) > self.capacity:
            return None
        self.records.append((key, value))
        return object()


class FakeProducer:
    def __init__(self, partitions: int = 2, capacity: int = 100) -> None:
        self.partitions = partitions
        self.capacity = capacity
        self.sent: list[tuple[str, int, list[bytes]]] = []  # in the order handed over
        self.acks: list[asyncio.Future] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.partitions))

    def create_batch(self) -> FakeBuilder:
        return FakeBuilder(self.capacity)

    async def send_batch(self, batch: FakeBuilder, topic: str, *, partition: int) -> asyncio.Future:
        self.sent.append((topic, partition, [v for _, v in batch.records]))
        ack = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack

    async def send(self, topic: str, *, value: bytes, key: bytes, partition: int) -> asyncio.Future:
        self.sent.append((topic, partition, [value]))
        ack = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack


def key_for(partition: int, partitions: int = 2, n: int = 0) -> bytes:
    """A key the default partitioner puts on `partition`."""
    found = [k for k in (f"k{i}".encode() for i in range(1000))
             if (murmur2(k) & 0x7FFFFFFF) % partitions == partition]
    return found[n]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_requests_arriving_while_a_batch_is_out_leave_together_in_order():
    producer = FakeProducer()
    batches = BatchProducer(producer)
    k = key_for(0)
    first = asyncio.create_task(batches.produce_acked([("t", k, b"a1"), ("t", k, b"a2")]))
    await settle()
    assert producer.sent == [("t", 0, [b"a1", b"a2"])]
    second = asyncio.create_task(batches.produce_acked([("t", k, b"b1")]))
    third = asyncio.create_task(batches.produce_acked([("t", k, b"c1"), ("t", k, b"c2")]))
    await settle()
    assert len(producer.sent) == 1  # the partition's batch is still out: the others wait, together
    assert not first.done() and not second.done()
    producer.acks[0].set_result(None)
    await settle()
    assert first.done() and not second.done() and not third.done()
    assert producer.sent[1] == ("t", 0, [b"b1", b"c1", b"c2"])
    producer.acks[1].set_result(None)
    await asyncio.wait_for(asyncio.gather(second, third), 1)


async def test_partitions_do_not_wait_for_each_other_and_a_request_waits_for_all_its_records():
    producer = FakeProducer()
    batches = BatchProducer(producer)
    request = asyncio.create_task(batches.produce_acked([("t", key_for(0), b"x"), ("t", key_for(1), b"y")]))
    await settle()
    assert sorted(p for _, p, _ in producer.sent) == [0, 1]
    producer.acks[0].set_result(None)
    await settle()
    assert not request.done()
    producer.acks[1].set_result(None)
    await asyncio.wait_for(request, 1)


async def test_a_failed_batch_fails_every_request_in_it_and_the_partition_moves_on():
    producer = FakeProducer()
    batches = BatchProducer(producer)
    k = key_for(0)
    first = asyncio.create_task(batches.produce_acked([("t", k, b"a")]))
    await settle()
    second = asyncio.create_task(batches.produce_acked([("t", k, b"b")]))
    third = asyncio.create_task(batches.produce_acked([("t", k, b"c")]))
    await settle()
    producer.acks[0].set_result(None)
    await settle()
    producer.acks[1].set_exception(KafkaConnectionError())
    for task in (second, third):
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(task, 1)
    await first
    again = asyncio.create_task(batches.produce_acked([("t", k, b"d")]))
    await settle()
    assert producer.sent[-1] == ("t", 0, [b"d"])
    producer.acks[-1].set_result(None)
    await asyncio.wait_for(again, 1)


async def test_a_full_batch_leaves_first_and_an_oversized_record_goes_alone_in_its_turn():
    producer = FakeProducer(capacity=4)
    batches = BatchProducer(producer)
    k = key_for(0)
    records = [("t", k, v) for v in (b"aa", b"bb", b"cc", b"toolarge", b"dd")]
    request = asyncio.create_task(batches.produce_acked(records))
    for _ in range(4):
        await settle()
        for ack in producer.acks:
            if not ack.done():
                ack.set_result(None)
    await asyncio.wait_for(request, 1)
    assert [values for _, _, values in producer.sent] == [[b"aa", b"bb"], [b"cc"], [b"toolarge"], [b"dd"]]


async def test_a_request_that_gives_up_does_not_disturb_the_others_in_its_batch():
    producer = FakeProducer()
    batches = BatchProducer(producer)
    k = key_for(0)
    first = asyncio.create_task(batches.produce_acked([("t", k, b"a")]))
    await settle()
    impatient = asyncio.create_task(batches.produce_acked([("t", k, b"b")]))
    patient = asyncio.create_task(batches.produce_acked([("t", k, b"c")]))
    await settle()
    impatient.cancel()
    producer.acks[0].set_result(None)
    await settle()
    producer.acks[1].set_result(None)
    await asyncio.wait_for(patient, 1)
    await first
    assert producer.sent[1] == ("t", 0, [b"b", b"c"])
