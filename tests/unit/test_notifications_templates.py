"""Templates: every kind in every locale, locale fallback, Babel money and dates, startup checks."""

from __future__ import annotations

import datetime as dt
import shutil

import pytest

from services.notifications.contacts import Contact
from services.notifications.policy import NotificationRules, Offer, Trigger
from services.notifications.templates import (
    TEMPLATES_DIR,
    Templates,
    TemplateSetError,
    money,
    template_locale,
)

RULES = NotificationRules()
AT = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC)
OFFER = Offer("BDAY-7F3A", "Birthday gift", 5000, 30000, "USD", dt.datetime(2026, 12, 6, 12, tzinfo=dt.UTC))


@pytest.fixture(scope="module")
def templates() -> Templates:
    return Templates(RULES.kinds, RULES.locales)


@pytest.mark.parametrize("tag,expected", [
    ("en", "en"), ("en-GB", "en"), ("zh-Hans", "zh-Hans"), ("zh-CN", "zh-Hans"), ("zh", "zh-Hans"),
    ("zh-Hant", "zh-Hant"), ("zh-TW", "zh-Hant"), ("zh-HK", "zh-Hant"), ("zh_Hant_HK", "zh-Hant"),
    ("fr-FR", "en"), (None, "en"), ("", "en"),
])
def test_locale_choice_falls_back_to_en(tag, expected):
    assert template_locale(tag, RULES.locales) == expected


def test_money_is_formatted_per_locale_from_minor_units():
    assert money(5000, "USD", "en") == "$50.00"
    assert money(5000, "USD", "zh-Hans") == "US$50.00"
    assert money(1234, "JPY", "en") == "¥1,234"  # zero-decimal currency: minor unit = yen
    assert money(12990, "CNY", "zh-Hans") == "¥129.90"


@pytest.mark.parametrize("locale", ["en", "zh-Hans", "zh-Hant"])
def test_every_kind_renders_in_every_locale_with_and_without_offer(templates, locale):
    c = Contact("c1", first_name="Mei", locale=locale)
    for kind in RULES.kinds:
        for offer in (None, OFFER):
            r = templates.render(Trigger("t", kind, "c1", AT, context={"store_name": "SoHo"}, offer=offer), c, "UTC")
            assert r.locale == locale and r.body and r.subject
            assert "{{" not in r.body and "&amp;" not in r.body


def test_birthday_coupon_text_in_each_locale(templates):
    t = Trigger("t", "birthday_coupon", "c1", AT, offer=OFFER)
    en = templates.render(t, Contact("c1", first_name="Ann & Bo", locale="en-US"), "America/New_York")
    assert en.body == ("Happy birthday, Ann & Bo! Enjoy $50.00 off when you spend $300.00 with code "
                       "BDAY-7F3A, valid until December 6, 2026.")
    hans = templates.render(t, Contact("c1", locale="zh-CN"), "Asia/Shanghai")
    assert "2026年12月6日" in hans.body and "US$50.00" in hans.body and "优惠码" in hans.body
    hant = templates.render(t, Contact("c1", locale="zh-TW"), "Asia/Taipei")
    assert "優惠碼" in hant.body
    assert en.params["offer_amount"] == "$50.00"


def test_geo_thank_you_names_the_store(templates):
    r = templates.render(Trigger("t", "geo_thank_you", "c1", AT, context={"store_name": "SoHo"}),
                         Contact("c1"), "UTC")
    assert r.body.startswith("Thanks for visiting our SoHo store today!")


def test_missing_template_is_a_startup_error(tmp_path):
    copy = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, copy)
    (copy / "zh-Hant" / "win_back.j2").unlink()
    with pytest.raises(TemplateSetError, match="zh-Hant/win_back.j2"):
        Templates(RULES.kinds, RULES.locales, copy)


def test_broken_template_is_a_startup_error(tmp_path):
    copy = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, copy)
    (copy / "en" / "welcome.j2").write_text("Hi {{ frist_name }}")
    with pytest.raises(TemplateSetError, match="en/welcome.j2"):
        Templates(RULES.kinds, RULES.locales, copy)


def test_sandbox_blocks_unsafe_attribute_access(tmp_path):
    copy = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, copy)
    (copy / "en" / "welcome.j2").write_text("{{ first_name.__class__.__mro__ }}")
    with pytest.raises(TemplateSetError):
        Templates(RULES.kinds, RULES.locales, copy)
