"""Per-key token buckets: each API key may publish `rate` events/s with bursts of `burst` events.

Pure: the caller passes the monotonic time, so tests drive it by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """One bucket per key, refilled continuously; a request costs one token per event."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, cost: int, now: float) -> float:
        """Spend `cost` tokens of `key`'s bucket: 0.0 when allowed, else seconds until it would be."""
        # A request larger than the bucket is allowed from a full bucket rather than never.
        cost = min(float(cost), self.burst)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self.rate

    def give_back(self, key: str, cost: int) -> None:
        """Undo a `take` that was allowed (the request was refused for another reason after it):
        the bucket is as if that request had not come."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(self.burst, bucket.tokens + min(float(cost), self.burst))


def retry_after_header(wait_seconds: float) -> str:
    """Retry-After is whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_seconds)))
