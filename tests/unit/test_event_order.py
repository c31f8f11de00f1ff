"""Event-time order across partitions: the same logs release the same sequence however fetches
interleave, and nothing leaves while a partition that may still hold an earlier record is unknown."""

from __future__ import annotations

import datetime as dt
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.event_order import EventTimeOrder, PartitionState, event_time, time_key

T0 = dt.datetime(2026, 9, 1, tzinfo=dt.UTC)
QUIET = PartitionState(caught_up=True, polled_ms=10_000)


def at(minutes: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def test_records_leave_in_event_time_order_across_partitions():
    order = EventTimeOrder(grace_ms=100)
    order.add(("a", 0), 0, at(5), "a0@5", arrived_ms=0)
    order.add(("a", 0), 1, at(9), "a1@9", arrived_ms=0)
    order.add(("a", 1), 0, at(1), "b0@1", arrived_ms=0)
    order.add(("a", 1), 1, at(7), "b1@7", arrived_ms=0)
    states = {("a", 0): QUIET, ("a", 1): QUIET}
    assert order.release(states, limit=10) == ["b0@1", "a0@5", "b1@7", "a1@9"]
    assert order.held() == 0


def test_an_empty_partition_that_is_not_caught_up_holds_everything_back():
    order = EventTimeOrder(grace_ms=100)
    order.add(("a", 0), 0, at(5), "a0", arrived_ms=0)
    behind = PartitionState(caught_up=False, polled_ms=10_000)
    assert order.release({("a", 0): QUIET, ("a", 1): behind}, limit=10) == []
    never_fetched = PartitionState(caught_up=True, polled_ms=None)
    assert order.release({("a", 0): QUIET, ("a", 1): never_fetched}, limit=10) == []
    assert order.held() == 1


def test_caught_up_counts_only_when_confirmed_a_grace_after_the_record_arrived():
    order = EventTimeOrder(grace_ms=100)
    order.add(("a", 0), 0, at(5), "a0", arrived_ms=1_000)
    too_soon = PartitionState(caught_up=True, polled_ms=1_050)
    assert order.release({("a", 0): QUIET, ("a", 1): too_soon}, limit=10) == []
    later = PartitionState(caught_up=True, polled_ms=1_100)
    assert order.release({("a", 0): QUIET, ("a", 1): later}, limit=10) == ["a0"]


def test_a_partition_drained_by_the_release_blocks_later_records_of_the_others():
    order = EventTimeOrder(grace_ms=100)
    order.add(("a", 0), 0, at(1), "a0@1", arrived_ms=0)
    order.add(("a", 0), 1, at(2), "a1@2", arrived_ms=0)
    order.add(("a", 1), 0, at(3), "b0@3", arrived_ms=0)
    # a:0 has more to come (not caught up): once its buffer is empty, b0@3 must wait for it
    states = {("a", 0): PartitionState(False, 10_000), ("a", 1): QUIET}
    assert order.release(states, limit=10) == ["a0@1"]  # a1@2 held: more of that moment may come
    assert order.held() == 2


def test_one_moment_is_released_whole_or_not_at_all():
    order = EventTimeOrder(grace_ms=0)
    for i in range(5):
        order.add(("a", 0), i, at(i), i, arrived_ms=0)
        order.add(("a", 1), i, at(i), 10 + i, arrived_ms=0)
    states = {("a", 0): QUIET, ("a", 1): QUIET}
    # the limit would cut moment 1 in half (1 out, 11 in): the whole moment waits
    assert order.release(states, limit=3) == [0, 10]
    order.drop([("a", 1)])
    assert order.release({("a", 0): QUIET}, limit=10) == [1, 2, 3, 4]
    # a moment larger than the limit still moves
    for i in range(4):
        order.add(("a", 0), 10 + i, at(9), f"m{i}", arrived_ms=0)
    assert order.release({("a", 0): QUIET}, limit=3) == ["m0", "m1", "m2"]
    # the last moment waits while another partition may still add to it
    order.add(("a", 0), 20, at(20), "x", arrived_ms=0)
    unknown = PartitionState(caught_up=False, polled_ms=None)
    assert order.release({("a", 0): QUIET, ("a", 1): unknown}, limit=10) == []
    assert order.release({("a", 0): QUIET, ("a", 1): QUIET}, limit=10) == ["m3", "x"]


def test_records_without_time_sort_first_and_ties_break_by_partition_then_offset():
    order = EventTimeOrder(grace_ms=0)
    order.add(("b", 0), 0, at(1), "b0", arrived_ms=0)
    order.add(("a", 3), 0, at(1), "a3", arrived_ms=0)
    order.add(("c", 0), 0, None, "tombstone", arrived_ms=0)
    states = {("a", 3): QUIET, ("b", 0): QUIET, ("c", 0): QUIET}
    assert order.release(states, limit=10) == ["tombstone", "a3", "b0"]
    assert time_key(None) < time_key(at(0))


def test_a_tombstone_keeps_the_time_of_the_record_before_it_in_its_partition():
    """identity publishes a merged-away customer's tombstone right after the change that caused it:
    it must not overtake another partition's records from before that change."""
    order = EventTimeOrder(grace_ms=0)
    order.add(("profiles", 0), 0, at(10), "survivor@10", arrived_ms=0)
    order.add(("profiles", 0), 1, None, "tombstone", arrived_ms=0)
    order.add(("fired", 0), 0, at(5), "trigger@5", arrived_ms=0)
    order.add(("fired", 0), 1, at(12), "trigger@12", arrived_ms=0)
    states = {("profiles", 0): QUIET, ("fired", 0): QUIET}
    assert order.release(states, limit=10) == ["trigger@5", "survivor@10", "tombstone", "trigger@12"]
    # forgotten with the partition: after a revoke the first record again has no predecessor
    order.add(("profiles", 0), 2, at(20), "later@20", arrived_ms=0)
    order.drop([("profiles", 0)])
    order.add(("profiles", 0), 3, None, "tombstone2", arrived_ms=0)
    order.add(("fired", 0), 2, at(1), "early@1", arrived_ms=0)
    assert order.release(states, limit=10) == ["tombstone2", "early@1"]


def test_event_time_of_each_topic_shape():
    assert event_time({"occurred_at": at(1)}) == at(1)
    assert event_time({"event": {"occurred_at": at(2)}, "customer_id": "c"}) == at(2)
    assert event_time({"fired_at": at(3)}) == at(3)
    assert event_time({"updated_at": at(4)}) == at(4)
    assert event_time(None) is None

    class Command:  # what a service's own decoder may hand over (loyalty's Sale, Return ...)
        occurred_at = at(5)
    assert event_time(Command()) == at(5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 50), max_size=12), min_size=1, max_size=4), st.randoms())
def test_any_interleaving_of_fetches_releases_the_same_sequence(logs, rnd: random.Random):
    """The k-way merge depends on the logs alone, not on how fetches chunk and interleave them."""

    def run(seed: int) -> list:
        chooser = random.Random(seed)
        order = EventTimeOrder(grace_ms=0)
        fetched = [0] * len(logs)
        out: list = []
        clock = 0
        while True:
            clock += 1
            pending = [i for i, log in enumerate(logs) if fetched[i] < len(log)]
            if pending:  # one fetch of a few records of a random partition
                i = chooser.choice(pending)
                n = chooser.randint(1, 3)
                for off in range(fetched[i], min(fetched[i] + n, len(logs[i]))):
                    order.add(("t", i), off, at(logs[i][off]), (i, off), arrived_ms=clock)
                fetched[i] = min(fetched[i] + n, len(logs[i]))
            states = {("t", i): PartitionState(fetched[i] == len(log), clock + 1)
                      for i, log in enumerate(logs)}
            out += order.release(states, limit=chooser.randint(1, 5))
            if not pending and order.held() == 0:
                return out

    first = run(rnd.randint(0, 10**6))
    assert first == run(rnd.randint(0, 10**6))
    assert sorted(first) == sorted((i, off) for i, log in enumerate(logs) for off in range(len(log)))
