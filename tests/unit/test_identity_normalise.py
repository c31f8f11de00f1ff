"""Identifier normalisation: email case and spaces, phones to E.164 with the store's country, blocklist."""

from __future__ import annotations

from services.identity.normalise import (
    Normaliser,
    normalise_email,
    normalise_phone,
    phone_by_library,
)
from shared.rules import load_rules

RULES = load_rules(environ={})["identity"]


def test_email_is_trimmed_and_lower_cased() -> None:
    assert normalise_email("  Alice@Example.COM ") == "alice@example.com"
    assert normalise_email("not-an-email") is None


def test_phone_uses_the_store_country_when_there_is_no_plus() -> None:
    assert normalise_phone("(212) 555-0100", "US") == "+12125550100"
    assert normalise_phone("+1 212 555 0100", "CN") == "+12125550100"
    assert normalise_phone("138 1234 5678", "CN") == "+8613812345678"
    assert normalise_phone("0044 20 7946 0958", "US") == "+442079460958"
    assert normalise_phone("12", "US") is None


def test_identifiers_are_normalised_sorted_and_blocklisted() -> None:
    n = Normaliser.from_rules(RULES)
    ids = n.identifiers({"email": " A@Example.com", "phone": "212 555 0100", "loyalty_id": " L-1 "})
    assert ids == [("email", "a@example.com"), ("loyalty_id", "L-1"), ("phone", "+12125550100")]
    assert n.identifiers({"phone": "13812345678"}, country="CN") == [("phone", "+8613812345678")]
    assert n.identifiers({"email": "TEST@test.com", "phone": "000-000-0000"}) == []
    assert n.identifiers({"phone": "+1 555 555 5555"}) == []


def test_whatsapp_id_also_names_the_phone() -> None:
    n = Normaliser.from_rules(RULES)
    assert n.identifiers({"whatsapp_id": "12125550100"}) == [
        ("phone", "+12125550100"), ("whatsapp_id", "+12125550100")]
    assert n.identifiers({"whatsapp_id": "12125550100", "phone": "+12125550199"}) == [
        ("phone", "+12125550199"), ("whatsapp_id", "+12125550100")]
    assert n.lookup_value("phone", "(212) 555-0100") == "+12125550100"


def test_north_american_fast_path_matches_phonenumbers() -> None:
    """normalise_phone answers `+1` + ten digits and US ten-digit numbers without phonenumbers:
    on random inputs of those shapes (separators anywhere) it must answer what phonenumbers does."""
    import random

    def reference(raw: str, region: str) -> str | None:  # normalise_phone without the fast path
        text = raw.strip()
        if text.startswith("00"):
            text = "+" + text[2:]
        return phone_by_library(text, region)

    rnd = random.Random(11)
    seps = [" ", "(", ")", "-", ".", "", ""]

    def shaped(digits: str) -> str:
        return "".join((rnd.choice(seps) if rnd.random() < 0.4 else "") + d for d in digits) + rnd.choice(seps)

    for _ in range(3000):
        ten = str(rnd.randint(2, 9)) + "".join(rnd.choice("0123456789") for _ in range(9))
        raw = rnd.choice([shaped(ten), "+" + shaped("1" + ten), "001" + shaped(ten),
                          shaped("1" + ten), shaped("0" + ten[1:])])
        region = rnd.choice(["US", "CA", "CN"])
        assert normalise_phone.__wrapped__(raw, region) == reference(raw, region), (raw, region)
