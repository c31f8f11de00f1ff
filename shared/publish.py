"""Publish a stream of events: as JSONL to a file, over HTTP to ingestion, or to `ingest.raw.v1`.

Pacing is shared by every sink: `rate` caps events per second, `speedup` replays event time
compressed (720 = a day in two minutes); with neither, events go as fast as the sink takes them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from shared.generator import MALFORMED, to_jsonl_line

MAX_BATCH = 1000  # CONTRACTS §2: at most 1000 events per request
FLUSH_SECONDS = 0.25  # a paced batch waits at most this long before it is sent


class PublishError(Exception):
    """The sink refused the stream in a way retrying cannot fix (bad key, bad URL, bad request)."""


@dataclass
class PublishResult:
    """Running totals, updated as batches are answered (read it from another thread for progress)."""

    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    retries: int = 0
    errors: list[str] = field(default_factory=list)
    done: bool = False

    def summary(self) -> str:
        return (f"sent {self.sent}: accepted {self.accepted}, duplicates {self.duplicates}, "
                f"rejected {self.rejected}")


class Pacer:
    """When each event is due, from an events/s cap and an event-time compression factor."""

    def __init__(self, rate: float | None = None, speedup: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0")
        if speedup is not None and speedup <= 0:
            raise ValueError("speedup must be > 0")
        self.rate, self.speedup, self.clock = rate, speedup, clock
        self.began: float | None = None
        self.count = 0
        self.first_event: float | None = None
        self.last_event: float | None = None

    def due(self, event: dict[str, Any]) -> float:
        """Monotonic time at which `event` may go out."""
        now = self.clock()
        if self.began is None:
            self.began = now
        due = self.began
        if self.rate:
            due = max(due, self.began + self.count / self.rate)
        self.count += 1
        if self.speedup:
            at = _event_seconds(event)
            # Malformed or wildly future times do not move the replay clock.
            if at is not None and MALFORMED not in event:
                if self.first_event is None:
                    self.first_event = self.last_event = at
                elif at - (self.last_event or at) < 2 * 86_400:
                    self.last_event = max(self.last_event or at, at)
            if self.first_event is not None and self.last_event is not None:
                due = max(due, self.began + (self.last_event - self.first_event) / self.speedup)
        return due


def _event_seconds(event: dict[str, Any]) -> float | None:
    raw = event.get("occurred_at")
    if not isinstance(raw, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(raw)
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo else None


async def paced_batches(events: Iterable[dict[str, Any]], size: int, pacer: Pacer | None,
                        stop: Callable[[], bool] = lambda: False) -> Any:
    """Async-iterate lists of at most `size` events, each sent no earlier than it is due."""
    batch: list[dict[str, Any]] = []
    opened = 0.0
    for event in events:
        if stop():
            break
        if pacer is not None:
            due = pacer.due(event)
            if batch and due - opened > FLUSH_SECONDS:
                yield batch
                batch = []
            while (wait := due - pacer.clock()) > 0 and not stop():
                await asyncio.sleep(min(wait, 0.2))
            if not batch:
                opened = pacer.clock()
        batch.append(event)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_jsonl(events: Iterable[dict[str, Any]], path: Path | str) -> int:
    """Write one event per line (the generator's stable serialisation); answer the count."""
    count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        for event in events:
            out.write(to_jsonl_line(event))
            out.write("\n")
            count += 1
    return count


def read_jsonl(path: Path | str) -> Iterator[dict[str, Any]]:
    """Events from a JSONL file, skipping blank lines."""
    with open(path, encoding="utf-8") as src:
        for line in src:
            if line.strip():
                yield orjson.loads(line)


async def publish_http(events: Iterable[dict[str, Any]], url: str, key: str, *,
                       batch_size: int = MAX_BATCH, pacer: Pacer | None = None,
                       result: PublishResult | None = None,
                       stop: Callable[[], bool] = lambda: False,
                       transport: httpx.AsyncBaseTransport | None = None,
                       attempts: int = 8) -> PublishResult:
    """POST batches to `url`/v1/events with a bearer key; transient failures are retried."""
    result = result if result is not None else PublishResult()
    size = max(1, min(batch_size, MAX_BATCH))
    endpoint = url.rstrip("/") + "/v1/events"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=30.0, transport=transport) as client:
        async for batch in paced_batches(events, size, pacer, stop):
            body = orjson.dumps({"events": batch})
            answer = await _post(client, endpoint, headers, body, result, attempts, stop)
            if answer is None:
                break
            result.sent += len(batch)
            result.accepted += int(answer.get("accepted", 0))
            result.duplicates += int(answer.get("duplicates", 0))
            result.rejected += int(answer.get("rejected", 0))
    result.done = True
    return result


async def _post(client: httpx.AsyncClient, endpoint: str, headers: dict[str, str], body: bytes,
                result: PublishResult, attempts: int,
                stop: Callable[[], bool]) -> dict[str, Any] | None:
    delay = 0.2
    for attempt in range(attempts):
        if stop():
            return None
        try:
            response = await client.post(endpoint, content=body, headers=headers)
        except httpx.TransportError as exc:
            problem = f"{endpoint} unreachable ({type(exc).__name__})"
        else:
            if response.status_code in (202, 422):
                return response.json()
            if response.status_code in (401, 403):
                raise PublishError(f"{endpoint} answered {response.status_code}: "
                                   "the API key is wrong or lacks the ingest scope")
            if response.status_code in (400, 404, 413):
                raise PublishError(f"{endpoint} answered {response.status_code}: "
                                   f"{response.text[:200]}")
            problem = f"{endpoint} answered {response.status_code}"
        result.retries += 1
        if attempt == attempts - 1:
            raise PublishError(f"{problem}; gave up after {attempts} attempts")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
    return None


async def publish_kafka(events: Iterable[dict[str, Any]], bootstrap: str, *,
                        topic: str = "ingest.raw.v1", pacer: Pacer | None = None,
                        result: PublishResult | None = None,
                        stop: Callable[[], bool] = lambda: False) -> PublishResult:
    """Produce each event as JSON to `topic`, keyed by its first identifier (else its event_id)."""
    from shared.events import first_identifier
    from shared.kafka import make_producer

    result = result if result is not None else PublishResult()
    producer = make_producer(bootstrap, "omnicrm-publish")
    await producer.start()
    try:
        async for batch in paced_batches(events, MAX_BATCH, pacer, stop):
            futures = []
            for event in batch:
                key = first_identifier(event) or str(event.get("event_id") or "")
                futures.append(await producer.send(topic, orjson.dumps(event),
                                                   key=key.encode() or None))
            await asyncio.gather(*futures)
            result.sent += len(batch)
    finally:
        await producer.stop()
    result.done = True
    return result


class BackgroundPublisher:
    """Publishes a list of events over HTTP from a thread of its own (the demo's traffic)."""

    def __init__(self, events: list[dict[str, Any]], url: str, key: str,
                 pacer: Pacer | None = None) -> None:
        self.events, self.url, self.key, self.pacer = events, url, key, pacer
        self.result = PublishResult()
        self.error: str | None = None
        self._bad_before = [0]  # malformed events among the first i events
        for event in events:
            self._bad_before.append(self._bad_before[-1] + (MALFORMED in event))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="omnicrm-traffic", daemon=True)

    @property
    def total(self) -> int:
        return len(self.events)

    def start(self) -> BackgroundPublisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            asyncio.run(publish_http(self.events, self.url, self.key, pacer=self.pacer,
                                     result=self.result, stop=self._stop.is_set))
        except PublishError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - shown on the dashboard, never a traceback
            self.error = f"traffic stopped: {type(exc).__name__}: {exc}"
        finally:
            self.result.done = True

    def status(self) -> str:
        r = self.result
        line = (f"{r.sent:,}/{self.total:,} events sent, {r.accepted:,} accepted, "
                f"{r.rejected:,} rejected ({self.malformed_sent:,} malformed on purpose)")
        if r.duplicates:
            line += f", {r.duplicates:,} duplicates"
        if r.done and not self.error:
            line += " (done)"
        return line

    @property
    def malformed_sent(self) -> int:
        return self._bad_before[min(self.result.sent, self.total)]

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def recent_emails(self, count: int = 3) -> list[str]:
        """Emails of the last few customers whose events went out (for the messages panel)."""
        out: list[str] = []
        for event in reversed(self.events[: self.result.sent]):
            email = (event.get("customer") or {}).get("email")
            if email and email not in out and MALFORMED not in event:
                out.append(email)
                if len(out) >= count:
                    break
        return out
