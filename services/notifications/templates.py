"""Message templates per trigger kind and locale, rendered in a Jinja2 sandbox with Babel formatting.

Every kind must have a template in every configured locale: a missing or broken one is a
startup error (TemplateSetError), never a surprise at send time. Customers whose locale has no
templates get `en`. Messages are plain text (SMS, WhatsApp, text/plain email), so autoescape is
off: HTML escaping would show `&amp;` in an SMS.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime
from babel.numbers import format_currency, get_currency_precision
from jinja2 import FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from services.notifications.contacts import Contact
from services.notifications.policy import Offer, Trigger, zone
from shared.pii import redact

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
FALLBACK_LOCALE = "en"
# The Babel locale that formats money and dates for each template locale.
BABEL_LOCALES = {"en": "en_US", "zh-Hans": "zh_Hans_CN", "zh-Hant": "zh_Hant_TW"}
# Language codes of approved WhatsApp templates (Cloud API `template.language.code`).
WHATSAPP_LANGUAGES = {"en": "en", "zh-Hans": "zh_CN", "zh-Hant": "zh_TW"}
# Named body parameters each WhatsApp template is approved with, in order.
WHATSAPP_PARAMS: dict[str, tuple[str, ...]] = {
    "birthday_coupon": ("first_name", "offer_amount", "offer_code", "offer_expires"),
    "geo_thank_you": ("first_name", "store_name"),
    "win_back": ("first_name", "offer_amount", "offer_code", "offer_expires"),
    "abandoned_cart": ("first_name",),
    "replenishment": ("first_name", "category"),
    "store_event_invite": ("first_name", "event_title", "store_name", "event_starts"),
    "campaign": ("first_name", "offer_description", "offer_code"),
    "welcome": ("first_name",),
    "tier_upgrade": ("first_name", "tier"),
    "points_expiring": ("first_name", "points", "points_expire_on"),
}
_TRADITIONAL_REGIONS = ("tw", "hk", "mo", "hant")


class TemplateSetError(Exception):
    """A template is missing or does not compile; raised at startup."""


@dataclass(frozen=True)
class Rendered:
    """A rendered message: subject (email), body, the values rendered (WhatsApp parameters)."""

    locale: str
    subject: str
    body: str
    params: Mapping[str, str] = field(default_factory=dict)


def template_locale(tag: str | None, available: Iterable[str]) -> str:
    """The template locale for a customer's BCP 47 tag; `en` when none fits."""
    available = list(available)
    if not tag:
        return FALLBACK_LOCALE
    norm = tag.replace("_", "-").strip()
    for loc in available:
        if loc.lower() == norm.lower():
            return loc
    parts = norm.lower().split("-")
    if parts[0] == "zh":
        wanted = "zh-Hant" if any(p in _TRADITIONAL_REGIONS for p in parts[1:]) else "zh-Hans"
        if wanted in available:
            return wanted
    for loc in available:
        if loc.lower().split("-")[0] == parts[0] and parts[0] != "zh":
            return loc
    return FALLBACK_LOCALE


@functools.lru_cache(maxsize=256)
def _babel_locale(locale: str) -> Locale:
    try:
        return Locale.parse(BABEL_LOCALES.get(locale, locale.replace("-", "_")))
    except (UnknownLocaleError, ValueError):
        return Locale.parse("en_US")


@functools.lru_cache(maxsize=8192)
def money(minor: int, currency: str, locale: str) -> str:
    """Minor units formatted for the locale (`$50.00`, `US$50.00`), exactly, without floats.

    Cached: offers repeat a handful of amounts, and Babel's formatting was a fifth of a decision."""
    digits = get_currency_precision(currency)
    amount = Decimal(minor).scaleb(-digits)
    return format_currency(amount, currency, locale=_babel_locale(locale))


class Templates:
    """All templates, loaded and compiled once."""

    def __init__(self, kinds: Iterable[str], locales: Iterable[str],
                 directory: Path = TEMPLATES_DIR) -> None:
        self.locales = tuple(locales)
        self.kinds = tuple(sorted(kinds))
        if FALLBACK_LOCALE not in self.locales:
            raise TemplateSetError(f"the fallback locale {FALLBACK_LOCALE!r} must be configured")
        self.env = SandboxedEnvironment(
            loader=FileSystemLoader(str(directory)), autoescape=False,
            undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
            keep_trailing_newline=False)
        self._compiled = {}
        missing = []
        for locale in self.locales:
            for kind in self.kinds:
                name = f"{locale}/{kind}.j2"
                if not (directory / name).is_file():
                    missing.append(name)
                    continue
                try:
                    self._compiled[(locale, kind)] = self.env.get_template(name)
                except TemplateError as exc:
                    raise TemplateSetError(f"template {name} does not compile: {exc}") from exc
        if missing:
            raise TemplateSetError(f"missing templates under {directory}: {', '.join(missing)}")
        self._smoke_render()

    def _smoke_render(self) -> None:
        """Render each template once with and without an offer, so a typo fails at startup."""
        at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        offer = Offer("CODE", "An offer", 5000, 30000, "USD", at)
        for (locale, kind), template in self._compiled.items():
            for with_offer in (None, offer):
                trigger = Trigger("smoke", kind, "smoke", at, offer=with_offer)
                try:
                    template.make_module(self.variables(trigger, None, locale, "UTC"))
                except TemplateError as exc:
                    raise TemplateSetError(f"template {locale}/{kind}.j2 fails to render: {exc}") from exc

    def variables(self, trigger: Trigger, contact: Contact | None, locale: str,
                  tz_name: str | None) -> dict[str, str]:
        """The values a template sees: trigger context, the offer and first name, formatted."""
        tz = zone(tz_name)
        bl = _babel_locale(locale)
        # Bodies are stored and shown: nothing shaped like an email or phone number gets in, even
        # when a customer typed one into the name field or a campaign text carries one.
        ctx = {k: redact(str(v)) for k, v in trigger.context.items()}
        name = contact.first_name if contact and contact.first_name else ""
        if redact(name) != name:
            name = ""
        values: dict[str, str] = {
            "store_name": "", "category": "", "tier": "", "points": "", "event_title": "",
            "event_starts": "", "points_expire_on": "", "days_since_last_purchase": "",
            "title": "", "text": "", "campaign": "",
            **ctx,
            "first_name": name,
            "kind": trigger.kind,
            "offer_code": "", "offer_description": "", "offer_amount": "", "offer_min_spend": "",
            "offer_expires": "",
        }
        for key in ("expires_at", "starts_at", "points_expire_at"):
            raw = ctx.get(key)
            if raw:
                when = _parse_instant(raw)
                if when is not None:
                    target = {"expires_at": "points_expire_on", "starts_at": "event_starts",
                              "points_expire_at": "points_expire_on"}[key]
                    values[target] = (format_datetime(when.astimezone(tz), "medium", locale=bl)
                                      if key == "starts_at" else
                                      format_date(when.astimezone(tz).date(), "long", locale=bl))
        offer = trigger.offer
        if offer is not None:
            values.update(
                offer_code=offer.code,
                offer_description=offer.description,
                offer_amount=money(offer.amount, offer.currency, locale),
                offer_min_spend=money(offer.min_spend, offer.currency, locale) if offer.min_spend else "",
                offer_expires=_long_date(offer.expires_at.astimezone(tz).date(), locale),
            )
        return values

    def render(self, trigger: Trigger, contact: Contact | None, tz_name: str | None) -> Rendered:
        """Render the trigger's message in the customer's locale (or `en`)."""
        locale = template_locale(contact.locale if contact else None, self.locales)
        template = self._compiled[(locale, trigger.kind)]
        values = self.variables(trigger, contact, locale, tz_name)
        module = template.make_module(values)
        body = str(module).strip()
        subject = str(getattr(module, "subject", "") or "").strip()
        params = {name: values.get(name, "") for name in WHATSAPP_PARAMS.get(trigger.kind, ())}
        return Rendered(locale=locale, subject=subject, body=body, params=params)

    def has(self, kind: str) -> bool:
        return (FALLBACK_LOCALE, kind) in self._compiled


@functools.lru_cache(maxsize=8192)
def _long_date(day: dt.date, locale: str) -> str:
    return format_date(day, "long", locale=_babel_locale(locale))


def _parse_instant(raw: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        try:
            return dt.datetime.combine(dt.date.fromisoformat(raw), dt.time(12), tzinfo=dt.UTC)
        except ValueError:
            return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
