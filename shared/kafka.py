"""Kafka clients built one way: producers (acks=all, no idempotence: Tansu rejects InitProducerId v0) and topic creation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from shared.errors import TransientError
from shared.topics import ALL_TOPICS, Topic

log = logging.getLogger(__name__)


def make_producer(bootstrap: str, client_id: str, **overrides) -> AIOKafkaProducer:
    """A producer whose send resolves only when the broker has the record (acks=all)."""
    options = dict(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        acks="all",
        linger_ms=2,
        max_batch_size=1 << 20,
        max_request_size=4 << 20,
        request_timeout_ms=15000,
        enable_idempotence=False,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


async def ensure_topics(bootstrap: str, partitions: int = 4,
                        topics: Iterable[Topic] = ALL_TOPICS, timeout: float = 30.0) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="omnicrm-admin",
                                request_timeout_ms=int(timeout * 1000))
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await admin.start()
            break
        except KafkaError as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise TransientError(f"broker {bootstrap} unreachable: {exc}") from exc
            await asyncio.sleep(0.2)
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                t.name,
                num_partitions=partitions if t.partitioned else 1,
                replication_factor=1,
                topic_configs={"cleanup.policy": "compact"} if t.compacted else {},
            )
            for t in topics
            if t.name not in existing
        ]
        if wanted:
            try:
                await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass  # a concurrent start created them first
    finally:
        await admin.close()
