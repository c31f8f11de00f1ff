"""HTTP routes of the triggers service (port 8003): fired triggers, segments, campaigns, scans."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
from fastapi import FastAPI, Query, Request

from services.triggers import store
from services.triggers.handlers import CampaignConflict, TriggersHandler
from services.triggers.money import to_decimal_string, to_minor
from services.triggers.segments import SegmentError, compile_segment
from shared.http import ApiError, require

MAX_BODY = 1 << 20


def _trigger_json(r: asyncpg.Record) -> dict[str, Any]:
    offer = r["offer"]
    if offer is not None:
        offer = {**offer, "amount": to_decimal_string(offer["amount"], offer["currency"]),
                 "min_spend": to_decimal_string(offer["min_spend"], offer["currency"]),
                 "amount_minor": offer["amount"], "min_spend_minor": offer["min_spend"]}
    return {"trigger_id": str(r["trigger_id"]), "kind": r["kind"], "customer_id": r["customer_id"],
            "period": r["period"], "fired_at": r["fired_at"].isoformat(),
            "occurred_at": r["occurred_at"].isoformat() if r["occurred_at"] else None,
            "cause_event_id": r["cause_event_id"], "context": r["context"], "offer": offer}


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError(413, "too_large", "body over 1 MiB")
    if not raw.strip():
        return {}
    try:
        import orjson
        body = orjson.loads(raw)
    except ValueError:
        raise ApiError(400, "malformed_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "the body must be a JSON object")
    return body


def _segment_error(exc: SegmentError) -> ApiError:
    return ApiError(422, "invalid_segment", f"invalid segment: {exc.path}: {exc.message}",
                    [{"field": exc.path, "message": exc.message}])


def _parse_time(value: Any, field: str) -> dt.datetime:
    if not isinstance(value, str):
        raise ApiError(422, "invalid_request", f"{field} must be an RFC 3339 string",
                       [{"field": field, "message": "must be an RFC 3339 date-time with offset"}])
    try:
        at = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise ApiError(422, "invalid_request", f"{field} must be an RFC 3339 date-time with offset",
                       [{"field": field, "message": "must be an RFC 3339 date-time with offset"}])
    return at.astimezone(dt.UTC)


def _check_message(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ApiError(422, "invalid_request", "message must be an object",
                       [{"field": "message", "message": "must be an object"}])
    kind = message.get("kind", "campaign")
    if kind != "campaign":
        raise ApiError(422, "invalid_request", "message.kind must be 'campaign'",
                       [{"field": "message.kind", "message": "must be 'campaign'"}])
    offer = message.get("offer")
    if offer is not None:
        if not isinstance(offer, dict):
            raise ApiError(422, "invalid_request", "message.offer must be an object",
                           [{"field": "message.offer", "message": "must be an object"}])
        currency = str(offer.get("currency") or "USD")
        for key in ("amount", "min_spend"):
            if key in offer:
                try:
                    if isinstance(offer[key], float):
                        raise ValueError("money must be a decimal string")
                    if to_minor(offer[key], currency) < 0:
                        raise ValueError("must not be negative")
                except ValueError as exc:
                    raise ApiError(422, "invalid_request", f"message.offer.{key}: {exc}",
                                   [{"field": f"message.offer.{key}", "message": str(exc)}]) from None
        if "amount" not in offer:
            raise ApiError(422, "invalid_request", "message.offer.amount is required",
                           [{"field": "message.offer.amount", "message": "is required"}])
        if offer.get("expires_at") is not None:
            _parse_time(offer["expires_at"], "message.offer.expires_at")
    return message


def add_routes(app: FastAPI, *, pool_of, handler: TriggersHandler) -> None:
    """Mount the service's routes; `pool_of()` answers the database pool once the runtime is open."""

    @app.get("/v1/customers/{customer_id}/triggers", tags=["triggers"])
    async def customer_triggers(customer_id: str, limit: int = Query(100, ge=1, le=1000),
                                _key=require("read")) -> dict[str, Any]:
        """Fired triggers of a customer, newest first (an id merged away answers its survivor's)."""
        async with pool_of().acquire() as conn:
            current = await store.resolve(conn, customer_id)
            rows = await store.customer_triggers(conn, current, limit)
        return {"customer_id": current, "triggers": [_trigger_json(r) for r in rows]}

    @app.get("/v1/erasures/{customer_id}", tags=["privacy"],
             responses={404: {"description": "no erasure recorded for this customer"}})
    async def erasure(customer_id: str, _key=require("admin")) -> dict[str, Any]:
        """When triggers applied the customer's erasure and what kinds of data it dropped."""
        async with pool_of().acquire() as conn:
            row = await store.erasure_of(conn, customer_id)
        if row is None:
            raise ApiError(404, "not_found", "no erasure recorded for this customer")
        return {"service": "triggers", "customer_id": row["customer_id"],
                "erased_at": row["erased_at"].isoformat(), "what": list(row["what"])}

    @app.post("/v1/segments/query", tags=["segments"])
    async def segment_query(request: Request, _key=require("read")) -> dict[str, Any]:
        """Count and list (first 1000) the customers matching a segment of CONTRACTS §3."""
        body = await _json_body(request)
        segment = body.get("segment", body) if "segment" in body else body
        try:
            compiled = compile_segment(segment, now=handler.clock.now(), money=handler.cfg.money)
        except SegmentError as exc:
            raise _segment_error(exc) from None
        async with pool_of().acquire() as conn:
            count, ids = await store.segment_members(conn, compiled.where, compiled.params, 1000)
        return {"count": count, "customer_ids": ids}

    @app.post("/v1/campaigns", tags=["campaigns"])
    async def create_campaign(request: Request, _key=require("admin")) -> Any:
        """Fire a `campaign` trigger per segment member, once per campaign name."""
        body = await _json_body(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise ApiError(422, "invalid_request", "name must be a non-empty string (at most 200 characters)",
                           [{"field": "name", "message": "must be a non-empty string"}])
        segment = body.get("segment")
        if not isinstance(segment, dict):
            raise ApiError(422, "invalid_segment", "segment must be an object",
                           [{"field": "segment", "message": "must be an object"}])
        message = _check_message(body.get("message") or {"kind": "campaign"})
        try:
            async with pool_of().acquire() as conn:
                result = await handler.run_campaign(conn, name, segment, message, handler.clock.now())
        except SegmentError as exc:
            raise _segment_error(exc) from None
        except CampaignConflict:
            raise ApiError(409, "campaign_exists",
                           f"campaign {name!r} already ran with a different segment or message") from None
        from fastapi.responses import JSONResponse
        return JSONResponse(result, status_code=201 if result["created"] else 200)

    @app.post("/v1/triggers/scan", tags=["triggers"])
    async def scan(request: Request, _key=require("admin")) -> dict[str, Any]:
        """Evaluate the time-based rules now, or as of `as_of` (test clusters)."""
        body = await _json_body(request)
        as_of = _parse_time(body["as_of"], "as_of") if body.get("as_of") is not None else handler.clock.now()
        async with pool_of().acquire() as conn:
            fired = await handler.scan_on_demand(conn, as_of)
        return {"fired": fired, "as_of": as_of.isoformat()}
