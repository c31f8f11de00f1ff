"""Ingestion's own settings (the edge limits), read once from the environment at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from shared.errors import ConfigError

MIB = 1 << 20


@dataclass(frozen=True)
class IngestionConfig:
    """Limits at the HTTP edge and the raw-topic consumer group."""

    rate_limit_per_second: float = 2000.0  # events per API key; 0 turns the limit off
    burst_factor: float = 2.0
    max_body_bytes: int = 5 * MIB
    max_events: int = 1000
    max_json_depth: int = 32
    produce_timeout_seconds: float = 30.0
    raw_group: str | None = None  # None: the runtime's `ingestion.hot`

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> IngestionConfig:
        env = os.environ if environ is None else environ
        raw = env.get("OMNICRM_RATE_LIMIT_PER_SECOND", "").strip()
        rate = cls.rate_limit_per_second
        if raw:
            try:
                rate = float(raw)
            except ValueError as exc:
                raise ConfigError("OMNICRM_RATE_LIMIT_PER_SECOND",
                                  f"must be a number of events per second, got {raw!r}") from exc
            if rate < 0 or rate != rate or rate == float("inf"):
                raise ConfigError("OMNICRM_RATE_LIMIT_PER_SECOND", "must be >= 0 (0 = no limit)")
        return cls(rate_limit_per_second=rate)
