"""HTTP routes of ingestion (CONTRACTS §2): POST /v1/events and the Shopify webhooks, behind the edge
limits: content type (415), body size by Content-Length and as streamed (413), JSON depth (400),
batch size (422), per-key token buckets (429 + Retry-After)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from services.ingestion import shopify, store
from services.ingestion.config import IngestionConfig
from services.ingestion.handlers import DuplicateDelivery, Ingestor, Outcome, Result, Unavailable
from services.ingestion.ratelimit import TokenBuckets, retry_after_header
from services.ingestion.validation import (
    RequestShapeError,
    envelope_json_schema,
    events_of,
    exceeds_depth,
    valid_events_within,
)
from shared.config import ApiKey
from shared.http import ApiError, require

EVENTS_ROUTE = "/v1/events"
_ERROR = {"type": "object", "properties": {
    "error": {"type": "string"}, "message": {"type": "string"},
    "details": {"type": "array", "items": {"type": "object"}}}}
_RESULTS = {"type": "object", "properties": {
    "accepted": {"type": "integer"}, "duplicates": {"type": "integer"}, "rejected": {"type": "integer"},
    "results": {"type": "array", "items": {"type": "object", "properties": {
        "event_id": {"type": ["string", "null"]},
        "status": {"type": "string", "enum": ["accepted", "duplicate", "rejected", "ignored"]},
        "errors": {"type": "array", "items": {"type": "object", "properties": {
            "field": {"type": "string"}, "message": {"type": "string"}}}}}}}}}


def _responses(*codes: int, ok: int = 202) -> dict[int | str, dict[str, Any]]:
    text = {200: "processed: one result per event", 202: "one result per event, in order",
            400: "malformed JSON or nesting too deep", 401: "missing or wrong credentials",
            403: "the key lacks the ingest scope", 413: "body over 5 MiB",
            415: "content type is not application/json",
            422: "every event rejected, or the batch is malformed (more than 1000 events)",
            429: "rate limit of the key exceeded; see Retry-After",
            503: "broker or database unavailable (nothing was accepted), or Shopify not configured"}
    out: dict[int | str, dict[str, Any]] = {
        ok: {"description": text[ok], "content": {"application/json": {"schema": _RESULTS}}}}
    for code in codes:
        out[code] = {"description": text[code], "content": {"application/json": {"schema": _ERROR}}}
    return out


def is_json_media(content_type: str | None) -> bool:
    """application/json (any parameters) or an application/*+json type."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing non-JSON content types and bodies over `limit` bytes early."""
    if not is_json_media(request.headers.get("content-type")):
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise ApiError(413, "payload_too_large", f"the body must be at most {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a lying or absent Content-Length: stop reading at the limit
            raise ApiError(413, "payload_too_large", f"the body must be at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes, max_depth: int | None) -> Any:
    """The parsed body (400 when not JSON), and with `max_depth` 400 when nested deeper."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "malformed_json", "the body is not valid UTF-8 JSON") from None
    if max_depth is not None:
        check_depth(parsed, max_depth)
    return parsed


def check_depth(parsed: Any, max_depth: int) -> None:
    if exceeds_depth(parsed, max_depth):
        raise ApiError(400, "too_deep", f"JSON nesting is limited to {max_depth} levels")


def _unavailable(exc: Unavailable) -> ApiError:
    return ApiError(503, "unavailable", "the broker or database is unavailable; nothing was accepted, "
                    "retry the same request", headers={"Retry-After": "1"})


class _Json(JSONResponse):
    """orjson-rendered JSON: a 1000-event answer is rendered in a fraction of the stdlib's time."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def _answer(outcome: Outcome, batch: bool, ok_status: int = 202) -> JSONResponse:
    body = outcome.as_json()
    if outcome.all_rejected:
        details = []
        for i, r in enumerate(outcome.results):
            prefix = f"events[{i}]" if batch else ""
            for e in r.errors:
                path = f"{prefix}.{e['field']}" if prefix and e["field"] else (prefix or e["field"])
                details.append({"field": path, "message": e["message"]})
        return _Json({"error": "validation", "message": "every event was rejected",
                      "details": details, **body}, status_code=422)
    return _Json(body, status_code=ok_status)


def build_router(ingestor: Ingestor, config: IngestionConfig, *, shopify_secret: str | None,
                 pool: Callable[[], asyncpg.Pool | None],
                 monotonic: Callable[[], float] = time.monotonic) -> APIRouter:
    """The ingestion routes, bound to their collaborators."""
    router = APIRouter()
    buckets = (TokenBuckets(config.rate_limit_per_second, config.rate_limit_per_second * config.burst_factor)
               if config.rate_limit_per_second > 0 else None)

    def spend(key: str, cost: int) -> float:
        """Take the key's tokens: 0.0 when allowed, else the seconds to wait (nothing taken)."""
        return buckets.take(key, cost, monotonic()) if buckets is not None else 0.0

    def give_back(key: str, cost: int) -> None:
        if buckets is not None:
            buckets.give_back(key, cost)

    def rate_limited(wait: float) -> ApiError:
        return ApiError(429, "rate_limited",
                        f"more than {config.rate_limit_per_second:g} events/s for this key",
                        headers={"Retry-After": retry_after_header(wait)})

    def limit(key: str, cost: int) -> None:
        wait = spend(key, cost)
        if wait > 0:
            raise rate_limited(wait)

    @router.post(EVENTS_ROUTE, status_code=202, tags=["events"], summary="Publish one event or a batch",
                 responses=_responses(400, 401, 403, 413, 415, 422, 429, 503),
                 openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"oneOf": [
                         envelope_json_schema(),
                         {"type": "object", "required": ["events"], "additionalProperties": False,
                          "properties": {"events": {"type": "array", "minItems": 1,
                                                    "maxItems": config.max_events,
                                                    "items": envelope_json_schema()}}}]}}}}})
    async def publish_events(request: Request, key: ApiKey = require("ingest")) -> JSONResponse:
        """One event object, or `{"events": [...]}` (at most 1000); one result per event, in order."""
        body = await read_body(request, config.max_body_bytes)
        # The nesting limit (400) is judged before anything else answers, but walking every event
        # for it cost as much as parsing: events that validate nest no deeper than the schema, so
        # the walk is only needed when something did not validate (or before answering 422/429).
        parsed = parse_json(body, None)
        try:
            items, batch = events_of(parsed, config.max_events)
        except RequestShapeError as exc:
            check_depth(parsed, config.max_json_depth)
            raise ApiError(422, "invalid_request", exc.message,
                           [{"field": exc.field, "message": exc.message}]) from None
        cost = len(items)
        wait = spend(key.name, cost)
        if wait > 0:
            check_depth(parsed, config.max_json_depth)
            raise rate_limited(wait)
        checked = ingestor.validate(items, key.name)
        if not valid_events_within(items, checked, config.max_json_depth - (2 if batch else 0)):
            try:
                check_depth(parsed, config.max_json_depth)
            except ApiError:
                give_back(key.name, cost)  # as if the request had been refused before the limit
                raise
        # The DLQ keeps each rejected event's own bytes; accepted ones need none.
        raws = [b"" if v.ok else (orjson.dumps(item) if batch else body) for v, item in zip(checked, items, strict=True)]
        try:
            outcome = await ingestor.publish(checked, raws, source=key.name,
                                             source_topic=f"http:{EVENTS_ROUTE}", via="http")
        except Unavailable as exc:
            raise _unavailable(exc) from None
        return _answer(outcome, batch)

    async def _shopify_body(request: Request, signature: str | None) -> Any:
        if not shopify_secret:
            raise ApiError(503, "shopify_not_configured",
                           "Shopify webhooks are off: OMNICRM_SHOPIFY_WEBHOOK_SECRET is not set")
        body = await read_body(request, config.max_body_bytes)
        if not shopify.verify_hmac(shopify_secret, body, signature):
            raise ApiError(401, "unauthorized", "X-Shopify-Hmac-Sha256 does not match the body")
        parsed = parse_json(body, config.max_json_depth)
        limit(shopify.SOURCE, 1)
        return body, parsed

    async def _shopify_publish(envelope: dict[str, Any] | shopify.Skipped, body: bytes,
                               webhook_id: str | None, topic: str | None, extra=None) -> JSONResponse:
        if isinstance(envelope, shopify.Skipped):
            return JSONResponse(Outcome([Result(envelope.event_id, "ignored", reason=envelope.reason)])
                                .as_json(), status_code=200)
        checked = ingestor.validate([envelope], shopify.SOURCE)

        async def in_transaction(conn: asyncpg.Connection) -> None:
            if webhook_id and not await store.claim_webhook(conn, webhook_id.strip()[:200], topic):
                raise DuplicateDelivery(webhook_id)
            if extra is not None:
                await extra(conn)

        try:
            outcome = await ingestor.publish(checked, [body], source=shopify.SOURCE,
                                             source_topic=f"http:/v1/webhooks/shopify ({topic or 'unknown'})",
                                             via="shopify", in_transaction=in_transaction)
        except DuplicateDelivery:
            outcome = Outcome([Result(checked[0].event_id, "duplicate")])
        except Unavailable as exc:
            raise _unavailable(exc) from None
        # 200 even when rejected: Shopify would retry a 4xx for days; the DLQ has it.
        return JSONResponse(outcome.as_json(), status_code=200)

    shopify_responses = _responses(400, 401, 413, 415, 429, 503, ok=200)

    @router.post("/v1/webhooks/shopify/orders", tags=["shopify"], responses=shopify_responses,
                 summary="Shopify orders/create and orders/paid webhooks",
                 openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"type": "object", "description": "Shopify Order payload, unchanged"}}}}})
    async def shopify_orders(
        request: Request,
        x_shopify_hmac_sha256: str | None = Header(None),
        x_shopify_webhook_id: str | None = Header(None),
        x_shopify_topic: str | None = Header(None),
    ) -> JSONResponse:
        """A paid order becomes one `sale` (`shopify-order-<id>`): create and paid count once."""
        body, order = await _shopify_body(request, x_shopify_hmac_sha256)
        envelope = shopify.order_to_event(order)
        remembered = (shopify.remembered_customer(order)
                      if isinstance(order, dict) and order.get("id") is not None else None)

        async def remember(conn: asyncpg.Connection) -> None:
            if remembered is not None:
                await store.remember_order(conn, str(order["id"]), remembered)

        return await _shopify_publish(envelope, body, x_shopify_webhook_id, x_shopify_topic, remember)

    @router.post("/v1/webhooks/shopify/refunds", tags=["shopify"], responses=shopify_responses,
                 summary="Shopify refunds/create webhook",
                 openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                     "schema": {"type": "object", "description": "Shopify Refund payload, unchanged"}}}}})
    async def shopify_refunds(
        request: Request,
        x_shopify_hmac_sha256: str | None = Header(None),
        x_shopify_webhook_id: str | None = Header(None),
        x_shopify_topic: str | None = Header(None),
    ) -> JSONResponse:
        """A refund becomes a `return` of its order, attributed to the order's customer."""
        body, refund = await _shopify_body(request, x_shopify_hmac_sha256)
        order = None
        if isinstance(refund, dict) and refund.get("order_id") is not None:
            db = pool()
            if db is None:
                raise _unavailable(Unavailable("not started"))
            try:
                async with db.acquire() as conn:
                    order = await store.order_customer(conn, str(refund["order_id"]))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise _unavailable(Unavailable(type(exc).__name__)) from None
        envelope = shopify.refund_to_event(refund, order)
        return await _shopify_publish(envelope, body, x_shopify_webhook_id, x_shopify_topic)

    return router
