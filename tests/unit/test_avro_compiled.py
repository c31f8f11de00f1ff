"""The compiled Avro encoders write exactly what fastavro writes, for every schema they compile, and
`AvroCodec.encode` falls back to fastavro for what they refuse."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.avro import AvroCodec, SchemaRegistry
from shared.avro_compiled import compile_record
from shared.errors import SchemaError
from shared.topics import OUTCOME

REGISTRY = SchemaRegistry.load()
SUBJECTS = REGISTRY.subjects
UTC = dt.UTC


def _named(schema: Any, names: dict[str, Any], ns: str | None) -> None:
    if isinstance(schema, list):
        for s in schema:
            _named(s, names, ns)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum", "fixed"):
            full = schema["name"] if "." in schema["name"] else f"{schema.get('namespace', ns)}.{schema['name']}"
            names[full] = schema
            ns = full.rpartition(".")[0]
        for key in ("fields", "items", "values", "type"):
            if key in schema:
                _named(schema[key], names, ns)


def values(schema: Any, names: dict[str, Any], ns: str | None) -> st.SearchStrategy:
    """Values of `schema` as services hand them to the codec."""
    if isinstance(schema, list):
        return st.one_of(*[values(s, names, ns) for s in schema])
    if isinstance(schema, dict):
        kind = schema["type"]
        if schema.get("logicalType") == "timestamp-millis":
            return st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2100, 1, 1),
                                timezones=st.just(UTC))
        if kind == "record":
            full = schema["name"] if "." in schema["name"] else f"{schema.get('namespace', ns)}.{schema['name']}"
            inner = full.rpartition(".")[0]
            return st.fixed_dictionaries({f["name"]: values(f["type"], names, inner) for f in schema["fields"]})
        if kind == "array":
            return st.lists(values(schema["items"], names, ns), max_size=3)
        if kind == "map":
            return st.dictionaries(st.text(max_size=5), values(schema["values"], names, ns), max_size=3)
        return values(kind, names, ns)
    primitive = {
        "null": st.none(), "boolean": st.booleans(), "string": st.text(max_size=20),
        "bytes": st.binary(max_size=20), "int": st.integers(-(1 << 31), (1 << 31) - 1),
        "long": st.integers(-(1 << 63), (1 << 63) - 1),
        "double": st.floats(allow_nan=False), "float": st.floats(allow_nan=False, width=32),
    }
    if schema in primitive:
        return primitive[schema]
    full = schema if schema in names else f"{ns}.{schema}"
    return values(names[full], names, ns)


def fastavro_body(parsed: Any, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def compiled_subjects() -> list[str]:
    out = []
    for subject in SUBJECTS:
        try:
            compile_record(REGISTRY.latest(subject).schema)
            out.append(subject)
        except ValueError:
            pass
    return out


def test_the_records_services_write_most_are_compiled():
    compiled = compiled_subjects()
    assert OUTCOME in compiled
    assert len(compiled) >= len(SUBJECTS) - 2, (compiled, SUBJECTS)  # Event's properties union is not


@pytest.mark.parametrize("subject", compiled_subjects())
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_compiled_bytes_equal_fastavro_bytes(subject, data):
    sv = REGISTRY.latest(subject)
    names: dict[str, Any] = {}
    _named(sv.schema, names, None)
    record = data.draw(values(sv.schema, names, None))
    out = bytearray()
    compile_record(sv.schema)(record, out)
    assert bytes(out) == fastavro_body(sv.parsed, record)


def test_a_missing_nullable_field_is_null_and_a_refused_value_goes_to_fastavro():
    codec = AvroCodec(REGISTRY)
    now = dt.datetime(2026, 6, 1, 12, tzinfo=UTC)
    full = {"outcome_id": "o", "notification_id": "n", "trigger_id": "t", "customer_id": "c", "kind": "welcome",
            "channel": None, "status": "pending", "reason": None, "scheduled_for": None, "sent_at": None,
            "occurred_at": now, "trigger_occurred_at": None, "attempt": 0, "provider": None,
            "provider_message_id": None}
    sparse = {k: v for k, v in full.items() if v is not None}
    assert codec.encode(OUTCOME, sparse) == codec.encode(OUTCOME, full) == codec.encode(OUTCOME, full, version=1)
    # a float for an int: the compiled encoder refuses it, fastavro writes it as the int
    assert codec.encode(OUTCOME, {**full, "attempt": 2.0}) == codec.encode(OUTCOME, {**full, "attempt": 2})
    with pytest.raises(SchemaError) as err:
        codec.encode(OUTCOME, {**full, "status": None})
    assert err.value.reason == "unencodable"
