"""The Clock: wall time live, the event-time watermark in replays."""

from __future__ import annotations

import datetime as dt

import pytest

from shared.clock import EventClock, FixedClock, WallClock, from_millis, make_clock, to_millis

T0 = dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC)


def test_event_clock_is_the_largest_event_time_seen_and_never_rewinds():
    clock = EventClock()
    clock.observe(T0)
    clock.observe(T0 + dt.timedelta(minutes=5))
    clock.observe(T0 + dt.timedelta(minutes=1))  # a late event
    assert clock.now() == T0 + dt.timedelta(minutes=5)


def test_event_clock_normalises_offsets_to_utc():
    clock = EventClock()
    clock.observe(dt.datetime(2026, 11, 22, 18, 15, tzinfo=dt.timezone(dt.timedelta(hours=8))))
    assert clock.now() == dt.datetime(2026, 11, 22, 10, 15, tzinfo=dt.UTC)
    assert clock.now().tzinfo == dt.UTC


def test_naive_times_are_refused():
    with pytest.raises(ValueError):
        EventClock().observe(dt.datetime(2026, 1, 1))


def test_wall_clock_ignores_event_time_and_is_aware():
    clock = WallClock()
    clock.observe(T0)
    assert clock.now().tzinfo is not None and clock.now() > T0 - dt.timedelta(days=3650)


def test_fixed_clock_and_mode_selection():
    clock = FixedClock(T0)
    clock.advance(dt.timedelta(hours=1))
    assert clock.now() == T0 + dt.timedelta(hours=1)
    assert isinstance(make_clock("event"), EventClock) and isinstance(make_clock("wall"), WallClock)


def test_millis_round_trip():
    assert from_millis(to_millis(T0)) == T0
