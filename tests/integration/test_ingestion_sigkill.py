"""SIGKILL of the ingestion process under load: every event answered `accepted` is in Kafka, and every
id the dedupe table holds is too (accepted = acked by the broker before the commit)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import asyncpg
import httpx
import pytest

from shared.stack import create_database, drop_database, free_port
from tests.integration.test_ingestion_http import (
    POS,
    POS_KEY,
    ROOT,
    _skip_existing_raw_records,
    decoded,
    read_topic,
    sale,
)
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio


async def test_sigkill_under_load_loses_no_accepted_event(broker, pg_server, unique):
    name = f"omnicrm_kill_{unique}"
    dsn = await create_database(pg_server, name)
    # Its own database (schema `ingestion`), its raw consumer starting at the end of ingest.raw.v1.
    await _skip_existing_raw_records(dsn, broker, "ingestion", "ingestion.hot")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICRM_")}
    env.update(KAFKA_BOOTSTRAP_SERVERS=broker, DATABASE_URL=dsn, OMNICRM_API_KEYS=f"pos:{POS_KEY}:ingest",
               OMNICRM_INGESTION_PORT=str(port), OMNICRM_RATE_LIMIT_PER_SECOND="0", PYTHONUNBUFFERED="1")
    log_dir = ROOT / ".omnicrm" / "test-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"ingestion-sigkill-{unique}.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.ingestion"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    accepted: set[str] = set()
    stop = asyncio.Event()

    async def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"ingestion exited with {proc.returncode}")
        try:
            async with httpx.AsyncClient(base_url=base, timeout=2) as c:
                return (await c.get("/ready")).status_code == 200
        except httpx.HTTPError:
            return False

    async def publisher(n: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            i = 0
            while not stop.is_set():
                batch = [sale(f"kill-{unique}-{n}-{i}-{j}", f"k{j % 40}-{unique}@example.com")
                         for j in range(100)]
                i += 1
                try:
                    r = await client.post("/v1/events", json={"events": batch}, headers=POS)
                except httpx.HTTPError:
                    return  # the process died mid-request: the outcome is unknown, not accepted
                if r.status_code == 202:
                    accepted.update(x["event_id"] for x in r.json()["results"] if x["status"] == "accepted")

    try:
        await eventually(ready, timeout=30, interval=0.2, message="ingestion ready")
        tasks = [asyncio.create_task(publisher(n)) for n in range(4)]
        await eventually(lambda: asyncio.sleep(0, len(accepted) >= 3000), timeout=30, message="3000 accepted")
        proc.send_signal(signal.SIGKILL)  # under load: requests are in flight
        proc.wait(10)
        stop.set()
        await asyncio.gather(*tasks)

        prefix = f"kill-{unique}-"
        in_kafka = set()
        for _, value in decoded(await read_topic(broker, "ingest.sales.v1"), "omnicrm.ingest.Event"):
            event_id = value["event_id"]
            if event_id.startswith(prefix):
                in_kafka.add(event_id)
        conn = await asyncpg.connect(dsn)
        try:
            seen = {r["event_id"] for r in await conn.fetch(
                "SELECT event_id FROM ingestion.seen_events WHERE event_id LIKE $1", prefix + "%")}
        finally:
            await conn.close()
        assert len(accepted) >= 3000
        assert accepted - in_kafka == set(), "an accepted event is not in Kafka"
        assert accepted <= seen
        assert seen - in_kafka == set(), "an id was marked seen without being in Kafka"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        await drop_database(pg_server, name)
