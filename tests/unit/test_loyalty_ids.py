"""Loyalty's derived ids are exactly uuid5 in the loyalty namespace."""

from __future__ import annotations

import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from services.loyalty.ledger import LOYALTY_NAMESPACE, derived_id, entry_id


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=5))
def test_derived_ids_are_uuid5_of_the_joined_parts(parts):
    assert derived_id(*parts) == str(uuid.uuid5(LOYALTY_NAMESPACE, "|".join(parts)))


def test_entry_ids_are_stable():
    assert entry_id("ev-1", "earn") == str(uuid.uuid5(LOYALTY_NAMESPACE, "entry|ev-1|earn"))
