"""Avro binary encoders compiled from a record schema into straight-line Python, several times faster
than fastavro's schema walk for the small records this system writes.

`compile_record(schema)` turns a record schema, once, into a function per record that appends the
record's body to a bytearray; its output is byte for byte fastavro's `schemaless_writer` (tests
compare them over generated records of every schema). It knows records, arrays, maps, [null, T]
unions, the primitives and timestamp-millis; a schema with anything else (other unions, enums,
fixed) raises ValueError and its users keep fastavro. It is stricter than fastavro on values a
service never produces (a float for a long, a naive datetime): `AvroCodec.encode` then lets fastavro
encode that record, so what is written never depends on which encoder ran.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from typing import Any

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


class SourceCompiler:
    """What the schema compilers share (this encoder's, shared/avro_reader.py's reader): fresh
    variable names and one generated function per named record."""

    def __init__(self) -> None:
        self.functions: dict[str, str] = {}  # full record name -> function name
        self.sources: list[str] = []
        self._n = 0

    def var(self) -> str:
        self._n += 1
        return f"v{self._n}"

    def function_for(self, schema: dict[str, Any], namespace: str | None) -> tuple[str, str | None, bool]:
        """(function name, the record's namespace, whether its source is still to be written)."""
        full = _full_name(schema, namespace)
        if full in self.functions:
            return self.functions[full], None, False
        fn = self.functions[full] = f"_rec_{full.replace('.', '_')}"
        return fn, full.rpartition(".")[0] or None, True


class _Compiler(SourceCompiler):
    """Python source for one function per record of the schema."""

    def __init__(self, names: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.names = names
        self.consts: dict[str, Any] = {}

    def const(self, value: Any) -> str:
        name = f"_c{len(self.consts)}"
        self.consts[name] = value
        return name

    def record(self, schema: dict[str, Any], namespace: str | None) -> str:
        fn, namespace, new = self.function_for(schema, namespace)
        if not new:
            return fn
        lines = [f"def {fn}(d, o):"]
        for field in schema["fields"]:
            v = self.var()
            if "default" in field:
                lines.append(f"    {v} = d.get({field['name']!r}, {self.const(field['default'])})")
            elif isinstance(field["type"], list) and "null" in field["type"]:
                lines.append(f"    {v} = d.get({field['name']!r})")  # missing: null, as fastavro
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
        if node == "bytes":
            n = self.var()
            return [f"{ind}{n} = len({v}) if {v}.__class__ is bytes else _bytes_len({v})",
                    f"{ind}o += _S[{n}] if {n} < {_SMALL} else _varint({n})", f"{ind}o += {v}"]
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


def _bytes_len(value: Any) -> int:
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError("an Avro bytes value must be bytes")
    return len(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("an Avro boolean must be a bool")
    return value


_HELPERS: dict[str, Any] = {"_long_any": _long_any, "_int": _int, "_timestamp": _timestamp,
                            "_DOUBLE": _DOUBLE, "_S": _SIZES, "_varint": _varint, "_FLOAT": _FLOAT,
                            "_bool": _bool, "_bytes_len": _bytes_len}


def build(compiler: _Compiler) -> dict[str, Any]:
    """Execute the compiler's functions; returns their namespace."""
    env: dict[str, Any] = {**_HELPERS, **compiler.consts}
    exec("\n\n".join(compiler.sources), env)  # noqa: S102 - source generated from our own schemas
    return env


def compile_record(schema: dict[str, Any]) -> Callable[[dict[str, Any], bytearray], None]:
    """`fn(record, out)` appends the Avro binary body of `record` to `out`; ValueError if the schema
    uses what this compiler does not know."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise ValueError("only record schemas are compiled")
    names: dict[str, dict[str, Any]] = {}
    _collect(schema, names, None)
    compiler = _Compiler(names)
    namespace = _full_name(schema, None).rpartition(".")[0] or None
    fn = compiler.record(schema, namespace)
    return build(compiler)[fn]
