"""Wiring of the notifications service: topics -> handler, dispatcher task, HTTP routes."""

from __future__ import annotations

import logging

import httpx
from fastapi import FastAPI

from services.notifications.api import install_routes
from services.notifications.handlers import NotificationHandler
from services.notifications.metrics import NotificationMetrics
from services.notifications.policy import NotificationRules
from services.notifications.providers import ProviderConfig, build_providers
from services.notifications.sender import Dispatcher
from services.notifications.templates import Templates
from shared.avro_reader import lean_decoder
from shared.crypto import Vault
from shared.runtime import Runtime
from shared.topics import (
    IDENTITY_MERGES,
    IDENTITY_PROFILES,
    INGEST_STORES,
    MERGE,
    PROFILE,
    TRIGGER,
    TRIGGERS_FIRED,
)

log = logging.getLogger(__name__)


def build(runtime: Runtime, config: ProviderConfig | None = None) -> FastAPI:
    """Wire the service on `runtime`; templates are checked here, so a missing one stops startup."""
    rules = NotificationRules.from_rules(runtime.rules)
    templates = Templates(rules.kinds, rules.locales)
    config = config or ProviderConfig.from_env()
    metrics = NotificationMetrics(runtime.metrics)
    # Contact points are sealed at rest; outside embedded mode the keys must be configured.
    vault = Vault.from_env(embedded=runtime.settings.embedded)
    handler = NotificationHandler(codec=runtime.codec, clock=runtime.clock, rules=rules,
                                  templates=templates, metrics=metrics,
                                  save_watermark=runtime.save_watermark, vault=vault)
    runtime.consume([TRIGGERS_FIRED, IDENTITY_PROFILES, IDENTITY_MERGES, INGEST_STORES], handler,
                    decoder=lean_decoder(runtime.codec, (TRIGGER, PROFILE, MERGE)))
    holder: dict[str, Dispatcher] = {}

    async def dispatch() -> None:
        assert runtime.pool is not None
        client = httpx.AsyncClient() if runtime.settings.delivery == "live" else None
        providers = build_providers(runtime.settings.delivery, config, client)
        log.info("delivery mode %s", runtime.settings.delivery)
        dispatcher = Dispatcher(runtime.pool, runtime.settings.dsn, providers=providers,
                                codec=runtime.codec, clock=runtime.clock, rules=rules,
                                metrics=metrics, vault=vault)
        holder["dispatcher"] = dispatcher
        try:
            await dispatcher.run()
        finally:
            if client is not None:
                await client.aclose()

    dispatch.__name__ = "dispatcher"
    runtime.task(dispatch)
    app = runtime.http("omnicrm notifications")

    def wake() -> None:
        if "dispatcher" in holder:
            holder["dispatcher"].wake()

    install_routes(app, pool=lambda: runtime.pool, codec=runtime.codec, clock=runtime.clock,
                   config=config, metrics=metrics, wake=wake)
    return app
