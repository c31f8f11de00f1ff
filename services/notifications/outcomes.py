"""`notifications.outcomes.v1` records: one per status change, with a deterministic outcome_id."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from services.notifications.policy import outcome_id
from shared.avro import AvroCodec
from shared.outbox import OutboxMessage
from shared.topics import NOTIFICATION_OUTCOMES, OUTCOME


def outcome_record(n: Mapping[str, Any], *, status: str, reason: str | None,
                   occurred_at: dt.datetime) -> dict[str, Any]:
    """The OUTCOME record for notification `n` (a row or dict with the notifications columns)."""
    nid = str(n["notification_id"])
    attempt = int(n.get("attempt") or 0)
    return {
        "outcome_id": outcome_id(nid, status, attempt, reason),
        "notification_id": nid,
        "trigger_id": n["trigger_id"],
        "customer_id": n["customer_id"],
        "kind": n["kind"],
        "channel": n.get("channel"),
        "status": status,
        "reason": reason,
        "scheduled_for": n.get("scheduled_for"),
        "sent_at": n.get("sent_at"),
        "occurred_at": occurred_at,
        "trigger_occurred_at": n.get("trigger_occurred_at"),
        "attempt": attempt,
        "provider": n.get("provider"),
        "provider_message_id": n.get("provider_message_id"),
    }


def outcome_message(codec: AvroCodec, n: Mapping[str, Any], *, status: str, reason: str | None,
                    occurred_at: dt.datetime) -> OutboxMessage:
    """The outbox row publishing one status change, keyed by customer_id."""
    record = outcome_record(n, status=status, reason=reason, occurred_at=occurred_at)
    return OutboxMessage(NOTIFICATION_OUTCOMES.name, record["customer_id"],
                         codec.encode(OUTCOME, record))
