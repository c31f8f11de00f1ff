"""`omnicrm backtest`: what a changed rule set would have fired over recorded traffic, beside what
the current rules fire, computed in process on the event clock: nothing is sent, no database used.

The recorded events (CONTRACTS §2 envelopes, e.g. `omnicrm generate --out`) are validated as
ingestion does, resolved to people naively (identifiers seen together in an event are one person:
a union-find, like the test oracle), and played in event-time order through the triggers service's
pure rules (services/triggers/facts.py and rules.py) with the loyalty ledger's pure book feeding
them tiers and points lots, exactly as the services chain them. Time-based rules are evaluated
before each customer event (as the handler does) and by a daily scan at each local midnight of
every time zone seen, plus one at the end of the input. Because trigger ids are deterministic,
the two runs are compared id by id.

Known simplifications: people are the final identifier components from the start (the real
identity service merges when a link appears, and quarantines identifiers shared too widely);
store-event invitations are judged at the announcement; campaigns are not replayed.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import phonenumbers

from services.ingestion.validation import validate_event
from services.loyalty.book import Book
from services.loyalty.handlers import parse as loyalty_command
from services.loyalty.rules import LoyaltyRules
from services.triggers import rules as R
from services.triggers.facts import (
    CustomerFacts,
    Store,
    apply_event,
    apply_loyalty,
    apply_profile,
)
from shared.errors import OmnicrmError, PermanentError
from shared.events import IDENTIFIER_TYPES, STORE_TYPES
from shared.pii import mask_identifier

UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)
PROFILE_TYPES = frozenset({"signup", "profile_update", "consent_update"})
PROFILE_FIELDS = ("birthday", "locale", "timezone", "home_store_id", "preferred_channel")
# Which identifier names a person in the report (the most stable first), as in the test oracle.
KEY_ORDER = ("email", "loyalty_id", "phone", "web_customer_id", "pos_customer_id", "anonymous_id",
             "whatsapp_id")


class BacktestError(OmnicrmError):
    """The input or a rules file cannot be used (the message names which and why)."""


# -- input -------------------------------------------------------------------------------------

@dataclass
class Input:
    """Recorded events ready for the rules: validated, in event-time order."""

    events: list[dict[str, Any]]
    rejected: int = 0      # lines that are not valid JSON or not a valid event
    duplicates: int = 0    # event_ids seen before (ingestion answers `duplicate`)


def read_events(path: Path | str) -> Iterator[dict[str, Any] | None]:
    """Envelopes from a JSONL file (or an `omnicrm export` of ingest.raw.v1); None for a bad line."""
    try:
        src = open(path, encoding="utf-8")  # noqa: SIM115 - closed below, iterated lazily
    except OSError as exc:
        raise BacktestError(f"cannot read {path}: {exc.strerror}") from None
    with src:
        for line in src:
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                yield None
                continue
            if isinstance(row, dict) and "type" not in row and isinstance(row.get("value"), dict):
                row = row["value"]  # an export row: {"topic", "partition", "offset", "value", ...}
            yield row


def prepare(raw_events: Iterable[dict[str, Any] | None]) -> Input:
    """Validate each envelope as ingestion would (received when it occurred) and order by event time."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    rejected = duplicates = 0
    for raw in raw_events:
        if raw is None:
            rejected += 1
            continue
        at = _occurred(raw)
        checked = validate_event(raw, received_at=at or EPOCH, default_source="backtest") if at else None
        if checked is None or not checked.ok:
            rejected += 1
            continue
        event = checked.event
        if event["event_id"] in seen:
            duplicates += 1
            continue
        seen.add(event["event_id"])
        out.append(event)
    out.sort(key=lambda e: e["occurred_at"])  # stable: equal times keep the file's order
    return Input(out, rejected, duplicates)


def _occurred(raw: Any) -> dt.datetime | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("occurred_at"), str):
        return None
    try:
        at = dt.datetime.fromisoformat(raw["occurred_at"].replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else None


# -- people --------------------------------------------------------------------------------------

class People:
    """Naive identity: identifiers appearing together in an event are one person (union-find)."""

    def __init__(self, events: Iterable[dict[str, Any]], rules: Mapping[str, Any]) -> None:
        ident = rules.get("identity") or {}
        self.default_country = str(ident.get("default_country") or "US")
        block = ident.get("blocklist") or {}
        self.blocked = {f"email:{e.strip().lower()}" for e in block.get("email") or ()}
        self.blocked |= {f"phone:{self._phone(p, self.default_country)}" for p in block.get("phone") or ()}
        self.store_country: dict[str, str] = {}
        self._parent: dict[str, str] = {}
        events = list(events)
        for e in events:
            if e["type"] == "store_upsert":
                s = (e.get("properties") or {}).get("store") or {}
                if s.get("store_id") and s.get("country"):
                    self.store_country[s["store_id"]] = s["country"]
        for e in events:
            ids = self.identifiers(e)
            for other in ids[1:]:
                self._union(ids[0], other)
        members: dict[str, list[str]] = {}
        for i in self._parent:
            members.setdefault(self._find(i), []).append(i)
        self._key: dict[str, str] = {}
        for idents in members.values():
            key = min(idents, key=lambda i: (KEY_ORDER.index(i.split(":", 1)[0]), i))
            for i in idents:
                self._key[i] = key

    @staticmethod
    def _phone(raw: str, country: str) -> str:
        try:
            return phonenumbers.format_number(phonenumbers.parse(raw, country),
                                              phonenumbers.PhoneNumberFormat.E164)
        except phonenumbers.NumberParseException:
            return raw.strip()

    def identifiers(self, event: dict[str, Any]) -> list[str]:
        """The event's normalised identifiers as `type:value`, blocklisted ones left out."""
        country = self.store_country.get(event.get("store_id") or "", self.default_country)
        customer = event.get("customer") or {}
        out = []
        for kind in IDENTIFIER_TYPES:
            value = customer.get(kind)
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
        """The person (e.g. `email:a@example.com`) an event belongs to; None without identifiers."""
        ids = self.identifiers(event)
        return self._key[ids[0]] if ids else None


def masked(customer: str) -> str:
    """A person's key for the screen: contact identifiers masked (`email:a***@example.com`)."""
    key, _, generation = customer.partition("#")
    kind, _, value = key.partition(":")
    return f"{kind}:{mask_identifier(kind, value)}" + (f"#{generation}" if generation else "")


# -- one run -------------------------------------------------------------------------------------

@dataclass
class Run:
    """What one rule set fired: trigger ids by customer, with their kinds and periods."""

    fired: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)  # cid -> {tid: (kind, period)}
    scans: int = 0

    def counts(self) -> Counter[str]:
        return Counter(kind for per in self.fired.values() for kind, _ in per.values())


def load_rule_set(path: Path | str, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A rules YAML file, laid over `base` when given (so a file may hold only what it changes)."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise BacktestError(f"cannot read rules file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise BacktestError(f"rules file {path} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise BacktestError(f"rules file {path} must be a mapping of sections")
    return _overlay(copy.deepcopy(dict(base or {})), loaded)


def _overlay(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _overlay(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def simulate(data: Input, people: People, rules: Mapping[str, Any]) -> Run:
    """Play the input through the triggers rules (fed by the loyalty book) on the event clock."""
    try:
        cfg = R.RuleConfig.from_rules(rules)
        loyalty_rules = LoyaltyRules.from_config(rules)
    except (KeyError, TypeError, ValueError, OmnicrmError) as exc:
        raise BacktestError(f"the rules cannot be used: {type(exc).__name__}: {exc}") from None
    return _Simulation(cfg, loyalty_rules, people).play(data.events)


class _Simulation:
    def __init__(self, cfg: R.RuleConfig, loyalty_rules: LoyaltyRules, people: People) -> None:
        self.cfg, self.loyalty_rules, self.people = cfg, loyalty_rules, people
        self.book = Book(loyalty_rules)
        self.facts: dict[str, CustomerFacts] = {}
        self.profiles: dict[str, dict[str, Any]] = {}
        self.stores: dict[str, Store] = {}
        self.generation: Counter[str] = Counter()   # a person erased, then seen again, is someone new
        self.run = Run()
        self.zones: set[str] = {cfg.default_timezone}
        self.next_midnight: dict[str, dt.datetime] = {}

    # The customer id a person has now.
    def cid(self, key: str) -> str:
        n = self.generation[key]
        return key if n == 0 else f"{key}#{n}"

    def play(self, events: list[dict[str, Any]]) -> Run:
        now = None
        for event in events:
            now = event["occurred_at"]
            self.scan_until(now)
            self.apply(event, now)
        if now is not None:
            self.scan(now, None)  # as far as the input goes
        return self.run

    # -- scans -----------------------------------------------------------------------------------
    def scan_until(self, now: dt.datetime) -> None:
        """Run every local-midnight scan that falls at or before `now`, in time order."""
        while True:
            due = [(at, z) for z, at in self.next_midnight.items() if at <= now]
            if not due:
                return
            at, z = min(due)
            self.scan(at, z)
            self.next_midnight[z] = _midnight_after(at, z)

    def scan(self, as_of: dt.datetime, zone: str | None) -> None:
        """The time-based rules as of `as_of` for the customers living in `zone` (None: everyone)."""
        self.run.scans += 1
        # The loyalty expiry timer: points past their date expire, tiers whose spend left the window drop.
        start = len(self.book.notices)
        self.book.expire_due(as_of)
        self.fold_notices(start, as_of)
        for f in self.facts.values():
            if zone is not None and R.customer_zone(f, self.cfg).key != zone:
                continue
            if f.last_event_at is not None and f.last_event_at > as_of:
                continue
            self.fire(self._due(f, as_of))

    def _due(self, f: CustomerFacts, as_of: dt.datetime) -> list[R.Trigger]:
        due = R.time_based(f, as_of, self.cfg, f.last_event_at or EPOCH)
        for t in due:
            R.mark_fired(f, t)
        return due

    def watch_zone(self, name: str | None, now: dt.datetime) -> None:
        zone = R.zone(name, self.cfg.default_timezone).key
        if zone not in self.next_midnight:
            self.zones.add(zone)
            self.next_midnight[zone] = _midnight_after(now, zone)

    def fire(self, triggers: Iterable[R.Trigger]) -> None:
        for t in triggers:
            self.run.fired.setdefault(t.customer_id, {}).setdefault(t.trigger_id, (t.kind, t.period))

    # -- events ----------------------------------------------------------------------------------
    def live(self, cid: str) -> CustomerFacts:
        f = self.facts.get(cid)
        if f is None:
            f = self.facts[cid] = CustomerFacts(cid)
        return f

    def apply(self, event: dict[str, Any], now: dt.datetime) -> None:
        kind = event["type"]
        if kind in STORE_TYPES:
            self.apply_store(event, now)
            return
        key = self.people.key_of(event)
        if key is None:
            return  # identity rejects customer events without identifiers
        cid = self.cid(key)
        if kind == "erase_request":
            self.facts.pop(cid, None)
            self.profiles.pop(cid, None)
            self.loyalty(event, cid, now)
            self.generation[key] += 1
            return
        f = self.live(cid)
        if kind in PROFILE_TYPES:
            self.apply_profile(f, event)
        self.watch_zone(f.timezone or f.home_store_tz, now)
        # Whatever fell due before this event happened is decided before it is folded.
        self.fire(self._due(f, event["occurred_at"]))
        shop = self.stores.get(event.get("store_id") or "")
        self.fire(R.welcome(f, event, now, self.cfg, shop))
        apply_event(f, event, self.cfg.money)
        self.fire(R.geo_thank_you(f, event, now, self.cfg, shop))
        self.loyalty(event, cid, now)

    def apply_store(self, event: dict[str, Any], now: dt.datetime) -> None:
        props = event.get("properties") or {}
        if event["type"] == "store_upsert":
            s = props.get("store") or {}
            self.stores[s["store_id"]] = Store(s["store_id"], s["name"], s.get("timezone"), s.get("country"),
                                               s.get("city"), s.get("lat"), s.get("lon"), s.get("currency"))
            self.watch_zone(s.get("timezone"), now)
            for f in self.facts.values():
                if f.home_store_id == s["store_id"]:
                    self._attach_home_store(f)
            return
        shop = self.stores.get(props.get("store_id") or "")
        if shop is None or shop.lat is None or shop.lon is None:
            return
        for f in list(self.facts.values()):
            self.fire(R.store_event_invite(f, event, shop, now, self.cfg))

    def apply_profile(self, f: CustomerFacts, event: dict[str, Any]) -> None:
        """The golden profile as identity would publish it, naively: last value wins."""
        props = event.get("properties") or {}
        p = self.profiles.setdefault(f.customer_id, {"tags": set(), "consents": {}, "address": None,
                                                     "version": 0})
        for name in PROFILE_FIELDS:
            if props.get(name) is not None:
                p[name] = props[name]
        if props.get("address"):
            p["address"] = props["address"]
        p["tags"] |= set(props.get("tags") or ())
        p["tags"] -= set(props.get("tags_removed") or ())
        p["consents"].update(props.get("consents") or {})
        p["version"] += 1
        apply_profile(f, {**p, "tags": sorted(p["tags"]), "updated_at": event["occurred_at"]})
        self._attach_home_store(f)

    def _attach_home_store(self, f: CustomerFacts) -> None:
        home = self.stores.get(f.home_store_id or "")
        if home is not None:
            f.home_store_tz, f.home_store_lat, f.home_store_lon = home.timezone, home.lat, home.lon

    def loyalty(self, event: dict[str, Any], cid: str, now: dt.datetime) -> None:
        """Run the loyalty book on the event and fold what it announces, as triggers reads it."""
        try:
            command = loyalty_command({"customer_id": cid, "event": event}, self.loyalty_rules)
        except PermanentError:
            return  # loyalty dead-letters it
        if command is None:
            return
        start = len(self.book.notices)
        self.book.apply(command, max(now, command.occurred_at))
        self.fold_notices(start, now)

    def fold_notices(self, start: int, now: dt.datetime) -> None:
        """What the book announced since `start`, folded into facts as triggers reads loyalty.events."""
        for notice in self.book.notices[start:]:
            record = notice.as_record()
            f = self.facts.get(notice.customer_id)
            if f is None:
                continue  # erased: nothing to tell triggers about
            apply_loyalty(f, record)
            self.fire(R.tier_upgrade(f, record, now, self.cfg))
        del self.book.notices[start:]
        self.book.entries.clear()


def _midnight_after(at: dt.datetime, zone: str) -> dt.datetime:
    """The first local midnight in `zone` strictly after `at`."""
    tz = ZoneInfo(zone)
    day = at.astimezone(tz).date() + dt.timedelta(days=1)
    return R.local_midnight(day, tz)


# -- comparison ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CustomerDiff:
    customer: str                       # the person's key, unmasked (mask before showing it)
    only_current: tuple[str, ...]       # kinds (one per trigger) fired only by the current rules
    only_new: tuple[str, ...]


@dataclass
class Comparison:
    current: Counter[str]
    new: Counter[str]
    differing: list[CustomerDiff]
    events: int
    rejected: int
    duplicates: int
    customers: int

    def kinds(self) -> list[str]:
        seen = set(self.current) | set(self.new)
        return [k for k in R.KINDS if k in seen] + sorted(seen - set(R.KINDS))


def compare(current: Run, new: Run, data: Input) -> Comparison:
    diffs = []
    for cid in sorted(set(current.fired) | set(new.fired)):
        a, b = current.fired.get(cid, {}), new.fired.get(cid, {})
        if a.keys() != b.keys():
            diffs.append(CustomerDiff(cid, tuple(sorted(a[t][0] for t in a.keys() - b.keys())),
                                      tuple(sorted(b[t][0] for t in b.keys() - a.keys()))))
    customers = len({c for run in (current, new) for c in run.fired})
    return Comparison(current.counts(), new.counts(), diffs, len(data.events), data.rejected,
                      data.duplicates, customers)


def backtest(events: Iterable[dict[str, Any] | None], current_rules: Mapping[str, Any],
             new_rules: Mapping[str, Any]) -> Comparison:
    """Both rule sets over the same events; nothing leaves the process."""
    data = prepare(events)
    people = People(data.events, current_rules)
    return compare(simulate(data, people, current_rules), simulate(data, people, new_rules), data)


def render(result: Comparison, *, limit: int = 20, current_name: str = "current",
           new_name: str = "new") -> str:
    """Counts per kind side by side, then the first `limit` customers whose triggers differ."""
    lines = [f"{result.events:,} events ({result.rejected:,} rejected, {result.duplicates:,} duplicates); "
             f"{result.customers:,} customers fired something",
             f"{'kind':<20} {current_name:>10} {new_name:>10} {'change':>8}"]
    for kind in result.kinds():
        a, b = result.current.get(kind, 0), result.new.get(kind, 0)
        lines.append(f"{kind:<20} {a:>10,} {b:>10,} {b - a:>+8,}" + ("" if a == b else "  *"))
    a, b = sum(result.current.values()), sum(result.new.values())
    lines.append(f"{'total':<20} {a:>10,} {b:>10,} {b - a:>+8,}")
    if not result.differing:
        lines.append("no customer's triggers differ")
        return "\n".join(lines)
    lines.append(f"{len(result.differing):,} customers differ" +
                 (f" (first {limit})" if len(result.differing) > limit else "") + ":")
    for d in result.differing[:limit]:
        parts = ([f"only {current_name}: {', '.join(d.only_current)}"] if d.only_current else []) + \
                ([f"only {new_name}: {', '.join(d.only_new)}"] if d.only_new else [])
        lines.append(f"  {masked(d.customer):<40} {'; '.join(parts)}")
    return "\n".join(lines)


def as_json(result: Comparison, *, limit: int = 20) -> dict[str, Any]:
    """The comparison as a JSON-ready dict (customers masked)."""
    return {"events": result.events, "rejected": result.rejected, "duplicates": result.duplicates,
            "counts": {k: {"current": result.current.get(k, 0), "new": result.new.get(k, 0)}
                       for k in result.kinds()},
            "differing": len(result.differing),
            "customers": [{"customer": masked(d.customer), "only_current": list(d.only_current),
                           "only_new": list(d.only_new)} for d in result.differing[:limit]]}
