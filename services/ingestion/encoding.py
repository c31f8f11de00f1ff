"""Avro single-object encoding of `omnicrm.ingest.Event`, compiled once from its schema.

`AvroCodec.encode` (fastavro) walks the parsed schema for every record and resolves the properties
union by name; for ingestion's hot path that cost more CPU than validating the event. Here the
schema is turned, at start, into straight-line Python functions (one per record) that append to one
bytearray. The output is byte for byte what `AvroCodec.encode(EVENT, for_encoding(event))` writes
(tests/unit/test_ingestion_encoding.py compares them over every event type), and what it cannot
encode raises SchemaError as well. It is stricter than fastavro on values validation never
produces: an `int` beyond 32 bits and a naive datetime are refused rather than written.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from typing import Any

from shared.avro import AvroCodec
from shared.errors import SchemaError
from shared.topics import EVENT

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_SMALL = 8192  # lengths and small numbers come from a table
_DOUBLE = struct.Struct("<d").pack
_FLOAT = struct.Struct("<f").pack


def _varint(n: int) -> bytes:
    """Avro long: zig-zag, then 7 bits a byte, low first."""
    if not -(1 << 63) <= n < (1 << 63):
        raise OverflowError("long out of range")
    z = (n << 1) ^ (n >> 63)
    if z <= 0x7F:
        return bytes((z,))
    if z < 0x4000:
        return bytes(((z & 0x7F) | 0x80, z >> 7))
    out = []
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_SIZES = tuple(_varint(n) for n in range(_SMALL))


def _long(n: int) -> bytes:
    if 0 <= n < _SMALL:
        return _SIZES[n]
    return _varint(n)


def _millis(value: Any) -> int:
    """timestamp-millis as fastavro prepares it: aware datetimes exactly, ints unchanged."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime for a timestamp-millis field")
        delta = value - _EPOCH
        return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000
    return value


_last_timestamp: list[Any] = [None, b""]  # a request's events share received_at: remembered


def _timestamp(value: Any) -> bytes:
    """A timestamp-millis field's bytes."""
    if value is _last_timestamp[0]:
        return _last_timestamp[1]
    encoded = _long_any(_millis(value))
    if isinstance(value, dt.datetime):
        _last_timestamp[:] = [value, encoded]  # holds `value`, so its identity stays its own
    return encoded


class _Compiler:
    """Python source for one function per record of the schema."""

    def __init__(self, names: dict[str, dict[str, Any]]) -> None:
        self.names = names
        self.functions: dict[str, str] = {}  # full record name -> function name
        self.sources: list[str] = []
        self.consts: dict[str, Any] = {}
        self._n = 0

    def const(self, value: Any) -> str:
        name = f"_c{len(self.consts)}"
        self.consts[name] = value
        return name

    def var(self) -> str:
        self._n += 1
        return f"v{self._n}"

    def record(self, schema: dict[str, Any], namespace: str | None) -> str:
        full = _full_name(schema, namespace)
        if full in self.functions:
            return self.functions[full]
        fn = self.functions[full] = f"_rec_{full.replace('.', '_')}"
        namespace = full.rpartition(".")[0] or None
        lines = [f"def {fn}(d, o):"]
        for field in schema["fields"]:
            v = self.var()
            if "default" in field:
                lines.append(f"    {v} = d.get({field['name']!r}, {self.const(field['default'])})")
            else:
                lines.append(f"    {v} = d[{field['name']!r}]")
            lines += self.value(field["type"], v, "    ", namespace)
        if len(lines) == 1:
            lines.append("    pass")
        self.sources.append("\n".join(lines))
        return fn

    def value(self, node: Any, v: str, ind: str, namespace: str | None) -> list[str]:
        if isinstance(node, list):
            return self.union(node, v, ind, namespace)
        if isinstance(node, dict):
            kind = node["type"]
            if node.get("logicalType") == "timestamp-millis" and kind == "long":
                return [f"{ind}o += _timestamp({v})"]
            if kind == "record":
                return [f"{ind}{self.record(node, namespace)}({v}, o)"]
            if kind == "array":
                x = self.var()
                return [f"{ind}if len({v}):",
                        f"{ind}    o += _long_any(len({v}))",
                        f"{ind}    for {x} in {v}:",
                        *self.value(node["items"], x, ind + "        ", namespace),
                        f"{ind}o += b'\\x00'"]
            if kind == "map":
                k, x = self.var(), self.var()
                return [f"{ind}if len({v}):",
                        f"{ind}    o += _long_any(len({v}))",
                        f"{ind}    for {k}, {x} in {v}.items():",
                        *self.value("string", k, ind + "        ", namespace),
                        *self.value(node["values"], x, ind + "        ", namespace),
                        f"{ind}o += b'\\x00'"]
            if kind in ("enum", "fixed"):
                raise ValueError(f"no compiled Avro encoding for {kind}")
            return self.value(kind, v, ind, namespace)
        if node == "string":
            b = self.var()
            n = self.var()
            return [f"{ind}{b} = {v}.encode()", f"{ind}{n} = len({b})",
                    f"{ind}o += _S[{n}] if {n} < {_SMALL} else _varint({n})", f"{ind}o += {b}"]
        if node == "long":
            return [f"{ind}o += _S[{v}] if {v}.__class__ is int and 0 <= {v} < {_SMALL} else _long_any({v})"]
        if node == "int":
            return [f"{ind}o += _S[{v}] if {v}.__class__ is int and 0 <= {v} < {_SMALL} else _int({v})"]
        if node == "double":
            return [f"{ind}o += _DOUBLE({v})"]
        if node == "float":
            return [f"{ind}o += _FLOAT({v})"]
        if node == "boolean":
            return [f"{ind}o += b'\\x01' if _bool({v}) else b'\\x00'"]
        if node == "null":
            return [f"{ind}if {v} is not None:", f"{ind}    raise ValueError('not null')"]
        if isinstance(node, str):
            full = node if node in self.names else f"{namespace}.{node}"
            if full not in self.names:
                raise ValueError(f"unknown Avro type {node!r}")
            return self.value(self.names[full], v, ind, namespace)
        raise ValueError(f"no compiled Avro encoding for {node!r}")

    def union(self, branches: list[Any], v: str, ind: str, namespace: str | None) -> list[str]:
        others = [b for b in branches if b != "null"]
        if len(branches) != 2 or len(others) != 1 or isinstance(others[0], list):
            raise ValueError("only [null, T] unions outside Event.properties")
        null_index = branches.index("null")
        return [f"{ind}if {v} is None:",
                f"{ind}    o += {bytes(_long(null_index))!r}",
                f"{ind}else:",
                f"{ind}    o += {bytes(_long(1 - null_index))!r}",
                *self.value(others[0], v, ind + "    ", namespace)]


def _full_name(schema: dict[str, Any], namespace: str | None) -> str:
    name = schema["name"]
    if "." in name:
        return name
    ns = schema.get("namespace", namespace)
    return f"{ns}.{name}" if ns else name


def _collect(node: Any, names: dict[str, dict[str, Any]], namespace: str | None) -> None:
    if isinstance(node, list):
        for item in node:
            _collect(item, names, namespace)
    elif isinstance(node, dict):
        if node.get("type") in ("record", "enum", "fixed"):
            full = _full_name(node, namespace)
            names[full] = node
            namespace = full.rpartition(".")[0] or None
        for key in ("fields", "items", "values", "type"):
            if key in node:
                _collect(node[key], names, namespace)


def _int(n: int) -> bytes:
    if not isinstance(n, int):
        raise TypeError("an Avro int must be an int")
    if not -(1 << 31) <= n < (1 << 31):
        raise OverflowError("int out of range")
    return _SIZES[n] if 0 <= n < _SMALL else _varint(n)


def _long_any(n: int) -> bytes:
    if not isinstance(n, int):
        raise TypeError("an Avro long must be an int")
    return _SIZES[n] if 0 <= n < _SMALL else _varint(n)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("an Avro boolean must be a bool")
    return value


class EventEncoder:
    """`encode(event)` == `codec.encode(EVENT, for_encoding(event))`, several times faster."""

    def __init__(self, codec: AvroCodec) -> None:
        version = codec.registry.latest(EVENT)
        self.header = version.header
        schema = version.schema
        names: dict[str, dict[str, Any]] = {}
        _collect(schema, names, None)
        compiler = _Compiler(names)
        namespace = _full_name(schema, None).rpartition(".")[0] or None
        # Event.properties is a union of records chosen by the event's type (or, as fastavro takes
        # it, by a (record name, value) tuple); every other union is [null, T].
        props_field = next(f for f in schema["fields"] if f["name"] == "properties")
        by_name: dict[str, tuple[bytes, Callable[..., None]]] = {}
        by_type: dict[str, str] = {}
        branch_fns: list[tuple[str, bytes, str]] = []
        for index, branch in enumerate(props_field["type"]):
            if branch == "null":
                self._props_null = _long(index)
                continue
            record = names[branch] if isinstance(branch, str) else branch
            full = _full_name(record, namespace)
            branch_fns.append((full, _long(index), compiler.record(record, namespace)))
            for event_type in record.get("omnicrm.types", []):
                by_type[event_type] = full
        envelope = {**schema, "fields": [f for f in schema["fields"] if f["name"] != "properties"]}
        envelope_fn = compiler.record(envelope, namespace)
        env: dict[str, Any] = {"_long_any": _long_any, "_int": _int, "_timestamp": _timestamp,
                               "_DOUBLE": _DOUBLE, "_S": _SIZES, "_varint": _varint, "_FLOAT": _FLOAT, "_bool": _bool, **compiler.consts}
        exec("\n\n".join(compiler.sources), env)  # noqa: S102 - source generated from our own schema
        for full, index_bytes, fn in branch_fns:
            by_name[full] = (index_bytes, env[fn])
        self._by_name = by_name
        self._by_type = {t: by_name[full] for t, full in by_type.items()}
        self._envelope = env[envelope_fn]
        if [f["name"] for f in schema["fields"]][-1] != "properties":
            raise ValueError("the compiled encoder expects properties as the last Event field")
        self.source = "\n\n".join(compiler.sources)

    def encode(self, event: dict[str, Any]) -> bytes:
        out = bytearray(self.header)
        try:
            self._envelope(event, out)
            props = event.get("properties")
            if props is None:
                out += self._props_null
            else:
                if props.__class__ is tuple:
                    name, props = props
                    index, fn = self._by_name[name]
                else:
                    index, fn = self._by_type[event["type"]]
                out += index
                fn(props, out)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise SchemaError("unencodable", f"{EVENT}: {type(exc).__name__}: {exc}") from exc
        return bytes(out)
