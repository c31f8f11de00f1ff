"""Settings from the environment: defaults, and a clear error naming the variable when wrong."""

from __future__ import annotations

import pytest

from shared.config import DEV_KEY_NAME, load_settings, parse_api_keys
from shared.errors import ConfigError
from shared.rules import load_rules


def test_embedded_defaults():
    s = load_settings({})
    assert s.kafka_bootstrap_servers is None and s.database_url is None
    assert s.clock == "wall" and s.delivery == "sandbox" and s.base_currency == "USD"
    assert [k.name for k in s.api_keys] == [DEV_KEY_NAME]
    assert s.port("ingestion") == 8000 and s.port("notifications") == 8004
    assert s.consumer_lanes == 4


def test_values_are_read_and_normalised():
    s = load_settings({
        "KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9092,kafka-2:9092",
        "DATABASE_URL": "postgresql://u@db/omnicrm",
        "OMNICRM_API_KEYS": "pos:s3cret:ingest,bi:other:read|read_pii",
        "OMNICRM_CLOCK": "EVENT", "OMNICRM_DELIVERY": "live", "OMNICRM_BASE_CURRENCY": "eur",
        "OMNICRM_TRIGGERS_PORT": "9103", "OMNICRM_CONSUMER_LANES": "2",
    })
    assert s.clock == "event" and s.delivery == "live" and s.base_currency == "EUR"
    assert {k.name: k.scopes for k in s.api_keys} == {"pos": {"ingest"}, "bi": {"read", "read_pii"}}
    assert s.port("triggers") == 9103
    assert s.consumer_lanes == 2


@pytest.mark.parametrize(("env", "variable"), [
    ({"OMNICRM_CLOCK": "sundial"}, "OMNICRM_CLOCK"),
    ({"OMNICRM_CONSUMER_LANES": "0"}, "OMNICRM_CONSUMER_LANES"),
    ({"OMNICRM_CONSUMER_LANES": "four"}, "OMNICRM_CONSUMER_LANES"),
    ({"OMNICRM_DELIVERY": "carrier-pigeon"}, "OMNICRM_DELIVERY"),
    ({"KAFKA_BOOTSTRAP_SERVERS": "no-port-here"}, "KAFKA_BOOTSTRAP_SERVERS"),
    ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
    ({"OMNICRM_API_KEYS": "pos:secret"}, "OMNICRM_API_KEYS"),
    ({"OMNICRM_API_KEYS": "pos:secret:superuser"}, "OMNICRM_API_KEYS"),
    ({"OMNICRM_API_KEYS": "a:x:read,a:y:read"}, "OMNICRM_API_KEYS"),
    ({"OMNICRM_BASE_CURRENCY": "dollars"}, "OMNICRM_BASE_CURRENCY"),
    ({"OMNICRM_INGESTION_PORT": "eighty"}, "OMNICRM_INGESTION_PORT"),
    ({"OMNICRM_INGESTION_PORT": "70000"}, "OMNICRM_INGESTION_PORT"),
    ({"OMNICRM_EMBEDDED": "0"}, "OMNICRM_API_KEYS"),
    ({"OMNICRM_API_KEYS_FILE": "/nonexistent/keys"}, "OMNICRM_API_KEYS_FILE"),
])
def test_bad_value_names_the_variable(env, variable):
    with pytest.raises(ConfigError) as err:
        load_settings(env)
    assert err.value.variable == variable
    assert str(err.value).startswith(variable)


def test_secrets_never_appear_in_errors_or_repr():
    with pytest.raises(ConfigError) as err:
        parse_api_keys("pos:topsecret:root")
    assert "topsecret" not in str(err.value)
    s = load_settings({"OMNICRM_API_KEYS": "pos:topsecret:ingest", "OMNICRM_SHOPIFY_WEBHOOK_SECRET": "shh"})
    assert "topsecret" not in repr(s) and "shh" not in repr(s)


def test_api_keys_from_a_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("pos:fromfile:ingest\n")
    s = load_settings({"OMNICRM_API_KEYS_FILE": str(keys)})
    assert s.api_keys[0].secret == "fromfile"


def test_rules_defaults_and_env_override():
    rules = load_rules(environ={})
    assert rules["loyalty"]["points_expiry_days"] == 365
    assert rules["notifications"]["frequency_caps"] == {"per_day": 1, "per_7_days": 3}
    rules = load_rules(environ={"OMNICRM_RULE__LOYALTY__POINTS_EXPIRY_DAYS": "180",
                                "OMNICRM_RULE__TRIGGERS__WIN_BACK__LAPSE_DAYS": "60"})
    assert rules["loyalty"]["points_expiry_days"] == 180
    assert rules["triggers"]["win_back"]["lapse_days"] == 60


def test_rules_file_missing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_rules(tmp_path / "nope.yaml", environ={})
    assert err.value.variable == "OMNICRM_RULES"
