"""A lean decoder for the ingest Event: identity needs the envelope and the customer record of every
event, but the properties only of the few types that change a profile. Decoding the whole record
with fastavro was a third of the worker's CPU (py-spy), so the envelope is read straight from the
Avro bytes and `properties` is decoded on first access.

Only records written with the exact Event schema this module was checked against take the lean
path (the 10-byte single-object header carries its fingerprint); anything else is decoded by the
codec as before. The ingest topics are written by the ingestion service with the same codec (inside
the trust boundary); a record whose properties are malformed fails when they are read (profile
types) and otherwise passes through in the resolved event's reused body, as bytes it was given.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from shared.avro import HEADER_LEN, AvroCodec
from shared.avro_wire import LONG, OPTIONAL_STRING, STRING, program, read
from shared.errors import SchemaError
from shared.topics import EVENT, Topic

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ENVELOPE = [("event_id", "string"), ("type", "string"),
             ("occurred_at", {"type": "long", "logicalType": "timestamp-millis"}), ("utc_offset_minutes", "int"),
             ("received_at", {"type": "long", "logicalType": "timestamp-millis"}),
             ("source", ["null", "string"]), ("store_id", ["null", "string"])]


class LazyEvent(dict):
    """The decoded Event; `properties` is decoded from the raw bytes when first read."""

    __slots__ = ("_raw", "_codec")

    def __missing__(self, key: str) -> Any:
        if key != "properties":
            raise KeyError(key)
        full = self._codec.decode(self._raw, EVENT)
        self["properties"] = full["properties"]
        return self["properties"]

    def get(self, key: str, default: Any = None) -> Any:
        if key == "properties" and not dict.__contains__(self, key):
            return self[key]
        return dict.get(self, key, default)


def _timestamp(ms: int, _epoch: dt.datetime = EPOCH, _delta: type[dt.timedelta] = dt.timedelta) -> dt.datetime:
    return _epoch + _delta(0, ms // 1000, (ms % 1000) * 1000)  # exact, and cheaper than milliseconds=


def event_decoder(codec: AvroCodec) -> Callable[[Topic, bytes | None], Any]:
    """A BatchConsumer decoder for the ingest topics (falls back to the codec when unsure)."""
    latest = codec.registry.latest(EVENT)
    fields = latest.schema["fields"]
    customer = next(f for f in fields if f["name"] == "customer")["type"]
    customer_fields = [f["name"] for f in customer.get("fields", ())]
    lean = ([(f["name"], f["type"]) for f in fields[:len(_ENVELOPE)]] == _ENVELOPE
            and fields[len(_ENVELOPE)]["name"] == "customer"
            and all(f["type"] == ["null", "string"] for f in customer["fields"]))
    header = latest.header
    n_optional = 2 + len(customer_fields)  # source, store_id, then the customer's fields
    # event_id, type, occurred_at, utc_offset_minutes, received_at, then the optional strings.
    envelope = program(STRING, STRING, LONG, LONG, LONG, OPTIONAL_STRING * n_optional)

    def full(topic: Topic, raw: bytes | None) -> Any:  # what BatchConsumer does by default
        if raw is None:
            return None
        if topic.subject is None:
            raise SchemaError("no_schema", f"{topic.name} has no Avro subject")
        return codec.decode(raw, topic.subject)

    def decode(topic: Topic, raw: bytes | None) -> Any:
        if not lean or raw is None or topic.subject != EVENT or raw[:HEADER_LEN] != header:
            return full(topic, raw)
        try:
            event_id, kind, occurred, offset, received, *values, _ = read(raw, HEADER_LEN, envelope)
        except (IndexError, UnicodeDecodeError):
            return full(topic, raw)  # malformed: let the codec raise its error
        event = LazyEvent(event_id=event_id, type=kind,
                          occurred_at=_timestamp(occurred), utc_offset_minutes=offset,
                          received_at=_timestamp(received),
                          source=values[0], store_id=values[1],
                          customer=dict(zip(customer_fields, values[2:], strict=True)))
        event._raw = raw
        event._codec = codec
        return event

    return decode
