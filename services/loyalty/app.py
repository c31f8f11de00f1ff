"""Wiring of the loyalty service: topics -> handler, expiry timer, HTTP routes."""

from __future__ import annotations

from fastapi import FastAPI

from services.loyalty.api import router
from services.loyalty.handlers import LoyaltyHandler
from services.loyalty.rules import LoyaltyRules
from services.loyalty.wire import resolved_decoder
from shared.runtime import Runtime
from shared.topics import IDENTITY_EVENTS, IDENTITY_MERGES

DEFAULT_EXPIRY_SCAN_SECONDS = 60


def build(runtime: Runtime) -> FastAPI:
    rules = LoyaltyRules.from_config(runtime.rules, runtime.settings.base_currency)
    handler = LoyaltyHandler(rules, runtime.codec, runtime.clock, metrics=runtime.metrics,
                             save_watermark=runtime.save_watermark)
    runtime.consume([IDENTITY_EVENTS, IDENTITY_MERGES], handler,
                    decoder=resolved_decoder(runtime.codec))

    async def expire() -> None:
        assert runtime.pool is not None
        async with runtime.pool.acquire() as conn:
            await handler.expire_due(conn, runtime.clock.now())

    interval = float(runtime.rules.get("loyalty", {}).get("expiry_scan_seconds",
                                                         DEFAULT_EXPIRY_SCAN_SECONDS))
    runtime.every(interval, expire, name="loyalty-expiry")
    app = runtime.http("omnicrm loyalty")
    app.include_router(router(lambda: runtime.pool, rules, runtime.clock))
    return app
