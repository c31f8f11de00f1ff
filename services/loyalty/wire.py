"""Fast encoding of omnicrm.loyalty.LoyaltyEvent (one per ledger change, the hot path's largest
cost through the generic codec): writes the same single-object bytes as AvroCodec.encode for the
schema version it was written for, and refuses to be used with any other (falls back). Below it,
fast decoding of the identity.events.v1 records loyalty acts on."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from services.loyalty.ledger import Enrol, Erase, Notice, Return, Sale
from shared.avro import HEADER_LEN, AvroCodec
from shared.avro_wire import (
    LONG,
    OPTIONAL_STRING,
    OPTIONAL_TIMESTAMP_MILLIS,
    SKIP_LONG,
    SKIP_OPTIONAL_LONG,
    SKIP_OPTIONAL_STRING,
    SKIP_STRING,
    STRING,
    TIMESTAMP_MILLIS,
    array,
    program,
    read,
    write,
    write_program,
)
from shared.errors import SchemaError
from shared.topics import LOYALTY, RESOLVED, Topic

_FIELDS = ["event_id", "kind", "customer_id", "occurred_at", "points", "balance", "order_id",
           "cause_event_id", "old_tier", "new_tier", "trailing_spend", "currency", "expires_at"]
# The LoyaltyEvent, one write operation per field.
_NOTICE = write_program(STRING, STRING, STRING, TIMESTAMP_MILLIS, LONG, LONG, OPTIONAL_STRING,
                        OPTIONAL_STRING, OPTIONAL_STRING, OPTIONAL_STRING, LONG, STRING,
                        OPTIONAL_TIMESTAMP_MILLIS)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


def loyalty_encoder(codec: AvroCodec) -> Callable[[Notice], bytes]:
    """An encoder for notices: the fast one when the latest schema is the one it knows."""
    version = codec.registry.latest(LOYALTY)
    if [f["name"] for f in version.schema["fields"]] != _FIELDS:
        return lambda n: codec.encode(LOYALTY, n.as_record())
    header = bytes(version.header)

    def encode(n: Notice) -> bytes:
        return write(header, _NOTICE, (
            n.event_id, n.kind, n.customer_id, n.occurred_at, n.points, n.balance, n.order_id,
            n.cause_event_id, n.old_tier, n.new_tier, n.trailing_spend, n.currency, n.expires_at))

    # Self-check against the generic codec on a sample covering every branch.
    at = dt.datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=dt.UTC)
    for sample in (Notice("e", "points_earned", "c-ü", at, 12, -3, "o", "x", None, None, 99, "USD", at),
                   Notice("e", "tier_changed", "c", at, 0, 0, None, None, "member", "gold", 1 << 40)):
        if encode(sample) != codec.encode(LOYALTY, sample.as_record()):
            return lambda n: codec.encode(LOYALTY, n.as_record())
    return encode


# -- decoding identity.events.v1 -------------------------------------------------------------------
# Decoding the whole ResolvedEvent with the generic codec was a fifth of the worker's CPU (py-spy):
# loyalty needs a dozen scalars of sales, returns, signups and erase requests. Those are read
# straight from the Avro bytes into commands (parse() validates them as it validates dicts); every
# other type is dropped after the envelope, its properties unread (loyalty ignores those types).
# Only records written with the exact schema version checked below take this path; anything else
# (other versions, other subjects, merges) goes through the codec as before.

_RESOLVED_SHAPE = ("customer_id:string", "identifiers:[Identifier{type:string,value:string}]",
                   "event:Event")
_EVENT_SHAPE = ("event_id:string", "type:string", "occurred_at:long/timestamp-millis",
                "utc_offset_minutes:int", "received_at:long/timestamp-millis",
                "source:null|string", "store_id:null|string")
_LINE_SHAPE = ("sku:string", "name:null|string", "category:null|string", "quantity:int",
               "unit_price:long")
_SALE_SHAPE = ("order_id:string", "currency:string", "total:long", "lines:[Line]",
               "discount:null|long", "coupon_codes:[string]", "points_redeemed:int",
               "channel:null|string")
_RETURN_SHAPE = ("order_id:string", "return_id:string", "currency:string", "total:long",
                 "lines:[Line]")


def _shape(t) -> str:
    """A compact description of an Avro type: names without namespace, records by name."""
    if isinstance(t, str):
        return t.rsplit(".", 1)[-1]
    if isinstance(t, list):
        return "|".join(_shape(b) for b in t)
    kind = t["type"]
    if kind == "array":
        items = t["items"]
        return f"[{items['name'] if isinstance(items, dict) and items.get('type') == 'record' else _shape(items)}]"
    if kind == "record":
        return t["name"]
    if isinstance(kind, str) and t.get("logicalType"):
        return f"{kind}/{t['logicalType']}"
    return _shape(kind)


def _fields(record: dict) -> tuple[str, ...]:
    return tuple(f"{f['name']}:{_shape(f['type'])}" for f in record["fields"])


def _lean_layout(schema: dict) -> tuple[int, int, int] | None:
    """(customer fields, sale branch, return branch) when `schema` is the ResolvedEvent this
    decoder reads; None otherwise."""
    try:
        top = schema["fields"]
        ids = top[1]["type"]["items"]
        resolved = (f"customer_id:{top[0]['type']}",
                    f"identifiers:[{ids['name']}{{" + ",".join(f"{f['name']}:{f['type']}" for f in ids["fields"]) + "}]",
                    f"event:{top[2]['type']['name']}")
        event = top[2]["type"]
        fields = event["fields"]
        envelope = _fields({"fields": fields[:7]})
        customer = fields[7]["type"]
        props = fields[8]
        if (resolved != _RESOLVED_SHAPE or len(top) != 3 or envelope != _EVENT_SHAPE
                or fields[7]["name"] != "customer" or props["name"] != "properties"
                or len(fields) != 9 or customer.get("type") != "record"
                or any(_shape(f["type"]) != "null|string" for f in customer["fields"])):
            return None
        branches = props["type"]
        names = [b if isinstance(b, str) else b.get("name") for b in branches]
        sale, ret = names.index("SaleProperties"), names.index("ReturnProperties")
        line = branches[sale]["fields"][3]["type"]["items"]
        if (names[0] != "null" or _fields(branches[sale]) != _SALE_SHAPE
                or _fields(branches[ret]) != _RETURN_SHAPE or _fields(line) != _LINE_SHAPE):
            return None
        return len(customer["fields"]), sale, ret
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None


# Programs of shared.avro_wire over the layout _lean_layout checked: the envelope up to the
# properties' union branch, then a sale's or a return's properties to the end of the record.
_LINE = array(SKIP_STRING, SKIP_OPTIONAL_STRING, SKIP_OPTIONAL_STRING, SKIP_LONG, SKIP_LONG)
_SALE = program(STRING, STRING, LONG, _LINE, SKIP_OPTIONAL_LONG, array(SKIP_STRING), LONG,
                SKIP_OPTIONAL_STRING)  # order_id, currency, total, points_redeemed
_RETURN = program(STRING, STRING, STRING, LONG, _LINE)  # order_id, return_id, currency, total


def _envelope(n_customer: int) -> bytes:
    """customer_id, event_id, type, occurred_at and the properties' branch, read; the rest skipped."""
    return program(STRING, array(SKIP_STRING, SKIP_STRING), STRING, STRING, LONG,
                   SKIP_LONG, SKIP_LONG,  # utc_offset_minutes, received_at
                   SKIP_OPTIONAL_STRING, SKIP_OPTIONAL_STRING,  # source, store_id
                   SKIP_OPTIONAL_STRING * n_customer, LONG)


def resolved_decoder(codec: AvroCodec) -> Callable[[Topic, bytes | None], Any]:
    """A BatchConsumer decoder for identity.events.v1 handing loyalty its commands (falls back to
    the codec for any other schema or topic, and for bytes it cannot read)."""
    latest = codec.registry.latest(RESOLVED)
    layout = _lean_layout(latest.schema)
    header = bytes(latest.header)

    def full(topic: Topic, raw: bytes | None) -> Any:  # what BatchConsumer does by default
        if raw is None:
            return None
        if topic.subject is None:
            raise SchemaError("no_schema", f"{topic.name} has no Avro subject")
        return codec.decode(raw, topic.subject)

    if layout is None:
        return full
    n_customer, sale_branch, return_branch = layout
    envelope = _envelope(n_customer)

    def decode(topic: Topic, raw: bytes | None) -> Any:
        if raw is None or topic.subject != RESOLVED or raw[:HEADER_LEN] != header:
            return full(topic, raw)
        try:
            customer_id, event_id, kind, millis, branch, pos = read(raw, HEADER_LEN, envelope)
            if kind not in _WANTED:
                return IGNORED
            at = _EPOCH + _MS * millis  # exact, and half the cost of timedelta(milliseconds=)
            if kind == "sale" and branch == sale_branch:
                order_id, currency, total, redeemed, end = read(raw, pos, _SALE)
                if end == len(raw):
                    return Sale(event_id, customer_id, at, order_id, currency, total, redeemed)
            elif kind == "return" and branch == return_branch:
                order_id, return_id, currency, total, end = read(raw, pos, _RETURN)
                if end == len(raw):
                    return Return(event_id, customer_id, at, order_id, return_id, currency, total)
            elif kind == "erase_request":
                return Erase(event_id, customer_id, at)
            elif kind == "signup":
                return Enrol(event_id, customer_id, at)
        except (IndexError, UnicodeDecodeError, ValueError, OverflowError):
            pass
        return full(topic, raw)  # anything unexpected: the codec decides (and names the error)

    return decode


class _Ignored:
    """A record of a type loyalty has nothing to do with (its properties were not decoded)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "IGNORED"


IGNORED = _Ignored()
_WANTED = frozenset({"sale", "return", "erase_request", "signup"})
