"""Publishing: batches of at most 1000 with a bearer key, retries, pacing, JSONL round trip."""

from __future__ import annotations

import datetime as dt
import json

import httpx
import pytest

from shared.generator import MALFORMED, generate, to_jsonl_line
from shared.publish import Pacer, PublishError, publish_http, read_jsonl, write_jsonl


def events(n: int) -> list[dict]:
    base = dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
    return [{"event_id": f"e{i}", "type": "page_view",
             "occurred_at": (base + dt.timedelta(seconds=i)).isoformat(),
             "customer": {"anonymous_id": "a"}, "properties": {}} for i in range(n)]


async def test_http_batches_of_at_most_1000_with_the_bearer_key() -> None:
    seen: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/events"
        assert request.headers["authorization"] == "Bearer s3cret"
        batch = json.loads(request.content)["events"]
        seen.append(len(batch))
        return httpx.Response(202, json={"accepted": len(batch) - 1, "duplicates": 1,
                                         "rejected": 0, "results": []})

    result = await publish_http(events(2500), "http://ingest:8000/", "s3cret",
                                transport=httpx.MockTransport(answer))
    assert seen == [1000, 1000, 500]
    assert (result.sent, result.accepted, result.duplicates, result.done) == (2500, 2497, 3, True)


async def test_http_retries_transient_failures_and_counts_all_rejected_batches() -> None:
    calls = {"n": 0}

    def answer(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(503, json={"error": "unavailable"})
        if calls["n"] == 2:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(422, json={"accepted": 0, "duplicates": 0, "rejected": 3})

    result = await publish_http(events(3), "http://ingest", "k",
                                transport=httpx.MockTransport(answer))
    assert (result.retries, result.rejected, result.sent) == (2, 3, 3)


async def test_http_wrong_key_is_one_clear_error() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(401, json={"error": "unauthorized"}))
    with pytest.raises(PublishError, match="401.*API key"):
        await publish_http(events(3), "http://ingest", "bad", transport=transport)


def test_pacer_caps_rate_and_compresses_event_time() -> None:
    now = {"t": 100.0}
    by_rate = Pacer(rate=10, clock=lambda: now["t"])
    assert [round(by_rate.due(e) - 100, 3) for e in events(4)] == [0, 0.1, 0.2, 0.3]
    by_time = Pacer(speedup=60, clock=lambda: now["t"])
    stream = events(1) + [events(121)[120]]  # two minutes apart in event time
    future = {**stream[1], "occurred_at": "2099-01-01T00:00:00+00:00", MALFORMED: "future_time"}
    assert by_time.due(stream[0]) == 100
    assert by_time.due(future) == 100, "a malformed time does not move the replay clock"
    assert by_time.due(stream[1]) == pytest.approx(102.0)


def test_jsonl_round_trip_keeps_every_event(tmp_path) -> None:
    world = list(generate(2, 50, 2, dt.date(2026, 3, 2)))
    path = tmp_path / "world.jsonl"
    assert write_jsonl(world, path) == len(world)
    assert [to_jsonl_line(e) for e in read_jsonl(path)] == [to_jsonl_line(e) for e in world]
