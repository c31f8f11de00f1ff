"""Wiring of the triggers service: topics -> handler, the leader's scan timer, HTTP routes."""

from __future__ import annotations

import datetime as dt

from fastapi import FastAPI

from services.triggers.api import add_routes
from services.triggers.handlers import INPUT_TOPICS, TriggersHandler
from services.triggers.rules import RuleConfig
from shared.clock import EventClock
from shared.runtime import Runtime


def build(runtime: Runtime) -> FastAPI:
    cfg = RuleConfig.from_rules(runtime.rules)
    interval = dt.timedelta(minutes=float((runtime.rules.get("triggers") or {}).get("scan_interval_minutes", 15)))
    event_clock = isinstance(runtime.clock, EventClock)
    handler = TriggersHandler(codec=runtime.codec, cfg=cfg, clock=runtime.clock, event_clock=event_clock,
                              save_watermark=runtime.save_watermark, metrics=runtime.metrics,
                              scan_interval=interval, partitions=runtime.settings.partitions)
    runtime.consume(list(INPUT_TOPICS), handler)

    def pool():
        assert runtime.pool is not None, "runtime not open"
        return runtime.pool

    async def scan_job() -> None:
        await handler.scheduled_scan(pool())

    # Event time can pass a boundary at any moment of a replay: look often, scan only at boundaries.
    tick = 1.0 if event_clock else min(60.0, interval.total_seconds())
    runtime.every(tick, scan_job, name="scan")
    app = runtime.http("omnicrm triggers")
    add_routes(app, pool_of=pool, handler=handler)
    return app
