"""Fired triggers are encoded byte for byte as the generic codec encodes them."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.triggers import rules as R
from services.triggers.handlers import _TriggerEncoder, encode_trigger
from shared.avro import AvroCodec, SchemaRegistry
from shared.errors import SchemaError
from shared.topics import TRIGGER

CODEC = AvroCodec(SchemaRegistry.load())
ENCODER = _TriggerEncoder(CODEC)
times = st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1),
                     timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-5))]))
text = st.text(max_size=16)
offers = st.builds(R.Offer, text, text, st.integers(0, 2 ** 40), st.integers(0, 2 ** 40), text, times)


def test_the_tight_encoder_is_in_use():
    assert ENCODER.fast


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["welcome", "geo_thank_you", "tier_upgrade", "win_back", "campaign"]), text, text, times,
       st.dictionaries(text, st.none() | text | st.integers(), max_size=4), st.none() | offers,
       st.none() | text, st.none() | times)
def test_event_triggers_encode_as_the_codec_does(kind, customer_id, period, fired_at, context, offer, cause,
                                                 occurred_at):
    t = R.make_trigger(kind, customer_id, period, fired_at, context=context, offer=offer, cause_event_id=cause,
                       occurred_at=occurred_at)
    mine = ENCODER.trigger(t)
    assert mine == encode_trigger(CODEC, t)
    back = CODEC.decode(mine, TRIGGER)
    assert back["cause_event_id"] == cause and back["context"] == dict(t.context)


def test_values_it_does_not_write_go_through_the_codec():
    at = dt.datetime(2026, 6, 1, 12, 0, 0, 999_999)
    naive = R.make_trigger("welcome", "c", "welcome", at, occurred_at=at, cause_event_id="e")
    assert ENCODER.trigger(naive) == encode_trigger(CODEC, naive)  # fastavro reads naive as UTC
    odd = R.Trigger("t", "welcome", "c", "welcome", at.replace(tzinfo=dt.UTC), {"n": 1})
    with pytest.raises(SchemaError):  # the codec's refusal, not a value of its own
        ENCODER.trigger(odd)
