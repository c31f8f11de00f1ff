"""Helpers for the `omnicrm.ingest.Event` envelope as it travels between services."""

from __future__ import annotations

import datetime as dt
from functools import cache
from typing import Any

from shared.avro import SchemaRegistry
from shared.topics import EVENT

IDENTIFIER_TYPES = ("email", "phone", "loyalty_id", "pos_customer_id", "web_customer_id",
                    "anonymous_id", "whatsapp_id")
STORE_TYPES = frozenset({"store_upsert", "store_event"})


@cache
def properties_record_by_type() -> dict[str, str]:
    """Event type -> full name of its properties record, read from the schema's `omnicrm.types`."""
    schema = SchemaRegistry.load().latest(EVENT).schema
    field = next(f for f in schema["fields"] if f["name"] == "properties")
    mapping: dict[str, str] = {}
    for branch in field["type"]:
        if isinstance(branch, dict):
            name = f"{branch['namespace']}.{branch['name']}"
            for event_type in branch.get("omnicrm.types", []):
                mapping[event_type] = name
    return mapping


def for_encoding(event: dict[str, Any]) -> dict[str, Any]:
    """The event with `properties` tagged by its record name, so Avro picks the right union branch."""
    props = event.get("properties")
    if props is None or isinstance(props, tuple):
        return event
    return {**event, "properties": (properties_record_by_type()[event["type"]], props)}


def first_identifier(event: dict[str, Any]) -> str | None:
    """The partition key ingestion uses: the first identifier present, as `type:value`."""
    customer = event.get("customer") or {}
    for kind in IDENTIFIER_TYPES:
        value = customer.get(kind)
        if value:
            return f"{kind}:{value}"
    return None


def local_time(event: dict[str, Any]) -> dt.datetime:
    """`occurred_at` in the publisher's own UTC offset (the local wall time of the event)."""
    offset = dt.timedelta(minutes=event.get("utc_offset_minutes") or 0)
    return event["occurred_at"].astimezone(dt.timezone(offset))
