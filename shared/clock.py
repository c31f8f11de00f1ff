"""The Clock: business time is wall time live, or the event-time watermark in replays."""

from __future__ import annotations

import datetime as dt
from typing import Protocol

UTC = dt.UTC
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


class Clock(Protocol):
    """What rules ask for the current time."""

    def now(self) -> dt.datetime: ...

    def observe(self, occurred_at: dt.datetime) -> None: ...


class WallClock:
    """Live time (OMNICRM_CLOCK=wall)."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(UTC)

    def observe(self, occurred_at: dt.datetime) -> None:
        """Wall time ignores event time."""


class EventClock:
    """Time is the largest event time seen (OMNICRM_CLOCK=event), so replays fire identically.

    The watermark never moves backwards: a late event does not rewind time.
    """

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._watermark = _aware(start) if start is not None else EPOCH

    def now(self) -> dt.datetime:
        return self._watermark

    def observe(self, occurred_at: dt.datetime) -> None:
        occurred_at = _aware(occurred_at)
        if occurred_at > self._watermark:
            self._watermark = occurred_at


class FixedClock:
    """A clock set by hand, for tests and the admin scan's `as_of`."""

    def __init__(self, at: dt.datetime) -> None:
        self._at = _aware(at)

    def now(self) -> dt.datetime:
        return self._at

    def set(self, at: dt.datetime) -> None:
        self._at = _aware(at)

    def advance(self, delta: dt.timedelta) -> None:
        self._at += delta

    def observe(self, occurred_at: dt.datetime) -> None:
        """A fixed clock ignores event time."""


def make_clock(mode: str) -> Clock:
    """The clock for OMNICRM_CLOCK."""
    return EventClock() if mode == "event" else WallClock()


def _aware(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError("naive datetime: business time must carry a time zone")
    return value.astimezone(UTC)


def to_millis(value: dt.datetime) -> int:
    """UTC epoch milliseconds of an aware datetime."""
    return int(_aware(value).timestamp() * 1000)


def from_millis(ms: int) -> dt.datetime:
    """Aware UTC datetime from epoch milliseconds."""
    return EPOCH + dt.timedelta(milliseconds=ms)
