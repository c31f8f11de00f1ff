"""The Avro single-object codec and the schema registry."""

from __future__ import annotations

import datetime as dt
import json
import struct
from itertools import permutations
from pathlib import Path

import pytest

from shared.avro import MAGIC, AvroCodec, SchemaRegistry, canonical_form, fingerprint, signed64
from shared.errors import SchemaError
from shared.topics import ALL_TOPICS

# (schema, canonical form, fingerprint) from the Avro project's share/test/data/schema-tests.txt.
AVRO_VECTORS = [
    ('"null"', '"null"', 7195948357588979594),
    ('{"type":"boolean"}', '"boolean"', -6970731678124411036),
    ('"int"', '"int"', 8247732601305521295),
    ('{"type":"long"}', '"long"', -3434872931120570953),
    ('"float"', '"float"', 5583340709985441680),
    ('"double"', '"double"', -8181574048448539266),
    ('"bytes"', '"bytes"', 5746618253357095269),
    ('"string"', '"string"', -8142146995180207161),
    ('[ "int"  ]', '["int"]', -5232228896498058493),
    ('[ "int" , {"type":"boolean"} ]', '["int","boolean"]', 5392556393470105090),
    ('{"fields":[], "type":"record", "name":"foo"}',
     '{"name":"foo","type":"record","fields":[]}', -4824392279771201922),
    ('{"fields":[], "type":"record", "name":"foo", "namespace":"x.y"}',
     '{"name":"x.y.foo","type":"record","fields":[]}', 5916914534497305771),
    ('{"fields":[], "type":"record", "name":"a.b.foo", "namespace":"x.y"}',
     '{"name":"a.b.foo","type":"record","fields":[]}', -4616218487480524110),
    ('{"fields":[], "type":"record", "name":"foo", "doc":"Useful info"}',
     '{"name":"foo","type":"record","fields":[]}', -4824392279771201922),
    ('{"fields":[{"type":{"type":"boolean"}, "name":"f1"}], "type":"record", "name":"foo"}',
     '{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}', 7843277075252814651),
    ('{"fields":[{"type":"boolean", "aliases":[], "name":"f1", "default":"true"},'
     '{"order":"descending","name":"f2","doc":"Hello","type":"int"}], "type":"record", "name":"foo"}',
     '{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"},{"name":"f2","type":"int"}]}',
     -4860222112080293046),
    ('{"type":"enum", "name":"foo", "symbols":["A1"]}',
     '{"name":"foo","type":"enum","symbols":["A1"]}', -6342190197741309591),
    ('{"namespace":"x.y.z", "type":"enum", "name":"foo", "doc":"foo bar", "symbols":["A1", "A2"]}',
     '{"name":"x.y.z.foo","type":"enum","symbols":["A1","A2"]}', -4448647247586288245),
    ('{"name":"foo","type":"fixed","size":15}', '{"name":"foo","type":"fixed","size":15}', 1756455273707447556),
    ('{ "items":{"type":"null"}, "type":"array"}', '{"type":"array","items":"null"}', -589620603366471059),
    ('{ "values":"string", "type":"map"}', '{"type":"map","values":"string"}', -8732877298790414990),
    ('{"name":"PigValue","type":"record","fields":[{"name":"value", "type":["null", "int", "long", "PigValue"]}]}',
     '{"name":"PigValue","type":"record","fields":[{"name":"value","type":["null","int","long","PigValue"]}]}',
     -1759257747318642341),
]


@pytest.mark.parametrize(("schema", "canonical", "expected"), AVRO_VECTORS)
def test_fingerprints_match_the_avro_projects_test_vectors(schema, canonical, expected):
    parsed = json.loads(schema)
    assert canonical_form(parsed) == canonical
    assert signed64(fingerprint(parsed)) == expected


@pytest.fixture(scope="module")
def registry() -> SchemaRegistry:
    return SchemaRegistry.load()


def test_every_topic_with_a_subject_has_a_schema(registry):
    for topic in ALL_TOPICS:
        if topic.subject is not None:
            assert registry.latest(topic.subject).version >= 1


def test_every_field_of_every_published_schema_has_a_doc():
    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "record":
                for f in node["fields"]:
                    assert f.get("doc"), f"{where}.{f['name']} has no doc"
                    walk(f["type"], f"{where}.{f['name']}")
            for key in ("items", "values"):
                if key in node:
                    walk(node[key], where)
        elif isinstance(node, list):
            for branch in node:
                walk(branch, where)

    paths = list(Path("schemas").glob("*/v*.avsc"))
    assert paths
    for path in paths:
        walk(json.loads(path.read_text()), str(path))


def test_single_object_encoding_layout(registry):
    codec = AvroCodec(registry)
    data = codec.encode("omnicrm.identity.Merge", _merge())
    latest = registry.latest("omnicrm.identity.Merge")
    assert data[:2] == MAGIC
    assert struct.unpack("<Q", data[2:10])[0] == latest.fingerprint


def test_round_trip_every_subject_with_defaults_filled(registry):
    codec = AvroCodec(registry)
    merge = codec.decode(codec.encode("omnicrm.identity.Merge", _merge()), "omnicrm.identity.Merge")
    assert merge["survivor"] == "c-1" and merge["cause_event_id"] is None
    assert merge["occurred_at"] == dt.datetime(2026, 11, 22, 2, 15, tzinfo=dt.UTC)
    event = {
        "event_id": "pos-soho-000123", "type": "sale",
        "occurred_at": dt.datetime(2026, 11, 22, 2, 15, tzinfo=dt.UTC), "utc_offset_minutes": 480,
        "customer": {"phone": "+12125550100"},
        "properties": ("omnicrm.ingest.SaleProperties",
                       {"order_id": "o-1", "currency": "USD", "total": 12990}),
    }
    decoded = codec.decode(codec.encode("omnicrm.ingest.Event", event), "omnicrm.ingest.Event")
    assert decoded["properties"]["total"] == 12990
    assert decoded["properties"]["points_redeemed"] == 0
    assert decoded["customer"]["email"] is None


def test_unknown_fingerprint_is_a_clear_schema_error(registry):
    codec = AvroCodec(registry)
    with pytest.raises(SchemaError) as err:
        codec.decode(MAGIC + struct.pack("<Q", 12345) + b"\x00")
    assert err.value.reason == "unknown_schema"
    with pytest.raises(SchemaError) as err:
        codec.decode(b"{\"json\": true}")
    assert err.value.reason == "not_single_object"


def test_truncated_body_is_malformed_not_a_crash(registry):
    codec = AvroCodec(registry)
    data = codec.encode("omnicrm.identity.Merge", _merge())
    with pytest.raises(SchemaError) as err:
        codec.decode(data[:14], "omnicrm.identity.Merge")
    assert err.value.reason == "malformed_avro"


def test_record_of_another_subject_is_rejected(registry):
    codec = AvroCodec(registry)
    data = codec.encode("omnicrm.identity.Merge", _merge())
    with pytest.raises(SchemaError) as err:
        codec.decode(data, "omnicrm.loyalty.LoyaltyEvent")
    assert err.value.reason == "wrong_schema"


# Schema evolution: three versions of one subject, every writer/reader pair resolves.
V1 = {"type": "record", "name": "Visit", "namespace": "omnicrm.test",
      "fields": [{"name": "id", "type": "string"}, {"name": "store", "type": "string"}]}
V2 = {**V1, "fields": V1["fields"] + [{"name": "minutes", "type": "int", "default": 0}]}
V3 = {**V1, "fields": V2["fields"] + [{"name": "channel", "type": ["null", "string"], "default": None}]}
SAMPLES = {1: {"id": "v", "store": "soho"}, 2: {"id": "v", "store": "soho", "minutes": 7},
           3: {"id": "v", "store": "soho", "minutes": 7, "channel": "app"}}


@pytest.fixture
def evolving(tmp_path: Path) -> SchemaRegistry:
    for number, schema in ((1, V1), (2, V2), (3, V3)):
        folder = tmp_path / "omnicrm.test.Visit"
        folder.mkdir(exist_ok=True)
        (folder / f"v{number}.avsc").write_text(json.dumps(schema))
    return SchemaRegistry.load(tmp_path)


@pytest.mark.parametrize(("writer", "reader"), list(permutations([1, 2, 3], 2)) + [(1, 1), (2, 2), (3, 3)])
def test_every_pair_of_versions_resolves(evolving, writer, reader):
    from shared.avro import make_version

    codec = AvroCodec(evolving)
    data = codec.encode("omnicrm.test.Visit", SAMPLES[writer], version=writer)
    # A reader whose newest version is `reader`.
    limited = SchemaRegistry([v for v in evolving.versions("omnicrm.test.Visit") if v.version <= max(reader, writer)])
    reader_codec = AvroCodec(SchemaRegistry([
        *[v for v in limited.versions("omnicrm.test.Visit") if v.version != reader],
        make_version("omnicrm.test.Visit", 99, [V1, V2, V3][reader - 1]),
    ]))
    decoded = reader_codec.decode(data, "omnicrm.test.Visit")
    reader_fields = {f["name"] for f in [V1, V2, V3][reader - 1]["fields"]}
    assert set(decoded) == reader_fields
    assert decoded["id"] == "v"
    if "minutes" in reader_fields:
        assert decoded["minutes"] == SAMPLES[writer].get("minutes", 0)


def test_a_breaking_change_is_a_clear_error_not_garbage(evolving):
    from shared.avro import make_version

    broken = {**V1, "fields": [V1["fields"][0], {"name": "minutes", "type": "string"}]}
    codec = AvroCodec(SchemaRegistry([*evolving.versions("omnicrm.test.Visit"),
                                      make_version("omnicrm.test.Visit", 4, broken)]))
    data = codec.encode("omnicrm.test.Visit", SAMPLES[1], version=1)
    with pytest.raises(SchemaError) as err:
        codec.decode(data, "omnicrm.test.Visit")
    assert err.value.reason == "incompatible_schema"


def test_schema_folder_name_must_match_the_record(tmp_path: Path):
    folder = tmp_path / "omnicrm.test.Wrong"
    folder.mkdir()
    (folder / "v1.avsc").write_text(json.dumps(V1))
    with pytest.raises(SchemaError):
        SchemaRegistry.load(tmp_path)


def _merge() -> dict:
    return {"merge_id": "m-1", "kind": "merged", "survivor": "c-1", "merged": "c-2",
            "reason": "shared phone", "occurred_at": dt.datetime(2026, 11, 22, 2, 15, tzinfo=dt.UTC)}
