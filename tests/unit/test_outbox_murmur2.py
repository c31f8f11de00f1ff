"""The relay picks partitions itself: they must be exactly the ones aiokafka's default partitioner picks,
or records of one customer would land on two partitions and lose their order."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.outbox import murmur2


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_murmur2_equals_aiokafkas(key: bytes) -> None:
    assert murmur2(key) == aiokafka_murmur2(bytearray(key))


def test_partitions_equal_the_default_partitioners() -> None:
    rng = random.Random(7)
    partitioner = DefaultPartitioner()
    parts = list(range(12))
    for _ in range(3000):
        key = f"customer-{rng.getrandbits(64):x}".encode()
        assert (murmur2(key) & 0x7FFFFFFF) % len(parts) == partitioner(key, parts, parts)
