"""HTTP: a customer's notifications (read scope), erasure records (admin scope), and providers'
delivery-status callbacks.

Callbacks carry no API key; each is verified with its provider's signature scheme instead:
Twilio `X-Twilio-Signature` (base64 HMAC-SHA1 of URL + sorted form pairs with the auth token),
WhatsApp Cloud `X-Hub-Signature-256` (hex HMAC-SHA256 of the body with the app secret), and
for email a JSON body signed like WhatsApp in `X-Omnicrm-Signature` with
OMNICRM_EMAIL_WEBHOOK_SECRET. An unconfigured secret answers 503, a bad signature 401.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse

from services.notifications import store
from services.notifications.metrics import NotificationMetrics
from services.notifications.outcomes import outcome_message
from services.notifications.policy import DELIVERED, PENDING, SENT
from services.notifications.providers import ProviderConfig
from services.notifications.sender import fail_over
from shared.avro import AvroCodec
from shared.clock import Clock
from shared.http import ApiError, require
from shared.outbox import add_to_outbox

# provider path segment -> the provider name recorded on a sent notification
PROVIDERS = {"twilio": "twilio", "whatsapp": "whatsapp_cloud", "email": "smtp"}
_TWILIO_DONE = {"delivered": DELIVERED, "read": DELIVERED,
                "failed": "failed", "undelivered": "failed"}
_WHATSAPP_DONE = {"delivered": DELIVERED, "read": DELIVERED, "failed": "failed"}


def twilio_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's scheme: base64(HMAC-SHA1(token, url + k1 + v1 + k2 + v2 ... sorted by key))."""
    payload = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()).decode()


def hub_signature(secret: str, body: bytes) -> str:
    """Meta's scheme: `sha256=` + hex HMAC-SHA256 of the raw body with the app secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _view(row: asyncpg.Record) -> dict[str, Any]:
    def iso(v):
        return v.isoformat() if v is not None else None

    return {
        "notification_id": str(row["notification_id"]), "trigger_id": row["trigger_id"],
        "customer_id": row["customer_id"], "kind": row["kind"], "channel": row["channel"],
        "status": row["status"], "reason": row["reason"], "locale": row["locale"],
        "scheduled_for": iso(row["scheduled_for"]), "sent_at": iso(row["sent_at"]),
        "decided_at": iso(row["decided_at"]), "attempt": row["attempt"],
        "provider": row["provider"], "subject": row["subject"], "body": row["body"],
    }


def install_routes(app: FastAPI, *, pool: Callable[[], asyncpg.Pool], codec: AvroCodec,
                   clock: Clock, config: ProviderConfig, metrics: NotificationMetrics,
                   wake: Callable[[], None] | None = None) -> None:
    """Add the notifications routes to the service app."""
    router = APIRouter(prefix="/v1")

    @router.get("/customers/{customer_id}/notifications", tags=["notifications"])
    async def customer_notifications(customer_id: str, limit: int = 200, include_held: bool = False,
                                     _=require("read")) -> dict:
        """Every notification decision for the customer (and customers merged into them), newest first.

        One current row per trigger. A trigger still waiting for the customer's profile
        (`pending` / `awaiting_profile`) is not decided yet: listed only with `include_held=true`.
        """
        limit = max(1, min(limit, 1000))
        async with pool().acquire() as conn:
            rows = await store.list_for_customer(conn, customer_id, limit, include_held=include_held)
        return {"customer_id": customer_id, "notifications": [_view(r) for r in rows]}

    @router.get("/erasures/{customer_id}", tags=["privacy"])
    async def erasure(customer_id: str, _=require("admin")) -> dict:
        """When this service applied the customer's erasure and what kinds of data it dropped."""
        async with pool().acquire() as conn:
            row = await store.erasure_of(conn, customer_id)
        if row is None:
            raise ApiError(404, "not_found", "no erasure recorded for this customer")
        return {"service": "notifications", "customer_id": row["customer_id"],
                "erased_at": row["erased_at"].isoformat(), "what": list(row["what"])}

    @router.get("/providers/whatsapp/status", tags=["providers"], response_class=PlainTextResponse)
    async def whatsapp_verify(request: Request) -> str:
        """Meta's webhook subscription handshake (hub.challenge echo)."""
        q = request.query_params
        token = config.whatsapp_verify_token
        if not token:
            raise ApiError(503, "not_configured", "OMNICRM_WHATSAPP_VERIFY_TOKEN is not set")
        if q.get("hub.mode") != "subscribe" or not hmac.compare_digest(
                q.get("hub.verify_token", ""), token):
            raise ApiError(403, "forbidden", "verify token does not match")
        return q.get("hub.challenge", "")

    @router.post("/providers/{provider}/status", tags=["providers"])
    async def provider_status(provider: str, request: Request) -> dict:
        """Delivery receipts: move a sent notification to delivered or failed."""
        if provider not in PROVIDERS:
            raise ApiError(404, "not_found", f"unknown provider {provider!r}")
        raw = await request.body()
        updates = _verified_updates(provider, request, raw, config)
        changed = 0
        async with pool().acquire() as conn:
            for message_id, nid, status, reason in updates:
                async with conn.transaction():
                    changed += await _apply(conn, PROVIDERS[provider], message_id, nid, status,
                                            reason, codec=codec, clock=clock, metrics=metrics)
        if changed and wake is not None:
            wake()
        return {"received": len(updates), "updated": changed}

    app.include_router(router)


def _verified_updates(provider: str, request: Request, raw: bytes,
                      config: ProviderConfig) -> list[tuple[str | None, str | None, str, str | None]]:
    """(provider message id, notification id, new status, reason) for each final status."""
    if provider == "twilio":
        if not config.twilio_auth_token:
            raise ApiError(503, "not_configured", "OMNICRM_TWILIO_AUTH_TOKEN is not set")
        params = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        url = str(request.url)
        if config.public_url:
            url = config.public_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        expected = twilio_signature(config.twilio_auth_token, url, params)
        if not hmac.compare_digest(request.headers.get("x-twilio-signature", ""), expected):
            raise ApiError(401, "bad_signature", "X-Twilio-Signature does not match")
        status = _TWILIO_DONE.get(params.get("MessageStatus", "").lower())
        if status is None:
            return []
        reason = f"twilio_error {params['ErrorCode']}" if params.get("ErrorCode") else (
            f"twilio_{params.get('MessageStatus')}" if status != DELIVERED else None)
        return [(params.get("MessageSid"), request.query_params.get("notification_id"), status, reason)]
    secret = config.whatsapp_app_secret if provider == "whatsapp" else config.email_webhook_secret
    header = "x-hub-signature-256" if provider == "whatsapp" else "x-omnicrm-signature"
    if not secret:
        raise ApiError(503, "not_configured", f"no webhook secret configured for {provider}")
    if not hmac.compare_digest(request.headers.get(header, ""), hub_signature(secret, raw)):
        raise ApiError(401, "bad_signature", f"{header} does not match")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", "body is not JSON") from exc
    if provider == "email":
        items = body.get("events", [body]) if isinstance(body, dict) else body
        out = []
        for item in items if isinstance(items, list) else []:
            status = {"delivered": DELIVERED, "failed": "failed", "bounced": "failed"}.get(
                str(item.get("status", "")).lower())
            if status:
                out.append((item.get("message_id"), item.get("notification_id"), status,
                            None if status == DELIVERED else f"email_{item.get('status')}"))
        return out
    out = []
    for entry in body.get("entry", []) if isinstance(body, dict) else []:
        for change in entry.get("changes", []):
            for s in (change.get("value") or {}).get("statuses", []):
                status = _WHATSAPP_DONE.get(str(s.get("status", "")).lower())
                if status is None:
                    continue
                errors = s.get("errors") or [{}]
                reason = None if status == DELIVERED else f"whatsapp_error {errors[0].get('code', '')}".strip()
                out.append((s.get("id"), s.get("biz_opaque_callback_data"), status, reason))
    return out


async def _apply(conn: asyncpg.Connection, provider: str, message_id: str | None, nid: str | None,
                 status: str, reason: str | None, *, codec: AvroCodec, clock: Clock,
                 metrics: NotificationMetrics) -> int:
    row = await store.find_for_callback(conn, provider, message_id, nid)
    if row is None:
        return 0
    now = clock.now()
    if status == DELIVERED:
        updated = await store.finish(conn, str(row["notification_id"]), status=DELIVERED,
                                     reason=None, from_statuses=(SENT, PENDING))
        if updated is None:
            return 0
        await add_to_outbox(conn, [outcome_message(codec, updated, status=DELIVERED, reason=None,
                                                   occurred_at=now)])
        metrics.status(updated["channel"], DELIVERED, None)
        return 1
    if row["status"] != SENT:
        return 0
    contact = await store.contact_of(conn, row["customer_id"])
    await fail_over(conn, codec, row, reason or "undelivered", contact, now=now,
                    from_statuses=(SENT,), metrics=metrics)
    return 1
