"""Independent expectations computed from generated input only (CONTRACTS §5 default rules).

Deliberately naive: people are the connected components of identifiers that appear together in
an event (after the normalisation CONTRACTS §2 promises, minus the blocklist), and points are
replayed in stream order. Exact for `WorldConfig.simple()` worlds; with households, shared
phones join people the way a naive resolver would.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import phonenumbers
import yaml

from shared.generator import MALFORMED

RULES = Path(__file__).resolve().parents[2] / "deploy" / "config" / "rules.yaml"
KEY_ORDER = ("email", "loyalty_id", "phone", "web_customer_id", "pos_customer_id",
             "anonymous_id", "whatsapp_id")


class Oracle:
    """What a correct pipeline must end up with, given these events."""

    def __init__(self, events: Iterable[dict[str, Any]], rules_path: Path = RULES) -> None:
        rules = yaml.safe_load(rules_path.read_text(encoding="utf-8"))
        self.rates = {k: Decimal(v) for k, v in rules["currency"]["exchange_rates"].items()}
        self.points_per_unit = Decimal(rules["loyalty"]["points_per_unit"])
        block = rules["identity"]["blocklist"]
        self.blocked = {f"email:{e.lower()}" for e in block["email"]}
        self.blocked |= {f"phone:{self._phone(p, 'US')}" for p in block["phone"]}
        self.events: list[dict[str, Any]] = []
        self.malformed: list[dict[str, Any]] = []
        for event in events:
            (self.malformed if MALFORMED in event else self.events).append(event)
        self.store_country = {e["properties"]["store"]["store_id"]: e["properties"]["store"]["country"]
                              for e in self.events if e["type"] == "store_upsert"}
        self._parent: dict[str, str] = {}
        for event in self.events:
            ids = self.identifiers(event)
            for other in ids[1:]:
                self._union(ids[0], other)
        members: dict[str, list[str]] = {}
        for ident in self._parent:
            members.setdefault(self._find(ident), []).append(ident)
        self._key: dict[str, str] = {}
        for idents in members.values():
            key = min(idents, key=lambda i: (KEY_ORDER.index(i.split(":", 1)[0]), i))
            for ident in idents:
                self._key[ident] = key

    # ---- identity ------------------------------------------------------------------------
    @staticmethod
    def _phone(raw: str, country: str) -> str:
        try:
            return phonenumbers.format_number(phonenumbers.parse(raw, country),
                                              phonenumbers.PhoneNumberFormat.E164)
        except phonenumbers.NumberParseException:
            return raw.strip()

    def identifiers(self, event: dict[str, Any]) -> list[str]:
        """The event's normalised identifiers as `type:value`, blocklisted ones left out."""
        country = self.store_country.get(event.get("store_id") or "", "US")
        out = []
        for kind, value in (event.get("customer") or {}).items():
            if not value:
                continue
            norm = (value.strip().lower() if kind == "email"
                    else self._phone(value, country) if kind == "phone" else value.strip())
            ident = f"{kind}:{norm}"
            if ident not in self.blocked:
                out.append(ident)
                self._parent.setdefault(ident, ident)
        return out

    def _find(self, x: str) -> str:
        while self._parent[x] != x:
            self._parent[x] = self._parent[self._parent[x]]
            x = self._parent[x]
        return x

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def key_of(self, event: dict[str, Any]) -> str | None:
        """The person (component key, e.g. `email:a@example.com`) an event belongs to."""
        ids = self.identifiers(event)
        return self._key[ids[0]] if ids else None

    def people(self) -> set[str]:
        return set(self._key.values())

    # ---- expectations --------------------------------------------------------------------
    def counts_by_type(self) -> Counter[str]:
        """Distinct valid event_ids per event type."""
        seen: dict[str, str] = {e["event_id"]: e["type"] for e in self.events}
        return Counter(seen.values())

    def _base(self, amount: str, currency: str) -> Decimal:
        return Decimal(amount) * self.rates[currency]

    def expected_points(self) -> dict[str, int]:
        """Points balance per person: earn floor(total in base), redeem if covered, reverse capped."""
        balance: Counter[str] = Counter()
        earned: dict[str, int] = {}
        reversed_: Counter[str] = Counter()
        for event in self.events:
            props = event["properties"]
            if event["type"] not in ("sale", "return"):
                continue
            key = self.key_of(event)
            if key is None:
                continue
            points = int((self._base(props["total"], props["currency"]) * self.points_per_unit)
                         .to_integral_value(ROUND_FLOOR))
            if event["type"] == "sale":
                redeem = int(props.get("points_redeemed") or 0)
                if redeem and balance[key] >= redeem:
                    balance[key] -= redeem
                earned[props["order_id"]] = points
                balance[key] += points
            else:
                order = props["order_id"]
                take = min(points, earned.get(order, 0) - reversed_[order])
                reversed_[order] += take
                balance[key] -= take
        return dict(balance)

    def expected_spend(self) -> dict[str, Decimal]:
        """Net spend per person in base currency (sales minus refunds)."""
        spend: dict[str, Decimal] = {}
        for event in self.events:
            if event["type"] in ("sale", "return") and (key := self.key_of(event)):
                amount = self._base(event["properties"]["total"], event["properties"]["currency"])
                sign = 1 if event["type"] == "sale" else -1
                spend[key] = spend.get(key, Decimal(0)) + sign * amount
        return spend

    def consents(self) -> dict[str, dict[str, str]]:
        """Latest marketing consent per person and channel."""
        state: dict[str, dict[str, str]] = {}
        for event in self.events:
            if event["type"] == "consent_update" and (key := self.key_of(event)):
                state.setdefault(key, {}).update(event["properties"]["consents"])
        return state

    def opted_out(self) -> set[str]:
        """People whose latest consent on some channel is an opt-out."""
        return {k for k, chans in self.consents().items() if "opted_out" in chans.values()}
