"""A seeded synthetic retail world: stores, customers and their events in the CONTRACTS §2 envelope.

Pure and deterministic: the same (seed, customers, days, start, config) yields the same events,
byte for byte once serialised with `to_jsonl_line`; nothing here reads the clock or does I/O.
Events come out ordered by `occurred_at` (deliberately malformed copies follow the event they
were made from). Malformed events carry the key `MALFORMED` (value: the defect) so an oracle
can skip them; every other event is valid input for ingestion.
"""

from __future__ import annotations

import copy
import datetime as dt
import heapq
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from decimal import ROUND_FLOOR, Decimal
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

import phonenumbers

MALFORMED = "_malformed"
DAY = 86_400
HOUR = 3_600
MINUTE = 60


@dataclass(frozen=True)
class Store:
    """A physical store: where in-store sales happen and what currency they are in."""

    store_id: str
    name: str
    city: str
    country: str
    timezone: str
    currency: str
    lat: float
    lon: float
    weight: float
    area_codes: tuple[str, ...]
    locales: tuple[tuple[str, float], ...]


STORES: tuple[Store, ...] = (
    Store("soho", "SoHo", "New York", "US", "America/New_York", "USD", 40.7233, -74.0030, 0.22,
          ("212", "646", "917", "718"), (("en", 0.85), ("zh-Hant", 0.08), ("zh-Hans", 0.07))),
    Store("sf", "Union Square", "San Francisco", "US", "America/Los_Angeles", "USD", 37.7880,
          -122.4075, 0.16, ("415", "628", "510", "650"),
          (("en", 0.75), ("zh-Hant", 0.15), ("zh-Hans", 0.10))),
    Store("london", "Covent Garden", "London", "GB", "Europe/London", "GBP", 51.5117, -0.1240,
          0.16, (), (("en", 0.9), ("zh-Hans", 0.1))),
    Store("shanghai", "Jing'an", "Shanghai", "CN", "Asia/Shanghai", "CNY", 31.2243, 121.4468,
          0.18, (), (("zh-Hans", 0.92), ("en", 0.08))),
    Store("hongkong", "Causeway Bay", "Hong Kong", "HK", "Asia/Hong_Kong", "HKD", 22.2800,
          114.1830, 0.14, (), (("zh-Hant", 0.8), ("en", 0.2))),
    Store("singapore", "Orchard Road", "Singapore", "SG", "Asia/Singapore", "SGD", 1.3040,
          103.8318, 0.14, (), (("en", 0.6), ("zh-Hans", 0.4))),
)
STORE_BY_ID = {s.store_id: s for s in STORES}

# Units of USD per unit of currency: the generator's own price table (rules.yaml has the official one).
USD_PER = {"USD": Decimal("1"), "GBP": Decimal("1.27"), "CNY": Decimal("0.14"),
           "HKD": Decimal("0.128"), "SGD": Decimal("0.74")}
WHOLE_PRICES = frozenset({"CNY", "HKD"})


@dataclass(frozen=True)
class Product:
    sku: str
    name: str
    category: str
    usd_cents: int


CATALOG: tuple[Product, ...] = (
    Product("PF-SALMON-6KG", "Salmon kibble 6 kg", "pet-food", 5400),
    Product("PF-CHICKEN-3KG", "Chicken kibble 3 kg", "pet-food", 3200),
    Product("PH-FLEA-3", "Flea & tick drops, 3 doses", "pet-health", 3900),
    Product("CF-HOUSE-1KG", "House blend beans 1 kg", "coffee", 2800),
    Product("CF-ESPRESSO-500", "Espresso roast 500 g", "coffee", 1900),
    Product("SK-SERUM-50", "Hydrating serum 50 ml", "skincare", 6800),
    Product("SK-SPF-50", "Daily SPF 50 fluid", "skincare", 3600),
    Product("VT-MULTI-90", "Daily multivitamin, 90", "vitamins", 2400),
    Product("CL-DAILY-90", "Daily contact lenses, 90", "contact-lenses", 7900),
    Product("AP-TEE-ORG", "Organic cotton tee", "apparel", 4500),
    Product("AP-KNIT-MER", "Merino crewneck", "apparel", 14800),
    Product("AP-COAT-WOOL", "Wool overcoat", "apparel", 42000),
    Product("SH-SNEAKER", "Leather sneaker", "shoes", 16500),
    Product("SH-LOAFER", "Suede loafer", "shoes", 26000),
    Product("HM-CANDLE", "Fig candle", "home", 3800),
    Product("HM-THROW", "Cashmere throw", "home", 19800),
    Product("BT-LIPSTICK", "Satin lipstick", "beauty", 3200),
    Product("EL-EARBUDS", "Wireless earbuds", "electronics", 17900),
    Product("EL-WATCH", "Smart watch", "electronics", 39900),
    Product("LX-BAG-TOTE", "Calfskin tote", "handbags", 289000),
    Product("LX-WATCH-AUTO", "Automatic watch", "jewelry", 645000),
    Product("LX-NECKLACE", "Gold pendant", "jewelry", 198000),
)
CONSUMABLE_CYCLES = {"pet-food": 30, "pet-health": 90, "coffee": 21, "skincare": 45,
                     "vitamins": 60, "contact-lenses": 90}
EVERYDAY = tuple(p for p in CATALOG if not p.sku.startswith("LX-"))
LUXURY = tuple(p for p in CATALOG if p.sku.startswith("LX-"))
BY_CATEGORY: dict[str, tuple[Product, ...]] = {}
for _p in CATALOG:
    BY_CATEGORY[_p.category] = (*BY_CATEGORY.get(_p.category, ()), _p)

EN_FIRST = ("Olivia", "Liam", "Emma", "Noah", "Ava", "James", "Sophia", "Lucas", "Mia", "Ethan",
            "Isabella", "Mason", "Amelia", "Logan", "Harper", "Oliver", "Chloe", "Henry", "Grace",
            "Jack", "Zoe", "Samuel", "Nora", "Daniel", "Ruby", "Leo", "Ella", "Arthur", "Maya", "Owen")
EN_LAST = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Lopez",
           "Wilson", "Anderson", "Taylor", "Thomas", "Moore", "Martin", "Lee", "Clark", "Lewis",
           "Walker", "Hall", "Young", "King", "Wright", "Scott", "Green", "Baker", "Adams", "Hill")
# (simplified, traditional, pinyin, cantonese romanisation)
ZH_LAST = (("陈", "陳", "chen", "chan"), ("李", "李", "li", "lee"), ("王", "王", "wang", "wong"),
           ("张", "張", "zhang", "cheung"), ("刘", "劉", "liu", "lau"), ("黄", "黃", "huang", "wong"),
           ("林", "林", "lin", "lam"), ("周", "周", "zhou", "chow"), ("吴", "吳", "wu", "ng"),
           ("郑", "鄭", "zheng", "cheng"))
ZH_FIRST = (("美玲", "美玲", "meiling"), ("伟", "偉", "wei"), ("静", "靜", "jing"), ("磊", "磊", "lei"),
            ("婷", "婷", "ting"), ("浩然", "浩然", "haoran"), ("欣怡", "欣怡", "xinyi"),
            ("子轩", "子軒", "zixuan"), ("嘉欣", "嘉欣", "jiaxin"), ("俊杰", "俊傑", "junjie"))
EMAIL_DOMAINS = ("example.com", "example.org", "example.net")
JUNK_EMAILS = ("noemail@example.com", "test@test.com")
STORE_EVENT_TITLES = ("Autumn trunk show", "Private shopping evening", "Coffee tasting morning",
                      "Skincare masterclass", "New season preview", "Pet adoption weekend")


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the world; shares are probabilities, rates are per person per day."""

    malformed_share: float = 0.01
    household_share: float = 0.12      # people who share a phone with another customer
    web_first_share: float = 0.20      # first seen as anonymous web visitors
    walk_in_share: float = 0.10        # first seen at a till, enrolled there
    anonymous_share: float = 0.15      # extra visitors (per customer) who never identify
    habit_share: float = 0.55          # people with a consumable repurchase habit
    vip_share: float = 0.005           # people who buy luxury goods now and then
    return_share: float = 0.06
    redeem_share: float = 0.25
    abandon_rate: float = 0.03
    opt_out_rate: float = 0.004
    profile_update_rate: float = 0.003
    message_rate: float = 0.002
    junk_identifier_share: float = 0.01  # POS sales where the cashier typed a placeholder email
    erase_share: float = 0.0

    @classmethod
    def simple(cls, **overrides: Any) -> WorldConfig:
        """A world without the identity traps (households, junk ids) and without malformed input."""
        return replace(cls(malformed_share=0.0, household_share=0.0, junk_identifier_share=0.0),
                       **overrides)


@dataclass
class Habit:
    category: str
    cycle_days: float
    next_due: float  # epoch seconds


@dataclass
class Order:
    order_id: str
    store_id: str | None
    source: str
    tz: str
    customer: dict[str, str]
    currency: str
    total: int
    lines: list[dict[str, Any]]


@dataclass
class Person:
    """A customer as the world knows them (the truth behind the identifiers the events carry)."""

    index: int
    kind: str  # member | web_first | walk_in
    home: Store
    locale: str
    timezone: str | None
    first_name: str
    last_name: str
    email_local: str
    email: str | None
    phone: str  # E.164
    loyalty_id: str | None
    pos_customer_id: str | None
    web_customer_id: str | None
    anonymous_id: str | None
    birthday: str | None
    rate: float
    basket: float
    luxury_rate: float
    online_share: float
    habits: list[Habit] = field(default_factory=list)
    appears_at: float = 0.0
    signs_up_at: float | None = None
    signed_up: bool = False
    seen_at_till: bool = False
    consents: dict[str, str] = field(default_factory=dict)
    redeemable: int = 0  # points the generator is sure the person holds, net of future reversals
    erased: bool = False
    household: int | None = None


def money(minor: int) -> str:
    """Minor units as a decimal string ("129.90")."""
    sign = "-" if minor < 0 else ""
    minor = abs(minor)
    return f"{sign}{minor // 100}.{minor % 100:02d}"


def to_jsonl_line(event: dict[str, Any]) -> str:
    """The one serialisation of an event (stable key order, UTF-8 text, no spaces)."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


@cache
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _rfc3339(epoch: float, tz: str) -> str:
    return dt.datetime.fromtimestamp(int(epoch), _zone(tz)).isoformat(timespec="seconds")


def _local_hour(epoch: float, tz: str) -> float:
    local = dt.datetime.fromtimestamp(int(epoch), _zone(tz))
    return local.hour + local.minute / 60


def _local_price(usd_cents: int, currency: str) -> int:
    """A shelf price in the store currency: converted, then rounded the way shops round."""
    local = Decimal(usd_cents) / USD_PER[currency]
    if currency in WHOLE_PRICES:
        return int((local / 100).quantize(Decimal(1))) * 100
    return max(100, int((local / 100).quantize(Decimal(1))) * 100 - 1)


def _points(total_minor: int, currency: str) -> int:
    """Points the default rules give for a total (1 per whole USD), as the generator reckons them."""
    return int((Decimal(total_minor) / 100 * USD_PER[currency]).to_integral_value(ROUND_FLOOR))


def _pick_weighted(rng: random.Random, pairs: tuple[tuple[Any, float], ...]) -> Any:
    roll = rng.random() * sum(w for _, w in pairs)
    for value, weight in pairs:
        roll -= weight
        if roll <= 0:
            return value
    return pairs[-1][0]


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def _phone(rng: random.Random, store: Store, taken: set[str]) -> str:
    """A fresh, valid-looking mobile number in the store's country, E.164."""
    blocked = {"+10000000000", "+11111111111", "+15555555555"}
    while True:
        if store.country == "US":
            exchange = f"{rng.randint(2, 9)}{rng.randint(0, 9)}{rng.randint(0, 9)}"
            number = f"+1{rng.choice(store.area_codes)}{exchange}{rng.randint(0, 9999):04d}"
        elif store.country == "GB":
            number = f"+447{rng.choice('45789')}{rng.randint(0, 99_999_999):08d}"
        elif store.country == "CN":
            number = f"+861{rng.choice('3589')}{rng.randint(0, 9)}{rng.randint(0, 99_999_999):08d}"
        elif store.country == "HK":
            number = f"+852{rng.choice('569')}{rng.randint(0, 9_999_999):07d}"
        else:
            number = f"+65{rng.choice('89')}{rng.randint(0, 9_999_999):07d}"
        if number in taken or number in blocked:
            continue
        if phonenumbers.is_valid_number(phonenumbers.parse(number)):
            taken.add(number)
            return number


def _phone_display(rng: random.Random, e164: str, at_home_country: bool) -> str:
    """The phone as a cashier or a web form might type it; national formats only at home."""
    parsed = phonenumbers.parse(e164)
    roll = rng.random()
    if at_home_country and roll < 0.35:
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
    if roll < 0.7:
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    return e164


class World:
    """Builds the people and plays the days; `events()` yields the envelope dicts in time order."""

    def __init__(self, seed: int, customers: int, days: int, start: dt.datetime,
                 config: WorldConfig) -> None:
        if customers < 0 or days < 1:
            raise ValueError("customers must be >= 0 and days >= 1")
        if start.tzinfo is None:
            raise ValueError("start must carry a time zone")
        self.seed = seed
        self.rng = random.Random(f"omnicrm-world-{seed}")
        self.config = config
        self.days = days
        self.start = start.timestamp()
        self.end = self.start + days * DAY
        self.earliest = self.start + HOUR
        self.tag = _base36(seed)
        self.counter = 0
        self.seq = 0
        self.heap: list[tuple[float, int, dict[str, Any]]] = []
        self.agenda: dict[int, list[tuple[Order, list[dict[str, Any]], int]]] = {}
        self.phones: set[str] = set()
        self.people = self._people(customers)
        self.visitors = [f"anon-{self.tag}-{i:06d}"
                         for i in range(int(customers * config.anonymous_share))]

    # ---- people -------------------------------------------------------------------------
    def _people(self, n: int) -> list[Person]:
        rng, cfg = self.rng, self.config
        ranks = list(range(1, n + 1))
        rng.shuffle(ranks)
        harmonic = sum(1 / r for r in range(1, n + 1)) or 1.0
        people: list[Person] = []
        sizes: dict[int, int] = {}  # household -> members, at most 3 (above that it looks like fraud)
        vip_cut = max(1, round(n * cfg.vip_share)) if n else 0
        for i in range(n):
            share = n / ranks[i] / harmonic  # Zipf: rank r gets 1/r of the spend, scaled to mean 1
            home = _pick_weighted(rng, tuple((s, s.weight) for s in STORES))
            locale = _pick_weighted(rng, home.locales)
            first, last, email_local = self._name(rng, locale, home)
            roll = rng.random()
            kind = ("web_first" if roll < cfg.web_first_share
                    else "walk_in" if roll < cfg.web_first_share + cfg.walk_in_share else "member")
            household = None
            mate = people[rng.randrange(len(people))] if people else None
            if mate is not None and rng.random() < cfg.household_share \
                    and sizes.get(mate.household if mate.household is not None else -1, 1) < 3:
                household = mate.household if mate.household is not None else mate.index
                mate.household = household
                sizes[household] = sizes.get(household, 1) + 1
                home, phone, last = mate.home, mate.phone, mate.last_name
            else:
                phone = _phone(rng, home, self.phones)
            email = f"{email_local}.{self.tag}.{i}@{rng.choice(EMAIL_DOMAINS)}"
            birthday = None
            if rng.random() < 0.78:
                doy = rng.randrange(365)
                md = (dt.date(2001, 1, 1) + dt.timedelta(days=doy)).strftime("%m-%d")
                birthday = f"{rng.randint(1950, 2005)}-{md}" if rng.random() < 0.8 else f"--{md}"
            person = Person(
                index=i, kind=kind, home=home, locale=locale,
                timezone=home.timezone if rng.random() < 0.85 else None,
                first_name=first, last_name=last, email_local=email_local,
                email=email if kind != "walk_in" or rng.random() < 0.7 else None,
                phone=phone,
                loyalty_id=f"L-{self.tag}-{i:06d}" if kind == "member" else None,
                pos_customer_id=f"P-{home.store_id}-{self.tag}-{i:06d}" if kind != "web_first" else None,
                web_customer_id=(f"W-{self.tag}-{i:06d}"
                                 if kind == "web_first" or (kind == "member" and rng.random() < 0.4)
                                 else None),
                anonymous_id=f"anon-{self.tag}-p{i:06d}" if kind == "web_first" else None,
                birthday=birthday,
                rate=min(0.5, 0.01 + 0.05 * share),
                basket=min(4.0, max(0.6, share ** 0.25)),
                luxury_rate=0.08 if ranks[i] <= vip_cut else 0.0,
                online_share=rng.choice((0.1, 0.3, 0.5, 0.8)),
                household=household,
            )
            if kind == "member":
                person.appears_at = self.start + rng.randint(5 * MINUTE, 55 * MINUTE)
            else:
                person.appears_at = self.start + rng.random() * self.days * DAY
            if rng.random() < cfg.habit_share:
                for category in rng.sample(sorted(CONSUMABLE_CYCLES), 2 if rng.random() < 0.25 else 1):
                    cycle = CONSUMABLE_CYCLES[category] * rng.uniform(0.85, 1.15)
                    first_due = (person.appears_at + rng.random() * cycle * DAY if kind == "member"
                                 else math.inf)
                    person.habits.append(Habit(category, cycle, first_due))
            people.append(person)
        return people

    @staticmethod
    def _name(rng: random.Random, locale: str, home: Store) -> tuple[str, str, str]:
        if locale == "en":
            first, last = rng.choice(EN_FIRST), rng.choice(EN_LAST)
            return first, last, f"{first}.{last}".lower()
        simp_l, trad_l, pinyin_l, canto_l = rng.choice(ZH_LAST)
        simp_f, trad_f, pinyin_f = rng.choice(ZH_FIRST)
        surname = canto_l if home.country == "HK" else pinyin_l
        if locale == "zh-Hant":
            return trad_f, trad_l, f"{pinyin_f}.{surname}"
        return simp_f, simp_l, f"{pinyin_f}.{surname}"

    # ---- emitting ------------------------------------------------------------------------
    def _emit(self, etype: str, at: float, tz: str, source: str, place: str,
              customer: dict[str, str] | None, properties: dict[str, Any],
              store_id: str | None = None) -> dict[str, Any]:
        self.counter += 1
        event: dict[str, Any] = {
            "event_id": f"{source}-{place}-{self.tag}-{self.counter:07d}",
            "type": etype,
            "occurred_at": _rfc3339(at, tz),
            "source": source,
        }
        if store_id is not None:
            event["store_id"] = store_id
        if customer is not None:
            event["customer"] = customer
        event["properties"] = properties
        self.seq += 1
        heapq.heappush(self.heap, (int(at), self.seq, event))
        return event

    def _when(self, day: int, tz: str, opens: float, closes: float) -> float | None:
        """A second of UTC day `day` whose local hour in `tz` is within [opens, closes)."""
        day_start = self.start + day * DAY
        for _ in range(24):
            at = float(int(day_start + self.rng.random() * DAY))
            if at >= self.earliest and at < self.end and opens <= _local_hour(at, tz) < closes:
                return at
        return None

    def _tz(self, person: Person) -> str:
        return person.timezone or person.home.timezone

    # ---- the world -----------------------------------------------------------------------
    def events(self) -> Iterator[dict[str, Any]]:
        for store in STORES:
            self._emit("store_upsert", self.start, store.timezone, "admin", store.store_id, None, {
                "store": {"store_id": store.store_id, "name": store.name, "timezone": store.timezone,
                          "country": store.country, "city": store.city, "lat": store.lat,
                          "lon": store.lon, "currency": store.currency}}, store_id=store.store_id)
        for day in range(self.days):
            if day == self.days // 3:
                self._store_events(day)
            for person in self.people:
                self._live(person, day)
            for visitor in self.visitors:
                if self.rng.random() < 0.1:
                    self._browse(day, {"anonymous_id": visitor}, self.rng.choice(STORES).timezone,
                                 abandon=self.rng.random() < 0.25)
            for order, returned, refund in self.agenda.pop(day, []):
                self._return(day, order, returned, refund)
            boundary = self.start + day * DAY
            while self.heap and self.heap[0][0] < boundary:
                yield heapq.heappop(self.heap)[2]
        while self.heap:
            yield heapq.heappop(self.heap)[2]

    def _store_events(self, day: int) -> None:
        for i, store in enumerate(STORES):
            at = self._when(day, store.timezone, 9, 12)
            if at is None:
                continue
            local = dt.datetime.fromtimestamp(int(at), _zone(store.timezone))
            starts = (local + dt.timedelta(days=7)).replace(hour=18, minute=30, second=0)
            self._emit("store_event", at, store.timezone, "admin", store.store_id, None, {
                "store_id": store.store_id,
                "title": f"{STORE_EVENT_TITLES[i % len(STORE_EVENT_TITLES)]} at {store.name}",
                "starts_at": starts.isoformat(timespec="seconds"),
                "radius_km": 10.0 if i % 2 == 0 else 25.0}, store_id=store.store_id)

    def _live(self, person: Person, day: int) -> None:
        rng, cfg = self.rng, self.config
        day_end = self.start + (day + 1) * DAY
        if person.erased or person.appears_at >= day_end:
            return
        if not person.signed_up:
            if person.kind == "member":
                self._signup(person, person.appears_at, "admin", None)
            elif person.kind == "walk_in":
                self._walk_in(person, day)
                return
            else:
                self._web_first(person, day)
                return
        if not person.signed_up:
            return
        bought = False
        for habit in person.habits:
            if habit.next_due < day_end:
                at = self._sale(person, day, [self._line(rng.choice(BY_CATEGORY[habit.category]),
                                                          rng.choice((1, 1, 1, 2)), person)])
                if at is not None:
                    bought = True
                    habit.next_due = at + (habit.cycle_days + rng.uniform(-2, 2)) * DAY
        if rng.random() < person.rate:
            bought = self._sale(person, day, self._basket(person)) is not None or bought
        if person.luxury_rate and rng.random() < person.luxury_rate:
            bought = self._sale(person, day, [self._line(rng.choice(LUXURY), 1, person)],
                                channel="in_store") is not None or bought
        if not bought and person.web_customer_id and rng.random() < cfg.abandon_rate:
            self._browse(day, self._web_ids(person), self._tz(person), abandon=True)
        if person.consents and rng.random() < cfg.opt_out_rate:
            self._opt_out(person, day)
        if rng.random() < cfg.profile_update_rate:
            self._profile_update(person, day)
        if rng.random() < cfg.message_rate:
            self._message(person, day)
        if cfg.erase_share and rng.random() < cfg.erase_share / max(1, self.days):
            at = self._when(day, self._tz(person), 8, 22)
            if at is not None:
                self._emit("erase_request", at, self._tz(person), "admin", "crm",
                           self._contact_ids(person), {})
                person.erased = True

    # ---- journeys ------------------------------------------------------------------------
    def _signup(self, person: Person, at: float, source: str, customer: dict[str, str] | None,
                store: Store | None = None) -> None:
        """Enrol a person: their profile, then the channels they agree to hear on."""
        rng = self.rng
        if customer is None:
            customer = {k: v for k, v in (
                ("email", person.email), ("phone", person.phone), ("loyalty_id", person.loyalty_id),
                ("pos_customer_id", person.pos_customer_id),
                ("web_customer_id", person.web_customer_id)) if v}
        props: dict[str, Any] = {"first_name": person.first_name, "last_name": person.last_name,
                                 "locale": person.locale, "home_store_id": person.home.store_id}
        if person.birthday:
            props["birthday"] = person.birthday
        if person.timezone:
            props["timezone"] = person.timezone
        if rng.random() < 0.6:
            props["address"] = {"city": person.home.city, "country": person.home.country,
                                "lat": round(person.home.lat + rng.uniform(-0.08, 0.08), 4),
                                "lon": round(person.home.lon + rng.uniform(-0.08, 0.08), 4)}
        tz = store.timezone if store else self._tz(person)
        place = store.store_id if store else ("web" if source == "web" else "crm")
        self._emit("signup", at, tz, source, place, customer, props,
                   store_id=store.store_id if store else None)
        consents: dict[str, str] = {}
        if person.email and rng.random() < 0.8:
            consents["email"] = "opted_in"
        if rng.random() < 0.5:
            consents["sms"] = "opted_in"
        if rng.random() < (0.7 if person.home.country in ("HK", "SG") else 0.4):
            consents["whatsapp"] = "opted_in"
        if consents:
            person.consents = dict(consents)
            self._emit("consent_update", at + rng.randint(5, 90), tz, source, place, customer,
                       {"consents": consents}, store_id=store.store_id if store else None)
        person.signed_up = True

    def _walk_in(self, person: Person, day: int) -> None:
        """Someone unknown buys at a till and enrols there, phone first."""
        store = person.home
        at = self._when(day, store.timezone, 10, 21)
        if at is None or at < person.appears_at:
            return
        person.loyalty_id = f"L-{self.tag}-{person.index:06d}"
        customer = {"phone": _phone_display(self.rng, person.phone, True),
                    "loyalty_id": person.loyalty_id}
        if person.pos_customer_id:
            customer["pos_customer_id"] = person.pos_customer_id
        if person.email:
            customer["email"] = person.email
        self._signup(person, at - 180, "pos", customer, store)
        person.seen_at_till = True
        self._sale(person, day, self._basket(person), channel="in_store", at=at, store=store)
        self._start_habits(person, at)

    def _web_first(self, person: Person, day: int) -> None:
        """An anonymous visitor who browses, later signs up online with an email."""
        rng = self.rng
        tz = self._tz(person)
        anon = {"anonymous_id": person.anonymous_id or ""}
        if person.signs_up_at is None:
            at = self._browse(day, anon, tz, abandon=rng.random() < 0.3, after=person.appears_at)
            if at is None:
                return
            person.signs_up_at = at + rng.choice((0.02, 0.5, 1, 2, 4)) * DAY
            return
        if person.signs_up_at < self.start + (day + 1) * DAY:
            at = max(person.signs_up_at, self.start + day * DAY + HOUR)
            hour = _local_hour(at, tz)
            if not 7 <= hour < 23:
                at = self._when(day, tz, 7, 23)
                if at is None:
                    return
            customer = {"anonymous_id": person.anonymous_id or "",
                        "web_customer_id": person.web_customer_id or "",
                        "email": person.email or ""}
            self._signup(person, at, "web", customer)
            self._start_habits(person, at)
        elif rng.random() < 0.3:
            self._browse(day, anon, tz, abandon=rng.random() < 0.2)

    def _start_habits(self, person: Person, at: float) -> None:
        for habit in person.habits:
            if habit.next_due == math.inf:
                habit.next_due = at + self.rng.uniform(1, habit.cycle_days) * DAY

    def _browse(self, day: int, customer: dict[str, str], tz: str, abandon: bool,
                after: float = 0.0) -> float | None:
        """A web session: views, perhaps a cart left behind (no sale follows it)."""
        rng = self.rng
        at = self._when(day, tz, 7, 24)
        if at is None or at < after:
            return None
        t = at
        product = rng.choice(EVERYDAY)
        for _ in range(rng.randint(1, 3)):
            self._emit("page_view", t, tz, "web", "web", dict(customer),
                       {"url": f"https://shop.example.com/c/{product.category}",
                        "category": product.category})
            t += rng.randint(10, 120)
        self._emit("product_view", t, tz, "web", "web", dict(customer),
                   {"url": f"https://shop.example.com/p/{product.sku.lower()}", "sku": product.sku,
                    "category": product.category})
        if abandon:
            t += rng.randint(20, 300)
            cart_id = f"cart-{self.tag}-{self.counter:07d}"
            self._emit("cart_add", t, tz, "web", "web", dict(customer), {
                "cart_id": cart_id, "sku": product.sku, "quantity": 1,
                "unit_price": money(product.usd_cents), "currency": "USD",
                "category": product.category})
            if rng.random() < 0.3:
                self._emit("checkout_started", t + rng.randint(30, 400), tz, "web", "web",
                           dict(customer), {"cart_id": cart_id, "total": money(product.usd_cents),
                                            "currency": "USD"})
        return at

    def _line(self, product: Product, quantity: int, person: Person) -> dict[str, Any]:
        return {"product": product, "quantity": quantity}

    def _basket(self, person: Person) -> list[dict[str, Any]]:
        rng = self.rng
        n = 1 + min(4, int(rng.expovariate(1 / max(0.3, person.basket - 0.4))))
        picks = rng.sample(EVERYDAY, min(n, len(EVERYDAY)))
        return [self._line(p, 2 if rng.random() < 0.12 else 1, person) for p in picks]

    def _web_ids(self, person: Person) -> dict[str, str]:
        ids = {"web_customer_id": person.web_customer_id or ""}
        if person.email:
            ids["email"] = person.email
        return {k: v for k, v in ids.items() if v}

    def _contact_ids(self, person: Person) -> dict[str, str]:
        if person.email:
            return {"email": person.email}
        return {"phone": person.phone}

    def _pos_ids(self, person: Person, store: Store) -> dict[str, str]:
        """What a till records: a card, a phone, sometimes an email; the phone on first visit."""
        rng = self.rng
        at_home = store.country == person.home.country
        if not person.seen_at_till:
            person.seen_at_till = True
            if person.loyalty_id is None:
                person.loyalty_id = f"L-{self.tag}-{person.index:06d}"
            ids = {"phone": _phone_display(rng, person.phone, at_home),
                   "loyalty_id": person.loyalty_id}
            if person.email:
                ids["email"] = person.email
            return ids
        roll = rng.random()
        if person.loyalty_id and roll < 0.4:
            ids = {"loyalty_id": person.loyalty_id}
        elif roll < 0.7:
            ids = {"phone": _phone_display(rng, person.phone, at_home)}
        elif person.loyalty_id and roll < 0.9:
            ids = {"phone": _phone_display(rng, person.phone, at_home),
                   "loyalty_id": person.loyalty_id}
        elif person.email:
            ids = {"email": person.email}
        else:
            ids = {"phone": _phone_display(rng, person.phone, at_home)}
        if "email" not in ids and rng.random() < self.config.junk_identifier_share:
            ids["email"] = rng.choice(JUNK_EMAILS)
        return ids

    def _sale(self, person: Person, day: int, picks: list[dict[str, Any]],
              channel: str | None = None, at: float | None = None,
              store: Store | None = None) -> float | None:
        rng = self.rng
        if channel is None:
            online_ok = bool(person.web_customer_id)
            channel = ("online" if online_ok and rng.random() < person.online_share
                       else "pickup" if online_ok and rng.random() < 0.08 else "in_store")
        if channel == "in_store":
            store = store or (person.home if rng.random() < 0.9 else rng.choice(STORES))
            tz = store.timezone
            at = at if at is not None else self._when(day, tz, 10, 21)
        else:
            store = person.home if channel == "pickup" else None
            tz = self._tz(person)
            at = at if at is not None else self._when(day, tz, 7, 24)
        if at is None:
            return None
        currency = (store or person.home).currency
        lines = [{"sku": p["product"].sku, "name": p["product"].name,
                  "category": p["product"].category, "quantity": p["quantity"],
                  "unit_price": _local_price(p["product"].usd_cents, currency)} for p in picks]
        subtotal = sum(line["unit_price"] * line["quantity"] for line in lines)
        redeemed, discount = 0, 0
        if person.redeemable >= 200 and rng.random() < self.config.redeem_share:
            redeemed = (person.redeemable // 2) // 100 * 100
            value_usd_cents = redeemed // 100 * 1000
            discount = int(math.ceil(value_usd_cents / float(USD_PER[currency])))
            if discount >= subtotal:
                redeemed, discount = 0, 0
        total = subtotal - discount
        person.redeemable -= redeemed
        earned = _points(total, currency)
        place = store.store_id if store else "web"
        source = "pos" if channel == "in_store" else "web"
        order_id = f"{place}-{self.tag}-{self.counter + 1:07d}"
        if channel == "in_store":
            customer = self._pos_ids(person, store)  # type: ignore[arg-type]
            if rng.random() < 0.2 and person.loyalty_id:
                self._emit("store_checkin", at - rng.randint(120, 1500), tz, "app", place,
                           {"loyalty_id": person.loyalty_id}, {"store_id": place}, store_id=place)
        else:
            customer = self._web_ids(person)
            self._cart(at, tz, customer, lines, currency, total)
        props: dict[str, Any] = {
            "order_id": order_id, "currency": currency, "total": money(total),
            "lines": [{**line, "unit_price": money(line["unit_price"])} for line in lines],
            "channel": channel}
        if redeemed:
            props["points_redeemed"] = redeemed
            props["discount"] = money(discount)
        self._emit("sale", at, tz, source, place, customer, props,
                   store_id=store.store_id if store else None)
        order = Order(order_id, store.store_id if store else None, source, tz, customer, currency,
                      total, lines)
        if rng.random() < self.config.return_share:
            returned = lines if len(lines) == 1 or rng.random() < 0.5 else [rng.choice(lines)]
            refund = min(total, sum(line["unit_price"] * line["quantity"] for line in returned))
            reversal = min(earned, _points(refund, currency))
            person.redeemable += earned - reversal
            when = day + 1 + min(20, int(rng.expovariate(1 / 4)))
            if when < self.days:
                self.agenda.setdefault(when, []).append((order, returned, refund))
        else:
            person.redeemable += earned
        return at

    def _cart(self, at: float, tz: str, customer: dict[str, str], lines: list[dict[str, Any]],
              currency: str, total: int) -> None:
        """The cart an online order went through: adds, then checkout a minute or two before."""
        rng = self.rng
        cart_id = f"cart-{self.tag}-{self.counter + 1:07d}"
        t = at - rng.randint(300, 2400)
        for line in lines:
            self._emit("cart_add", t, tz, "web", "web", dict(customer), {
                "cart_id": cart_id, "sku": line["sku"], "quantity": line["quantity"],
                "unit_price": money(line["unit_price"]), "currency": currency,
                "category": line["category"]})
            t += rng.randint(20, 200)
        self._emit("checkout_started", at - rng.randint(30, 200), tz, "web", "web", dict(customer),
                   {"cart_id": cart_id, "total": money(total), "currency": currency})

    def _return(self, day: int, order: Order, returned: list[dict[str, Any]], refund: int) -> None:
        """Goods brought back against an earlier order, where it was bought."""
        store = STORE_BY_ID.get(order.store_id or "")
        at = self._when(day, order.tz, 10, 21) if store else self._when(day, order.tz, 7, 24)
        if at is None:
            return
        place = order.store_id or "web"
        self._emit("return", at, order.tz, order.source, place, dict(order.customer), {
            "order_id": order.order_id, "return_id": f"ret-{order.order_id}",
            "currency": order.currency, "total": money(refund),
            "lines": [{"sku": line["sku"], "name": line["name"], "category": line["category"],
                       "quantity": line["quantity"], "unit_price": money(line["unit_price"])}
                      for line in returned]}, store_id=order.store_id)

    def _opt_out(self, person: Person, day: int) -> None:
        channel = self.rng.choice(sorted(c for c, v in person.consents.items() if v == "opted_in")
                                  or ["email"])
        at = self._when(day, self._tz(person), 8, 23)
        if at is None:
            return
        person.consents[channel] = "opted_out"
        if all(v == "opted_out" for v in person.consents.values()):
            person.consents = {}
        self._emit("consent_update", at, self._tz(person), "web", "web", self._contact_ids(person),
                   {"consents": {channel: "opted_out"}})

    def _profile_update(self, person: Person, day: int) -> None:
        rng = self.rng
        at = self._when(day, self._tz(person), 8, 23)
        if at is None:
            return
        props: dict[str, Any] = rng.choice((
            {"tags": ["newsletter"]},
            {"preferred_channel": rng.choice(("email", "sms", "whatsapp"))},
            {"tags": ["vip-event"], "tags_removed": ["newsletter"]},
            {"home_store_id": rng.choice(STORES).store_id},
        ))
        self._emit("profile_update", at, self._tz(person), "web", "web", self._contact_ids(person),
                   props)

    def _message(self, person: Person, day: int) -> None:
        at = self._when(day, self._tz(person), 8, 23)
        if at is None:
            return
        text = self.rng.choice(("Is the serum back in stock?", "What time do you close today?",
                                "请问有会员活动吗？", "可以幫我留一件嗎？"))
        self._emit("message_received", at, self._tz(person), "whatsapp", "wa",
                   {"phone": person.phone, "whatsapp_id": person.phone.lstrip("+")},
                   {"channel": "whatsapp", "text": text})


# ---- malformed input -----------------------------------------------------------------------
MONEY_TYPES = {"sale", "return", "checkout_started", "cart_add", "cart_remove"}
CUSTOMER_BOUND = {"sale", "return", "cart_add", "cart_remove", "checkout_started", "page_view",
                  "product_view", "store_checkin", "message_received", "signup", "profile_update",
                  "consent_update", "erase_request"}


def malformed_copy(rng: random.Random, event: dict[str, Any]) -> dict[str, Any]:
    """A copy of a valid event with one defect ingestion must reject, marked with MALFORMED."""
    bad = copy.deepcopy(event)
    props = bad.get("properties") or {}
    etype = bad["type"]
    kinds = ["missing_event_id", "future_time", "bad_timestamp", "missing_occurred_at"]
    if etype in MONEY_TYPES and "currency" in props:
        kinds += ["float_money", "bad_currency", "missing_field"]
    if etype in CUSTOMER_BOUND:
        kinds.append("no_identifiers")
    kind = rng.choice(kinds)
    bad["event_id"] = f"{event['event_id']}-bad"
    if kind == "missing_event_id":
        del bad["event_id"]
    elif kind == "future_time":
        at = dt.datetime.fromisoformat(event["occurred_at"])
        bad["occurred_at"] = (at + dt.timedelta(days=3650)).isoformat(timespec="seconds")
    elif kind == "bad_timestamp":
        bad["occurred_at"] = event["occurred_at"][:19].replace("T", " ")  # no offset: not RFC 3339
    elif kind == "missing_occurred_at":
        del bad["occurred_at"]
    elif kind == "float_money":
        key = "total" if "total" in props else "unit_price"
        props[key] = float(Decimal(props[key]))
    elif kind == "bad_currency":
        props["currency"] = rng.choice(("US$", "RMB", "dollars", "EURO"))
    elif kind == "missing_field":
        props.pop("total" if etype in ("sale", "return") else "cart_id", None)
    elif kind == "no_identifiers":
        bad["customer"] = {}
    bad[MALFORMED] = kind
    return bad


def generate(seed: int, customers: int, days: int, start: dt.datetime | dt.date,
             config: WorldConfig | None = None, *,
             malformed_share: float | None = None) -> Iterator[dict[str, Any]]:
    """Yield the world's events (CONTRACTS §2 envelopes, JSON-ready) ordered by occurred_at."""
    cfg = config or WorldConfig()
    if malformed_share is not None:
        cfg = replace(cfg, malformed_share=malformed_share)
    if not 0 <= cfg.malformed_share < 0.5:
        raise ValueError("malformed_share must be in [0, 0.5)")
    if isinstance(start, dt.datetime):
        begin = start
    else:
        begin = dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC)
    world = World(seed, customers, days, begin, cfg)
    bad_rng = random.Random(f"omnicrm-malformed-{seed}")
    odds = cfg.malformed_share / (1 - cfg.malformed_share)
    end = begin + dt.timedelta(days=days)
    for event in world.events():
        # A session that starts just before the end can run past it; the world stops at its end
        # (otherwise feeding "the day that just ended" would send events from the future).
        if dt.datetime.fromisoformat(event["occurred_at"]) > end:
            continue
        yield event
        if odds and bad_rng.random() < odds:
            yield malformed_copy(bad_rng, event)
