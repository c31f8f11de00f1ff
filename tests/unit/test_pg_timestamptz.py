"""shared.pg_timestamptz gives asyncpg's values: microseconds since 2000-01-01 UTC, both ways, for
every value asyncpg's own codec accepts; compiled and as source."""

from __future__ import annotations

import datetime as dt
import importlib.util
from types import ModuleType
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import pg_timestamptz
from shared.compiled import source_of

PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
MICROSECOND = dt.timedelta(microseconds=1)


def _as_source() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pg_timestamptz_source", source_of("shared.pg_timestamptz"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOURCE = _as_source()
MODULES = pytest.mark.parametrize("codec", [pg_timestamptz, SOURCE], ids=["as_built", "source"])


PG_INFINITY, PG_NEGATIVE_INFINITY = 0x7FFFFFFFFFFFFFFF, -0x8000000000000000
FIRST = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
LAST = dt.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=dt.UTC)


def expected_micros(value: dt.datetime) -> int:
    """asyncpg's value: microseconds since 2000-01-01 UTC; Python's first and last instants are the
    infinities."""
    at = value.astimezone(dt.UTC)
    if at == FIRST:
        return PG_NEGATIVE_INFINITY
    return PG_INFINITY if at == LAST else (at - PG_EPOCH) // MICROSECOND


def test_the_built_module_is_compiled_where_the_hot_modules_are():
    """make install compiles it; the source copy is the one loaded from its .py."""
    assert pg_timestamptz.COMPILED == pg_timestamptz.__file__.endswith(".so")
    assert SOURCE.COMPILED is False


@MODULES
@given(st.datetimes(timezones=st.just(dt.UTC)))
def test_utc_values_round_trip_to_asyncpgs_microseconds(codec, value):
    (micros,) = codec.encode(value)
    assert micros == expected_micros(value)
    back = codec.decode((micros,))
    if value in (FIRST, LAST):
        assert back in (dt.datetime.min, dt.datetime.max)
    else:
        assert back == value and back.tzinfo is dt.UTC


@MODULES
@given(st.datetimes(min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 30),
                    timezones=st.sampled_from([ZoneInfo("America/New_York"), ZoneInfo("Asia/Kolkata"),
                                               dt.timezone(dt.timedelta(hours=-3, minutes=-30)),
                                               dt.timezone(dt.timedelta(0), "Z")])))
def test_other_zones_encode_the_same_instant(codec, value):
    (micros,) = codec.encode(value)
    assert micros == expected_micros(value)
    assert codec.decode((micros,)) == value.astimezone(dt.UTC)  # the same instant (a gap's too), in UTC


@MODULES
def test_naive_values_dates_and_subclasses_follow_asyncpgs_rules(codec):
    naive = dt.datetime(2026, 5, 17, 12, 30)
    assert codec.encode(naive) == (expected_micros(naive.astimezone()),)  # local time, as asyncpg reads it
    day = dt.date(2026, 5, 17)
    local = dt.datetime.now(dt.UTC).astimezone().utcoffset()
    assert codec.encode(day) == (expected_micros(dt.datetime(2026, 5, 17, tzinfo=dt.timezone(local))),)

    class Stamp(dt.datetime):
        pass

    stamp = Stamp(2026, 5, 17, 12, 30, 0, 7, tzinfo=dt.UTC)
    assert codec.encode(stamp) == (expected_micros(stamp),)
    with pytest.raises(TypeError, match="expected a datetime.date or datetime.datetime instance, got 'str'"):
        codec.encode("2026-05-17")


@MODULES
def test_postgresqls_infinities_are_asyncpgs_naive_extremes(codec):
    assert codec.decode((0x7FFFFFFFFFFFFFFF,)) == dt.datetime.max
    assert codec.decode((-0x8000000000000000,)) == dt.datetime.min
    assert codec.encode(dt.datetime.max) == (0x7FFFFFFFFFFFFFFF,)
    assert codec.encode(dt.datetime.min) == (-0x8000000000000000,)
    # asyncpg writes the aware extremes as the infinities too
    assert codec.encode(FIRST) == (PG_NEGATIVE_INFINITY,) and codec.encode(LAST) == (PG_INFINITY,)
    assert codec.encode(FIRST + MICROSECOND) == ((FIRST + MICROSECOND - PG_EPOCH) // MICROSECOND,)


@MODULES
def test_a_stored_value_past_pythons_range_is_an_overflow_not_a_wrong_date(codec):
    year_10000 = (dt.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=dt.UTC) - PG_EPOCH) // MICROSECOND + 1
    with pytest.raises(OverflowError):
        codec.decode((year_10000,))
