"""Lean decoding of consumed records, compiled once from their schemas (a BatchConsumer decoder).

Decoding every consumed record with the generic codec (fastavro's schemaless_reader) was a sixth of
the triggers worker's CPU (py-spy): most of it is fastavro's per-call set-up, not reading the few
dozen values of a resolved event, a profile or a loyalty event. Here the latest schema of each hot
subject of a service is turned, at start, into straight-line Python (one function per record) that
reads the Avro bytes into exactly the dict the codec returns: the same fields, the union branch's record
as a plain dict, timestamp-millis as an aware UTC datetime (as fastavro computes it).

Only records written with the latest schema (the 10-byte single-object header carries its
fingerprint) take the lean path; records of other versions or subjects, tombstones, and anything
the compiled reader does not read to the last byte (malformed, or a value it would read otherwise
than fastavro: a boolean byte other than 0/1, an int beyond 32 bits, a varint beyond 64) go through
the codec as before, which also names the error. tests/unit/test_avro_reader.py checks the
lean values equal the codec's on records of every schema branch.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable, Iterable
from typing import Any

from shared.avro import HEADER_LEN, AvroCodec
from shared.avro_compiled import SourceCompiler, _full_name
from shared.errors import SchemaError
from shared.topics import Topic

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_FAILURES = (IndexError, ValueError, OverflowError, struct.error)  # UnicodeDecodeError is a ValueError


def _long(b: bytes, p: int) -> tuple[int, int]:
    """The varint at `p` (any length up to 10 bytes, within 64 bits): (value, position after)."""
    x = b[p]
    p += 1
    n = x & 0x7F
    shift = 7
    while x > 0x7F:
        x = b[p]
        p += 1
        n |= (x & 0x7F) << shift
        shift += 7
    if shift > 70 or n >> 64:
        raise ValueError("varint beyond 64 bits")
    return (n >> 1) ^ -(n & 1), p


def _int(b: bytes, p: int) -> tuple[int, int]:
    """An Avro int at `p`; beyond 32 bits the codec decides."""
    n, p = _long(b, p)
    if not -(1 << 31) <= n < (1 << 31):
        raise ValueError("int beyond 32 bits")
    return n, p


class Unsupported(ValueError):
    """A schema with a type the compiler does not read (the codec decodes its records)."""


class _Compiler(SourceCompiler):
    """Python source of one reader function per record: f(b, p) -> (dict, position after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[str, dict[str, Any]] = {}

    def record(self, schema: dict[str, Any], namespace: str | None) -> str:
        fn, inner, new = self.function_for(schema, namespace)
        if not new:
            return fn
        self.names[_full_name(schema, namespace)] = schema
        namespace = inner
        lines = [f"def {fn}(b, p):"]
        names = []
        for field in schema["fields"]:
            v = self.var()
            lines += self.value(field["type"], v, "    ", namespace)
            names.append((field["name"], v))
        lines.append("    return {" + ", ".join(f"{name!r}: {v}" for name, v in names) + "}, p")
        self.sources.append("\n".join(lines))
        return fn

    def _varint(self, v: str, ind: str, slow: str = "_long") -> list[str]:
        """`v` = the varint at p (one byte inline, longer ones through `slow`)."""
        return [f"{ind}{v} = b[p]",
                f"{ind}if {v} < 0x80:",
                f"{ind}    p += 1",
                f"{ind}    {v} = ({v} >> 1) ^ -({v} & 1)",
                f"{ind}else:",
                f"{ind}    {v}, p = {slow}(b, p)"]

    def _blocks(self, item: Any, v: str, ind: str, namespace: str | None, keyed: bool) -> list[str]:
        """An array (or a map, `keyed`) into `v`: blocks of items until a zero count."""
        count, i, x, k = self.var(), self.var(), self.var(), self.var()
        body = ind + "        "
        lines = [f"{ind}{v} = {{}}" if keyed else f"{ind}{v} = []",
                 f"{ind}while True:",
                 *self._varint(count, ind + "    "),
                 f"{ind}    if {count} == 0:",
                 f"{ind}        break",
                 f"{ind}    if {count} < 0:  # a block with its size in bytes",
                 f"{ind}        {count} = -{count}",
                 f"{ind}        _, p = _long(b, p)",
                 f"{ind}    for {i} in range({count}):"]
        if keyed:
            lines += self.value("string", k, body, namespace)
        lines += self.value(item, x, body, namespace)
        lines.append(f"{body}{v}[{k}] = {x}" if keyed else f"{body}{v}.append({x})")
        return lines

    def value(self, node: Any, v: str, ind: str, namespace: str | None) -> list[str]:
        """Lines reading one value of type `node` into `v`, advancing p."""
        if isinstance(node, list):
            return self.union(node, v, ind, namespace)
        if isinstance(node, dict):
            kind = node["type"]
            logical = node.get("logicalType")
            if logical is not None:
                if logical != "timestamp-millis" or kind != "long":
                    raise Unsupported(f"logical type {logical}")
                # fastavro's _EPOCH + timedelta(microseconds=ms * 1000), computed more cheaply
                return [*self._varint(v, ind),
                        f"{ind}{v} = _EPOCH + _TD(0, {v} // 1000, ({v} % 1000) * 1000)"]
            if kind == "record":
                return [f"{ind}{v}, p = {self.record(node, namespace)}(b, p)"]
            if kind == "array":
                return self._blocks(node["items"], v, ind, namespace, keyed=False)
            if kind == "map":
                return self._blocks(node["values"], v, ind, namespace, keyed=True)
            if kind in ("enum", "fixed", "error"):
                raise Unsupported(kind)
            return self.value(kind, v, ind, namespace)
        if node == "null":
            return [f"{ind}{v} = None"]
        if node == "string" or node == "bytes":
            n = self.var()
            return [*self._varint(n, ind),
                    f"{ind}{n} += p",
                    f"{ind}if {n} < p or {n} > len(b):",
                    f"{ind}    raise IndexError('past the end')",
                    f"{ind}{v} = b[p:{n}]" + (".decode()" if node == "string" else ""),
                    f"{ind}p = {n}"]
        if node == "long":
            return self._varint(v, ind)
        if node == "int":
            return self._varint(v, ind, slow="_int")
        if node == "boolean":
            return [f"{ind}{v} = b[p]",
                    f"{ind}if {v} > 1:",
                    f"{ind}    raise ValueError('not a boolean byte')",
                    f"{ind}{v} = {v} == 1",
                    f"{ind}p += 1"]
        if node == "double":
            return [f"{ind}{v} = _DOUBLE(b, p)[0]", f"{ind}p += 8"]
        if node == "float":
            return [f"{ind}{v} = _FLOAT(b, p)[0]", f"{ind}p += 4"]
        if isinstance(node, str):
            full = node if node in self.names else f"{namespace}.{node}"
            if full not in self.names:
                raise Unsupported(f"unknown type {node!r}")
            return [f"{ind}{v}, p = {self.functions[full]}(b, p)"]
        raise Unsupported(repr(node))

    def union(self, branches: list[Any], v: str, ind: str, namespace: str | None) -> list[str]:
        if len(branches) > 63:
            raise Unsupported("a union of more than 63 branches")
        # The branch index, zig-zagged, in its one byte (written longer, the codec decides).
        index = self.var()
        lines = [f"{ind}{index} = b[p]", f"{ind}p += 1"]
        for n, branch in enumerate(branches):
            lines.append(f"{ind}{'if' if n == 0 else 'elif'} {index} == {2 * n}:")
            lines += self.value(branch, v, ind + "    ", namespace)
        lines += [f"{ind}else:", f"{ind}    raise IndexError('no such union branch')"]
        return lines


def compile_reader(schema: dict[str, Any]) -> tuple[Callable[[bytes, int], tuple[Any, int]], str]:
    """A reader of records of `schema` (from a position to (value, position after)) and its source.

    Raises Unsupported for a schema with a type it does not read.
    """
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise Unsupported("not a record")
    compiler = _Compiler()
    top = compiler.record(schema, None)
    source = "\n\n".join(compiler.sources)
    env: dict[str, Any] = {"_long": _long, "_int": _int, "_EPOCH": _EPOCH, "_TD": dt.timedelta,
                           "_DOUBLE": struct.Struct("<d").unpack_from, "_FLOAT": struct.Struct("<f").unpack_from}
    exec(source, env)  # noqa: S102 - source generated from our own schema
    return env[top], source


def lean_decoder(codec: AvroCodec, subjects: Iterable[str]) -> Callable[[Topic, bytes | None], Any]:
    """A BatchConsumer decoder: the compiled readers for records of the latest schema of `subjects`;
    the codec for everything else."""
    readers: dict[str, tuple[bytes, Callable[[bytes, int], tuple[Any, int]]]] = {}
    for subject in subjects:
        latest = codec.registry.latest(subject)
        try:
            reader, _ = compile_reader(latest.schema)
        except Unsupported:
            continue  # a schema that moved beyond what the compiler reads: the codec reads it
        readers[subject] = (bytes(latest.header), reader)

    def full(topic: Topic, raw: bytes | None) -> Any:  # what BatchConsumer does by default
        if raw is None:
            return None  # tombstone
        if topic.subject is None:
            raise SchemaError("no_schema", f"{topic.name} has no Avro subject")
        return codec.decode(raw, topic.subject)

    def decode(topic: Topic, raw: bytes | None) -> Any:
        lean = readers.get(topic.subject) if raw is not None else None
        if lean is not None and raw[:HEADER_LEN] == lean[0]:
            try:
                value, end = lean[1](raw, HEADER_LEN)
                if end == len(raw):
                    return value
            except _FAILURES:
                pass  # the codec decides (and names the error)
        return full(topic, raw)

    return decode
