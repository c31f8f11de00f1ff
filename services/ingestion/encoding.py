"""Avro single-object encoding of `omnicrm.ingest.Event`, compiled once from its schema.

`AvroCodec.encode` (fastavro) walks the parsed schema for every record and resolves the properties
union by name; for ingestion's hot path that cost more CPU than validating the event. Here the
envelope and each properties record are compiled (shared/avro_compiled.py) into straight-line Python
functions that append to one bytearray, and the properties union is chosen by the event's type. The
output is byte for byte what `AvroCodec.encode(EVENT, for_encoding(event))` writes
(tests/unit/test_ingestion_encoding.py compares them over every event type), and what it cannot
encode raises SchemaError as well. It is stricter than fastavro on values validation never
produces: an `int` beyond 32 bits and a naive datetime are refused rather than written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shared.avro import AvroCodec
from shared.avro_compiled import _collect, _Compiler, _full_name, _long, build
from shared.errors import SchemaError
from shared.topics import EVENT


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
        env = build(compiler)
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
