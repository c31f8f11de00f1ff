"""Where an accepted event goes: its typed topic (shared.topics.ROUTES) and its partition key."""

from __future__ import annotations

from typing import Any

from shared.events import STORE_TYPES, first_identifier
from shared.topics import ROUTES, Topic


def partition_key(event: dict[str, Any]) -> str:
    """Store events are keyed by store_id (ingest.stores.v1 is compacted by it); the others by
    their first identifier, else the store, else the event itself."""
    if event["type"] in STORE_TYPES:
        return event.get("store_id") or event["event_id"]
    return first_identifier(event) or event.get("store_id") or event["event_id"]


def route(event: dict[str, Any]) -> tuple[Topic, str]:
    return ROUTES[event["type"]], partition_key(event)
