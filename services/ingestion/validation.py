"""The event envelope of CONTRACTS §2 checked and converted into an Avro-ready `omnicrm.ingest.Event`.

Every rule is read from `schemas/omnicrm.ingest.Event` (field names, types, required-ness and the
`omnicrm.*` attributes), so there is no second hand-written list of fields:

- `omnicrm.types`    which properties record belongs to an event type
- `omnicrm.money`    a decimal string in the record's `currency`, stored as minor units (Babel's
                     precision for the currency; floats and extra decimals rejected)
- `omnicrm.format`   datetime (RFC 3339 with offset), currency, country, timezone, locale,
                     birthday, email, phone
- `omnicrm.enum` / `omnicrm.keys` / `omnicrm.min` / `omnicrm.max`   allowed values, map keys, bounds
                     (length for strings, entries for maps, value for numbers)
- `omnicrm.derived`  set here (utc_offset_minutes, received_at), never read from the input

Error messages name the field and the rule, never the value: they reach publishers, logs and the DLQ.
Pure: no I/O; the caller passes the time.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

from babel import Locale, UnknownLocaleError
from babel.numbers import get_currency_precision, list_currencies

from shared.avro import SchemaRegistry
from shared.events import IDENTIFIER_TYPES, STORE_TYPES
from shared.topics import EVENT

FieldError = dict[str, str]
MAX_FUTURE = dt.timedelta(minutes=5)
# Older than this is a broken till clock (epoch 0, year 1900), not history worth replaying.
MAX_PAST = dt.timedelta(days=3650)
MAX_IDENTIFIER_LENGTH = 256
_LONG_MAX = (1 << 63) - 1
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_BAD = object()  # a value that failed; its error is already recorded

_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_DECIMAL = re.compile(r"^(\d+)(?:\.(\d+))?$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+$")
_PHONE_CHARS = re.compile(r"^\+?[0-9 ().\-]+$")
_LOCALE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*$")
_BIRTHDAY = re.compile(r"^(\d{4}|-)-(\d{2})-(\d{2})$")
_SAFE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# C0 controls and DEL; free text may keep tab and newlines, identifiers may not.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_CONTROL_STRICT = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


class _Errors:
    """Collects field errors for one event."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def add(self, path: str, message: str) -> object:
        self.items.append({"field": path, "message": message})
        return _BAD


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# -- formats ------------------------------------------------------------------------------------

@cache
def _currencies() -> frozenset[str]:
    return frozenset(list_currencies())


@cache
def currency_precision(currency: str) -> int:
    """Decimal places of a currency's minor unit (USD 2, JPY 0, BHD 3), from Babel's CLDR data."""
    return get_currency_precision(currency)


@cache
def _countries() -> frozenset[str]:
    # CLDR also names groupings and placeholders (EU, UN, ZZ...) that are not ISO 3166-1 countries.
    not_countries = {"ZZ", "QO", "EU", "EZ", "UN", "XA", "XB"}
    return frozenset(k for k in Locale("en").territories
                     if len(k) == 2 and k.isalpha() and k not in not_countries)


@cache
def _timezones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


@cache
def _known_locale(tag: str) -> bool:
    try:
        Locale.parse(tag, sep="-")
    except (UnknownLocaleError, ValueError, TypeError):
        return False
    return True


def parse_datetime(text: str) -> dt.datetime | None:
    """An RFC 3339 date-time with an explicit offset, or None."""
    m = _RFC3339.match(text)
    if not m:
        return None
    date, time, fraction, offset = m.groups()
    if fraction is None and len(text) == 25 and text[10] == "T" and offset[0] in "+-":
        try:  # already in the form rebuilt below
            return dt.datetime.fromisoformat(text)
        except ValueError:
            return None
    fraction = (fraction or "")[:7]  # microseconds are all Python keeps
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        return dt.datetime.fromisoformat(f"{date}T{time}{fraction}{offset}")
    except ValueError:
        return None


def _currency(value: str, path: str, errs: _Errors) -> Any:
    code = value.upper()
    if len(code) != 3 or code not in _currencies():
        return errs.add(path, "must be an ISO 4217 currency code such as USD")
    return code


def _country(value: str, path: str, errs: _Errors) -> Any:
    code = value.upper()
    if len(code) != 2 or code not in _countries():
        return errs.add(path, "must be an ISO 3166-1 alpha-2 country code such as US")
    return code


def _timezone(value: str, path: str, errs: _Errors) -> Any:
    if value not in _timezones():
        return errs.add(path, "must be an IANA time zone such as Asia/Shanghai")
    return value


def _locale(value: str, path: str, errs: _Errors) -> Any:
    tag = value.replace("_", "-")
    if not _LOCALE.match(tag) or not _known_locale(tag):
        return errs.add(path, "must be a BCP 47 language tag such as en, zh-Hans or zh-Hant")
    return tag


def _birthday(value: str, path: str, errs: _Errors) -> Any:
    m = _BIRTHDAY.match(value)
    if m:
        year = 2000 if m.group(1) == "-" else int(m.group(1))  # 2000: Feb 29 exists
        try:
            dt.date(year, int(m.group(2)), int(m.group(3)))
            return value
        except ValueError:
            pass
    return errs.add(path, "must be YYYY-MM-DD or --MM-DD")


def _email(value: str, path: str, errs: _Errors) -> Any:
    if len(value) > 254 or not _EMAIL.match(value):
        return errs.add(path, "is not an email address")
    return value


def _phone(value: str, path: str, errs: _Errors) -> Any:
    digits = sum(c.isdigit() for c in value)
    if not _PHONE_CHARS.match(value) or not 6 <= digits <= 15:
        return errs.add(path, "is not a phone number (digits, spaces, + - . ( ) only; 6 to 15 digits)")
    return value


def _datetime(value: str, path: str, errs: _Errors) -> Any:
    parsed = parse_datetime(value)
    if parsed is None:
        return errs.add(path, "must be an RFC 3339 date-time with a UTC offset, e.g. 2026-11-22T10:15:00+08:00")
    return parsed


# `omnicrm.format` -> check and normalise; a format the schema names but this table lacks fails
# when the schema is compiled, not on the first event.
FORMATS: dict[str, Callable[[str, str, _Errors], Any]] = {
    "currency": _currency, "country": _country, "timezone": _timezone, "locale": _locale,
    "birthday": _birthday, "email": _email, "phone": _phone, "datetime": _datetime,
}


def _formatter(kind: str) -> Callable[[str, str, _Errors], Any]:
    try:
        return FORMATS[kind]
    except KeyError:
        raise ValueError(f"unknown omnicrm.format {kind!r} in the schema") from None


# -- compiled checkers ---------------------------------------------------------------------------
# A checker is called as check(value, path, errs, currency) and returns the converted value or _BAD.
Checker = Callable[[Any, str, _Errors, str | None], Any]


def _string_checker(attrs: dict[str, Any], identifier: bool) -> Checker:
    fmt = attrs.get("omnicrm.format")
    allowed = attrs.get("omnicrm.enum")
    low = attrs.get("omnicrm.min")
    high = attrs.get("omnicrm.max", MAX_IDENTIFIER_LENGTH if identifier else None)
    control = _CONTROL_STRICT if identifier else _CONTROL

    def check(value: Any, path: str, errs: _Errors, currency: str | None) -> Any:
        if not isinstance(value, str):
            return errs.add(path, "must be a string")
        value = value.strip()
        bad = control.search(value)
        if bad:
            if "\ud800" <= bad.group() <= "\udfff":
                return errs.add(path, "must be valid Unicode text")
            return errs.add(path, "must not contain control characters")
        if low is not None and len(value) < low:
            return errs.add(path, f"must be at least {low} characters" if low > 1 else "must not be empty")
        if high is not None and len(value) > high:
            return errs.add(path, f"must be at most {high} characters")
        if allowed is not None and value not in allowed:
            return errs.add(path, f"must be one of {', '.join(allowed)}")
        if fmt is not None:
            return formatter(value, path, errs)
        return value

    formatter = _formatter(fmt) if fmt is not None else None
    # What a compiled record needs to check a well-formed value inline (and call `check` otherwise).
    check.inline = _InlineString(control, low if low is not None else 0, high,  # type: ignore[attr-defined]
                                 frozenset(allowed) if allowed is not None else None, formatter)
    return check


@dataclass(frozen=True, slots=True)
class _InlineString:
    control: re.Pattern[str]
    low: int
    high: int | None
    allowed: frozenset[str] | None
    formatter: Callable[[str, str, _Errors], Any] | None


def _integer_checker(attrs: dict[str, Any], bits: int) -> Checker:
    low = attrs.get("omnicrm.min", _INT_MIN if bits == 32 else -_LONG_MAX - 1)
    high = attrs.get("omnicrm.max", _INT_MAX if bits == 32 else _LONG_MAX)

    def check(value: Any, path: str, errs: _Errors, currency: str | None) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            return errs.add(path, "must be an integer")
        if value < low:
            return errs.add(path, f"must be at least {low}")
        if value > high:
            return errs.add(path, f"must be at most {high}")
        return value

    return check


def _money_checker(attrs: dict[str, Any]) -> Checker:
    def check(value: Any, path: str, errs: _Errors, currency: str | None) -> Any:
        # The common case (a plain non-negative amount that fits the currency) in few steps; the
        # full check below takes the rest and words the errors.
        if value.__class__ is str and currency is not None:
            m = _DECIMAL.match(value.strip())
            if m is not None:
                whole, fraction = m.groups()
                if len(whole) <= 18:
                    places = currency_precision(currency)
                    fraction = (fraction or "").rstrip("0")
                    if len(fraction) <= places:
                        minor = int(whole) * 10 ** places + int(fraction.ljust(places, "0") or "0")
                        if minor <= _LONG_MAX:
                            return minor
        return full_check(value, path, errs, currency)

    def full_check(value: Any, path: str, errs: _Errors, currency: str | None) -> Any:
        if isinstance(value, bool) or not isinstance(value, str):
            return errs.add(path, 'must be a decimal string such as "129.90", never a number')
        text = value.strip()
        negative = text.startswith("-")
        m = _DECIMAL.match(text[1:] if negative else text)
        if not m or len(m.group(1)) > 18:
            return errs.add(path, 'must be a decimal string such as "129.90"')
        if negative and Decimal(text) != 0:
            return errs.add(path, "must not be negative")
        if currency is None:
            return errs.add(path, "needs a valid currency in this record")
        places = currency_precision(currency)
        fraction = (m.group(2) or "").rstrip("0")
        if len(fraction) > places:
            return errs.add(path, f"has more than {places} decimal places for {currency}")
        minor = int(m.group(1)) * 10 ** places + int(fraction.ljust(places, "0") or "0")
        if minor > _LONG_MAX:
            return errs.add(path, "is too large")
        return minor

    return check


def _double_checker(attrs: dict[str, Any]) -> Checker:
    low = attrs.get("omnicrm.min")
    high = attrs.get("omnicrm.max")

    def check(value: Any, path: str, errs: _Errors, currency: str | None) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return errs.add(path, "must be a number")
        if low is not None and value < low:
            return errs.add(path, f"must be at least {low}")
        if high is not None and value > high:
            return errs.add(path, f"must be at most {high}")
        return float(value)

    return check


def _timestamp_checker(attrs: dict[str, Any]) -> Checker:
    def check(value: Any, path: str, errs: _Errors, currency: str | None) -> Any:
        if not isinstance(value, str):
            return errs.add(path, "must be an RFC 3339 date-time string")
        return _datetime(value.strip(), path, errs)

    return check


def _array_checker(items: Checker) -> Checker:
    def check(value: Any, path: str, errs: _Errors, currency: str | None) -> Any:
        if not isinstance(value, list):
            return errs.add(path, "must be an array")
        out = []
        bad = False
        # A record's compiled function directly (one call less per item).
        each = (items._fn or items._compile()) if isinstance(items, _RecordChecker) else items
        for i, item in enumerate(value):
            if item is None:
                errs.add(f"{path}[{i}]", "must not be null")
                bad = True
                continue
            converted = each(item, f"{path}[{i}]", errs, currency)
            bad |= converted is _BAD
            out.append(converted)
        return _BAD if bad else out

    return check


def _map_checker(values: Checker, attrs: dict[str, Any]) -> Checker:
    keys = attrs.get("omnicrm.keys")
    allowed = attrs.get("omnicrm.enum")
    low = attrs.get("omnicrm.min")
    high = attrs.get("omnicrm.max")

    def check(value: Any, path: str, errs: _Errors, currency: str | None) -> Any:
        if not isinstance(value, dict):
            return errs.add(path, "must be an object")
        if low is not None and len(value) < low:
            return errs.add(path, f"must have at least {low} entr{'y' if low == 1 else 'ies'}")
        if high is not None and len(value) > high:
            return errs.add(path, f"must have at most {high} entries")
        out = {}
        bad = False
        for k, v in value.items():
            # Keys are publisher text: name them in the path only when they are allowed ones.
            if keys is not None and k not in keys:
                errs.add(path, f"has a key that is not one of {', '.join(keys)}")
                bad = True
                continue
            sub = _join(path, k) if keys is not None or _SAFE_KEY.match(k) else path
            if allowed is not None and v not in allowed:
                errs.add(sub, f"must be one of {', '.join(allowed)}")
                bad = True
                continue
            converted = values(v, sub, errs, currency)
            bad |= converted is _BAD
            out[k] = converted
        return _BAD if bad else out

    return check


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    check: Checker
    nullable: bool
    has_default: bool
    default: Any
    derived: bool
    is_currency: bool


class _RecordChecker:
    """A record: required fields, defaults, unknown fields, and the currency its money is in."""

    def __init__(self, schema: dict[str, Any], names: dict[str, dict[str, Any]],
                 identifier_fields: bool = False) -> None:
        self.full_name = _full_name(schema)
        fields = [_compile_field(f, names, identifier_fields) for f in schema["fields"]]
        self.known = frozenset(f.name for f in fields)
        # The currency field is checked first so money fields of the record (and its children) use it.
        self.fields = tuple(sorted((f for f in fields if not f.derived), key=lambda f: not f.is_currency))
        self.has_currency = any(f.is_currency for f in fields)
        self._paths: dict[str, tuple[str, ...]] = {}

    @property
    def fields(self) -> tuple[_Field, ...]:
        return self._fields

    @fields.setter
    def fields(self, fields: tuple[_Field, ...]) -> None:
        self._fields = tuple(fields)
        self._paths = {}
        self._fn = None

    @property
    def known(self) -> frozenset[str]:
        return self._known

    @known.setter
    def known(self, known: frozenset[str]) -> None:
        self._known = frozenset(known)
        self._fn = None

    def _subpaths(self, path: str) -> tuple[str, ...]:
        subs = self._paths.get(path)
        if subs is None:
            subs = tuple(_join(path, f.name) for f in self.fields)
            if len(self._paths) < 512:  # paths repeat (properties.lines[0]...); bound the cache
                self._paths[path] = subs
        return subs

    def __call__(self, value: Any, path: str, errs: _Errors, currency: str | None) -> Any:
        return (self._fn or self._compile())(value, path, errs, currency)

    def _compile(self) -> Checker:
        """This record's check as one straight-line function (no per-field loop, unpacking or
        zip), built on first use, once the schema wiring has set `fields` and `known`."""
        env: dict[str, Any] = {"_BAD": _BAD, "_copy": _copy, "_unknown_fields": _unknown_fields,
                               "_paths": self._paths, "_subpaths": self._subpaths, "_known": self._known}
        lines = ["def check(value, path, errs, currency):",
                 "    if not isinstance(value, dict):",
                 "        return errs.add(path, 'must be an object')",
                 "    subs = _paths.get(path) or _subpaths(path)",
                 "    bad = False"]
        if self.has_currency:
            lines.append("    currency = None")
        for i, f in enumerate(self._fields):
            check = f.check._fn or f.check._compile() if isinstance(f.check, _RecordChecker) else f.check
            env[f"c{i}"] = check
            env[f"d{i}"] = f.default
            blank = " or (raw.__class__ is str and not raw.strip())" if f.nullable else ""
            lines += [f"    raw = value.get({f.name!r})",
                      f"    if raw is None{blank}:"]
            if f.nullable:
                lines.append(f"        f{i} = None")
            elif f.has_default:
                mutable = isinstance(f.default, dict | list)
                lines.append(f"        f{i} = _copy(d{i})" if mutable else f"        f{i} = d{i}")
            else:
                lines += [f"        f{i} = None",
                          f"        errs.add(subs[{i}], 'is required')",
                          "        bad = True"]
            inline = getattr(check, "inline", None)
            if isinstance(inline, _InlineString):
                # A string that passes every rule takes no call; anything else goes to the check,
                # which finds the same value bad and words the error.
                env[f"r{i}"] = inline.control.search
                env[f"a{i}"] = inline.allowed
                env[f"m{i}"] = inline.formatter
                # isprintable() (C, no regex) is True only without control characters and
                # surrogates; when False the pattern decides, as in the check.
                rules = ["raw.__class__ is str", f"((s := raw.strip()).isprintable() or r{i}(s) is None)"]
                if inline.low > 0:
                    rules.append(f"len(s) >= {inline.low}")
                if inline.high is not None:
                    rules.append(f"len(s) <= {inline.high}")
                if inline.allowed is not None:
                    rules.append(f"s in a{i}")
                good = (f"m{i}(s, subs[{i}], errs)" if inline.formatter is not None else "s")
                lines += [f"    elif {' and '.join(rules)}:",
                          f"        f{i} = {good}"]
                if inline.formatter is not None:
                    lines += [f"        if f{i} is _BAD:", "            bad = True"]
                    if f.is_currency:
                        lines += ["        else:", f"            currency = f{i}"]
                elif f.is_currency:
                    lines.append(f"        currency = f{i}")
            lines += ["    else:",
                      f"        f{i} = c{i}(raw, subs[{i}], errs, currency)",
                      f"        if f{i} is _BAD:",
                      "            bad = True"]
            if f.is_currency:
                lines += ["        else:", f"            currency = f{i}"]
        lines += ["    if not _known.issuperset(value):",
                  "        _unknown_fields(value, path, errs, _known)",
                  "        return _BAD",
                  "    if bad:",
                  "        return _BAD",
                  "    return {" + ", ".join(f"{f.name!r}: f{i}" for i, f in enumerate(self._fields)) + "}"]
        exec("\n".join(lines), env)  # noqa: S102 - source generated from our own schema
        self._fn = env["check"]
        return self._fn


def _unknown_fields(value: dict[str, Any], path: str, errs: _Errors, known: frozenset[str]) -> None:
    for name in sorted(value.keys() - known, key=str):
        shown = _join(path, name) if isinstance(name, str) and _SAFE_KEY.match(name) else path
        errs.add(shown, "is not a known field" if shown != path else "has a field that is not known")


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _full_name(schema: dict[str, Any]) -> str:
    name = schema["name"]
    return name if "." in name or not schema.get("namespace") else f"{schema['namespace']}.{name}"


def _collect_names(node: Any, names: dict[str, dict[str, Any]], namespace: str | None = None) -> None:
    if isinstance(node, list):
        for item in node:
            _collect_names(item, names, namespace)
    elif isinstance(node, dict):
        if node.get("type") in ("record", "enum", "fixed"):
            namespace = node.get("namespace", namespace)
            full = node["name"] if "." in node["name"] else f"{namespace}.{node['name']}"
            names[full] = node
        for key in ("fields", "items", "values", "type"):
            if key in node:
                _collect_names(node[key], names, namespace)


def _compile_type(node: Any, attrs: dict[str, Any], names: dict[str, dict[str, Any]],
                  identifier: bool) -> Checker:
    if isinstance(node, str):
        if node == "string":
            return _string_checker(attrs, identifier)
        if node in ("int", "long"):
            if attrs.get("omnicrm.money"):
                return _money_checker(attrs)
            return _integer_checker(attrs, 32 if node == "int" else 64)
        if node in ("double", "float"):
            return _double_checker(attrs)
        if node in names:
            return _RecordChecker(names[node], names)
        raise ValueError(f"unsupported Avro type {node!r} in the event schema")
    if isinstance(node, dict):
        kind = node["type"]
        if node.get("logicalType") == "timestamp-millis":
            return _timestamp_checker(attrs)
        if kind == "record":
            return _RecordChecker(node, names)
        if kind == "array":
            return _array_checker(_compile_type(node["items"], {}, names, False))
        if kind == "map":
            return _map_checker(_compile_type(node["values"], {}, names, False), attrs)
        return _compile_type(kind, attrs, names, identifier)
    raise ValueError(f"unsupported Avro type {node!r} in the event schema")


def _compile_field(field: dict[str, Any], names: dict[str, dict[str, Any]],
                   identifier_fields: bool) -> _Field:
    ftype = field["type"]
    nullable = isinstance(ftype, list) and "null" in ftype
    if isinstance(ftype, list):
        branches = [b for b in ftype if b != "null"]
        if len(branches) != 1:
            raise ValueError(f"field {field['name']}: only [null, T] unions are validated generically")
        ftype = branches[0]
    identifier = identifier_fields or field["name"] in ("event_id", "store_id")
    return _Field(
        name=field["name"],
        check=_compile_type(ftype, field, names, identifier),
        nullable=nullable,
        has_default="default" in field,
        default=field.get("default"),
        derived=bool(field.get("omnicrm.derived")),
        is_currency=field.get("omnicrm.format") == "currency",
    )


@dataclass(frozen=True)
class _EventSchema:
    envelope: _RecordChecker
    properties: dict[str, _RecordChecker]  # event type -> its properties record
    types: tuple[str, ...]


@cache
def _event_schema() -> _EventSchema:
    schema = SchemaRegistry.load().latest(EVENT).schema
    names: dict[str, dict[str, Any]] = {}
    _collect_names(schema, names)
    # The envelope without `properties` (chosen by type) and `customer` (identifier rules).
    envelope_schema = {**schema, "fields": [f for f in schema["fields"] if f["name"] != "properties"]}
    envelope = _RecordChecker(envelope_schema, names)
    customer_field = next(f for f in schema["fields"] if f["name"] == "customer")
    customer = _RecordChecker(customer_field["type"], names, identifier_fields=True)
    envelope.fields = tuple(
        f if f.name != "customer" else _Field(
            name="customer", check=customer, nullable=False, has_default=True,
            default=customer_field["default"], derived=False, is_currency=False)
        for f in envelope.fields)
    envelope.known = envelope.known | {"properties"} | {
        f["name"] for f in schema["fields"] if f.get("omnicrm.derived")}
    props_field = next(f for f in schema["fields"] if f["name"] == "properties")
    properties: dict[str, _RecordChecker] = {}
    for branch in props_field["type"]:
        if isinstance(branch, dict):
            checker = _RecordChecker(branch, names)
            for event_type in branch.get("omnicrm.types", []):
                properties[event_type] = checker
    type_field = next(f for f in schema["fields"] if f["name"] == "type")
    return _EventSchema(envelope, properties, tuple(type_field["omnicrm.enum"]))


def event_types() -> tuple[str, ...]:
    """Every event type the schema knows."""
    return _event_schema().types


# -- the event -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Validated:
    """One input event after validation: `event` (Avro-ready) or `errors`, never both."""

    event_id: str | None
    event: dict[str, Any] | None
    errors: list[FieldError]

    @property
    def ok(self) -> bool:
        return self.event is not None


def validate_event(raw: Any, *, received_at: dt.datetime, default_source: str | None = None,
                   max_future: dt.timedelta = MAX_FUTURE) -> Validated:
    """Check one envelope; return the Avro-ready Event dict or the field errors."""
    event_id = _readable_event_id(raw)
    if not isinstance(raw, dict):
        return Validated(event_id, None, [{"field": "", "message": "an event must be a JSON object"}])
    spec = _event_schema()
    errs = _Errors()
    envelope = spec.envelope(raw, "", errs, None)
    event_type = raw.get("type")
    props_checker = spec.properties.get(event_type) if isinstance(event_type, str) else None
    properties: Any = _BAD
    if props_checker is not None:
        raw_props = raw.get("properties")
        if raw_props is None:
            raw_props = {}
        properties = props_checker(raw_props, "properties", errs, None)
    occurred_utc = None
    window = _window(received_at, max_future)
    if envelope is not _BAD:
        occurred_utc = envelope["occurred_at"].astimezone(dt.UTC)
        _check_envelope_rules(envelope, occurred_utc, window, errs)
    if errs.items:
        return Validated(event_id, None, errs.items)
    assert envelope is not _BAD and properties is not _BAD
    occurred: dt.datetime = envelope["occurred_at"]
    offset = occurred.utcoffset() or dt.timedelta(0)
    event = {
        **envelope,
        "occurred_at": occurred_utc,
        "utc_offset_minutes": int(offset.total_seconds() // 60),
        "received_at": window.received_utc,
        "source": envelope.get("source") or default_source,
        "properties": properties,
    }
    _fill_store_id(event, errs)
    if errs.items:
        return Validated(event_id, None, errs.items)
    return Validated(event["event_id"], event, [])


@dataclass(frozen=True, slots=True)
class _Window:
    """The occurred_at range accepted at one receive time, in UTC (compared without offsets)."""

    received_at: dt.datetime
    max_future: dt.timedelta
    latest: dt.datetime
    earliest: dt.datetime
    received_utc: dt.datetime


_last_window: list[_Window] = []


def _window(received_at: dt.datetime, max_future: dt.timedelta) -> _Window:
    """The window of `received_at` (a request's events share one: it is kept for the next call)."""
    if _last_window:
        w = _last_window[0]
        if w.received_at is received_at and w.max_future == max_future:
            return w
    # The bounds as before (arithmetic in received_at's own zone), then in UTC: the same instants.
    w = _Window(received_at, max_future, (received_at + max_future).astimezone(dt.UTC),
                (received_at - MAX_PAST).astimezone(dt.UTC), received_at.astimezone(dt.UTC))
    _last_window[:] = [w]
    return w


def _check_envelope_rules(envelope: dict[str, Any], occurred_utc: dt.datetime, window: _Window,
                          errs: _Errors) -> None:
    """The CONTRACTS rules that are about the whole event rather than one field's type."""
    if occurred_utc > window.latest:
        errs.add("occurred_at",
                 f"is more than {int(window.max_future.total_seconds() // 60)} minutes in the future")
    elif occurred_utc < window.earliest:
        errs.add("occurred_at", f"is more than {MAX_PAST.days} days in the past")
    if envelope["type"] not in STORE_TYPES:
        customer = envelope.get("customer") or {}
        for kind in IDENTIFIER_TYPES:
            if customer.get(kind):
                return
        errs.add("customer", f"needs at least one identifier ({', '.join(IDENTIFIER_TYPES)})")


def _fill_store_id(event: dict[str, Any], errs: _Errors) -> None:
    """store_upsert / store_event name their store in properties; the envelope's store_id agrees."""
    props = event.get("properties") or {}
    inner_path, inner = None, None
    if event["type"] == "store_upsert":
        inner_path, inner = "properties.store.store_id", (props.get("store") or {}).get("store_id")
    elif event["type"] in ("store_event", "store_checkin"):
        inner_path, inner = "properties.store_id", props.get("store_id")
    if inner is None:
        return
    if event.get("store_id") is None:
        event["store_id"] = inner
    elif event["store_id"] != inner:
        errs.add(inner_path, "must match the event's store_id")


def _readable_event_id(raw: Any) -> str | None:
    """The event_id to echo in a result, when it is a sane string."""
    if isinstance(raw, dict):
        value = raw.get("event_id")
        if isinstance(value, str):
            value = value.strip()
            if 0 < len(value) <= 128 and (value.isprintable() or not _CONTROL_STRICT.search(value)):
                return value
    return None


# -- requests ------------------------------------------------------------------------------------

class RequestShapeError(ValueError):
    """The body is JSON but not one event nor `{"events": [...]}` within the limits."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def events_of(body: Any, max_events: int = 1000) -> tuple[list[Any], bool]:
    """The events of a request body and whether it was a batch; RequestShapeError when neither."""
    if isinstance(body, dict) and "events" in body and "type" not in body:
        events = body["events"]
        if not isinstance(events, list):
            raise RequestShapeError("events", "must be an array of events")
        if not events:
            raise RequestShapeError("events", "must hold at least one event")
        if len(events) > max_events:
            raise RequestShapeError("events", f"must hold at most {max_events} events (got {len(events)})")
        extra = [k for k in body if k != "events"]
        if extra:
            raise RequestShapeError("", "a batch is {\"events\": [...]} with no other fields")
        return events, True
    if isinstance(body, dict):
        return [body], False
    raise RequestShapeError("", "the body must be one event object or {\"events\": [...]}")


@cache
def _valid_depth() -> tuple[int | None, tuple[str, ...]]:
    """The deepest JSON nesting (objects and arrays, as `exceeds_depth` counts it) an event can
    have and still validate, read from the schema, and the envelope fields whose input validation
    ignores (derived), so an event that validates may still hide deep values there. None when a
    record below the envelope has such fields (no bound then)."""
    schema = SchemaRegistry.load().latest(EVENT).schema
    names: dict[str, dict[str, Any]] = {}
    _collect_names(schema, names)
    unbounded = False

    def depth(node: Any, top: bool = False) -> int:
        nonlocal unbounded
        if isinstance(node, list):
            return max(depth(b) for b in node)
        if isinstance(node, str):
            return depth(names[node]) if node in names else 0
        kind = node["type"]
        if kind == "record":
            if not top and any(f.get("omnicrm.derived") for f in node["fields"]):
                unbounded = True
            return 1 + max((depth(f["type"]) for f in node["fields"] if not f.get("omnicrm.derived")),
                           default=0)
        if kind == "array":
            return 1 + depth(node["items"])
        if kind == "map":
            return 1 + depth(node["values"])
        return depth(kind) if isinstance(kind, dict | list) or kind in names else 0

    bound = depth(schema, top=True)
    derived = tuple(f["name"] for f in schema["fields"] if f.get("omnicrm.derived"))
    return (None if unbounded else bound), derived


def valid_events_within(items: list[Any], checked: list[Validated], levels: int) -> bool:
    """Whether events that validated are known to nest at most `levels` deep without walking them:
    validation accepts only the containers the schema has, except in ignored (derived) fields."""
    bound, derived = _valid_depth()
    if bound is None or bound > levels:
        return False
    for item, v in zip(items, checked, strict=True):
        if v.event is None:
            return False
        for name in derived:
            value = item.get(name)
            if value is not None and isinstance(value, dict | list):
                return False
    return True


def exceeds_depth(value: Any, limit: int) -> bool:
    """Whether JSON nesting (objects and arrays) goes deeper than `limit` levels."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        deeper = []
        for node in level:
            for child in (node.values() if isinstance(node, dict) else node):
                if isinstance(child, dict | list):
                    deeper.append(child)
        level = deeper
    return False


# -- the same schema as JSON Schema, for the OpenAPI document -------------------------------------

_JSON_FORMATS = {"datetime": {"format": "date-time"}, "email": {"format": "email"},
                 "currency": {"pattern": "^[A-Za-z]{3}$"}, "country": {"pattern": "^[A-Za-z]{2}$"},
                 "birthday": {"pattern": r"^(\d{4}|-)-\d{2}-\d{2}$"}}


def _json_type(node: Any, attrs: dict[str, Any], names: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(node, list):
        branches = [b for b in node if b != "null"]
        inner = _json_type(branches[0], attrs, names)
        return {"anyOf": [inner, {"type": "null"}]}
    if isinstance(node, dict) and node.get("logicalType") == "timestamp-millis":
        return {"type": "string", "format": "date-time"}
    if isinstance(node, dict) and node["type"] == "record":
        return _json_record(node, names)
    if isinstance(node, dict) and node["type"] == "array":
        return {"type": "array", "items": _json_type(node["items"], {}, names)}
    if isinstance(node, dict) and node["type"] == "map":
        out: dict[str, Any] = {"type": "object",
                               "additionalProperties": _json_type(node["values"], {}, names)}
        if "omnicrm.keys" in attrs:
            out["propertyNames"] = {"enum": attrs["omnicrm.keys"]}
        if "omnicrm.enum" in attrs:
            out["additionalProperties"] = {"type": "string", "enum": attrs["omnicrm.enum"]}
        if "omnicrm.min" in attrs:
            out["minProperties"] = attrs["omnicrm.min"]
        return out
    if isinstance(node, dict):
        return _json_type(node["type"], attrs, names)
    if node in names:
        return _json_record(names[node], names)
    if attrs.get("omnicrm.money"):
        return {"type": "string", "pattern": r"^-?\d+(\.\d+)?$",
                "description": "decimal string in the record's currency, e.g. \"129.90\""}
    if node in ("int", "long"):
        out = {"type": "integer"}
    elif node in ("double", "float"):
        out = {"type": "number"}
    else:
        out = {"type": "string"}
        out.update(_JSON_FORMATS.get(attrs.get("omnicrm.format", ""), {}))
        if "omnicrm.enum" in attrs:
            out["enum"] = attrs["omnicrm.enum"]
    if "omnicrm.min" in attrs:
        out["minLength" if node == "string" else "minimum"] = attrs["omnicrm.min"]
    if "omnicrm.max" in attrs:
        out["maxLength" if node == "string" else "maximum"] = attrs["omnicrm.max"]
    return out


def _json_record(schema: dict[str, Any], names: dict[str, dict[str, Any]]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required = []
    for f in schema["fields"]:
        if f.get("omnicrm.derived"):
            continue
        props[f["name"]] = {**_json_type(f["type"], f, names), "description": f.get("doc", "")}
        nullable = isinstance(f["type"], list) and "null" in f["type"]
        if not nullable and "default" not in f:
            required.append(f["name"])
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if schema.get("doc"):
        out["description"] = schema["doc"]
    if required:
        out["required"] = required
    return out


@cache
def envelope_json_schema() -> dict[str, Any]:
    """The event envelope as JSON Schema, generated from the Avro schema (documentation only:
    validate_event is what decides)."""
    schema = SchemaRegistry.load().latest(EVENT).schema
    names: dict[str, dict[str, Any]] = {}
    _collect_names(schema, names)
    envelope = _json_record({**schema, "fields": [f for f in schema["fields"] if f["name"] != "properties"]},
                            names)
    props_field = next(f for f in schema["fields"] if f["name"] == "properties")
    variants = []
    for branch in props_field["type"]:
        if isinstance(branch, dict):
            record = _json_record(branch, names)
            record["title"] = f"properties of {', '.join(branch.get('omnicrm.types', []))}"
            variants.append(record)
    envelope["properties"]["properties"] = {"anyOf": [*variants, {"type": "null"}],
                                            "description": props_field.get("doc", "")}
    envelope["description"] = ("An event (CONTRACTS §2). Money is a decimal string; customer-bound "
                               "types need at least one customer identifier.")
    return envelope
