"""The scan's chunks: every candidate once, in order; staggered sizes only when they make whole rounds."""

from __future__ import annotations

import pytest

from services.triggers.handlers import _scan_parts


@pytest.mark.parametrize(("n", "size", "connections"), [(0, 5000, 2), (1, 5000, 2), (12_000, 5000, 2),
                                                        (277_770, 69_443, 2), (277_770, 69_443, 1),
                                                        (600_000, 50_000, 3), (100_000, 25_000, 3)])
def test_parts_hold_every_candidate_once_in_order(n, size, connections):
    ids = [f"c{i:07d}" for i in range(n)]
    parts = _scan_parts(ids, size, connections)
    assert [i for p in parts for i in p] == ids
    assert all(parts)


def test_two_connections_start_apart_and_finish_together():
    parts = _scan_parts([str(i) for i in range(400_000)], 100_000, 2)
    sizes = [len(p) for p in parts]
    assert sizes == [60_000, 120_000, 140_000, 80_000]
    # Each connection takes the next chunk when free: the first finishes its small chunk first.
    assert sizes[0] + sizes[2] == sizes[1] + sizes[3]


def test_equal_chunks_when_they_make_no_whole_rounds():
    assert [len(p) for p in _scan_parts([str(i) for i in range(12_000)], 5000, 2)] == [5000, 5000, 2000]
    assert [len(p) for p in _scan_parts([str(i) for i in range(20_000)], 5000, 1)] == [5000] * 4
