"""Avro single-object encoding (C3 01 + CRC-64-AVRO fingerprint + body) over a registry of every schema version in schemas/.

A reader resolves any known writer schema to its own (latest) reader schema, so producers and
consumers can move to a new schema version independently. Unknown fingerprints and malformed
bodies raise SchemaError, which the batch consumer dead-letters.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
from fastavro._read_common import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form

from shared.errors import SchemaError

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"

_EMPTY64 = 0xC15D213AA4D7A795
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp & _MASK64)
    return table


_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The Avro specification's CRC-64-AVRO (Rabin) fingerprint, as an unsigned 64-bit int."""
    fp = _EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp & _MASK64


_CANONICAL_KEYS = {"type", "name", "namespace", "fields", "symbols", "items", "values", "size"}


def _strip(node: Any) -> Any:
    # Attributes the canonical form drops (doc, default, aliases, custom ones) are removed first,
    # so a default fastavro would refuse to parse cannot change a fingerprint.
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k in _CANONICAL_KEYS}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def canonical_form(schema: Any) -> str:
    """Parsing Canonical Form of a self-contained schema."""
    return to_parsing_canonical_form(_strip(schema))


def fingerprint(schema: Any) -> int:
    """CRC-64-AVRO of the schema's Parsing Canonical Form (unsigned)."""
    return crc64_avro(canonical_form(schema).encode("utf-8"))


def signed64(value: int) -> int:
    """The signed reading of an unsigned 64-bit value (how the Avro test vectors print it)."""
    return value - (1 << 64) if value >= (1 << 63) else value


@dataclass(frozen=True)
class SchemaVersion:
    """One published version of a subject (a record's full name)."""

    subject: str
    version: int
    schema: dict[str, Any] = field(repr=False)
    parsed: Any = field(repr=False, compare=False)
    fingerprint: int
    header: bytes = field(repr=False)


class SchemaRegistry:
    """Every `.avsc` under a folder laid out as `<subject>/v<N>.avsc`."""

    def __init__(self, versions: Iterable[SchemaVersion]) -> None:
        self._by_fp: dict[bytes, SchemaVersion] = {}
        self._by_subject: dict[str, list[SchemaVersion]] = {}
        for sv in versions:
            self._by_fp[sv.header] = sv
            self._by_subject.setdefault(sv.subject, []).append(sv)
        for svs in self._by_subject.values():
            svs.sort(key=lambda s: s.version)

    @classmethod
    def load(cls, root: Path | str = SCHEMAS_DIR) -> SchemaRegistry:
        root = Path(root)
        versions = []
        for path in sorted(root.glob("*/v*.avsc")):
            subject = path.parent.name
            try:
                version = int(path.stem[1:])
            except ValueError as exc:
                raise SchemaError("bad_schema_file", f"{path}: name must be v<N>.avsc") from exc
            schema = json.loads(path.read_text(encoding="utf-8"))
            full_name = _full_name(schema)
            if full_name != subject:
                raise SchemaError("bad_schema_file", f"{path}: record {full_name} is not {subject}")
            versions.append(make_version(subject, version, schema))
        if not versions:
            raise SchemaError("no_schemas", f"no schemas under {root}")
        return cls(versions)

    @property
    def subjects(self) -> list[str]:
        return sorted(self._by_subject)

    def versions(self, subject: str) -> list[SchemaVersion]:
        try:
            return list(self._by_subject[subject])
        except KeyError as exc:
            raise SchemaError("unknown_subject", subject) from exc

    def latest(self, subject: str) -> SchemaVersion:
        return self.versions(subject)[-1]

    def writer_of(self, data: bytes) -> SchemaVersion:
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise SchemaError("not_single_object", "value does not start with the Avro C3 01 marker")
        sv = self._by_fp.get(bytes(data[:HEADER_LEN]))
        if sv is None:
            fp = struct.unpack("<Q", data[2:HEADER_LEN])[0]
            raise SchemaError("unknown_schema", f"no schema with fingerprint {fp:016x}")
        return sv


def make_version(subject: str, version: int, schema: dict[str, Any]) -> SchemaVersion:
    fp = fingerprint(schema)
    return SchemaVersion(
        subject=subject,
        version=version,
        schema=schema,
        parsed=fastavro.parse_schema(schema, named_schemas={}),
        fingerprint=fp,
        header=MAGIC + struct.pack("<Q", fp),
    )


def _full_name(schema: dict[str, Any]) -> str:
    name = schema["name"]
    return name if "." in name or not schema.get("namespace") else f"{schema['namespace']}.{name}"


class AvroCodec:
    """Encodes with a subject's latest version; decodes any known version into the reader's."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry
        # subject -> (header, compiled body encoder or None where the schema is not compiled)
        self._compiled: dict[str, tuple[bytes, Any]] = {}

    def encode(self, subject: str, record: dict[str, Any], version: int | None = None) -> bytes:
        if version is None:
            compiled = self._compiled.get(subject)
            if compiled is None:
                compiled = self._compiled[subject] = self._compile(subject)
            header, fn = compiled
            if fn is not None:
                out = bytearray(header)
                try:
                    fn(record, out)
                    return bytes(out)
                except Exception:  # noqa: BLE001, S110 - fastavro decides (and words) what it refuses
                    pass
        sv = self.registry.latest(subject) if version is None else self._version(subject, version)
        buf = io.BytesIO()
        buf.write(sv.header)
        try:
            fastavro.schemaless_writer(buf, sv.parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise SchemaError("unencodable", f"{subject}: {exc}") from exc
        return buf.getvalue()

    def _compile(self, subject: str) -> tuple[bytes, Any]:
        from shared.avro_compiled import compile_record  # imports nothing back from here

        sv = self.registry.latest(subject)
        try:
            return sv.header, compile_record(sv.schema)
        except ValueError:
            return sv.header, None  # a union or type the compiler does not know: fastavro

    def decode(self, data: bytes, subject: str | None = None) -> dict[str, Any]:
        """Decode single-object bytes; with `subject`, resolve into that subject's latest schema."""
        writer = self.registry.writer_of(data)
        reader = None
        if subject is not None:
            latest = self.registry.latest(subject)
            if latest.header != writer.header:
                if writer.subject != subject:
                    raise SchemaError(
                        "wrong_schema", f"record is {writer.subject}, expected {subject}"
                    )
                reader = latest.parsed
        try:
            return fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer.parsed, reader)
        except SchemaResolutionError as exc:
            raise SchemaError("incompatible_schema",
                              f"{writer.subject} v{writer.version} cannot be read as the reader's version") from exc
        except Exception as exc:  # fastavro raises many types on garbage input
            raise SchemaError("malformed_avro", f"{writer.subject} v{writer.version}: {type(exc).__name__}") from exc

    def _version(self, subject: str, version: int) -> SchemaVersion:
        for sv in self.registry.versions(subject):
            if sv.version == version:
                return sv
        raise SchemaError("unknown_version", f"{subject} v{version}")
