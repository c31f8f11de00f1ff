"""Wiring of the triggers service: topics -> handler, the leader's scan timer, HTTP routes."""

from __future__ import annotations

import datetime as dt

from fastapi import FastAPI

from services.triggers.api import add_routes
from services.triggers.handlers import INPUT_TOPICS, TriggersHandler
from services.triggers.rules import RuleConfig
from shared.avro_reader import lean_decoder
from shared.clock import EventClock
from shared.runtime import Runtime
from shared.topics import LOYALTY, PROFILE, RESOLVED


def build(runtime: Runtime) -> FastAPI:
    cfg = RuleConfig.from_rules(runtime.rules)
    interval = dt.timedelta(minutes=float((runtime.rules.get("triggers") or {}).get("scan_interval_minutes", 15)))
    event_clock = isinstance(runtime.clock, EventClock)
    handler = TriggersHandler(codec=runtime.codec, cfg=cfg, clock=runtime.clock, event_clock=event_clock,
                              save_watermark=runtime.save_watermark, metrics=runtime.metrics,
                              scan_interval=interval, partitions=runtime.settings.partitions)
    runtime.consume(list(INPUT_TOPICS), handler,
                    decoder=lean_decoder(runtime.codec, (RESOLVED, PROFILE, LOYALTY)))

    def pool():
        assert runtime.pool is not None, "runtime not open"
        return runtime.pool

    async def scan_job() -> None:
        await handler.scheduled_scan(pool())

    # Wall clock: the leader scans at each boundary. Event clock (replays): a timer's scan lands at
    # an arbitrary point of the replayed stream, after some inputs and before others (loyalty runs a
    # hop behind identity), so what it judges would differ between two replays. There each
    # customer's own next event fires what fell due before it (at the boundary it fell due at), and
    # the admin scan (POST /v1/triggers/scan) ends a replay with the rest.
    if not event_clock:
        runtime.every(min(60.0, interval.total_seconds()), scan_job, name="scan")
    app = runtime.http("omnicrm triggers")
    add_routes(app, pool_of=pool, handler=handler)
    return app
