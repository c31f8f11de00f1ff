"""The notifications service wired by app.build on a real broker and PostgreSQL, in process:
a profile and a trigger produced to Kafka come out as a sent (sandbox) notification, readable
over HTTP, with its outcomes published on notifications.outcomes.v1."""

from __future__ import annotations

import asyncio
import datetime as dt

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from services.notifications.app import build
from shared.config import ApiKey, Settings
from shared.kafka import make_producer
from shared.runtime import Runtime
from shared.stack import free_port
from shared.topics import IDENTITY_PROFILES, NOTIFICATION_OUTCOMES, PROFILE, TRIGGER, TRIGGERS_FIRED
from tests.conftest import ROOT
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio


async def test_profile_and_trigger_in_kafka_become_a_sent_notification(broker, database, unique):
    port = free_port()
    settings = Settings(kafka_bootstrap_servers=broker, database_url=database,
                        api_keys=(ApiKey("reader", "read-key", frozenset({"read"})),),
                        delivery="sandbox", ports={"notifications": port}, partitions=2)
    runtime = Runtime("notifications", settings, migrations=ROOT / "services" / "notifications" / "migrations",
                      schema=f"notif_{unique}")
    app = build(runtime)
    running = asyncio.create_task(runtime.run(app))
    cid = f"svc-{unique}"
    now = dt.datetime.now(dt.UTC)
    # A zone where it is midday now, so quiet hours never defer this test's message.
    offset = 12 - now.hour
    tz = "Etc/GMT" + (f"{-offset:+d}" if offset else "")
    try:
        producer = make_producer(broker, "notif-test")
        await producer.start()
        try:
            await producer.send_and_wait(IDENTITY_PROFILES.name, runtime.codec.encode(PROFILE, {
                "customer_id": cid, "identifiers": {"email": ["x@example.com"]}, "locale": "zh-Hant",
                "timezone": tz, "consents": {"email": "opted_in"}, "created_at": now,
                "updated_at": now, "version": 1}), key=cid.encode())
            await eventually(lambda: runtime.pool.fetchval(
                "SELECT count(*) FROM contacts WHERE customer_id = $1", cid) if runtime.pool else _false(),
                timeout=15, message="profile applied")
            await producer.send_and_wait(TRIGGERS_FIRED.name, runtime.codec.encode(TRIGGER, {
                "trigger_id": f"t-{unique}", "kind": "tier_upgrade", "customer_id": cid, "fired_at": now,
                "period": "gold", "context": {"tier": "gold"}, "offer": None, "occurred_at": now}),
                key=cid.encode())
        finally:
            await producer.stop()

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async def sent():
                r = await client.get(f"/v1/customers/{cid}/notifications",
                                     headers={"Authorization": "Bearer read-key"})
                items = r.json().get("notifications", []) if r.status_code == 200 else []
                return items if items and items[0]["status"] == "sent" else None
            items = await eventually(sent, timeout=15, message="notification sent")
        assert items[0]["channel"] == "email" and "恭喜" in items[0]["body"]
        consumer = AIOKafkaConsumer(NOTIFICATION_OUTCOMES.name, bootstrap_servers=broker,
                                    auto_offset_reset="earliest", group_id=f"check-{unique}")
        await consumer.start()
        try:
            seen: list[str] = []

            async def published():
                for msgs in (await consumer.getmany(timeout_ms=500)).values():
                    seen.extend(runtime.codec.decode(m.value, "omnicrm.notifications.NotificationOutcome")["status"]
                                for m in msgs if m.key == cid.encode())
                return "sent" in seen
            await eventually(published, timeout=15, message="outcomes published")
            assert seen[:2] == ["pending", "sent"]
        finally:
            await consumer.stop()
    finally:
        runtime.stopping.set()
        await asyncio.wait_for(running, 30)


async def _false():
    return False
