"""shared.avro_wire's programs read and write what fastavro writes and reads, compiled and as source
(where Cython's declarations are the no-ops of shared.nocython), and refuse bytes they cannot read."""

from __future__ import annotations

import datetime as dt
import io
import os
import subprocess
import sys
from pathlib import Path

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import avro_wire as w

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "R", "fields": [
        {"name": "id", "type": "string"},
        {"name": "tags", "type": {"type": "array", "items": {
            "type": "record", "name": "Tag", "fields": [
                {"name": "k", "type": "string"}, {"name": "v", "type": ["null", "string"]},
                {"name": "n", "type": "long"}]}}},
        {"name": "n", "type": "long"},
        {"name": "note", "type": ["null", "string"]},
        {"name": "skipped", "type": ["null", "string"]},
        {"name": "amount", "type": ["null", "long"]},
        {"name": "codes", "type": {"type": "array", "items": "string"}},
        {"name": "count", "type": "int"},
    ]})
PROGRAM = w.program(w.STRING, w.array(w.SKIP_STRING, w.SKIP_OPTIONAL_STRING, w.SKIP_LONG), w.LONG,
                    w.OPTIONAL_STRING, w.SKIP_OPTIONAL_STRING, w.SKIP_OPTIONAL_LONG,
                    w.array(w.SKIP_STRING), w.LONG)
OUT_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "Out", "fields": [
        {"name": "s", "type": "string"}, {"name": "l", "type": "long"},
        {"name": "o", "type": ["null", "string"]},
        {"name": "t", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "u", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]}]})
OUT_PROGRAM = w.write_program(w.STRING, w.LONG, w.OPTIONAL_STRING, w.TIMESTAMP_MILLIS,
                              w.OPTIONAL_TIMESTAMP_MILLIS)

text = st.text(max_size=8) | st.text(min_size=60, max_size=200)  # lengths of one byte and more
longs = st.integers(-(2 ** 63), 2 ** 63 - 1)
records = st.fixed_dictionaries({
    "id": text, "tags": st.lists(st.fixed_dictionaries({"k": text, "v": st.none() | text, "n": longs}),
                                 max_size=3),
    "n": longs, "note": st.none() | text, "skipped": st.none() | text, "amount": st.none() | longs,
    "codes": st.lists(text, max_size=3), "count": st.integers(-(2 ** 31), 2 ** 31 - 1)})
times = st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1),
                     timezones=st.just(dt.UTC))


def _avro(schema, record) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, record)
    return out.getvalue()


@settings(max_examples=300, deadline=None)
@given(records, st.binary(max_size=4))
def test_a_read_program_reads_what_fastavro_wrote_and_where_it_ends(record, prefix):
    raw = prefix + _avro(SCHEMA, record)
    assert w.read(raw, len(prefix), PROGRAM) == [
        record["id"], record["n"], record["note"], record["count"], len(raw)]


@settings(max_examples=300, deadline=None)
@given(text, longs, st.none() | text, times, st.none() | times)
def test_a_write_program_writes_what_fastavro_reads(s, n, o, t, u):
    raw = w.write(b"HDR", OUT_PROGRAM, (s, n, o, t, u))
    assert raw == b"HDR" + _avro(OUT_SCHEMA, {"s": s, "l": n, "o": o, "t": t, "u": u})


def test_array_blocks_with_a_byte_size_are_skipped():
    # An array written as blocks with negative counts and their sizes (Avro's block form).
    item = _avro(fastavro.parse_schema("string"), "ab") * 2
    raw = bytes([3, len(item) << 1]) + item + b"\x00" + b"\x08"  # count -2, size; end; then 4
    assert w.read(raw, 0, w.program(w.array(w.SKIP_STRING), w.LONG)) == [4, len(raw)]


@pytest.mark.parametrize(("raw", "error"), [
    (b"\x0aab", IndexError),                      # a string of 5 bytes with 2 left
    (b"\x03", IndexError),                        # a negative length
    (b"\xff" * 11, IndexError),                   # a varint longer than 64 bits
    (b"\x04\xff\xfe", UnicodeDecodeError),        # not UTF-8
    (b"", IndexError),                            # nothing
])
def test_bytes_that_cannot_be_read_raise(raw, error):
    with pytest.raises(error):
        w.read(raw, 0, w.STRING)


def test_a_union_branch_other_than_null_or_the_value_raises():
    with pytest.raises(IndexError):
        w.read(b"\x04\x02ab", 0, w.OPTIONAL_STRING)


def test_programs_are_checked_when_made():
    with pytest.raises(ValueError):
        w.array(w.STRING)  # arrays are skipped: nothing read inside them
    with pytest.raises(ValueError):
        w.program(b"[S")
    with pytest.raises(ValueError):
        w.program(b"x")
    with pytest.raises(ValueError):
        w.write_program(w.SKIP_STRING)
    with pytest.raises(ValueError):
        w.write(b"", OUT_PROGRAM, ("only one value",))


def test_as_source_without_cython_the_same_bytes_read_and_write():
    """The Docker image runs the source and has no Cython: the declarations are shared.nocython's."""
    record = {"id": "c-ü" * 30, "tags": [{"k": "a", "v": None, "n": -5}], "n": 2 ** 40,
              "note": "x", "skipped": None, "amount": 7, "codes": ["p"], "count": -1}
    raw = _avro(SCHEMA, record)
    at = dt.datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=dt.UTC)
    out = w.write(b"", OUT_PROGRAM, ("s", -(2 ** 63), None, at, at))
    probe = (
        "import sys, datetime as dt; sys.modules['cython'] = None\n"
        "from shared import avro_wire as w\n"
        "assert w.__file__.endswith('.py') and w.cython.__name__ == 'shared.nocython'\n"
        f"p = w.program(w.STRING, w.array(w.SKIP_STRING, w.SKIP_OPTIONAL_STRING, w.SKIP_LONG), w.LONG,"
        " w.OPTIONAL_STRING, w.SKIP_OPTIONAL_STRING, w.SKIP_OPTIONAL_LONG, w.array(w.SKIP_STRING), w.LONG)\n"
        f"print(w.read({raw!r}, 0, p))\n"
        f"at = dt.datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=dt.UTC)\n"
        f"assert w.write(b'', {OUT_PROGRAM!r}, ('s', -(2 ** 63), None, at, at)) == {out!r}\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMNICRM_PURE_PYTHON": "1"}, check=True)
    assert result.stdout.strip() == repr([record["id"], 2 ** 40, "x", -1, len(raw)])
