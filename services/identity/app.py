"""Wiring of the identity service: ingest topics -> resolution handler, stores -> countries, HTTP."""

from __future__ import annotations

import datetime as dt

from fastapi import FastAPI

from services.identity import api, store
from services.identity.handlers import IdentityHandler, IdentityMetrics, handle_stores
from services.identity.normalise import Normaliser
from services.identity.resolution import Guard
from services.identity.wire import event_decoder
from shared.crypto import Vault
from shared.runtime import Runtime
from shared.topics import INGEST_INTERACTIONS, INGEST_PROFILES, INGEST_SALES, INGEST_STORES


def build(runtime: Runtime) -> FastAPI:
    rules = runtime.rules.get("identity") or {}
    metrics = IdentityMetrics(runtime.metrics)
    normaliser = Normaliser.from_rules(rules)
    guard = Guard.from_rules(rules)
    # Contact data at rest is sealed with keys from the environment (required outside embedded mode).
    vault = Vault.from_env(embedded=runtime.settings.embedded)
    handler = IdentityHandler(codec=runtime.codec, normaliser=normaliser, guard=guard,
                              metrics=metrics, clock=runtime.clock,
                              save_watermark=runtime.save_watermark, vault=vault)
    runtime.consume([INGEST_SALES, INGEST_INTERACTIONS, INGEST_PROFILES], handler,
                    decoder=event_decoder(runtime.codec))

    async def stores(conn, records) -> None:
        await handle_stores(handler, conn, records)

    runtime.consume([INGEST_STORES], stores, group="identity.stores", max_records=500)

    async def prune() -> None:
        assert runtime.pool is not None
        async with runtime.pool.acquire() as conn:
            await store.prune_sightings(conn, runtime.clock.now() - 2 * guard.window - dt.timedelta(hours=1))

    runtime.every(3600, prune, name="prune-sightings")
    app = runtime.http("omnicrm identity")
    deps = api.ApiDeps(
        pool=lambda: runtime.pool, codec=runtime.codec, clock=runtime.clock,
        normaliser=normaliser, metrics=metrics, vault=vault,
        on_commit=lambda: runtime.relay.wake() if runtime.relay is not None else None)
    app.include_router(api.router(deps))
    app.include_router(api.privacy_router(deps))
    return app
