"""Shopify webhooks mapped to omnicrm events, from Shopify's documented payloads in
tests/fixtures/shopify, and the HMAC over the raw body."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path

import pytest

from services.ingestion import shopify
from services.ingestion.shopify import OrderCustomer, Skipped
from services.ingestion.validation import validate_event

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "shopify"
NOW = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
SECRET = "hush"


def load(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def accepted(envelope: dict) -> dict:
    result = validate_event(envelope, received_at=NOW, default_source="ignored")
    assert result.ok, result.errors
    return result.event


# -- HMAC ------------------------------------------------------------------------------------

def test_hmac_of_the_raw_body():
    body = (FIXTURES / "orders_paid.json").read_bytes()
    header = shopify.sign(SECRET, body)
    assert shopify.verify_hmac(SECRET, body, header)
    assert shopify.verify_hmac(SECRET, body, f"  {header} ")


@pytest.mark.parametrize("header", [None, "", "bm90LWl0", "ünïcode", "x" * 500])
def test_hmac_rejects_wrong_headers(header):
    body = (FIXTURES / "orders_paid.json").read_bytes()
    assert not shopify.verify_hmac(SECRET, body, header)


def test_hmac_is_over_bytes_not_reparsed_json():
    body = (FIXTURES / "orders_paid.json").read_bytes()
    header = shopify.sign(SECRET, body)
    reserialised = json.dumps(json.loads(body)).encode()  # same JSON, other bytes
    assert not shopify.verify_hmac(SECRET, reserialised, header)
    assert not shopify.verify_hmac("other", body, header)
    assert not shopify.verify_hmac("", body, header)


# -- orders ----------------------------------------------------------------------------------

def test_documented_orders_create_sample_is_a_cancelled_voided_order_not_a_sale():
    result = shopify.order_to_event(load("orders_create"))
    assert result == Skipped("shopify-order-820982911946154508", "order is cancelled")


def test_paid_order_is_a_sale():
    envelope = shopify.order_to_event(load("orders_paid"))
    assert envelope["event_id"] == "shopify-order-820982911946154508"
    assert envelope["source"] == "shopify"
    assert envelope["customer"] == {"email": "jon@example.com", "phone": None,
                                    "web_customer_id": "115310627314723954"}
    event = accepted(envelope)
    props = event["properties"]
    assert props["order_id"] == "820982911946154508"
    assert props["currency"] == "USD"
    assert props["total"] == 38800
    assert props["discount"] == 2000
    assert props["coupon_codes"] == ["TENOFF"]
    assert props["channel"] == "online"
    assert [(line["sku"], line["quantity"], line["unit_price"], line["name"]) for line in props["lines"]] == [
        ("IPOD2008PINK", 1, 19900, "IPod Nano - 8GB")] * 2
    assert event["occurred_at"] == dt.datetime(2022, 1, 1, 0, 0, tzinfo=dt.UTC)
    assert event["utc_offset_minutes"] == -300
    assert event["store_id"] is None


def test_create_and_paid_for_one_order_are_one_event():
    created = copy.deepcopy(load("orders_paid"))  # a card order is already paid at creation
    paid = load("orders_paid")
    assert shopify.order_to_event(created)["event_id"] == shopify.order_to_event(paid)["event_id"]


@pytest.mark.parametrize("status", ["pending", "authorized", "voided", None])
def test_unpaid_orders_wait_for_orders_paid(status):
    order = load("orders_paid")
    order["financial_status"] = status
    result = shopify.order_to_event(order)
    assert isinstance(result, Skipped)
    assert result.event_id == "shopify-order-820982911946154508"


def test_pos_order_is_in_store_at_its_location():
    order = load("orders_paid")
    order.update(source_name="pos", location_id=48752903)
    event = accepted(shopify.order_to_event(order))
    assert event["properties"]["channel"] == "in_store"
    assert event["store_id"] == "shopify-location-48752903"


def test_line_without_sku_falls_back_to_variant():
    order = load("orders_paid")
    order["line_items"][0]["sku"] = ""
    order["line_items"][1]["sku"] = None
    order["line_items"][1]["variant_id"] = None
    skus = [line["sku"] for line in accepted(shopify.order_to_event(order))["properties"]["lines"]]
    assert skus == ["shopify-variant-808950810", "shopify-product-632910392"]


def test_guest_order_without_contact_is_rejected_by_validation():
    order = load("orders_paid")
    order.update(email=None, contact_email=None, customer=None)
    result = validate_event(shopify.order_to_event(order), received_at=NOW)
    assert {e["field"] for e in result.errors} == {"customer"}


def test_not_an_order():
    assert isinstance(shopify.order_to_event({"hello": 1}), Skipped)
    assert isinstance(shopify.order_to_event([1]), Skipped)


def test_remembered_customer_prefers_the_shopify_customer_id():
    assert shopify.remembered_customer(load("orders_paid")) == OrderCustomer(
        {"web_customer_id": "115310627314723954"}, "USD")
    guest = load("orders_paid")
    guest["customer"] = None
    assert shopify.remembered_customer(guest) == OrderCustomer({"email": "jon@example.com"}, "USD")


# -- refunds ---------------------------------------------------------------------------------

ORDER = OrderCustomer({"web_customer_id": "115310627314723954"}, "USD")


def test_documented_refund_is_a_return_of_its_order():
    envelope = shopify.refund_to_event(load("refunds_create"), ORDER)
    assert envelope["event_id"] == "shopify-refund-890088186047892319"
    event = accepted(envelope)
    props = event["properties"]
    assert props["order_id"] == "820982911946154508"  # the sale's order_id
    assert props["return_id"] == "890088186047892319"
    assert props["currency"] == "USD"  # the transaction's currency is null: from the line money
    assert props["total"] == 24998
    assert [(line["sku"], line["unit_price"]) for line in props["lines"]] == [
        ("SKU2006-001", 8999), ("SKU2006-020", 15999)]
    assert event["customer"]["web_customer_id"] == "115310627314723954"


def test_refund_total_counts_successful_refund_transactions_only():
    refund = load("refunds_create")
    ok = refund["transactions"][0]
    refund["transactions"] = [
        {**ok, "amount": "10.00", "currency": "USD"},
        {**ok, "amount": "5.00", "status": "failure"},
        {**ok, "amount": "7.00", "kind": "sale"},
    ]
    assert accepted(shopify.refund_to_event(refund, ORDER))["properties"]["total"] == 1000


def test_refund_with_no_money_is_zero():
    refund = load("refunds_create")
    refund["transactions"] = []
    assert accepted(shopify.refund_to_event(refund, ORDER))["properties"]["total"] == 0


def test_refund_of_an_unknown_order_has_no_customer_and_is_rejected():
    result = validate_event(shopify.refund_to_event(load("refunds_create"), None), received_at=NOW)
    assert {e["field"] for e in result.errors} == {"customer"}


def test_refund_currency_falls_back_to_the_order():
    refund = load("refunds_create")
    for item in refund["refund_line_items"]:
        del item["subtotal_set"]
    props = accepted(shopify.refund_to_event(refund, OrderCustomer({"email": "a@example.com"}, "CAD")))[
        "properties"]
    assert props["currency"] == "CAD"


def test_not_a_refund():
    assert isinstance(shopify.refund_to_event({"id": 1}, ORDER), Skipped)
