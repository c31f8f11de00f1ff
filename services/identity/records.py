"""The golden profile as the outside sees it: the Avro Profile record and the HTTP answer."""

from __future__ import annotations

from typing import Any

from services.identity import profile
from services.identity.resolution import Customer
from shared.pii import mask_identifier


def identifier_map(c: Customer) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for kind, value in sorted(c.identifiers):
        out.setdefault(kind, []).append(value)
    return out


def profile_record(c: Customer) -> dict[str, Any]:
    """The `omnicrm.identity.Profile` value for identity.profiles.v1."""
    rec: dict[str, Any] = {"customer_id": c.customer_id, "identifiers": identifier_map(c)}
    rec.update(profile.view(c.golden))  # the FIELDS, then address, tags and consents
    rec["merged_from"] = sorted(m for m in c.members if m != c.customer_id)
    rec["quarantined"] = [dict(q) for q in c.quarantined]
    rec["erased"] = c.erased
    rec["created_at"] = c.created_at
    rec["updated_at"] = c.updated_at
    rec["version"] = c.version
    return rec


def api_view(c: Customer, *, pii: bool) -> dict[str, Any]:
    """The HTTP answer of GET /v1/customers/{id}: masked contact data unless the key has read_pii."""
    rec = profile_record(c)

    def show(kind: str, value: str) -> str:
        return value if pii else mask_identifier(kind, value)

    rec["identifiers"] = {k: [show(k, v) for v in vs] for k, vs in rec["identifiers"].items()}
    rec["quarantined"] = [{**q, "value": show(q["type"], q["value"])} for q in rec["quarantined"]]
    rec["created_at"] = c.created_at.isoformat()
    rec["updated_at"] = c.updated_at.isoformat()
    return rec
