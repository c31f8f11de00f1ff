"""The dashboard: metrics parsed, rates measured, drawing pure and tolerant of missing metrics."""

from __future__ import annotations

import httpx
from rich.console import Console

from shared.dashboard import Dashboard, ServiceStats, Snapshot, parse_metrics, render, service_stats

INGESTION_METRICS = """\
# HELP omnicrm_ingestion_events_produced_total Records published, per topic.
# TYPE omnicrm_ingestion_events_produced_total counter
omnicrm_ingestion_events_produced_total{topic="ingest.sales.v1"} 120.0
omnicrm_ingestion_events_produced_total{topic="ingest.profiles.v1"} 30.0
"""
TRIGGERS_METRICS = """\
# TYPE omnicrm_triggers_events_consumed_total counter
omnicrm_triggers_events_consumed_total{topic="loyalty.events.v1"} 40.0
# TYPE omnicrm_triggers_consumer_lag gauge
omnicrm_triggers_consumer_lag{topic="loyalty.events.v1",partition="0"} 3.0
omnicrm_triggers_consumer_lag{topic="loyalty.events.v1",partition="1"} 4.0
# TYPE omnicrm_triggers_fired_total counter
omnicrm_triggers_fired_total{kind="welcome"} 9.0
omnicrm_triggers_triggers_fired_total{kind="geo_thank_you"} 4.0
"""
NOTIFICATIONS_METRICS = """\
# TYPE omnicrm_notifications_decisions_total counter
omnicrm_notifications_decisions_total{channel="sms",status="sent"} 5.0
omnicrm_notifications_decisions_total{channel="email",status="suppressed"} 2.0
"""


def text_of(renderable) -> str:
    console = Console(record=True, width=140, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_service_stats_sum_labels_and_leave_missing_metrics_empty() -> None:
    stats = service_stats("triggers", "http://x", parse_metrics(TRIGGERS_METRICS))
    assert stats.consumed == 40 and stats.lag == 7
    assert stats.produced is None and stats.dlq is None


def test_render_with_everything_missing_does_not_fail() -> None:
    snapshot = Snapshot(at=0.0, services=(ServiceStats("identity", "http://x", up=False,
                                                       error="ConnectError"),),
                        problems=("identity: /metrics at http://x did not answer (ConnectError)",))
    text = text_of(render(snapshot))
    assert "identity" in text and "down" in text and "—" in text
    assert "did not answer" in text


def test_render_shows_rates_triggers_notifications_and_messages() -> None:
    snapshot = Snapshot(
        at=10.0, elapsed=75.0, traffic="sent 1,200 of 5,000",
        services=(ServiceStats("ingestion", "u", True, produced=150, in_rate=None, out_rate=42.5),
                  ServiceStats("triggers", "u", True, consumed=40, lag=7, in_rate=3.0)),
        triggers={"welcome": 9, "geo_thank_you": 4},
        notifications={("sms", "sent"): 5, ("email", "suppressed"): 2},
        messages=("en sms: Thanks for visiting our SoHo store today",))
    text = text_of(render(snapshot))
    for expected in ("42.5", "3.0", "welcome", "geo_thank_you", "suppressed", "sms", "SoHo",
                     "sent 1,200 of 5,000", "1m15s"):
        assert expected in text, expected


def test_poll_measures_rates_and_degrades_when_a_service_is_down() -> None:
    counters = {"value": 100.0}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.port == 8000:
            body = INGESTION_METRICS.replace("120.0", str(counters["value"]))
            return httpx.Response(200, text=body)
        if request.url.port == 8003:
            return httpx.Response(200, text=TRIGGERS_METRICS)
        if request.url.port == 8004:
            return httpx.Response(200, text=NOTIFICATIONS_METRICS)
        raise httpx.ConnectError("refused", request=request)

    now = {"t": 0.0}
    dashboard = Dashboard({"ingestion": "http://h:8000", "identity": "http://h:8001",
                           "triggers": "http://h:8003", "notifications": "http://h:8004"},
                          client=httpx.Client(transport=httpx.MockTransport(answer)),
                          clock=lambda: now["t"])
    first = dashboard.poll()
    assert first.services[0].out_rate is None
    now["t"], counters["value"] = 2.0, 200.0
    second = dashboard.poll(traffic="sending")
    ingestion, identity = second.services[0], second.services[1]
    assert ingestion.out_rate == 50.0  # (230 - 130) / 2 s
    assert not identity.up and any("identity" in p for p in second.problems)
    assert second.triggers == {"welcome": 9, "geo_thank_you": 4}
    assert second.notifications[("sms", "sent")] == 5
    assert second.total_traffic("ingestion") == 230 and second.total_traffic("identity") == 0
    text = text_of(render(second))
    assert "50.0" in text and "down" in text


def test_message_sampler_shows_the_latest_rendered_messages_and_survives_errors() -> None:
    from shared.dashboard import MessageSampler

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer k"
        if request.url.path == "/v1/customers/lookup":
            email = request.url.params["email"]
            if email == "gone@example.com":
                return httpx.Response(404, json={"error": "not_found"})
            if email == "boom@example.com":
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(200, json={"customer_id": "c-1"})
        return httpx.Response(200, json={"notifications": [
            {"kind": "geo_thank_you", "channel": "sms", "status": "sent",
             "decided_at": "2026-03-02T10:00:00+00:00",
             "body": "Thanks for visiting our SoHo store today"},
            {"kind": "welcome", "channel": None, "status": "suppressed", "body": None}]})

    now = {"t": 0.0}
    sampler = MessageSampler("http://id", "http://notes", "k", every=5, clock=lambda: now["t"],
                             client=httpx.Client(transport=httpx.MockTransport(answer)))
    lines = sampler.sample(["boom@example.com", "gone@example.com", "a@example.com"])
    assert lines == ("geo_thank_you · sms · sent: Thanks for visiting our SoHo store today",)
    assert sampler.sample(["a@example.com"]) == lines  # throttled, still shown
