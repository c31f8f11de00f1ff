"""Every topic of CONTRACTS §4, declared once: name, value subject, partitions, compaction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    """A topic and what its values are."""

    name: str
    subject: str | None  # Avro subject of the values; None = JSON (ingest.raw.v1)
    compacted: bool = False
    partitioned: bool = True  # False: one partition (low-volume, order matters globally)


EVENT = "omnicrm.ingest.Event"
RESOLVED = "omnicrm.identity.ResolvedEvent"
PROFILE = "omnicrm.identity.Profile"
MERGE = "omnicrm.identity.Merge"
LOYALTY = "omnicrm.loyalty.LoyaltyEvent"
TRIGGER = "omnicrm.triggers.TriggerFired"
OUTCOME = "omnicrm.notifications.NotificationOutcome"
DEAD_LETTER = "omnicrm.dlq.DeadLetter"

INGEST_RAW = Topic("ingest.raw.v1", None)
INGEST_SALES = Topic("ingest.sales.v1", EVENT)
INGEST_INTERACTIONS = Topic("ingest.interactions.v1", EVENT)
INGEST_PROFILES = Topic("ingest.profiles.v1", EVENT)
INGEST_STORES = Topic("ingest.stores.v1", EVENT, compacted=True, partitioned=False)
INGEST_DLQ = Topic("ingest.dlq.v1", DEAD_LETTER)
IDENTITY_EVENTS = Topic("identity.events.v1", RESOLVED)
IDENTITY_PROFILES = Topic("identity.profiles.v1", PROFILE, compacted=True)
IDENTITY_MERGES = Topic("identity.merges.v1", MERGE)
LOYALTY_EVENTS = Topic("loyalty.events.v1", LOYALTY)
TRIGGERS_FIRED = Topic("triggers.fired.v1", TRIGGER)
NOTIFICATION_OUTCOMES = Topic("notifications.outcomes.v1", OUTCOME)
# Dead letters of the services downstream of ingestion (an addition to CONTRACTS §4).
IDENTITY_DLQ = Topic("identity.dlq.v1", DEAD_LETTER)
LOYALTY_DLQ = Topic("loyalty.dlq.v1", DEAD_LETTER)
TRIGGERS_DLQ = Topic("triggers.dlq.v1", DEAD_LETTER)
NOTIFICATIONS_DLQ = Topic("notifications.dlq.v1", DEAD_LETTER)

ALL_TOPICS: tuple[Topic, ...] = (
    INGEST_RAW, INGEST_SALES, INGEST_INTERACTIONS, INGEST_PROFILES, INGEST_STORES, INGEST_DLQ,
    IDENTITY_EVENTS, IDENTITY_PROFILES, IDENTITY_MERGES, LOYALTY_EVENTS, TRIGGERS_FIRED,
    NOTIFICATION_OUTCOMES, IDENTITY_DLQ, LOYALTY_DLQ, TRIGGERS_DLQ, NOTIFICATIONS_DLQ,
)
BY_NAME = {t.name: t for t in ALL_TOPICS}
DLQ_OF_SERVICE = {
    "ingestion": INGEST_DLQ,
    "identity": IDENTITY_DLQ,
    "loyalty": LOYALTY_DLQ,
    "triggers": TRIGGERS_DLQ,
    "notifications": NOTIFICATIONS_DLQ,
}

# Event types routed by ingestion to each typed topic.
ROUTES: dict[str, Topic] = {
    **{t: INGEST_SALES for t in ("sale", "return")},
    **{t: INGEST_INTERACTIONS for t in (
        "cart_add", "cart_remove", "checkout_started", "page_view", "product_view",
        "store_checkin", "message_received")},
    **{t: INGEST_PROFILES for t in ("signup", "profile_update", "consent_update", "erase_request")},
    **{t: INGEST_STORES for t in ("store_upsert", "store_event")},
}


def topic(name: str) -> Topic:
    return BY_NAME[name]
