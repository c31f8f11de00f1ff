"""One pipeline of the five services as processes, on a broker and database of its own, per session."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from shared.kafka import ensure_topics
from shared.stack import Broker, create_database, drop_database, free_port
from tests.conftest import ROOT
from tests.support.pipeline import Pipeline


@pytest.fixture(scope="session")
def pipeline(pg_server: str) -> Iterator[Pipeline]:
    log_dir = ROOT / ".omnicrm" / "test-logs" / "e2e"
    log_dir.mkdir(parents=True, exist_ok=True)
    broker = Broker(port=free_port(), log_path=log_dir / "broker.log").start()
    name = f"omnicrm_e2e_{uuid.uuid4().hex[:8]}"
    dsn = asyncio.run(create_database(pg_server, name))
    asyncio.run(ensure_topics(broker.bootstrap, 4))
    p = Pipeline(broker.bootstrap, dsn, log_dir, env={"OMNICRM_PARTITIONS": "4"})
    try:
        p.start()
        p.wait_ready(timeout=90)
        yield p
    finally:
        p.stop()
        broker.stop()
        asyncio.run(drop_database(pg_server, name))
