"""The notifications read model of a customer: contact points, locale, time zone and consents.

Kept from `identity.profiles.v1`; it is the only place email addresses and phone numbers live
in this service, and it is looked up again at send time so an opt-out or erasure after the
decision still stops the message. At rest every contact point is sealed (AES-256-GCM,
shared/crypto.py) under a context naming the customer and the kind of value, so a blob moved to
another row or column does not open. A Contact read back from the table holds `Sealed` values:
the policy only needs to know an address exists; the dispatcher opens it when it sends.

Under the event clock every applied profile is also kept as a version valid from its `updated_at`
(contact_versions), so a trigger is decided on the profile as it stood at its fired_at. A version
holds no contact point at all, only which channels had one (`reachable`): that is all a decision
needs, and the send still goes to the address in `contacts`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.crypto import Vault

CHANNELS = ("whatsapp", "sms", "email")
OPTED_IN = "opted_in"
# Contact fields and the identifier kind each holds (the kind is part of the seal context).
CONTACT_FIELDS = {"emails": "email", "phones": "phone", "whatsapp_ids": "whatsapp_id"}


def seal_context(customer_id: str, kind: str) -> str:
    """Associated data of a sealed contact value: the blob only opens for this customer and kind."""
    return f"notifications.contacts/{customer_id}/{kind}"


@dataclass(frozen=True, slots=True)
class Sealed:
    """A contact value encrypted at rest; only the sender opens it, with the vault, at send time."""

    blob: bytes = field(repr=False)
    context: str

    def open(self, vault: Vault) -> str:
        return vault.open(self.blob, self.context)


Address = str | Sealed


def reveal(address: Address, vault: Vault) -> str:
    """The clear address to send to (raises shared.crypto.DecryptionError if the key is gone)."""
    return address.open(vault) if isinstance(address, Sealed) else address


@dataclass(frozen=True, slots=True)
class Contact:
    """What notifications knows about one customer."""

    customer_id: str
    emails: tuple[Address, ...] = ()
    phones: tuple[Address, ...] = ()
    whatsapp_ids: tuple[Address, ...] = ()
    first_name: str | None = None
    locale: str | None = None
    timezone: str | None = None
    home_store_id: str | None = None
    preferred_channel: str | None = None
    consents: Mapping[str, str] = field(default_factory=dict)
    version: int = 0
    # Event time the profile took effect (identity's updated_at); set on versions.
    valid_from: dt.datetime | None = None
    # A version: the channels that had a contact point (the points themselves are not kept).
    reachable: frozenset[str] | None = None

    def consented(self, channel: str) -> bool:
        """Marketing consent recorded and opted in; no record means no."""
        return self.consents.get(channel) == OPTED_IN

    def has_address(self, channel: str) -> bool:
        """The channel can reach the customer (decided without opening anything)."""
        if self.reachable is not None:
            return channel in self.reachable
        return bool(self.address(channel))

    def channels_reachable(self) -> frozenset[str]:
        """Channels with a contact point: what a version keeps instead of the points."""
        return frozenset(c for c in CHANNELS if self.has_address(c))

    def address(self, channel: str) -> Address | None:
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
        valid_from=profile.get("updated_at"),
    )


def version_from_row(row: Mapping[str, Any]) -> Contact:
    """A version (a `contact_versions` row): no contact points, which channels had one."""
    return Contact(
        customer_id=row["customer_id"],
        first_name=row["first_name"],
        locale=row["locale"],
        timezone=row["timezone"],
        home_store_id=row["home_store_id"],
        preferred_channel=row["preferred_channel"],
        consents=dict(row["consents"] or {}),
        version=int(row["version"] or 0),
        valid_from=row["valid_from"],
        reachable=frozenset(row["reachable"] or ()),
    )


def contact_from_row(row: Mapping[str, Any]) -> Contact:
    """A Contact from a `contacts` table row; its contact points stay sealed."""
    cid = row["customer_id"]

    def sealed(column: str) -> tuple[Address, ...]:
        context = seal_context(cid, CONTACT_FIELDS[column])
        return tuple(Sealed(bytes(b), context) for b in row[f"{column}_sealed"] or ())

    return Contact(
        customer_id=cid,
        emails=sealed("emails"),
        phones=sealed("phones"),
        whatsapp_ids=sealed("whatsapp_ids"),
        first_name=row["first_name"],
        locale=row["locale"],
        timezone=row["timezone"],
        home_store_id=row["home_store_id"],
        preferred_channel=row["preferred_channel"],
        consents=dict(row["consents"] or {}),
        version=int(row["version"] or 0),
    )
