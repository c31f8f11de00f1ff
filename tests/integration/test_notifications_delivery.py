"""Delivery against real protocol peers: a local HTTP server standing in for Twilio and the WhatsApp
Cloud API (records requests, fails on demand), a real aiosmtpd SMTP server, and the dispatcher
killed with SIGKILL mid-send and restarted."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import httpx
import pytest
from aiosmtpd.controller import Controller

from services.notifications.api import hub_signature, install_routes, twilio_signature
from services.notifications.handlers import NotificationHandler
from services.notifications.metrics import NotificationMetrics
from services.notifications.policy import NotificationRules, notification_id
from services.notifications.providers import ProviderConfig, build_providers
from services.notifications.sender import Dispatcher
from services.notifications.templates import Templates
from shared.auth import KeyRing
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import Record
from shared.clock import EventClock, FixedClock
from shared.db import setup_database
from shared.http import create_app
from shared.metrics import ServiceMetrics
from shared.rules import load_rules
from shared.stack import free_port
from shared.topics import IDENTITY_PROFILES, OUTCOME, PROFILE, TRIGGER, TRIGGERS_FIRED
from tests.conftest import ROOT
from tests.support.polling import eventually

pytestmark = pytest.mark.asyncio
MIGRATIONS = ROOT / "services" / "notifications" / "migrations"
CODEC = AvroCodec(SchemaRegistry.load())
RULES = dataclasses.replace(NotificationRules.from_rules(load_rules(environ={})),
                            base_delay_seconds=0.05, max_delay_seconds=0.2)
TEMPLATES = Templates(RULES.kinds, RULES.locales)
NOON = dt.datetime(2026, 6, 10, 12, 0, tzinfo=dt.UTC)
SID, TOKEN, WA_TOKEN, PHONE_ID = "AC0123456789", "twilio-token", "wa-token", "1098765"


class Peer:
    """A local HTTP server answering like Twilio and WhatsApp Cloud; fails on demand; records all."""

    def __init__(self, delay: float = 0.0) -> None:
        self.requests: list[dict] = []
        self.script: dict[str, list[int]] = {}  # "sms" / "whatsapp" -> statuses to answer first
        self.delay = delay
        self.lock = threading.Lock()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                channel = "sms" if "/Messages.json" in self.path else "whatsapp"
                with peer.lock:
                    n = len(peer.requests) + 1
                    peer.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "body": body, "channel": channel,
                                          "nid": self.headers.get("X-Omnicrm-Notification-Id")})
                    queue = peer.script.get(channel) or []
                    status = queue.pop(0) if queue else (201 if channel == "sms" else 200)
                if peer.delay:
                    time.sleep(peer.delay)
                if status >= 300:
                    payload = ({"code": 21211, "message": "invalid", "status": status} if channel == "sms"
                               else {"error": {"message": "bad", "type": "OAuthException", "code": 131009}})
                elif channel == "sms":
                    payload = {"sid": f"SM{n:032d}", "status": "queued"}
                else:
                    payload = {"messaging_product": "whatsapp", "messages": [{"id": f"wamid.{n}"}]}
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, channel: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["channel"] == channel]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """aiosmtpd handler keeping every message; can refuse recipients with a code."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.refuse: str | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if self.refuse:
            return self.refuse
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted for delivery"


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


@pytest.fixture
def smtp():
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield box, controller.port
    controller.stop()


def provider_config(peer_url: str, smtp_port: int = 1) -> ProviderConfig:
    return ProviderConfig.from_env({
        "OMNICRM_TWILIO_URL": peer_url, "OMNICRM_TWILIO_ACCOUNT_SID": SID,
        "OMNICRM_TWILIO_AUTH_TOKEN": TOKEN, "OMNICRM_TWILIO_FROM": "+15005550006",
        "OMNICRM_WHATSAPP_URL": peer_url, "OMNICRM_WHATSAPP_TOKEN": WA_TOKEN,
        "OMNICRM_WHATSAPP_PHONE_NUMBER_ID": PHONE_ID, "OMNICRM_WHATSAPP_APP_SECRET": "wa-secret",
        "OMNICRM_SMTP_HOST": "127.0.0.1", "OMNICRM_SMTP_PORT": str(smtp_port),
        "OMNICRM_SMTP_FROM": "Shop <no-reply@shop.example>", "OMNICRM_PROVIDER_TIMEOUT_SECONDS": "5",
    })


def record(topic, subject, value, key: str) -> Record:
    raw = CODEC.encode(subject, value)
    return Record(topic.name, 0, 0, key.encode(), CODEC.decode(raw, subject), raw, 0)


def profile(cid: str, consents: dict, *, tz: str = "UTC", preferred: str | None = None) -> Record:
    n = int(cid.rsplit("-", 1)[-1]) if cid.rsplit("-", 1)[-1].isdigit() else 0
    return record(IDENTITY_PROFILES, PROFILE, {
        "customer_id": cid, "identifiers": {"email": [f"c{n}@example.com"], "phone": [f"+1212555{n:04d}"]},
        "first_name": "Ann", "locale": "en", "timezone": tz, "preferred_channel": preferred,
        "consents": consents, "created_at": NOON, "updated_at": NOON, "version": 1}, cid)


def trigger(tid: str, cid: str, kind: str = "welcome", at: dt.datetime = NOON) -> Record:
    return record(TRIGGERS_FIRED, TRIGGER, {
        "trigger_id": tid, "kind": kind, "customer_id": cid, "fired_at": at, "period": "",
        "context": {}, "offer": None, "cause_event_id": None, "occurred_at": at}, cid)


class Env:
    def __init__(self, pool, clock, metrics, providers, dsn) -> None:
        self.pool, self.clock, self.metrics, self.providers, self.dsn = pool, clock, metrics, providers, dsn
        self.handler = NotificationHandler(codec=CODEC, clock=clock, rules=RULES, templates=TEMPLATES,
                                           metrics=metrics)

    async def apply(self, *records: Record) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await self.handler(conn, list(records))

    def dispatcher(self, **kw) -> Dispatcher:
        return Dispatcher(self.pool, self.dsn, providers=self.providers, codec=CODEC, clock=self.clock,
                          rules=RULES, metrics=self.metrics, idle_poll=0.05, **kw)

    async def run_until(self, dispatcher: Dispatcher, done, timeout: float = 10.0):
        await dispatcher.start()
        try:
            async def probe():
                await dispatcher.dispatch_once()
                await dispatcher.drain()
                return await done()
            return await eventually(probe, timeout=timeout, interval=0.05)
        finally:
            await dispatcher.stop()

    async def rows(self) -> dict[str, dict]:
        return {f"{r['trigger_id']}/{r['channel']}": dict(r) for r in await self.pool.fetch("SELECT * FROM notifications")}

    async def outcomes(self) -> list[dict]:
        rows = await self.pool.fetch("SELECT value FROM outbox WHERE topic = 'notifications.outcomes.v1' ORDER BY id")
        return [CODEC.decode(r["value"], OUTCOME) for r in rows]


@pytest.fixture
async def make_env(database, unique):
    pools = []
    clients = []

    async def make(config: ProviderConfig, delivery: str = "live") -> Env:
        pool = await setup_database(database, f"notif_{unique}", MIGRATIONS)
        pools.append(pool)
        client = httpx.AsyncClient()
        clients.append(client)
        return Env(pool, FixedClock(NOON), NotificationMetrics(ServiceMetrics("notifications")),
                   build_providers(delivery, config, client), database)

    yield make
    for c in clients:
        await c.aclose()
    for p in pools:
        await p.close()


async def test_twilio_503_twice_then_201_is_sent_once_in_the_documented_shape(peer, make_env):
    env = await make_env(provider_config(peer.url))
    peer.script["sms"] = [503, 503]
    await env.apply(profile("c-1", {"sms": "opted_in"}), trigger("t1", "c-1"))
    d = env.dispatcher()

    async def sent():
        return (await env.rows())["t1/sms"]["status"] == "sent"
    await env.run_until(d, sent)
    requests = peer.of("sms")
    assert len(requests) == 3
    req = requests[-1]
    assert req["path"] == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert req["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert req["headers"]["Authorization"] == "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    form = {k: v[0] for k, v in parse_qs(req["body"].decode()).items()}
    assert form["To"] == "+12125550001" and form["From"] == "+15005550006"
    assert form["Body"].startswith("Welcome, Ann!")
    row = (await env.rows())["t1/sms"]
    assert (row["attempt"], row["provider"], row["provider_message_id"]) == (3, "twilio", f"SM{3:032d}")
    statuses = [(o["status"], o["reason"], o["attempt"]) for o in await env.outcomes()]
    assert statuses == [("pending", None, 0), ("pending", "retry http_503 code 21211", 1),
                        ("pending", "retry http_503 code 21211", 2), ("sent", None, 3)]
    metrics = env.metrics.base.exposition()[0].decode()
    assert 'omnicrm_notifications_provider_errors_total{provider="twilio",retryable="true"} 2.0' in metrics
    assert "+1212555" not in metrics


async def test_whatsapp_400_is_not_retried_and_fails_over_to_sms(peer, make_env):
    env = await make_env(provider_config(peer.url))
    peer.script["whatsapp"] = [400]
    await env.apply(profile("c-2", {"whatsapp": "opted_in", "sms": "opted_in"}), trigger("t2", "c-2"))

    async def sms_sent():
        return (await env.rows()).get("t2/sms", {}).get("status") == "sent"
    await env.run_until(env.dispatcher(), sms_sent)
    wa = peer.of("whatsapp")
    assert len(wa) == 1 and len(peer.of("sms")) == 1
    assert wa[0]["path"] == f"/v21.0/{PHONE_ID}/messages"
    assert wa[0]["headers"]["Authorization"] == f"Bearer {WA_TOKEN}"
    payload = json.loads(wa[0]["body"])
    assert payload["messaging_product"] == "whatsapp" and payload["type"] == "template"
    assert payload["to"] == "12125550002" and payload["template"]["name"] == "omnicrm_welcome"
    assert payload["template"]["language"] == {"code": "en"}
    assert payload["biz_opaque_callback_data"] == notification_id("t2", "whatsapp")
    rows = await env.rows()
    assert (rows["t2/whatsapp"]["status"], rows["t2/whatsapp"]["reason"]) == ("failed", "http_400 code 131009")
    assert [(o["channel"], o["status"], o["reason"]) for o in await env.outcomes()] == [
        ("whatsapp", "pending", None), ("whatsapp", "failed", "http_400 code 131009"),
        ("sms", "pending", "failover"), ("sms", "sent", None)]


async def test_email_reaches_a_real_smtp_server_with_the_rendered_text(smtp, make_env):
    box, port = smtp
    env = await make_env(provider_config("http://127.0.0.1:9", port))
    await env.apply(profile("c-3", {"email": "opted_in"}), trigger("t3", "c-3"))

    async def sent():
        return (await env.rows())["t3/email"]["status"] == "sent"
    await env.run_until(env.dispatcher(), sent)
    assert len(box.messages) == 1
    mail_from, rcpt, content = box.messages[0]
    text = content.decode()
    assert rcpt == ["c3@example.com"] and mail_from == "no-reply@shop.example"
    assert "Subject: Welcome, Ann!" in text and "You are now a member" in text
    assert f"Message-ID: <{notification_id('t3', 'email')}@shop.example>" in text


async def test_last_channel_refusing_permanently_ends_failed_with_the_providers_reason(smtp, make_env):
    box, port = smtp
    box.refuse = "550 5.1.1 mailbox unavailable"
    env = await make_env(provider_config("http://127.0.0.1:9", port))
    await env.apply(profile("c-4", {"email": "opted_in"}), trigger("t4", "c-4"))

    async def failed():
        return (await env.rows())["t4/email"]["status"] == "failed"
    await env.run_until(env.dispatcher(), failed)
    assert (await env.rows())["t4/email"]["reason"] == "smtp_550 recipient refused"


async def test_deferred_send_wakes_at_nine_and_opt_out_before_then_stops_it(peer, make_env):
    env = await make_env(provider_config(peer.url))
    env.clock.set(dt.datetime(2026, 6, 10, 22, 0, tzinfo=dt.UTC))
    await env.apply(profile("c-5", {"sms": "opted_in"}), profile("c-6", {"sms": "opted_in"}),
                    trigger("t5", "c-5", at=env.clock.now()), trigger("t6", "c-6", at=env.clock.now()))
    d = env.dispatcher()
    await d.start()
    try:
        assert await d.dispatch_once() == 0
        await env.apply(profile("c-6", {"sms": "opted_out"}))
        env.clock.set(dt.datetime(2026, 6, 11, 9, 0, tzinfo=dt.UTC))
        assert await d.dispatch_once() == 2
        await d.drain()
    finally:
        await d.stop()
    rows = await env.rows()
    assert rows["t5/sms"]["status"] == "sent" and len(peer.of("sms")) == 1
    assert (rows["t6/sms"]["status"], rows["t6/sms"]["reason"]) == ("suppressed", "no_consent")


async def test_sandbox_records_the_rendered_message_and_calls_nobody(peer, make_env):
    env = await make_env(provider_config(peer.url), delivery="sandbox")
    await env.apply(profile("c-7", {"sms": "opted_in"}), trigger("t7", "c-7"))

    async def sent():
        return (await env.rows())["t7/sms"]["status"] == "sent"
    await env.run_until(env.dispatcher(), sent)
    row = (await env.rows())["t7/sms"]
    assert row["provider"] == "sandbox" and row["body"].startswith("Welcome, Ann!")
    assert peer.requests == []


async def test_delivery_callbacks_verified_and_applied(peer, make_env):
    env = await make_env(provider_config(peer.url))
    await env.apply(profile("c-8", {"sms": "opted_in", "email": "opted_in"}),
                    profile("c-9", {"whatsapp": "opted_in", "email": "opted_in"}),
                    trigger("t8", "c-8"), trigger("t9", "c-9"))

    async def both_sent():
        rows = await env.rows()
        return rows["t8/sms"]["status"] == "sent" and rows["t9/whatsapp"]["status"] == "sent"
    await env.run_until(env.dispatcher(), both_sent)
    rows = await env.rows()
    app = create_app("notifications", keyring=KeyRing([]), metrics=env.metrics.base, ready=lambda: None)
    install_routes(app, pool=lambda: env.pool, codec=CODEC, clock=env.clock,
                   config=provider_config(peer.url), metrics=env.metrics)
    url = "http://testserver/v1/providers/twilio/status"
    form = {"MessageSid": rows["t8/sms"]["provider_message_id"], "MessageStatus": "delivered"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://testserver") as client:
        bad = await client.post("/v1/providers/twilio/status", data=form, headers={"X-Twilio-Signature": "nope"})
        assert bad.status_code == 401
        ok = await client.post("/v1/providers/twilio/status", data=form,
                               headers={"X-Twilio-Signature": twilio_signature(TOKEN, url, form)})
        assert ok.status_code == 200 and ok.json()["updated"] == 1
        wa = json.dumps({"object": "whatsapp_business_account", "entry": [{"changes": [{"value": {"statuses": [{
            "id": rows["t9/whatsapp"]["provider_message_id"], "status": "failed", "recipient_id": "12125550009",
            "errors": [{"code": 131026, "title": "Message undeliverable"}]}]}}]}]}).encode()
        r = await client.post("/v1/providers/whatsapp/status", content=wa,
                              headers={"X-Hub-Signature-256": hub_signature("wa-secret", wa),
                                       "Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["updated"] == 1
        assert (await client.post("/v1/providers/email/status", content=b"{}")).status_code == 503
    rows = await env.rows()
    assert rows["t8/sms"]["status"] == "delivered"
    assert (rows["t9/whatsapp"]["status"], rows["t9/whatsapp"]["reason"]) == ("failed", "whatsapp_error 131026")
    assert rows["t9/email"]["status"] == "pending"  # failed over to the next consented channel


CHILD = """
import asyncio, os, sys
from services.notifications.policy import NotificationRules
from services.notifications.providers import ProviderConfig, build_providers
from services.notifications.sender import Dispatcher
from services.notifications.metrics import NotificationMetrics
from services.notifications.templates import Templates
from shared.avro import AvroCodec, SchemaRegistry
from shared.clock import FixedClock
from shared.db import create_pool
from shared.metrics import ServiceMetrics
import datetime as dt, httpx

async def main():
    pool = await create_pool(os.environ["DSN"], os.environ["SCHEMA"])
    client = httpx.AsyncClient()
    rules = NotificationRules()
    d = Dispatcher(pool, os.environ["DSN"], providers=build_providers("live", ProviderConfig.from_env(), client),
                   codec=AvroCodec(SchemaRegistry.load()), clock=FixedClock(dt.datetime(2026, 6, 10, 12, tzinfo=dt.UTC)),
                   rules=rules, metrics=NotificationMetrics(ServiceMetrics("notifications")), idle_poll=0.05)
    print("ready", flush=True)
    await d.run()

asyncio.run(main())
"""


async def test_sigkill_mid_send_loses_nothing_and_repeats_only_in_flight_sends(make_env, unique):
    peer = Peer(delay=0.3)
    try:
        env = await make_env(provider_config(peer.url))
        n = 40
        records = []
        for i in range(n):
            records += [profile(f"k-{i}", {"sms": "opted_in"}), trigger(f"k{i}", f"k-{i}")]
        await env.apply(*records)
        child_env = dict(os.environ, DSN=env.dsn, SCHEMA=f"notif_{unique}", OMNICRM_TWILIO_URL=peer.url,
                         OMNICRM_TWILIO_ACCOUNT_SID=SID, OMNICRM_TWILIO_AUTH_TOKEN=TOKEN,
                         OMNICRM_TWILIO_FROM="+15005550006")

        def spawn() -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, env=child_env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        first = spawn()
        await eventually(lambda: _async(len(peer.of("sms")) >= 12), timeout=15, message="sends started")
        first.send_signal(signal.SIGKILL)
        first.wait(5)
        in_flight = {str(r["notification_id"]) for r in await env.pool.fetch(
            "SELECT notification_id FROM notifications WHERE status = 'pending' AND claimed_by IS NOT NULL")}
        assert in_flight, "the kill should land while sends are in flight"
        second = spawn()
        try:
            async def all_sent():
                return await env.pool.fetchval("SELECT count(*) FROM notifications WHERE status = 'sent'") == n
            await eventually(all_sent, timeout=15, message="all sent after restart")
        finally:
            second.send_signal(signal.SIGTERM)
            second.kill()
            second.wait(5)
        counts = Counter(r["nid"] for r in peer.of("sms"))
        assert set(counts) == {notification_id(f"k{i}", "sms") for i in range(n)}
        repeated = {nid for nid, c in counts.items() if c > 1}
        assert all(c <= 2 for c in counts.values())
        assert repeated <= in_flight
    finally:
        peer.close()


async def _async(value):
    return value



async def test_event_clock_sends_a_deferred_message_as_of_its_due_time_not_the_replays_now(peer, make_env):
    """In a replay the dispatcher's timer looks whenever it looks; by then the event clock may stand in
    the next night's quiet hours. A message due at 09:00 is checked and stamped as of 09:00, so two
    replays deliver it identically."""
    env = await make_env(provider_config(peer.url))
    env.clock = EventClock()
    env.handler = NotificationHandler(codec=CODEC, clock=env.clock, rules=RULES, templates=TEMPLATES,
                                      metrics=env.metrics)
    evening = dt.datetime(2026, 6, 10, 22, 0, tzinfo=dt.UTC)
    await env.apply(profile("c-9", {"sms": "opted_in"}), trigger("t9", "c-9", at=evening))
    nine = dt.datetime(2026, 6, 11, 9, 0, tzinfo=dt.UTC)
    assert (await env.rows())["t9/sms"]["due_at"] == nine  # decided as of its fired_at: quiet hours
    env.clock.observe(dt.datetime(2026, 6, 11, 23, 30, tzinfo=dt.UTC))  # the replay has moved on

    async def sent():
        return (await env.rows())["t9/sms"]["status"] == "sent"
    await env.run_until(env.dispatcher(), sent)
    row = (await env.rows())["t9/sms"]
    assert row["sent_at"] == nine and len(peer.of("sms")) == 1
    assert [(o["status"], o["occurred_at"]) for o in await env.outcomes()][-1] == ("sent", nine)


async def test_sandbox_batch_still_defers_at_night_and_stops_on_opt_out(peer, make_env):
    """Sandbox sends of a claim are recorded together; the checks at send time still hold for each."""
    env = await make_env(provider_config(peer.url), delivery="sandbox")
    await env.apply(*[profile(f"c-{i}", {"sms": "opted_in"}) for i in (20, 21, 22)],
                    profile("c-23", {"sms": "opted_in"}, tz="Asia/Tokyo"),
                    *[trigger(f"t{i}", f"c-{i}") for i in (20, 21, 22, 23)])
    await env.apply(profile("c-21", {"sms": "opted_out"}))  # after the decision, before the send
    env.clock.set(dt.datetime(2026, 6, 10, 14, 0, tzinfo=dt.UTC))  # 23:00 in Tokyo: quiet hours

    async def settled():
        rows = await env.rows()
        return all(rows[f"t{i}/sms"]["status"] != "pending" for i in (20, 21, 22, 23))
    d = env.dispatcher()
    await env.run_until(d, settled)
    rows = await env.rows()
    assert [rows[f"t{i}/sms"]["status"] for i in (20, 21, 22, 23)] == ["sent", "suppressed", "sent", "deferred"]
    assert rows["t21/sms"]["reason"] == "no_consent" and rows["t23/sms"]["reason"] == "quiet_hours"
    assert d.sent == 2 and peer.requests == []
    sent = [o for o in await env.outcomes() if o["status"] == "sent"]
    assert sorted(o["trigger_id"] for o in sent) == ["t20", "t22"]
    # recorded sent without a claim written first, still counted as one attempt
    assert [rows[f"t{i}/sms"]["attempt"] for i in (20, 22)] == [1, 1] and {o["attempt"] for o in sent} == {1}
