"""The fast LoyaltyEvent encoder writes exactly the bytes the generic Avro codec writes."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from services.loyalty.ledger import Notice
from services.loyalty.wire import loyalty_encoder
from shared.avro import AvroCodec, SchemaRegistry
from shared.topics import LOYALTY

CODEC = AvroCodec(SchemaRegistry.load())
ENCODE = loyalty_encoder(CODEC)
times = st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1),
                     timezones=st.just(dt.UTC))
longs = st.integers(-(2 ** 63), 2 ** 63 - 1)
text = st.text(max_size=40)


def test_the_fast_encoder_is_in_use():
    assert ENCODE.__name__ == "encode"


@settings(max_examples=400, deadline=None)
@given(st.builds(Notice, text, st.sampled_from(["points_earned", "tier_changed"]), text, times,
                 longs, longs, st.none() | text, st.none() | text, st.none() | text,
                 st.none() | text, longs, text, st.none() | times))
def test_fast_encoding_equals_the_codec(notice):
    fast = ENCODE(notice)
    assert fast == CODEC.encode(LOYALTY, notice.as_record())
    back = CODEC.decode(fast, LOYALTY)
    assert back["customer_id"] == notice.customer_id and back["points"] == notice.points
