"""Shopify webhooks (orders/create, orders/paid, refunds/create) as omnicrm envelopes, and their HMAC.

Pure mapping: the payloads come unchanged from Shopify and leave as CONTRACTS §2 envelopes, which
then go through the same validation as any published event. One order is one `sale` whatever
webhook brought it (`shopify-order-<id>`), so orders/create and orders/paid count once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

SOURCE = "shopify"
# An order is a sale once money has moved; pending or authorized orders wait for orders/paid.
SALE_STATUSES = frozenset({"paid", "partially_paid", "partially_refunded", "refunded"})


def verify_hmac(secret: str, body: bytes, header: str | None) -> bool:
    """Whether `X-Shopify-Hmac-Sha256` is the base64 HMAC-SHA256 of the raw body (constant time)."""
    if not header or not secret:
        return False
    expected = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest())
    return hmac.compare_digest(expected, header.strip().encode("utf-8", "replace"))


def sign(secret: str, body: bytes) -> str:
    """The header value Shopify would send for `body` (tests and tools)."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def order_event_id(order_id: Any) -> str:
    return f"shopify-order-{order_id}"


def refund_event_id(refund_id: Any) -> str:
    return f"shopify-refund-{refund_id}"


@dataclass(frozen=True)
class Skipped:
    """A payload that is not (yet) a sale, with why; answered 200 so Shopify does not retry."""

    event_id: str | None
    reason: str


@dataclass(frozen=True)
class OrderCustomer:
    """What a later refund of the order needs: one identifier and the shop currency."""

    identifiers: dict[str, str]
    currency: str | None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _first(*values: Any) -> str | None:
    for v in values:
        t = _text(v)
        if t:
            return t
    return None


def _sku(line: dict[str, Any]) -> str | None:
    # Shopify allows products without SKU; fall back to the variant, product or line id.
    return _first(line.get("sku"),
                  f"shopify-variant-{line['variant_id']}" if line.get("variant_id") else None,
                  f"shopify-product-{line['product_id']}" if line.get("product_id") else None,
                  f"shopify-line-{line['id']}" if line.get("id") else None)


def customer_of_order(order: dict[str, Any]) -> dict[str, str | None]:
    """The order's identifiers: contact email and phone, and the Shopify customer id."""
    customer = order.get("customer") if isinstance(order.get("customer"), dict) else {}
    return {
        "email": _first(order.get("email"), order.get("contact_email"), customer.get("email")),
        "phone": _first(order.get("phone"), customer.get("phone")),
        "web_customer_id": _text(customer.get("id")),
    }


def order_to_event(order: Any) -> dict[str, Any] | Skipped:
    """An orders/create or orders/paid payload as a `sale` envelope, or Skipped."""
    if not isinstance(order, dict) or order.get("id") is None:
        return Skipped(None, "not a Shopify order payload")
    event_id = order_event_id(order["id"])
    if order.get("cancelled_at"):
        return Skipped(event_id, "order is cancelled")
    status = order.get("financial_status")
    if status not in SALE_STATUSES:
        return Skipped(event_id, f"financial_status {status!s} is not paid yet")
    lines = []
    for line in order.get("line_items") or []:
        if not isinstance(line, dict):
            continue
        lines.append({
            "sku": _sku(line),
            "name": _first(line.get("title"), line.get("name")),
            "quantity": line.get("quantity"),
            "unit_price": line.get("price"),
        })
    codes = [_text(d.get("code")) for d in order.get("discount_codes") or [] if isinstance(d, dict)]
    location = order.get("location_id")
    properties: dict[str, Any] = {
        "order_id": str(order["id"]),
        "currency": order.get("currency"),
        "total": order.get("total_price"),
        "lines": lines,
        "coupon_codes": [c for c in codes if c],
        "channel": "in_store" if order.get("source_name") == "pos" else "online",
    }
    if _text(order.get("total_discounts")) is not None:
        properties["discount"] = _text(order.get("total_discounts"))
    return {
        "event_id": event_id,
        "type": "sale",
        "occurred_at": _first(order.get("processed_at"), order.get("created_at")),
        "source": SOURCE,
        "store_id": f"shopify-location-{location}" if location else None,
        "customer": customer_of_order(order),
        "properties": properties,
    }


def remembered_customer(order: dict[str, Any]) -> OrderCustomer | None:
    """The one identifier a refund of this order will be attributed with (least sensitive first)."""
    ids = customer_of_order(order)
    for kind in ("web_customer_id", "email", "phone"):
        if ids.get(kind):
            return OrderCustomer({kind: ids[kind]}, _text(order.get("currency")))
    return None


def _amount(value: Any) -> Decimal | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return Decimal(str(value).strip())
    except InvalidOperation:
        return None


def refund_to_event(refund: Any, order: OrderCustomer | None) -> dict[str, Any] | Skipped:
    """A refunds/create payload as a `return` envelope; `order` is what was remembered of its order."""
    if not isinstance(refund, dict) or refund.get("id") is None or refund.get("order_id") is None:
        return Skipped(None, "not a Shopify refund payload")
    refunded = Decimal(0)
    currency = None
    for t in refund.get("transactions") or []:
        if not isinstance(t, dict) or t.get("kind") != "refund" or t.get("status", "success") != "success":
            continue
        amount = _amount(t.get("amount"))
        if amount is None:
            refunded = None
            break
        refunded += amount
        currency = currency or _text(t.get("currency"))
    lines = []
    for item in refund.get("refund_line_items") or []:
        if not isinstance(item, dict):
            continue
        line = item.get("line_item") if isinstance(item.get("line_item"), dict) else {}
        money = ((item.get("subtotal_set") or {}).get("shop_money") or {})
        currency = currency or _text(money.get("currency_code"))
        lines.append({
            "sku": _sku(line) or (f"shopify-line-{item['line_item_id']}" if item.get("line_item_id") else None),
            "name": _first(line.get("title"), line.get("name")),
            "quantity": item.get("quantity"),
            "unit_price": line.get("price"),
        })
    customer = dict(order.identifiers) if order else {}
    if isinstance(refund.get("customer"), dict):  # some API versions carry it; prefer the payload
        customer = {**customer, **{k: v for k, v in customer_of_order(refund).items() if v}}
    return {
        "event_id": refund_event_id(refund["id"]),
        "type": "return",
        "occurred_at": _first(refund.get("processed_at"), refund.get("created_at")),
        "source": SOURCE,
        "customer": customer,
        "properties": {
            "order_id": str(refund["order_id"]),
            "return_id": str(refund["id"]),
            "currency": currency or (order.currency if order else None),
            "total": None if refunded is None else f"{refunded:f}",
            "lines": lines,
        },
    }
