"""Contact points sealed in the read model, decided on without opening them; rendered messages
that never carry an email or phone number."""

from __future__ import annotations

import datetime as dt

import pytest

from services.notifications.contacts import Sealed, contact_from_row, reveal, seal_context
from services.notifications.policy import (
    NotificationRules,
    Trigger,
    check_before_send,
    choose_channels,
)
from services.notifications.templates import Templates
from shared.crypto import DecryptionError, Vault
from shared.pii import contains_pii

RULES = NotificationRules()
AT = dt.datetime(2026, 6, 10, 12, 0, tzinfo=dt.UTC)
VAULT = Vault.from_env({})  # embedded development keys
EMAIL, PHONE = "mei.chen@example.com", "+8613812345678"


def row(cid: str = "c1", **kw) -> dict:
    base = {"customer_id": cid,
            "emails_sealed": [VAULT.seal(EMAIL, seal_context(cid, "email"))],
            "phones_sealed": [VAULT.seal(PHONE, seal_context(cid, "phone"))],
            "whatsapp_ids_sealed": [], "first_name": "Mei", "locale": "en", "timezone": "UTC",
            "home_store_id": None, "preferred_channel": None, "version": 1,
            "consents": {"whatsapp": "opted_in", "sms": "opted_in", "email": "opted_in"}}
    base.update(kw)
    return base


def test_policy_decides_on_sealed_contact_points_without_opening_them():
    c = contact_from_row(row())
    assert all(isinstance(a, Sealed) for a in c.emails + c.phones)
    assert EMAIL not in repr(c) and PHONE not in repr(c)
    # WhatsApp falls back to the phone number, still sealed.
    assert choose_channels(c, RULES) == (("whatsapp", "sms", "email"), None)
    check = check_before_send("sms", c, erased=False, now=AT, tz_name="UTC", rules=RULES)
    assert check.action == "send" and isinstance(check.address, Sealed)
    assert reveal(check.address, VAULT) == PHONE
    assert choose_channels(contact_from_row(row(emails_sealed=[], phones_sealed=[])), RULES) == ((), "no_contact")


def test_a_sealed_value_only_opens_for_its_customer_and_kind():
    blob = VAULT.seal(PHONE, seal_context("c1", "phone"))
    assert Sealed(blob, seal_context("c1", "phone")).open(VAULT) == PHONE
    for wrong in (seal_context("c2", "phone"), seal_context("c1", "whatsapp_id")):
        with pytest.raises(DecryptionError) as info:
            Sealed(blob, wrong).open(VAULT)
        assert PHONE not in str(info.value)


@pytest.fixture(scope="module")
def templates() -> Templates:
    return Templates(RULES.kinds, RULES.locales)


@pytest.mark.parametrize("name", [EMAIL, PHONE, "Mei 13812345678", "call +1 (212) 555-0100"])
def test_a_first_name_holding_contact_data_is_not_rendered(templates, name):
    c = contact_from_row(row(first_name=name))
    for kind in RULES.kinds:
        r = templates.render(Trigger("t", kind, "c1", AT), c, "UTC")
        assert contains_pii(r.subject + " " + r.body + " " + " ".join(r.params.values())) == []
    assert templates.render(Trigger("t", "welcome", "c1", AT), c, "UTC").body.startswith("Welcome!")


def test_the_first_name_is_kept_and_contact_data_in_trigger_context_is_masked(templates):
    c = contact_from_row(row())
    t = Trigger("t", "campaign", "c1", AT, context={"text": f"Questions? Write to {EMAIL} or call {PHONE}."})
    r = templates.render(t, c, "UTC")
    assert r.body.startswith("Hi Mei!")
    assert EMAIL not in r.body and PHONE not in r.body and contains_pii(r.body) == []
