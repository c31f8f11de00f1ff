"""Properties of the loyalty book under any sequence of sales, returns, redemptions, expiry and
merges: the balance is the sum of the ledger and never negative, no points appear from nothing,
a whole-order return leaves the member as if the sale never happened, and replays change nothing."""

from __future__ import annotations

import datetime as dt

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.loyalty import rules as R
from services.loyalty.book import Book
from services.loyalty.ledger import MergeCommand, Return, Sale
from shared.rules import load_rules

RULES = R.LoyaltyRules.from_config(load_rules())
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CUSTOMERS = ("c0", "c1", "c2")
CURRENCIES = ("USD", "USD", "EUR", "JPY")

step = st.one_of(
    st.tuples(st.just("sale"), st.sampled_from(CUSTOMERS), st.integers(0, 900_000),
              st.sampled_from(CURRENCIES), st.integers(0, 3000)),
    st.tuples(st.just("return"), st.integers(0, 50), st.integers(0, 900_000), st.booleans()),
    st.tuples(st.just("wait"), st.integers(1, 200)),
    st.tuples(st.just("merge"), st.sampled_from(CUSTOMERS), st.sampled_from(CUSTOMERS)),
    st.tuples(st.just("unmerge"), st.integers(0, 10)),
)


def build_commands(steps) -> list[tuple[object, dt.datetime]]:
    """Turn generated steps into commands with non-decreasing times."""
    now = T0
    out: list[tuple[object, dt.datetime]] = []
    sales: list[Sale] = []
    merges: list[MergeCommand] = []
    for i, s in enumerate(steps):
        kind = s[0]
        if kind == "wait":
            now += dt.timedelta(days=s[1])
            continue
        now += dt.timedelta(minutes=1)
        if kind == "sale":
            cmd = Sale(f"s{i}", s[1], now, f"o{i}", s[3], s[2], s[4])
            sales.append(cmd)
        elif kind == "return":
            if not sales:
                continue
            original = sales[s[1] % len(sales)]
            amount = original.total if s[3] else min(s[2], original.total)
            cmd = Return(f"r{i}", original.customer_id, now, original.order_id, f"ret{i}",
                         original.currency, amount)
        elif kind == "merge":
            if s[1] == s[2]:
                continue
            cmd = MergeCommand(f"m{i}", "merged", s[1], s[2], "test", None, now)
            merges.append(cmd)
        else:
            if not merges:
                continue
            m = merges[s[1] % len(merges)]
            cmd = MergeCommand(m.merge_id, "unmerged", m.survivor, m.merged, "admin", None, now)
        out.append((cmd, now))
    return out


def run(commands) -> Book:
    book = Book(RULES)
    for cmd, at in commands:
        book.apply(cmd, at)
        check_invariants(book)
    return book


def check_invariants(book: Book) -> None:
    ledger: dict[str, int] = {}
    for e in book.entries:
        ledger[e.customer_id] = ledger.get(e.customer_id, 0) + e.points
        assert e.balance_after >= 0
    for cid, acct in book.accounts.items():
        assert acct.balance >= 0, cid
        assert acct.balance == ledger.get(cid, 0), cid
        assert acct.balance == sum(lot.remaining for lot in acct.lots), cid
        assert all(lot.owner == cid and lot.remaining > 0 for lot in acct.lots)
        assert all(acct.orders.get(lot.order_key) is lot for lot in acct.lots)
    # No points from nothing: what members hold never exceeds what their orders earned.
    earned = sum(o.earned for o in book.orders.values())
    assert sum(a.balance for a in book.accounts.values()) <= earned
    assert sum(e.points for e in book.entries if e.kind == "earn") == earned


def state(book: Book, at: dt.datetime) -> dict:
    return {cid: (a.balance, a.tier, R.trailing_spend(a.orders.values(), at, RULES.window),
                  sorted((lot.order_key, lot.remaining) for lot in a.lots), a.merged_into)
            for cid, a in book.accounts.items() if a.balance or a.lots or a.orders or a.merged_into}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40))
def test_balance_is_the_ledger_and_never_negative(steps):
    run(build_commands(steps))


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=30), st.data())
def test_processing_any_command_twice_changes_nothing(steps, data):
    commands = build_commands(steps)
    once = run(commands)
    twice_list = []
    for cmd, at in commands:
        twice_list.append((cmd, at))
        if data.draw(st.booleans()):
            twice_list.append((cmd, at))          # re-delivered at once ...
    if commands:
        twice_list += data.draw(st.lists(st.sampled_from(commands), max_size=5))  # ... or later
    twice = run(twice_list)
    end = commands[-1][1] if commands else T0
    assert state(once, end) == state(twice, end)
    assert once.entries == twice.entries and once.notices == twice.notices


@settings(max_examples=200, deadline=None)
@given(st.lists(step, max_size=30), st.sampled_from(CUSTOMERS), st.integers(1, 2_000_000),
       st.sampled_from(CURRENCIES))
def test_a_whole_order_return_is_as_if_the_sale_never_happened(steps, customer, total, currency):
    commands = [(c, at) for c, at in build_commands(steps) if not isinstance(c, MergeCommand)]
    end = (commands[-1][1] if commands else T0) + dt.timedelta(minutes=1)
    without = run(commands)
    extra = Sale("x-sale", customer, end, "x-order", currency, total)
    undo = Return("x-return", customer, end, "x-order", "x-ret", currency, total)
    with_return = run([*commands, (extra, end), (undo, end)])
    without.catch_up(without.account(customer), end)
    s_without, s_with = state(without, end), state(with_return, end)
    # The returned order stays on record with no spend and no points; everything else is equal.
    for cid in set(s_without) | set(s_with):
        a, b = s_without.get(cid), s_with.get(cid)
        if a is None:
            assert b[0] == 0 and b[2] == 0 and b[1] == RULES.entry_tier
        else:
            assert a == b, cid


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=30))
def test_expiry_takes_only_what_is_due(steps):
    commands = build_commands(steps)
    book = run(commands)
    end = (commands[-1][1] if commands else T0) + dt.timedelta(days=800)
    book.expire_due(end)
    check_invariants(book)
    for acct in book.accounts.values():
        assert acct.balance == 0 and acct.tier == RULES.entry_tier
