"""Wiring of the ingestion service: the raw-topic consumer, the HTTP routes, the edge clock."""

from __future__ import annotations

import functools

from fastapi import FastAPI

from services.ingestion.api import build_router
from services.ingestion.config import IngestionConfig
from services.ingestion.handlers import Ingestor, decode_raw
from shared.clock import Clock, EventClock, WallClock
from shared.runtime import Runtime
from shared.topics import INGEST_RAW


def edge_clock(runtime: Runtime) -> Clock:
    """The time ingestion stamps and checks events with.

    In event-time mode the runtime clock is the watermark of events seen, which ingestion, the
    first to see them, cannot use to judge "in the future": the edge stays on wall time.
    """
    return WallClock() if isinstance(runtime.clock, EventClock) else runtime.clock


def build(runtime: Runtime, config: IngestionConfig | None = None) -> FastAPI:
    config = config or IngestionConfig.from_env()
    ingestor = Ingestor(
        codec=runtime.codec, clock=edge_clock(runtime), metrics=runtime.metrics, config=config,
        pool=lambda: runtime.pool, producer=lambda: runtime.producer,
        wake_relay=lambda: runtime.relay.wake() if runtime.relay is not None else None,
    )
    runtime.consume([INGEST_RAW], ingestor.handle_raw, group=config.raw_group,
                    decoder=functools.partial(decode_raw, max_depth=config.max_json_depth),
                    max_records=1000)
    app = runtime.http("omnicrm ingestion")
    app.state.ingestor = ingestor
    app.include_router(build_router(ingestor, config, shopify_secret=runtime.settings.shopify_webhook_secret,
                                    pool=lambda: runtime.pool))
    return app
