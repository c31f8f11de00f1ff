"""Identifier normalisation: the one place that decides when two written forms are the same identifier.

Email is trimmed and lower-cased; phone goes to E.164 with `phonenumbers`, using the store's country
when the number has no `+`; a WhatsApp id (the phone digits with country code) also yields that
phone; other ids are taken as given (trimmed). Blocklisted junk values and unparseable numbers are
dropped, so they can neither create nor join customers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import phonenumbers

from shared.events import IDENTIFIER_TYPES

Ident = tuple[str, str]
PHONE_TYPES = ("phone", "whatsapp_id")
_TYPES = frozenset(IDENTIFIER_TYPES)


@lru_cache(maxsize=65536)
def normalise_phone(raw: str, region: str) -> str | None:
    """E.164 of a phone number, or None when it cannot be a phone number."""
    text = raw.strip()
    if not text:
        return None
    if text.startswith("00"):
        text = "+" + text[2:]
    nanp = _nanp(text, region)
    if nanp is not None:
        return nanp
    return phone_by_library(text, region)


def phone_by_library(text: str, region: str) -> str | None:
    """The general path (phonenumbers, ~30 us a parse): any shape, any country."""
    try:
        number = phonenumbers.parse(text, None if text.startswith("+") else region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


_SEPARATORS = str.maketrans("", "", " ()-.")
_NANP_AREA_START = frozenset("23456789")


def _nanp(text: str, region: str) -> str | None:
    """The E.164 of a North American number written in one of its two everyday shapes, without
    `phonenumbers` (a parse costs ~30 us; phones are on a good share of events): `+1` and ten
    digits, or, in a US store, ten digits, each with only spaces ( ) - . between them, the area
    code starting 2-9. For exactly these inputs `phonenumbers` returns "+1" and the ten digits
    (country code 1, no national prefix to strip, a possible length; a unit test compares the two
    on random inputs of these shapes). Anything else: None, and the caller parses."""
    if len(text) > 40:
        return None
    if text[0] == "+":
        digits = text[1:].translate(_SEPARATORS)
        if (len(digits) == 11 and digits[0] == "1" and digits[1] in _NANP_AREA_START
                and digits.isascii() and digits.isdigit()):
            return "+" + digits
        return None
    if region == "US":
        digits = text.translate(_SEPARATORS)
        if len(digits) == 10 and digits[0] in _NANP_AREA_START and digits.isascii() and digits.isdigit():
            return "+1" + digits
    return None


def normalise_whatsapp(raw: str) -> str | None:
    """WhatsApp ids are the international number without `+`; E.164 when it parses, else None."""
    text = raw.strip()
    if not text:
        return None
    digits = "".join(ch for ch in text if ch.isdigit())
    return normalise_phone("+" + digits, "ZZ") if digits else None


def normalise_email(raw: str) -> str | None:
    text = raw.strip().lower()
    local, at, domain = text.partition("@")
    if not at or not local or not domain or " " in text:
        return None
    return text


@dataclass(frozen=True)
class Normaliser:
    """Normalises an event's `customer` record with the configured default country and blocklist."""

    default_country: str = "US"
    blocklist: frozenset[Ident] = field(default_factory=frozenset)

    @classmethod
    def from_rules(cls, identity_rules: Mapping[str, Any]) -> Normaliser:
        country = str(identity_rules.get("default_country") or "US").upper()
        blocked: set[Ident] = set()
        for kind, values in (identity_rules.get("blocklist") or {}).items():
            for value in values or ():
                blocked.add((kind, str(value).strip().lower()))
                norm = _normalise_one(kind, str(value), country)
                if norm is not None:
                    blocked.add((kind, norm))
                    if kind == "phone":
                        blocked.add(("whatsapp_id", norm))
        return cls(country, frozenset(blocked))

    def identifiers(self, customer: Mapping[str, Any] | None, country: str | None = None) -> list[Ident]:
        """The usable normalised identifiers of a `customer` record, sorted, blocklist removed."""
        if not customer:
            return []
        region = (country or self.default_country).upper()
        blocklist = self.blocklist
        found: set[Ident] = set()
        # One pass over what the record holds (the decoded record has every type, mostly None).
        for kind, raw in customer.items():
            if not raw or kind not in _TYPES:
                continue
            raw = str(raw)
            if kind == "email":
                norm = normalise_email(raw)
            elif kind == "phone":
                norm = normalise_phone(raw, region)
            else:
                norm = _normalise_one(kind, raw, region)
            if norm is None or (kind, norm) in blocklist or (kind, raw.strip().lower()) in blocklist:
                continue
            found.add((kind, norm))
            if kind == "whatsapp_id" and norm.startswith("+") and not customer.get("phone"):
                # The WhatsApp number is the person's phone: it joins the shopper seen at the till.
                if not self.is_blocked("phone", norm, norm):
                    found.add(("phone", norm))
        return sorted(found)

    def lookup_value(self, kind: str, raw: str) -> str | None:
        """The normalised form of one identifier for a lookup query (default country)."""
        return _normalise_one(kind, raw, self.default_country)

    def is_blocked(self, kind: str, raw: str, norm: str) -> bool:
        return (kind, norm) in self.blocklist or (kind, raw.strip().lower()) in self.blocklist


def _normalise_one(kind: str, raw: str, region: str) -> str | None:
    if kind == "email":
        return normalise_email(raw)
    if kind == "phone":
        return normalise_phone(raw, region)
    if kind == "whatsapp_id":
        return normalise_whatsapp(raw) or (raw.strip() or None)
    text = raw.strip()
    return text or None


def types_of(identifiers: Iterable[Ident]) -> list[str]:
    return sorted({kind for kind, _ in identifiers})
