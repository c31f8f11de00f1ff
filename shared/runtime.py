"""One service process: database pool and migrations, producer, outbox relay, batch consumers,
leader-elected timers and the HTTP API on one event loop, with clean shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import FastAPI

from shared.auth import KeyRing
from shared.avro import AvroCodec, SchemaRegistry
from shared.batch_consumer import BatchConsumer, Decoder, Handler
from shared.clock import Clock, EventClock, make_clock
from shared.config import Settings
from shared.db import TRANSIENT_DB_ERRORS, _lock_key, setup_database
from shared.http import create_app, serve_http
from shared.kafka import ensure_topics, make_producer
from shared.metrics import ServiceMetrics
from shared.outbox import OutboxRelay
from shared.rules import load_rules
from shared.topics import DLQ_OF_SERVICE, Topic

log = logging.getLogger(__name__)



# Records a lane takes from the broker per batch (its transaction). Every batch pays fixed costs (a
# dozen statements, the positions, the commit): with 1000, bench.loyalty applied 10.5k / 10.3k events/s
# against 13.0k / 12.5k with 2000, bench.identity 11.2k / 14.8k against 18.3k / 16.1k (alternating,
# 2026-12-07). A light load fills a batch with what is there, so latency does not change.
BATCH_RECORDS = 2000

class Runtime:
    """The shared parts of a service, opened and closed together; services add handlers and routes."""

    def __init__(self, service: str, settings: Settings, *, migrations: Path | None = None,
                 schema: str | None = None, metrics: ServiceMetrics | None = None,
                 pool_size: int = 10) -> None:
        self.service = service
        self.settings = settings
        self.schema = schema or service
        self.migrations = migrations
        self.metrics = metrics or ServiceMetrics(service)
        self.codec = AvroCodec(SchemaRegistry.load())
        self.clock: Clock = make_clock(settings.clock)
        self.rules: dict[str, Any] = load_rules(settings.rules_path)
        self.keyring = KeyRing(settings.api_keys)
        self.pool_size = pool_size
        self.pool: asyncpg.Pool | None = None
        self.producer = None
        self.relay: OutboxRelay | None = None
        self.consumers: list[BatchConsumer] = []
        self._consumer_specs: list[dict[str, Any]] = []
        self._tasks: list[Callable[[], Awaitable[None]]] = []
        self._running: list[asyncio.Task] = []
        self.stopping = asyncio.Event()

    # -- wiring -----------------------------------------------------------------------------
    def consume(self, topics: Sequence[Topic], handler: Handler, *, group: str | None = None,
                decoder: Decoder | None = None, max_records: int = BATCH_RECORDS, lanes: int | None = None) -> None:
        """Register a batch consumer of `topics` in group `<service>.hot` (or `group`).

        `lanes`: batches of different partitions applied at once (BatchConsumer); by default
        `OMNICRM_CONSUMER_LANES`."""
        self._consumer_specs.append(dict(topics=topics, handler=handler,
                                         group=group or f"{self.service}.hot",
                                         decoder=decoder, max_records=max_records, lanes=lanes))

    def every(self, seconds: float, job: Callable[[], Awaitable[Any]], *, name: str,
              leader: bool = True) -> None:
        """Run `job` every `seconds`; with leader=True only one worker of the service runs it at a time."""

        async def loop() -> None:
            while not self.stopping.is_set():
                with contextlib.suppress(TimeoutError):  # not wait_for: see shared/outbox.py
                    async with asyncio.timeout(seconds):
                        await self.stopping.wait()
                if self.stopping.is_set():
                    return
                try:
                    if leader:
                        await self.as_leader(name, job)
                    else:
                        await job()
                except Exception:  # noqa: BLE001 - a failed run is retried at the next tick
                    log.exception("timer %s failed", name)

        self._tasks.append(loop)

    async def as_leader(self, name: str, job: Callable[[], Awaitable[Any]]) -> Any:
        """Run `job` only if this worker holds the service-wide lock for `name`."""
        assert self.pool is not None
        key = _lock_key(f"omnicrm-leader-{self.service}-{name}")
        async with self.pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                return None
            try:
                return await job()
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)

    def task(self, fn: Callable[[], Awaitable[None]]) -> None:
        """A long-running coroutine started with the service and cancelled at stop."""
        self._tasks.append(fn)

    def http(self, title: str | None = None) -> FastAPI:
        return create_app(self.service, keyring=self.keyring, metrics=self.metrics,
                          ready=self.ready, title=title)

    # -- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        s = self.settings
        await ensure_topics(s.kafka, s.partitions)
        lanes = [spec["lanes"] or s.consumer_lanes for spec in self._consumer_specs]
        # A connection per lane, and room beside them for the relay, timers and HTTP.
        pool_size = max(self.pool_size, sum(lanes) + 6)
        self.pool = await setup_database(s.dsn, self.schema, self.migrations, max_size=pool_size)
        if isinstance(self.clock, EventClock):
            mark = await self.pool.fetchval(
                "SELECT watermark FROM clock_watermark WHERE service = $1", self.service)
            if mark is not None:
                self.clock.observe(mark)
        self.producer = make_producer(s.kafka, f"omnicrm-{self.service}")
        await self.producer.start()
        self.relay = OutboxRelay(self.pool, self.producer, self.schema, self.metrics)
        dlq = DLQ_OF_SERVICE[self.service].name
        for spec, spec_lanes in zip(self._consumer_specs, lanes, strict=True):
            consumer = BatchConsumer(
                service=self.service, bootstrap=s.kafka, group_id=spec["group"],
                topics=spec["topics"], pool=self.pool, handler=spec["handler"], codec=self.codec,
                metrics=self.metrics, dlq_topic=dlq, decoder=spec["decoder"],
                max_records=spec["max_records"], on_committed=self.relay.wake,
                event_order=isinstance(self.clock, EventClock), lanes=spec_lanes,
            )
            await consumer.start()
            self.consumers.append(consumer)
        self._initialise_metric_series(dlq)

    def _initialise_metric_series(self, dlq: str) -> None:
        """Expose every documented family from the start (at zero), so dashboards and `absent()`
        alerts see a quiet service as quiet, not as missing."""
        m = self.metrics
        for spec in self._consumer_specs:
            for topic in spec["topics"]:
                m.events_consumed.labels(topic=topic.name)
        m.events_produced.labels(topic=dlq)
        for reason in ("not_single_object", "unknown_schema", "malformed_avro"):
            m.dlq.labels(reason=reason)
        m.retries.labels(kind="TransientError")

    async def save_watermark(self, conn: asyncpg.Connection) -> None:
        """Persist the event clock with the batch so a restart resumes the same time."""
        if isinstance(self.clock, EventClock) and self.clock.now() > dt.datetime(1970, 1, 2, tzinfo=dt.UTC):
            await conn.execute(
                "INSERT INTO clock_watermark (service, watermark) VALUES ($1, $2) "
                "ON CONFLICT (service) DO UPDATE SET watermark = GREATEST(clock_watermark.watermark, EXCLUDED.watermark)",
                self.service, self.clock.now())

    async def ready(self) -> dict[str, bool]:
        checks = {"database": False, "broker": False, "consumers": all(c.healthy for c in self.consumers),
                  "outbox_relay": self.relay is None or self.relay.healthy}
        if self.pool is not None:
            try:
                async with asyncio.timeout(1.0):
                    await self.pool.fetchval("SELECT 1")
                checks["database"] = True
                self.metrics.db_pool_size.set(self.pool.get_size())
                self.metrics.db_pool_in_use.set(self.pool.get_size() - self.pool.get_idle_size())
            except (TimeoutError, *TRANSIENT_DB_ERRORS, asyncpg.PostgresError):
                pass
        if self.producer is not None:
            try:
                async with asyncio.timeout(1.0):
                    checks["broker"] = bool(await self.producer.client.fetch_all_metadata())
            except Exception:  # noqa: BLE001 - any failure means not ready
                checks["broker"] = False
        return checks

    async def run(self, app: FastAPI | None = None) -> None:
        """Open everything, run until SIGTERM/SIGINT, then stop in order."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self.open()
            assert self.relay is not None
            self._running = [asyncio.create_task(self.relay.run(), name="outbox-relay")]
            self._running += [asyncio.create_task(c.run(), name=f"consumer-{c.group_id}")
                              for c in self.consumers]
            self._running += [asyncio.create_task(fn(), name=getattr(fn, "__name__", "task"))
                              for fn in self._tasks]
            if app is not None:
                self._running.append(asyncio.create_task(
                    serve_http(app, self.settings.host, self.settings.port(self.service), self.stopping),
                    name="http"))
            log.info("%s started", self.service)
            stop_wait = asyncio.create_task(self.stopping.wait())
            done, _ = await asyncio.wait([stop_wait, *self._running],
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop_wait and task.exception() is not None:
                    raise task.exception()
        finally:
            await self.close()

    async def close(self) -> None:
        self.stopping.set()
        for consumer in self.consumers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 10)
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        if self.relay is not None and self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.relay.publish_once(), 5)
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.producer.stop(), 5)
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pool.close(), 5)
        log.info("%s stopped", self.service)


# Collect the youngest generation after 200k net allocations instead of CPython's 700. The count
# drops as objects are freed (down to zero) and the batches in flight (four lanes of up to 1000
# events) hold ~100k collectable objects: at 50k, loyalty's worker ran a ~30 ms collection every
# ~17k events, ~4% of its CPU in bench.loyalty (gc.callbacks, 2026-12-08); at 200k, none over the
# 200k events. Cyclic garbage, which only the collector frees, still is collected at that count.
GC_THRESHOLD = (200_000, 10, 10)


def tune_gc() -> None:
    """A batch of 1000 events allocates tens of thousands of objects that live until the batch is
    applied and are then freed by reference counting. At the default gen-0 threshold that is ~40
    collections per batch, each walking the batch's live objects: ~9% of identity's CPU (measured
    with gc.callbacks). With this threshold a collection runs only when more than the batches in
    flight accumulates (GC_THRESHOLD). What startup built (modules, schemas, phone metadata) is
    frozen out of the collector's way."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def run_service(service: str, build: Callable[[Runtime], FastAPI | None], *,
                migrations: Path | None = None, pool_size: int = 10) -> None:
    """The `main()` of a service process: settings, logging, wiring by `build`, run until signalled."""
    import sys

    from shared.config import load_settings
    from shared.errors import ConfigError
    from shared.logs import configure_logging

    try:
        settings = load_settings()
        if not settings.kafka_bootstrap_servers or not settings.database_url:
            raise ConfigError("KAFKA_BOOTSTRAP_SERVERS/DATABASE_URL",
                              "both are required to run a service (`omnicrm up` starts embedded ones)")
    except ConfigError as exc:
        print(f"omnicrm {service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(service, settings.log_level)
    runtime = Runtime(service, settings, migrations=migrations, pool_size=pool_size)
    app = build(runtime)
    tune_gc()
    try:
        asyncio.run(runtime.run(app))
    except OSError as exc:
        log.error("%s cannot start: %s", service, exc)
        raise SystemExit(1) from None
