"""The notifications read model of a customer: contact points, locale, time zone and consents.

Kept from `identity.profiles.v1`; it is the only place email addresses and phone numbers live
in this service, and it is looked up again at send time so an opt-out or erasure after the
decision still stops the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CHANNELS = ("whatsapp", "sms", "email")
OPTED_IN = "opted_in"


@dataclass(frozen=True, slots=True)
class Contact:
    """What notifications knows about one customer."""

    customer_id: str
    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    whatsapp_ids: tuple[str, ...] = ()
    first_name: str | None = None
    locale: str | None = None
    timezone: str | None = None
    home_store_id: str | None = None
    preferred_channel: str | None = None
    consents: Mapping[str, str] = field(default_factory=dict)
    version: int = 0

    def consented(self, channel: str) -> bool:
        """Marketing consent recorded and opted in; no record means no."""
        return self.consents.get(channel) == OPTED_IN

    def address(self, channel: str) -> str | None:
        """The contact point a channel sends to (WhatsApp falls back to the phone number)."""
        if channel == "email":
            return self.emails[0] if self.emails else None
        if channel == "sms":
            return self.phones[0] if self.phones else None
        if channel == "whatsapp":
            if self.whatsapp_ids:
                return self.whatsapp_ids[0]
            return self.phones[0] if self.phones else None
        return None


def contact_from_profile(profile: Mapping[str, Any]) -> Contact:
    """A Contact from a decoded `omnicrm.identity.Profile` record."""
    ids = profile.get("identifiers") or {}
    return Contact(
        customer_id=profile["customer_id"],
        emails=tuple(ids.get("email") or ()),
        phones=tuple(ids.get("phone") or ()),
        whatsapp_ids=tuple(ids.get("whatsapp_id") or ()),
        first_name=profile.get("first_name"),
        locale=profile.get("locale"),
        timezone=profile.get("timezone"),
        home_store_id=profile.get("home_store_id"),
        preferred_channel=profile.get("preferred_channel"),
        consents=dict(profile.get("consents") or {}),
        version=int(profile.get("version") or 0),
    )


def contact_from_row(row: Mapping[str, Any]) -> Contact:
    """A Contact from a `contacts` table row."""
    return Contact(
        customer_id=row["customer_id"],
        emails=tuple(row["emails"] or ()),
        phones=tuple(row["phones"] or ()),
        whatsapp_ids=tuple(row["whatsapp_ids"] or ()),
        first_name=row["first_name"],
        locale=row["locale"],
        timezone=row["timezone"],
        home_store_id=row["home_store_id"],
        preferred_channel=row["preferred_channel"],
        consents=dict(row["consents"] or {}),
        version=int(row["version"] or 0),
    )
