"""Typed settings read once from the environment (CONTRACTS §1)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ConfigError

SERVICE_PORTS: dict[str, int] = {
    "ingestion": 8000,
    "identity": 8001,
    "loyalty": 8002,
    "triggers": 8003,
    "notifications": 8004,
}
SCOPES = frozenset({"ingest", "read", "read_pii", "admin"})
CLOCK_MODES = ("wall", "event")
DELIVERY_MODES = ("live", "sandbox")
DEV_KEY_NAME = "dev"
DEV_KEY_SECRET = "omnicrm-dev-key"


@dataclass(frozen=True)
class ApiKey:
    """An API key: its name (recorded as the source of what it publishes), secret and scopes."""

    name: str
    secret: str = field(repr=False)
    scopes: frozenset[str]


@dataclass(frozen=True)
class Settings:
    """Everything a service needs from its environment, validated."""

    kafka_bootstrap_servers: str | None
    database_url: str | None
    api_keys: tuple[ApiKey, ...]
    shopify_webhook_secret: str | None = field(repr=False, default=None)
    clock: str = "wall"
    delivery: str = "sandbox"
    base_currency: str = "USD"
    rules_path: str | None = None
    home: Path = Path(".omnicrm")
    host: str = "127.0.0.1"
    ports: Mapping[str, int] = field(default_factory=lambda: dict(SERVICE_PORTS))
    partitions: int = 4
    # Batches of different partitions a worker applies at once (shared/batch_consumer.py).
    consumer_lanes: int = 4
    log_level: str = "INFO"
    embedded: bool = True

    def port(self, service: str) -> int:
        return self.ports[service]

    @property
    def kafka(self) -> str:
        if not self.kafka_bootstrap_servers:
            raise ConfigError("KAFKA_BOOTSTRAP_SERVERS", "no broker configured")
        return self.kafka_bootstrap_servers

    @property
    def dsn(self) -> str:
        if not self.database_url:
            raise ConfigError("DATABASE_URL", "no database configured")
        return self.database_url


def parse_api_keys(raw: str, variable: str = "OMNICRM_API_KEYS") -> tuple[ApiKey, ...]:
    """Parse `name:secret:scope|scope,...`; any malformed entry is an error naming the variable."""
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for position, entry in enumerate(p.strip() for p in raw.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise ConfigError(variable, f"entry {position + 1} is not name:secret:scopes")
        name, secret, scopes_raw = parts
        scopes = frozenset(s.strip() for s in scopes_raw.split("|") if s.strip())
        unknown = scopes - SCOPES
        if unknown or not scopes:
            raise ConfigError(
                variable,
                f"entry {position + 1} ({name}) has unknown or no scopes "
                f"{sorted(unknown)}; allowed: {sorted(SCOPES)}",
            )
        if name in seen:
            raise ConfigError(variable, f"key name {name!r} appears twice")
        seen.add(name)
        keys.append(ApiKey(name=name, secret=secret, scopes=scopes))
    return tuple(keys)


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """A secret from NAME, or from the file named by NAME_FILE."""
    if env.get(name):
        return env[name]
    path = env.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE", f"cannot read {path}: {exc.strerror}") from exc
    return None


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in allowed:
        raise ConfigError(name, f"must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, low: int = 1, high: int = 65535) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(name, f"must be an integer, got {raw!r}") from exc
    if not low <= value <= high:
        raise ConfigError(name, f"must be between {low} and {high}, got {value}")
    return value


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the environment; raise ConfigError naming the variable on a bad value."""
    env = os.environ if environ is None else environ
    kafka = env.get("KAFKA_BOOTSTRAP_SERVERS", "").strip() or None
    if kafka is not None:
        for server in kafka.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError("KAFKA_BOOTSTRAP_SERVERS", f"{server!r} is not host:port")
    dsn = env.get("DATABASE_URL", "").strip() or None
    if dsn is not None and not dsn.startswith(("postgres://", "postgresql://")):
        raise ConfigError("DATABASE_URL", "must be a postgresql:// URL")
    raw_keys = _secret(env, "OMNICRM_API_KEYS")
    embedded = env.get("OMNICRM_EMBEDDED", "1") not in ("0", "false", "no")
    if raw_keys:
        keys = parse_api_keys(raw_keys)
    elif embedded:
        keys = (ApiKey(DEV_KEY_NAME, DEV_KEY_SECRET, SCOPES),)
    else:
        raise ConfigError("OMNICRM_API_KEYS", "required outside embedded mode")
    currency = (env.get("OMNICRM_BASE_CURRENCY", "").strip() or "USD").upper()
    if len(currency) != 3 or not currency.isalpha():
        raise ConfigError("OMNICRM_BASE_CURRENCY", f"must be an ISO 4217 code, got {currency!r}")
    ports = dict(SERVICE_PORTS)
    for service in SERVICE_PORTS:
        ports[service] = _int(env, f"OMNICRM_{service.upper()}_PORT", SERVICE_PORTS[service])
    return Settings(
        kafka_bootstrap_servers=kafka,
        database_url=dsn,
        api_keys=keys,
        shopify_webhook_secret=_secret(env, "OMNICRM_SHOPIFY_WEBHOOK_SECRET"),
        clock=_choice(env, "OMNICRM_CLOCK", CLOCK_MODES, "wall"),
        delivery=_choice(env, "OMNICRM_DELIVERY", DELIVERY_MODES, "sandbox" if embedded else "live"),
        base_currency=currency,
        rules_path=env.get("OMNICRM_RULES") or None,
        home=Path(env.get("OMNICRM_HOME", ".omnicrm")),
        host=env.get("OMNICRM_HOST", "127.0.0.1"),
        ports=ports,
        partitions=_int(env, "OMNICRM_PARTITIONS", 4, 1, 256),
        consumer_lanes=_int(env, "OMNICRM_CONSUMER_LANES", 4, 1, 64),
        log_level=_choice(env, "OMNICRM_LOG_LEVEL", ("debug", "info", "warning", "error"), "info").upper(),
        embedded=embedded,
    )
