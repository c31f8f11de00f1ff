"""asyncpg's `timestamptz` conversion, done in C for the values the services hold: aware datetimes in UTC.

Why: asyncpg's own codec converts each value through Python-level datetime arithmetic (astimezone,
a timedelta, attribute reads). In a perf profile of loyalty's worker (2026-12-08) it took 10.9% of the
CPU: the ledger and order rows it copies carry two timestamps each, the accounts and orders it reads
two or three. Compiled, `encode`/`decode` read and build the datetime's fields through CPython's C
API: a value costs 80 and 100 ns in a loop; through asyncpg, client CPU a value, 0.10 against 0.65 µs
to copy and 0.47 against 0.85-1.0 µs to fetch (200,000 values, asyncpg 0.32, alternating runs).

The values are the same as asyncpg's: microseconds since 2000-01-01 UTC (the `tuple` exchange
format). Anything but an exact `datetime` in `datetime.UTC` (another zone, a naive or `date` value,
a subclass) takes asyncpg's own rules, written here in Python. As asyncpg does, the first and last
instants Python has (0001-01-01 and 9999-12-31 23:59:59.999999 UTC) are written as PostgreSQL's
-infinity and infinity, and those are read as naive `datetime.min` and `datetime.max`.
`shared.db` installs the codec only when this module runs compiled (`COMPILED`): as source it would
be slower than asyncpg's.
"""

from __future__ import annotations

import datetime as dt

try:
    import cython
except ImportError:  # running as source without Cython: its declarations mean nothing
    from shared import nocython as cython
if not cython.compiled:
    from shared import nocython as cython
else:
    from cython.cimports.cpython.datetime import (
        PyDateTime_CheckExact,
        PyDateTime_DATE_GET_HOUR,
        PyDateTime_DATE_GET_MICROSECOND,
        PyDateTime_DATE_GET_MINUTE,
        PyDateTime_DATE_GET_SECOND,
        PyDateTime_GET_DAY,
        PyDateTime_GET_MONTH,
        PyDateTime_GET_YEAR,
        datetime_new,
        datetime_tzinfo,
        import_datetime,
    )
    import_datetime()

COMPILED: bool = cython.compiled

_UTC = dt.UTC
_PG_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
# C constants compiled (a Python global in C arithmetic would box every operand).
_PG_EPOCH_DAYS = cython.declare(cython.longlong, 10_957)  # 2000-01-01 in days from 1970-01-01
_DAY_US = cython.declare(cython.longlong, 86_400_000_000)
# PostgreSQL's infinities and what asyncpg maps them to (naive datetimes, as asyncpg does).
_PG_INFINITY = cython.declare(cython.longlong, 0x7FFFFFFFFFFFFFFF)
_PG_NEGATIVE_INFINITY = cython.declare(cython.longlong, -0x8000000000000000)
_INFINITY = dt.datetime.max  # noqa: DTZ901 - naive, as asyncpg returns it
_NEGATIVE_INFINITY = dt.datetime.min  # noqa: DTZ901
# asyncpg writes Python's first and last instants (in UTC, of any zone) as the infinities too.
_MIN_MICROS = cython.declare(cython.longlong, -63_082_281_600_000_000)
_MAX_MICROS = cython.declare(cython.longlong, 252_455_615_999_999_999)
_MIN_YEAR = cython.declare(cython.longlong, dt.MINYEAR)
_MAX_YEAR = cython.declare(cython.longlong, dt.MAXYEAR)


# (Types by @cython.locals: the hot modules are compiled with annotation typing off, shared.compiled.)
@cython.cfunc
@cython.inline
@cython.exceptval(check=False)
@cython.returns(cython.longlong)
@cython.locals(y=cython.longlong, m=cython.longlong, d=cython.longlong, era=cython.longlong,
               yoe=cython.longlong, doy=cython.longlong, doe=cython.longlong)
def _days_from_civil(y, m, d):
    """Days from 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil)."""
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468


@cython.locals(days=cython.longlong, seconds=cython.longlong, micros=cython.longlong)
def encode(value: object) -> tuple[int]:
    """A timestamptz as asyncpg's tuple format: (microseconds since 2000-01-01 UTC,)."""
    if cython.compiled:
        if PyDateTime_CheckExact(value) and datetime_tzinfo(value) is _UTC:
            days = _days_from_civil(
                PyDateTime_GET_YEAR(value), PyDateTime_GET_MONTH(value), PyDateTime_GET_DAY(value))
            seconds = ((days - _PG_EPOCH_DAYS) * 86_400 + PyDateTime_DATE_GET_HOUR(value) * 3600
                       + PyDateTime_DATE_GET_MINUTE(value) * 60 + PyDateTime_DATE_GET_SECOND(value))
            micros = seconds * 1_000_000 + PyDateTime_DATE_GET_MICROSECOND(value)
            if micros != _MIN_MICROS and micros != _MAX_MICROS:
                return (micros,)
            return (_PG_NEGATIVE_INFINITY if micros == _MIN_MICROS else _PG_INFINITY,)
    return (_encode_any(value),)


def _encode_any(value: object) -> int:
    """asyncpg's timestamptz encoding, for any value it accepts."""
    if not isinstance(value, dt.datetime):
        if not isinstance(value, dt.date):
            raise TypeError(f"expected a datetime.date or datetime.datetime instance, "
                            f"got {type(value).__name__!r}")
        local = dt.datetime.now(dt.UTC).astimezone()
        value = dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone(local.utcoffset()))
    if value == _INFINITY:
        return _PG_INFINITY
    if value == _NEGATIVE_INFINITY:
        return _PG_NEGATIVE_INFINITY
    delta = value.astimezone(_UTC) - _PG_EPOCH
    micros = delta.days * _DAY_US + delta.seconds * 1_000_000 + delta.microseconds
    if micros == _MIN_MICROS:
        return _PG_NEGATIVE_INFINITY
    return _PG_INFINITY if micros == _MAX_MICROS else micros


@cython.locals(us=cython.longlong, secs=cython.longlong, micro=cython.longlong, day=cython.longlong,
               sod=cython.longlong, z=cython.longlong, era=cython.longlong, doe=cython.longlong,
               yoe=cython.longlong, doy=cython.longlong, mp=cython.longlong, d=cython.longlong, m=cython.longlong,
               y=cython.longlong)
def decode(value: tuple[int]) -> dt.datetime:
    """An aware datetime in UTC from asyncpg's tuple format; the infinities as asyncpg returns them."""
    us = value[0]
    if us == _PG_INFINITY:
        return _INFINITY
    if us == _PG_NEGATIVE_INFINITY:
        return _NEGATIVE_INFINITY
    if not cython.compiled:
        return _PG_EPOCH + dt.timedelta(microseconds=us)
    # civil_from_days (H. Hinnant), on days from 1970-01-01
    secs = us // 1_000_000
    micro = us - secs * 1_000_000
    day = secs // 86_400
    sod = secs - day * 86_400
    z = day + _PG_EPOCH_DAYS + 719_468
    era = (z if z >= 0 else z - 146_096) // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    y = yoe + era * 400 + (1 if m <= 2 else 0)
    if y < _MIN_YEAR or y > _MAX_YEAR:
        raise OverflowError("date value out of range")  # as asyncpg's timedelta arithmetic raises
    return datetime_new(y, m, d, sod // 3600, (sod // 60) % 60, sod % 60, micro, _UTC)
