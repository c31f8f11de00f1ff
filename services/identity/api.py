"""HTTP on :8001: look a customer up by identifier, read the golden profile, undo a merge (admin)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from services.identity import store
from services.identity.handlers import IdentityMetrics
from services.identity.normalise import Normaliser
from services.identity.records import api_view, profile_record
from services.identity.resolution import merge_id_for, unmerge
from services.identity.sealing import Sealer
from shared.avro import AvroCodec
from shared.clock import Clock
from shared.config import ApiKey
from shared.crypto import Vault
from shared.events import IDENTIFIER_TYPES
from shared.http import ApiError, require
from shared.outbox import OutboxMessage, add_to_outbox
from shared.topics import IDENTITY_MERGES, IDENTITY_PROFILES, MERGE, PROFILE


class UnmergeRequest(BaseModel):
    merged: str = Field(min_length=1, max_length=200, description="The customer id merged in.")


@dataclass
class ApiDeps:
    """What the routes need, resolved at request time (the pool opens after wiring)."""

    pool: Callable[[], asyncpg.Pool | None]
    codec: AvroCodec
    clock: Clock
    normaliser: Normaliser
    metrics: IdentityMetrics
    on_commit: Callable[[], None] = lambda: None
    vault: Vault = field(default_factory=lambda: Vault.from_env(embedded=True))

    def __post_init__(self) -> None:
        self.sealer = Sealer(self.vault)

    def get_pool(self) -> asyncpg.Pool:
        pool = self.pool()
        if pool is None:
            raise ApiError(503, "unavailable", "the database is not connected yet")
        return pool


def router(deps: ApiDeps) -> APIRouter:
    r = APIRouter(prefix="/v1/customers", tags=["customers"])

    @r.get("/lookup", responses={404: {"description": "no customer has this identifier"}})
    async def lookup(request: Request, key: ApiKey = require("read")) -> dict:
        """The customer holding an identifier: `?email=`, `?phone=`, `?loyalty_id=`, ..."""
        given = [(k, v) for k, v in request.query_params.items() if k in IDENTIFIER_TYPES and v]
        if not given:
            raise ApiError(422, "invalid_request", "give one identifier: "
                           + ", ".join(IDENTIFIER_TYPES))
        kind, raw = given[0]
        value = deps.normaliser.lookup_value(kind, raw)
        if value is None:
            raise ApiError(404, "not_found", f"no customer with this {kind}")
        async with deps.get_pool().acquire() as conn:
            owner = await store.owner_of(conn, (kind, value), deps.sealer)
        if owner is None:
            raise ApiError(404, "not_found", f"no customer with this {kind}")
        return {"customer_id": owner}

    @r.get("/{customer_id}", responses={404: {"description": "unknown customer"}})
    async def get_customer(customer_id: str, key: ApiKey = require("read")) -> dict:
        """The golden profile; a merged-away id answers its survivor."""
        async with deps.get_pool().acquire() as conn:
            root = await store.root_of(conn, customer_id)
            c = await store.customer_with_identifiers(conn, root, deps.sealer) if root else None
        if c is None:
            raise ApiError(404, "not_found", "unknown customer")
        return api_view(c, pii="read_pii" in key.scopes)

    @r.post("/{customer_id}/unmerge", responses={404: {"description": "unknown customer"},
                                                 409: {"description": "not merged into it"}})
    async def unmerge_customer(customer_id: str, body: UnmergeRequest,
                               key: ApiKey = require("admin")) -> dict:
        """Split `merged` (and what was merged into it) back out of this customer."""
        at = deps.clock.now()
        async with deps.get_pool().acquire() as conn, conn.transaction():
            root = await store.root_of(conn, customer_id)
            merged_root = await store.root_of(conn, body.merged)
            if root is None or merged_root is None:
                raise ApiError(404, "not_found", "unknown customer")
            if merged_root != root or body.merged == root:
                raise ApiError(409, "not_merged", "that customer is not merged into this one")
            tree, homes = await store.load_tree(conn, root, deps.sealer)
            node = tree.get(body.merged)
            if tree[root].merged_into is not None or node is None or node.merged_into is None:
                raise ApiError(409, "conflict", "the customer changed meanwhile; try again")
            if tree[root].erased:
                raise ApiError(409, "erased", "the customer was erased")
            parent = node.merged_into
            edge = await store.merge_edge(conn, parent, body.merged)
            merge_id = edge["merge_id"] if edge else merge_id_for(parent, body.merged, None)
            split = unmerge(tree, root, body.merged, homes)
            for c in (split.survivor, split.merged):
                c.version += 1
            # The Avro record carries identifiers only for the two profiles we publish.
            await store.save_split(conn, split.changed, body.merged, split.moved, merge_id, at,
                                   deps.sealer)
            await add_to_outbox(conn, [
                OutboxMessage(IDENTITY_MERGES.name, root, deps.codec.encode(MERGE, {
                    "merge_id": merge_id, "kind": "unmerged", "survivor": root,
                    "merged": body.merged, "reason": f"admin unmerge by {key.name}",
                    "cause_event_id": edge["cause_event_id"] if edge else None, "occurred_at": at})),
                *(OutboxMessage(IDENTITY_PROFILES.name, c.customer_id,
                                deps.codec.encode(PROFILE, profile_record(c)))
                  for c in (split.survivor, split.merged)),
            ])
        deps.metrics.merges.labels(kind="unmerged").inc()
        deps.on_commit()
        return {"survivor": root, "merged": body.merged, "merge_id": merge_id,
                "identifiers_moved": len(split.moved)}

    return r


def privacy_router(deps: ApiDeps) -> APIRouter:
    r = APIRouter(prefix="/v1/erasures", tags=["privacy"])

    @r.get("/{customer_id}", responses={404: {"description": "no erasure recorded"}})
    async def erasure(customer_id: str, key: ApiKey = require("admin")) -> dict:
        """When identity erased this customer (or a customer merged into it) and what it dropped."""
        async with deps.get_pool().acquire() as conn:
            row = await store.erasure_of(conn, customer_id)
        if row is None:
            raise ApiError(404, "not_found", "no erasure recorded for this customer")
        return {"service": "identity", "customer_id": row["customer_id"],
                "erased_at": row["erased_at"].isoformat(), "what": list(row["what"])}

    return r
