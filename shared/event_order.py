"""Event-time order across partitions, for replays under OMNICRM_CLOCK=event (DESIGN "Time").

A consumer of several partitions sees them interleaved as fetches happen to return, so a service
whose decisions depend on order across partitions (identity names a customer after the first event
it sees; a merge and the events around it) would decide differently on every replay. This buffer
releases consumed records as a k-way merge of the partitions by (event time, topic, partition,
offset): a record leaves only when every other assigned partition either has a record buffered
(whose head is then known to be later) or is caught up with its log, confirmed by a fetch answered
at least `grace_ms` after the record arrived. The merge of fixed logs by their heads is a function of
the logs alone, so every replay releases the same sequence; the grace covers records of one publish
that reach different partitions a few milliseconds apart.

Records without an event time (tombstones, dead letters) take the time of the record before them in
their partition: a tombstone is published with the change that caused it (identity's merge-away or
erasure comes right after that event's records), so it must not overtake other partitions' records
from before that change — triggers of the merged-away customer still a hop behind would otherwise
be decided `erased` in one replay and not in the next. The first record of a partition with no
time sorts first among the heads.
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

TP = tuple[str, int]
NO_TIME = -(1 << 62)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class PartitionState:
    """What the consumer knows of one assigned partition's log."""

    caught_up: bool  # fetch position has reached the high watermark
    polled_ms: int | None  # wall ms of the latest fetch answer for it (None: never fetched)


def event_time(value: Any) -> dt.datetime | None:
    """Event time of a decoded record of any omnicrm topic (None for tombstones and unknown shapes).

    A service's own decoder may hand over a command object instead of the record's dict (loyalty
    does): its `occurred_at` is the event time.
    """
    if not isinstance(value, dict):
        at = getattr(value, "occurred_at", None)
        return at if isinstance(at, dt.datetime) else None
    nested = value.get("event")
    if isinstance(nested, dict) and isinstance(nested.get("occurred_at"), dt.datetime):
        return nested["occurred_at"]
    for name in ("occurred_at", "fired_at", "updated_at"):
        at = value.get(name)
        if isinstance(at, dt.datetime):
            return at
    return None


def time_key(at: dt.datetime | None) -> int:
    """Microseconds since the epoch, comparable across partitions; NO_TIME sorts first."""
    if at is None:
        return NO_TIME
    return (at - _EPOCH) // _MICROSECOND


@dataclass(slots=True)
class _Held:
    key: tuple[int, str, int, int]
    arrived_ms: int
    item: Any


class EventTimeOrder:
    """Holds consumed items per partition and releases them in event-time order."""

    def __init__(self, grace_ms: int = 500) -> None:
        self.grace_ms = grace_ms
        self._buffers: dict[TP, deque[_Held]] = {}
        self._last: dict[TP, int] = {}  # time key of the latest item added per partition

    def add(self, tp: TP, offset: int, at: dt.datetime | None, item: Any, arrived_ms: int) -> None:
        """Buffer one item of partition `tp`, in offset order; no time: its predecessor's."""
        key = self._last.get(tp, NO_TIME) if at is None else time_key(at)
        self._last[tp] = key
        self._buffers.setdefault(tp, deque()).append(_Held((key, tp[0], tp[1], offset), arrived_ms, item))

    def held(self, tp: TP | None = None) -> int:
        """Items buffered for `tp` (or in all)."""
        if tp is not None:
            return len(self._buffers.get(tp, ()))
        return sum(len(b) for b in self._buffers.values())

    def drop(self, tps: Iterable[TP]) -> None:
        """Forget revoked partitions: their new owner re-reads them from the stored positions."""
        for tp in tps:
            self._buffers.pop(tp, None)
            self._last.pop(tp, None)

    def release(self, assigned: Mapping[TP, PartitionState], limit: int) -> list[Any]:
        """Items that can leave now, in order, at most `limit`."""
        heads = [(b[0].key, tp) for tp, b in self._buffers.items() if b and tp in assigned]
        heapq.heapify(heads)
        empty = [tp for tp in assigned if not self._buffers.get(tp)]
        out: list[Any] = []
        released: list[_Held] = []
        blocked = False
        while heads and len(out) < limit:
            _, tp = heads[0]
            buf = self._buffers[tp]
            head = buf[0]
            if any(self._blocks(assigned[e], head.arrived_ms) for e in empty if e != tp):
                blocked = True
                break
            heapq.heappop(heads)
            held = buf.popleft()
            released.append(held)
            out.append(held.item)
            if buf:
                heapq.heappush(heads, (buf[0].key, tp))
            else:
                empty.append(tp)
        if released:
            moment, last = released[-1].key[0], released[-1].arrived_ms
            same_next = bool(heads) and heads[0][0][0] == moment
            may_come = blocked or any(self._blocks(assigned[e], last) for e in empty)
            whole = all(h.key[0] == moment for h in released)
            if (may_come or same_next) and not (whole and len(out) >= limit):
                self._hold_back(released, out, moment)
        return out

    def _hold_back(self, released: list[_Held], out: list[Any], moment: int) -> None:
        """Keep the last moment's records for later unless all of that moment has arrived.

        Records of one moment (the triggers one sale fired) are then applied in one batch, so a
        rule that looks at them together (notifications' priority within a day) sees the same set
        on every replay, however the fetches were chunked.
        """
        while released and released[-1].key[0] == moment:
            held = released.pop()
            out.pop()
            self._buffers[(held.key[1], held.key[2])].appendleft(held)

    def _blocks(self, state: PartitionState, arrived_ms: int) -> bool:
        # An empty partition may still produce an earlier record unless a fetch answered well after
        # this record arrived showed it caught up.
        return not (state.caught_up and state.polled_ms is not None
                    and state.polled_ms >= arrived_ms + self.grace_ms)
