"""Identity resolution on plain data: match, attach, merge, the over-merge guard, erase and unmerge.

A `Graph` holds the part of the identity graph a batch touches: customers (with every identifier
they own) and who owns which identifier. `resolve` applies one normalised event to it and returns
the decision; the handler loads the Graph, resolves each event, then writes what changed. Nothing
here does I/O, so the rules are tested without Kafka or PostgreSQL.

Rules:
- each (type, value) is owned by at most one customer, always a surviving (root) customer;
- no match -> a new customer whose id is uuid5 of the creating event's id (replays give the same ids);
- one match -> attach the new identifiers; several -> merge into the oldest (created_at, then id);
- over-merge guard: per-type limits (a customer holds at most N emails / N phones, a merge that
  would exceed them is refused) and quarantine of an identifier seen on more than M distinct
  customers within the window (it stops matching and merging);
- merges are edges (survivor, merged, cause event); an unmerge splits along one edge, and the pair
  is remembered so later events do not merge them again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.identity import profile
from services.identity.normalise import Ident

NAMESPACE = uuid.UUID("5b0f3c1e-9a4d-4e3b-8f5e-2d7c1a9b6e40")
LIMITED_TYPES = ("email", "phone")
# Types that name one person: a second value of one of these next to a known identifier hints that
# the identifier is shared by several people (a store's phone typed in for every shopper).
PERSONAL_TYPES = frozenset({"email", "phone", "loyalty_id", "pos_customer_id", "web_customer_id",
                            "whatsapp_id"})
MAX_QUARANTINE_NOTES = 50


_NAMESPACE_BYTES = NAMESPACE.bytes


def _uuid5(name: str) -> str:
    """str(uuid.uuid5(NAMESPACE, name)) without building the UUID object (this runs per event)."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode(), usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50   # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80   # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def customer_id_for(event_id: str) -> str:
    """Deterministic id of the customer an event creates."""
    return _uuid5(f"customer:{event_id}")


def merge_id_for(survivor: str, merged: str, cause_event_id: str | None) -> str:
    return _uuid5(f"merge:{survivor}:{merged}:{cause_event_id or ''}")


class NoIdentifier(Exception):
    """The event has no usable identifier (none, or only blocklisted / quarantined ones)."""


@dataclass(frozen=True)
class Guard:
    """Over-merge guard settings (rules.yaml `identity`)."""

    max_per_type: int = 5
    quarantine_customers: int = 3
    window: dt.timedelta = dt.timedelta(hours=24)

    @classmethod
    def from_rules(cls, rules: Mapping[str, Any]) -> Guard:
        return cls(int(rules.get("max_identifiers_per_type", 5)),
                   int(rules.get("quarantine_distinct_customers", 3)),
                   dt.timedelta(hours=float(rules.get("quarantine_window_hours", 24))))

    @classmethod
    def off(cls) -> Guard:
        return cls(10**9, 10**9)


@dataclass
class Customer:
    """A customer node; `identifiers` is non-empty only on roots (surviving customers)."""

    customer_id: str
    created_at: dt.datetime
    updated_at: dt.datetime
    identifiers: set[Ident] = field(default_factory=set)
    own: dict = field(default_factory=profile.empty)      # what events resolved to this node said
    golden: dict = field(default_factory=profile.empty)   # fold of `own` over the subtree
    members: list[str] = field(default_factory=list)      # subtree: itself and all merged into it
    blocked: set[str] = field(default_factory=set)        # ids it must never be merged with
    quarantined: list[dict] = field(default_factory=list)
    merged_into: str | None = None
    erased: bool = False
    version: int = 0
    created_by: str | None = None
    # batch bookkeeping: `changed` = the row is written at the end of the batch; `profile_changed`
    # and `tombstone` = a profile record (or tombstone) is due, cleared by whoever publishes it
    # (the handler, after each event: one record per changing event, whatever the batch cut).
    new: bool = False
    changed: bool = False
    profile_changed: bool = False
    tombstone: bool = False

    def __post_init__(self) -> None:
        if not self.members:
            self.members = [self.customer_id]

    @property
    def age(self) -> tuple[dt.datetime, str]:
        return (self.created_at, self.customer_id)

    def count(self, kind: str) -> int:
        return sum(1 for t, _ in self.identifiers if t == kind)

    def note_quarantine(self, ident: Ident, reason: str) -> bool:
        entry = {"type": ident[0], "value": ident[1], "reason": reason}
        if entry in self.quarantined or len(self.quarantined) >= MAX_QUARANTINE_NOTES:
            return False
        self.quarantined.append(entry)
        self.changed = self.profile_changed = True
        return True


@dataclass(frozen=True)
class Incoming:
    """A customer-bound event after normalisation."""

    event_id: str
    type: str
    occurred_at: dt.datetime
    identifiers: tuple[Ident, ...]
    delta: dict = field(default_factory=profile.empty, compare=False)

    @property
    def erase(self) -> bool:
        return self.type == "erase_request"


@dataclass(frozen=True)
class MergeEdge:
    merge_id: str
    kind: str           # merged | unmerged
    survivor: str
    merged: str
    reason: str
    cause_event_id: str | None
    occurred_at: dt.datetime


@dataclass
class Resolution:
    customer_id: str
    outcome: str        # new | matched | attached | merged
    identifiers: tuple[Ident, ...]
    merges: list[MergeEdge] = field(default_factory=list)
    quarantined: list[tuple[Ident, str]] = field(default_factory=list)
    erased: bool = False


@dataclass
class Graph:
    """The loaded part of the identity graph plus what a batch changed in it."""

    guard: Guard = field(default_factory=Guard)
    customers: dict[str, Customer] = field(default_factory=dict)
    owners: dict[Ident, str] = field(default_factory=dict)
    quarantined: dict[Ident, str] = field(default_factory=dict)        # identifier -> reason
    sightings: dict[Ident, list[tuple[str, dt.datetime]]] = field(default_factory=dict)
    homes: dict[Ident, str] = field(default_factory=dict)              # links added: -> home customer
    new_sightings: list[tuple[Ident, str, dt.datetime]] = field(default_factory=list)
    new_quarantine: dict[Ident, tuple[str, dt.datetime]] = field(default_factory=dict)
    merged_away: dict[str, str] = field(default_factory=dict)          # merged -> survivor
    erased: set[str] = field(default_factory=set)
    removed: set[Ident] = field(default_factory=set)                   # links deleted by erase
    # Customers whose row the event being resolved changed (reset by each `resolve`): their
    # updated_at moves to its time, and the handler publishes their profiles right after it.
    touched: dict[str, Customer] = field(default_factory=dict)

    # -- loading ------------------------------------------------------------------------
    def add(self, customer: Customer) -> Customer:
        self.customers[customer.customer_id] = customer
        for ident in customer.identifiers:
            self.owners[ident] = customer.customer_id
        return customer

    def root_of(self, customer_id: str) -> str:
        seen = customer_id
        while (c := self.customers.get(seen)) is not None and c.merged_into is not None:
            seen = c.merged_into
        return seen

    # -- views --------------------------------------------------------------------------
    def partition(self) -> set[frozenset[Ident]]:
        """Identifiers grouped by owning customer (what the property tests compare)."""
        groups: dict[str, set[Ident]] = {}
        for ident, owner in self.owners.items():
            groups.setdefault(owner, set()).add(ident)
        return {frozenset(g) for g in groups.values()}


def resolve(graph: Graph, ev: Incoming) -> Resolution:
    """Apply one event to the graph: the customer it belongs to, and what that changed."""
    touched = graph.touched
    touched.clear()
    usable = [i for i in ev.identifiers if i not in graph.quarantined]
    if not usable:
        raise NoIdentifier("no usable identifier")
    noted: list[tuple[Ident, str]] = []
    for ident in list(usable):
        if _sighted_too_often(graph, ev, ident, usable):
            graph.quarantined[ident] = "shared_identifier"
            graph.new_quarantine[ident] = ("shared_identifier", ev.occurred_at)
            usable.remove(ident)
            noted.append((ident, "shared_identifier"))
            owner = graph.customers[graph.owners[ident]]
            if owner.note_quarantine(ident, "shared_identifier"):
                touched[owner.customer_id] = owner
    if not usable:
        raise NoIdentifier("only quarantined identifiers")

    candidates = sorted((graph.customers[cid] for cid in {graph.owners[i] for i in usable
                                                           if i in graph.owners}),
                        key=lambda c: c.age)
    merges: list[MergeEdge] = []
    if not candidates:
        survivor = graph.add(Customer(customer_id_for(ev.event_id), ev.occurred_at, ev.occurred_at,
                                      created_by=ev.event_id, new=True, changed=True,
                                      profile_changed=True))
        touched[survivor.customer_id] = survivor
        outcome = "new"
    else:
        survivor = candidates[0]
        outcome = "matched"
        for other in candidates[1:]:
            bridges = sorted(i for i in usable if graph.owners.get(i) == other.customer_id)
            refusal = _refuse_merge(graph, survivor, other)
            if refusal is not None:
                for ident in bridges:
                    if survivor.note_quarantine(ident, refusal):
                        noted.append((ident, refusal))
                        touched[survivor.customer_id] = survivor
                continue
            merges.append(_merge(graph, survivor, other, ev, usable))
            touched[survivor.customer_id] = survivor
            touched[other.customer_id] = other
            outcome = "merged"
    for ident in usable:
        if ident in graph.owners:
            continue
        kind = ident[0]
        if kind in LIMITED_TYPES and survivor.count(kind) >= graph.guard.max_per_type:
            if survivor.note_quarantine(ident, "type_limit"):
                noted.append((ident, "type_limit"))
                touched[survivor.customer_id] = survivor
            continue
        graph.owners[ident] = survivor.customer_id
        graph.homes[ident] = survivor.customer_id
        graph.removed.discard(ident)
        survivor.identifiers.add(ident)
        survivor.changed = survivor.profile_changed = True
        touched[survivor.customer_id] = survivor
        if outcome == "matched":
            outcome = "attached"
    if _apply_delta(survivor, ev):
        touched[survivor.customer_id] = survivor
    if ev.occurred_at < survivor.created_at:
        survivor.created_at = ev.occurred_at
        survivor.changed = survivor.profile_changed = True
        touched[survivor.customer_id] = survivor
    if ev.erase:
        erase(graph, survivor, ev.occurred_at)
        touched[survivor.customer_id] = survivor
    # updated_at is the event time of the customer's latest change: what this event changed moves
    # to its time (never back), an event that changed nothing leaves it, whatever batch it was in.
    for c in touched.values():
        if ev.occurred_at > c.updated_at:
            c.updated_at = ev.occurred_at
    return Resolution(survivor.customer_id, outcome, tuple(usable), merges, noted, ev.erase)


def _apply_delta(c: Customer, ev: Incoming) -> bool:
    """Fold the event's delta into the customer; True when its row changed."""
    if profile.is_empty(ev.delta):
        return False
    own = profile.merge(c.own, ev.delta)
    golden = profile.merge(c.golden, ev.delta)
    if golden != c.golden:
        c.golden = golden
        c.profile_changed = True
    elif own == c.own:
        return False  # said nothing new (a redelivered or older update)
    c.own = own
    c.changed = True
    return True


def _sighted_too_often(graph: Graph, ev: Incoming, ident: Ident, usable: list[Ident]) -> bool:
    """Record whom `ident` is seen with; True once that is more than M distinct customers."""
    owner_id = graph.owners.get(ident)
    if owner_id is None:
        return False
    others = [j for j in usable if j != ident]
    if not others:
        return False
    owner = graph.customers[owner_id]
    other_owners = {graph.owners[j] for j in others if j in graph.owners} - {owner_id}
    anchors = sorted(other_owners)
    if not anchors and not any(j in graph.owners for j in others):
        owner_types = {t for t, _ in owner.identifiers}
        if any(j[0] in PERSONAL_TYPES and j[0] in owner_types for j in others):
            anchors = [customer_id_for(ev.event_id)]  # the other person this event would be
    if not anchors:
        return False
    seen = graph.sightings.setdefault(ident, [])
    for anchor in anchors:
        if (anchor, ev.occurred_at) not in seen:
            seen.append((anchor, ev.occurred_at))
            graph.new_sightings.append((ident, anchor, ev.occurred_at))
    window = graph.guard.window
    distinct = {a for a, at in seen if abs(at - ev.occurred_at) <= window} | {owner_id}
    return len(distinct) > graph.guard.quarantine_customers


def _refuse_merge(graph: Graph, survivor: Customer, other: Customer) -> str | None:
    if set(survivor.members) & other.blocked or set(other.members) & survivor.blocked:
        return "unmerged_pair"
    for kind in LIMITED_TYPES:
        if survivor.count(kind) + other.count(kind) > graph.guard.max_per_type:
            return "merge_limit"
    return None


def _merge(graph: Graph, survivor: Customer, other: Customer, ev: Incoming,
           usable: Iterable[Ident]) -> MergeEdge:
    shared = sorted({i[0] for i in usable
                     if graph.owners.get(i) in (survivor.customer_id, other.customer_id)})
    for ident in other.identifiers:
        graph.owners[ident] = survivor.customer_id
    survivor.identifiers |= other.identifiers
    other.identifiers = set()
    survivor.members = sorted(set(survivor.members) | set(other.members))
    survivor.blocked |= other.blocked
    survivor.golden = profile.merge(survivor.golden, other.golden)
    for note in other.quarantined:
        if note not in survivor.quarantined and len(survivor.quarantined) < MAX_QUARANTINE_NOTES:
            survivor.quarantined.append(note)
    if other.created_at < survivor.created_at:  # cannot happen for the oldest; kept for safety
        survivor.created_at = other.created_at
    survivor.changed = survivor.profile_changed = True
    other.merged_into = survivor.customer_id
    other.changed = other.tombstone = True
    graph.merged_away[other.customer_id] = survivor.customer_id
    for merged, into in list(graph.merged_away.items()):
        if into == other.customer_id:
            graph.merged_away[merged] = survivor.customer_id
    return MergeEdge(merge_id_for(survivor.customer_id, other.customer_id, ev.event_id), "merged",
                     survivor.customer_id, other.customer_id, "shared " + ",".join(shared),
                     ev.event_id, ev.occurred_at)


def erase(graph: Graph, c: Customer, at: dt.datetime) -> None:
    """Forget the person: identifiers and profile data go, the anonymous customer id stays."""
    for ident in c.identifiers:
        graph.owners.pop(ident, None)
        if graph.homes.pop(ident, None) is None:
            graph.removed.add(ident)
        graph.sightings.pop(ident, None)
    graph.new_sightings = [s for s in graph.new_sightings if s[0] not in c.identifiers]
    c.identifiers = set()
    c.own = profile.empty()
    c.golden = profile.empty()
    c.quarantined = []
    c.erased = True
    c.changed = c.tombstone = True
    if at > c.updated_at:
        c.updated_at = at
    graph.erased.add(c.customer_id)


# -- unmerge -------------------------------------------------------------------------------
@dataclass
class Split:
    """The outcome of splitting `merged` out of `survivor`'s tree."""

    survivor: Customer
    merged: Customer
    moved: list[Ident]                 # identifiers that go back to `merged`
    changed: list[Customer]            # every node whose stored row changes


def unmerge(tree: Mapping[str, Customer], root_id: str, merged_id: str,
            homes: Mapping[Ident, str]) -> Split:
    """Split `merged_id` (and everything merged into it) out of the tree rooted at `root_id`.

    `tree` holds every node of the root's subtree; `homes` maps each identifier the root owns to
    the customer it was first attached to. Identifiers whose home is in the split-off subtree go
    back; golden profiles are refolded from each side's own states; the pair is blocked.
    """
    root = tree[root_id]
    node = tree[merged_id]
    children: dict[str, list[str]] = {}
    for c in tree.values():
        if c.merged_into is not None:
            children.setdefault(c.merged_into, []).append(c.customer_id)

    def subtree(cid: str) -> list[str]:
        out, stack = [], [cid]
        while stack:
            cur = stack.pop()
            out.append(cur)
            stack.extend(children.get(cur, ()))
        return sorted(out)

    parent = node.merged_into
    node.merged_into = None
    split_members = set(subtree(merged_id))
    changed = [node]
    # Ancestors between the node and the root lose the split-off members.
    cur = parent
    while cur is not None:
        anc = tree[cur]
        anc.members = sorted(set(anc.members) - split_members)
        changed.append(anc)
        cur = anc.merged_into
    moved = sorted(i for i, home in homes.items() if home in split_members)
    root.identifiers -= set(moved)
    node.identifiers = set(moved)
    node.members = sorted(split_members)
    root.golden = profile.fold(tree[m].own for m in subtree(root_id) if m not in split_members)
    node.golden = profile.fold(tree[m].own for m in split_members)
    root.blocked |= {merged_id}
    node.blocked |= {root_id}
    node.tombstone = False
    for c in (root, node):
        c.changed = c.profile_changed = True
    return Split(root, node, moved, changed)
