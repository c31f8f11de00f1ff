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
from shared.avro_wire import read_long as _long_at
from shared.avro_wire import read_string as _string_at
from shared.errors import SchemaError
from shared.topics import LOYALTY, RESOLVED, Topic

_FIELDS = ["event_id", "kind", "customer_id", "occurred_at", "points", "balance", "order_id",
           "cause_event_id", "old_tier", "new_tier", "trailing_spend", "currency", "expires_at"]
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


# Varints of the zigzagged values below 2**14 (one or two bytes), looked up instead of computed.
_SMALL = [bytes([z]) if z < 0x80 else bytes([(z & 0x7F) | 0x80, z >> 7]) for z in range(1 << 14)]


def _long(n: int, out: bytearray) -> None:
    n = (n << 1) ^ (n >> 63)  # zigzag
    if n < 16384:
        out += _SMALL[n]
        return
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _string(s: str, out: bytearray) -> None:
    data = s.encode()
    _long(len(data), out)
    out += data


def loyalty_encoder(codec: AvroCodec) -> Callable[[Notice], bytes]:
    """An encoder for notices: the fast one when the latest schema is the one it knows."""
    version = codec.registry.latest(LOYALTY)
    if [f["name"] for f in version.schema["fields"]] != _FIELDS:
        return lambda n: codec.encode(LOYALTY, n.as_record())
    header = bytes(version.header)

    kinds: dict[str, bytes] = {}
    small, ms, epoch = _SMALL, _MS, _EPOCH

    def varint(n: int) -> bytes:  # zigzagged, past the table (timestamps, big amounts)
        n = (n << 1) ^ (n >> 63)
        if n < 16384:
            return small[n]
        if 1 << 35 <= n < 1 << 42:  # six bytes: epoch milliseconds of 1971..2109
            return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80,
                          n >> 21 & 0x7F | 0x80, n >> 28 & 0x7F | 0x80, n >> 35))
        out = bytearray()
        while n & ~0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
        return bytes(out)

    # Straight-line: lengths and non-negative longs below 8192 come from the table (zigzag of a
    # non-negative n is 2n), everything else from varint(); the pieces are joined once.
    def encode(n: Notice) -> bytes:
        kind = kinds.get(n.kind)
        if kind is None:  # a handful of kinds: encoded once each
            kind = bytearray()
            _string(n.kind, kind)
            kind = kinds[n.kind] = bytes(kind)
        eid = n.event_id.encode()
        cid = n.customer_id.encode()
        cur = n.currency.encode()
        points, balance, spend = n.points, n.balance, n.trailing_spend
        parts = [header, small[len(eid) << 1] if len(eid) < 8192 else varint(len(eid)), eid, kind,
                 small[len(cid) << 1] if len(cid) < 8192 else varint(len(cid)), cid,
                 varint((n.occurred_at - epoch) // ms),
                 small[points << 1] if 0 <= points < 8192 else varint(points),
                 small[balance << 1] if 0 <= balance < 8192 else varint(balance)]
        for opt in (n.order_id, n.cause_event_id, n.old_tier, n.new_tier):
            if opt is None:
                parts.append(b"\x00")
            else:
                b = opt.encode()
                parts.append(b"\x02")
                parts.append(small[len(b) << 1] if len(b) < 8192 else varint(len(b)))
                parts.append(b)
        parts.append(small[spend << 1] if 0 <= spend < 8192 else varint(spend))
        parts.append(small[len(cur) << 1] if len(cur) < 8192 else varint(len(cur)))
        parts.append(cur)
        if n.expires_at is None:
            parts.append(b"\x00")
        else:
            parts.append(b"\x02")
            parts.append(varint((n.expires_at - epoch) // ms))
        return b"".join(parts)

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




# Each reader below handles the common case inline (a length or value in one byte, a null) and
# leaves the rest to shared.avro_wire: a function call per field was most of decoding's cost.
# Anything they cannot read raises IndexError, and the record goes to the codec.

def _text(buf: bytes, pos: int) -> tuple[str, int]:
    b = buf[pos]
    if b < 0x80 and not b & 1:  # a length below 64 in one byte
        end = pos + 1 + (b >> 1)
        if end > len(buf):
            raise IndexError("string past the end")
        return buf[pos + 1:end].decode(), end
    return _string_at(buf, pos)


def _read_long(buf: bytes, pos: int) -> tuple[int, int]:
    b = buf[pos]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    return _long_at(buf, pos)


def _skip_string(buf: bytes, pos: int) -> int:
    b = buf[pos]
    if b < 0x80 and not b & 1:
        return pos + 1 + (b >> 1)
    n, pos = _long_at(buf, pos)
    if n < 0:
        raise IndexError("negative length")
    return pos + n


def _skip_optional_string(buf: bytes, pos: int) -> int:
    branch = buf[pos]
    if branch == 0:
        return pos + 1
    if branch != 2:  # zig-zag 1: the string branch
        raise IndexError("bad union branch")
    return _skip_string(buf, pos + 1)


def _skip_blocks(buf: bytes, pos: int, item: Callable[[bytes, int], int]) -> int:
    """Skip an Avro array whose items `item` skips."""
    while True:
        count, pos = _read_long(buf, pos)
        if count == 0:
            return pos
        if count < 0:  # a block with its byte size: jump over it
            size, pos = _long_at(buf, pos)
            pos += size
            continue
        for _ in range(count):
            pos = item(buf, pos)


def _skip_line(buf: bytes, pos: int) -> int:
    pos = _skip_optional_string(buf, _skip_optional_string(buf, _skip_string(buf, pos)))
    while buf[pos] & 0x80:  # quantity
        pos += 1
    pos += 1
    while buf[pos] & 0x80:  # unit_price
        pos += 1
    return pos + 1


def _skip_identifier(buf: bytes, pos: int) -> int:
    return _skip_string(buf, _skip_string(buf, pos))


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

    def decode(topic: Topic, raw: bytes | None) -> Any:
        if raw is None or topic.subject != RESOLVED or raw[:HEADER_LEN] != header:
            return full(topic, raw)
        try:
            customer_id, pos = _text(raw, HEADER_LEN)
            pos = _skip_blocks(raw, pos, _skip_identifier)
            event_id, pos = _text(raw, pos)
            kind, pos = _text(raw, pos)
            if kind not in _WANTED:
                return IGNORED
            millis, pos = _read_long(raw, pos)
            for _ in range(2):  # utc_offset_minutes, received_at: skipped, not decoded
                while raw[pos] & 0x80:
                    pos += 1
                pos += 1
            pos = _skip_optional_string(raw, pos)  # source
            pos = _skip_optional_string(raw, pos)  # store_id
            for _ in range(n_customer):  # mostly nulls: one zero byte each
                pos = pos + 1 if raw[pos] == 0 else _skip_optional_string(raw, pos)
            at = _EPOCH + _MS * millis  # exact, and half the cost of timedelta(milliseconds=)
            branch, pos = _read_long(raw, pos)
            if kind == "sale" and branch == sale_branch:
                order_id, pos = _text(raw, pos)
                currency, pos = _text(raw, pos)
                total, pos = _read_long(raw, pos)
                pos = _skip_blocks(raw, pos, _skip_line)
                has_discount, pos = _read_long(raw, pos)
                if has_discount:
                    _, pos = _read_long(raw, pos)
                pos = _skip_blocks(raw, pos, _skip_string)
                redeemed, pos = _read_long(raw, pos)
                pos = _skip_optional_string(raw, pos)
                if pos != len(raw):
                    return full(topic, raw)
                return Sale(event_id, customer_id, at, order_id, currency, total, redeemed)
            if kind == "return" and branch == return_branch:
                order_id, pos = _text(raw, pos)
                return_id, pos = _text(raw, pos)
                currency, pos = _text(raw, pos)
                total, pos = _read_long(raw, pos)
                if _skip_blocks(raw, pos, _skip_line) != len(raw):
                    return full(topic, raw)
                return Return(event_id, customer_id, at, order_id, return_id, currency, total)
            if kind == "erase_request":
                return Erase(event_id, customer_id, at)
            if kind == "signup":
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
