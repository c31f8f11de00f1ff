"""Golden-profile field precedence: last-writer-wins registers per field, consent channel and tag.

A profile state is plain JSON: {"f": {field: [value, at_ms, event_id]}, "c": {channel: [...]},
"t": {tag: [present, at_ms, event_id]}}. The newest non-empty value wins per field by `occurred_at`
(ties by event id, then value), so folding states is commutative, associative and idempotent:
a merge is a fold, and an unmerge refolds each side's own states, whatever order events came in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

FIELDS = ("first_name", "last_name", "birthday", "locale", "timezone", "home_store_id",
          "preferred_channel")
ADDRESS_FIELDS = ("city", "region", "postal_code", "country", "lat", "lon")
PROFILE_TYPES = frozenset({"signup", "profile_update"})
State = dict[str, dict[str, list[Any]]]


def empty() -> State:
    return {"f": {}, "c": {}, "t": {}}


def _rank(entry: list[Any]) -> tuple[int, str, str]:
    return (entry[1], entry[2], repr(entry[0]))


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> State:
    """The fold of two states: per key, the newer entry."""
    out = empty()
    for part in ("f", "c", "t"):
        merged = dict(a.get(part) or {})
        for key, entry in (b.get(part) or {}).items():
            mine = merged.get(key)
            if mine is None or _rank(list(entry)) > _rank(list(mine)):
                merged[key] = list(entry)
        out[part] = merged
    return out


def fold(states: Iterable[Mapping[str, Any]]) -> State:
    out = empty()
    for s in states:
        out = merge(out, s)
    return out


def delta_of(event: Mapping[str, Any]) -> State:
    """What an event says about the profile (empty for events that say nothing)."""
    delta = empty()
    kind = event.get("type")
    if kind not in PROFILE_TYPES and kind != "consent_update":
        return delta  # before touching properties: they are decoded lazily (wire.py)
    props = event.get("properties") or {}
    if not isinstance(props, Mapping):
        return delta
    at = to_ms(event["occurred_at"])
    eid = str(event["event_id"])
    if kind in PROFILE_TYPES:
        for name in FIELDS:
            value = props.get(name)
            if value not in (None, ""):
                delta["f"][name] = [value, at, eid]
        address = props.get("address") or {}
        for name in ADDRESS_FIELDS:
            value = address.get(name)
            if value not in (None, ""):
                delta["f"][f"address.{name}"] = [value, at, eid]
        for tag in props.get("tags_removed") or ():
            delta["t"][str(tag)] = [False, at, eid]
        for tag in props.get("tags") or ():
            delta["t"][str(tag)] = [True, at, eid]
    elif kind == "consent_update":
        for channel, decision in (props.get("consents") or {}).items():
            if decision in ("opted_in", "opted_out"):
                delta["c"][str(channel)] = [decision, at, eid]
    return delta


def is_empty(state: Mapping[str, Any]) -> bool:
    return not any(state.get(p) for p in ("f", "c", "t"))


_ADDRESS_KEYS = tuple((name, f"address.{name}") for name in ADDRESS_FIELDS)
_NO_FIELDS = dict.fromkeys(FIELDS)


def view(state: Mapping[str, Any]) -> dict[str, Any]:
    """The golden fields as the Profile record and the API show them."""
    # A profile record goes out for every event that changes a customer; most states hold few
    # fields (often none), so the common cases skip the per-field work.
    fields = state.get("f")
    if fields:
        out: dict[str, Any] = {name: (entry[0] if (entry := fields.get(name)) is not None else None)
                               for name in FIELDS}
        address = None
        for name, key in _ADDRESS_KEYS:
            entry = fields.get(key)
            if entry is not None:
                if address is None:
                    address = dict.fromkeys(ADDRESS_FIELDS)
                address[name] = entry[0]
        out["address"] = address
    else:
        out = dict(_NO_FIELDS)
        out["address"] = None
    tags = state.get("t")
    out["tags"] = sorted(tag for tag, entry in tags.items() if entry[0]) if tags else []
    consents = state.get("c")
    out["consents"] = {ch: entry[0] for ch, entry in sorted(consents.items())} if consents else {}
    return out


def to_ms(value: dt.datetime | int) -> int:
    if isinstance(value, int):
        return value
    return int(value.timestamp() * 1000)
