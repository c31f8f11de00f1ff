"""The HTTP edge rules that need no server: token buckets, content types, settings."""

from __future__ import annotations

import pytest

from services.ingestion.api import is_json_media
from services.ingestion.config import IngestionConfig
from services.ingestion.handlers import decode_raw
from services.ingestion.ratelimit import TokenBuckets, retry_after_header
from shared.errors import ConfigError, PermanentError
from shared.topics import INGEST_RAW


def test_bucket_allows_a_burst_then_refills_at_the_rate():
    b = TokenBuckets(rate=100, burst=200)
    assert b.take("pos", 200, now=0.0) == 0.0
    wait = b.take("pos", 50, now=0.0)
    assert wait == pytest.approx(0.5)
    assert b.take("pos", 50, now=0.5) == 0.0
    assert b.take("pos", 1, now=0.5) > 0


def test_buckets_are_per_key():
    b = TokenBuckets(rate=10, burst=20)
    assert b.take("a", 20, now=0.0) == 0.0
    assert b.take("a", 1, now=0.0) > 0
    assert b.take("b", 20, now=0.0) == 0.0


def test_refill_never_exceeds_the_burst():
    b = TokenBuckets(rate=10, burst=20)
    b.take("a", 20, now=0.0)
    assert b.take("a", 20, now=1000.0) == 0.0
    assert b.take("a", 1, now=1000.0) > 0


def test_request_larger_than_the_burst_needs_a_full_bucket():
    b = TokenBuckets(rate=10, burst=20)
    assert b.take("a", 1000, now=0.0) == 0.0
    assert b.take("a", 1000, now=1.0) == pytest.approx(1.0)


def test_retry_after_is_whole_seconds_at_least_one():
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(1.2) == "2"


@pytest.mark.parametrize(("value", "ok"), [
    ("application/json", True), ("application/json; charset=utf-8", True), ("Application/JSON", True),
    ("application/vnd.api+json", True), ("text/plain", False), ("application/x-www-form-urlencoded", False),
    ("multipart/form-data; boundary=x", False), (None, False), ("", False), ("text/json", False),
])
def test_json_media_types(value, ok):
    assert is_json_media(value) is ok


def test_rate_limit_setting():
    assert IngestionConfig.from_env({}).rate_limit_per_second == 2000
    assert IngestionConfig.from_env({"OMNICRM_RATE_LIMIT_PER_SECOND": "50"}).rate_limit_per_second == 50
    assert IngestionConfig.from_env({"OMNICRM_RATE_LIMIT_PER_SECOND": "0"}).rate_limit_per_second == 0
    for bad in ("fast", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="OMNICRM_RATE_LIMIT_PER_SECOND"):
            IngestionConfig.from_env({"OMNICRM_RATE_LIMIT_PER_SECOND": bad})


@pytest.mark.parametrize(("value", "reason"), [
    (None, "malformed_json"), (b"", "malformed_json"), (b"{not json", "malformed_json"),
    (b"\xff\xfe", "malformed_json"), (b"[" * 40 + b"]" * 40, "too_deep"),
])
def test_raw_decoder_dead_letters_what_is_not_json(value, reason):
    with pytest.raises(PermanentError) as info:
        decode_raw(INGEST_RAW, value)
    assert info.value.reason == reason


def test_raw_decoder_reads_json():
    assert decode_raw(INGEST_RAW, b'{"event_id": "e"}') == {"event_id": "e"}
