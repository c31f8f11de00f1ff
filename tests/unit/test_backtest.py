"""`omnicrm backtest`: the trigger rules replayed in process over a generated world, two rule sets
compared id by id; no broker, no database."""

from __future__ import annotations

import copy
import datetime as dt
import json

import orjson
import pytest
from typer.testing import CliRunner

from shared.backtest import backtest, load_rule_set, render
from shared.cli import app as cli
from shared.generator import generate, to_jsonl_line
from shared.pii import contains_pii
from shared.rules import load_rules

BASE = load_rules(environ={})


@pytest.fixture(scope="module")
def world() -> list[dict]:
    """A month of a small world, as JSON text would carry it."""
    return [json.loads(to_jsonl_line(e)) for e in generate(11, 250, 30, dt.date(2026, 3, 1))]


def with_birthday_days(days: int) -> dict:
    rules = copy.deepcopy(BASE)
    rules["triggers"]["birthday_coupon"]["days_before"] = days
    return rules


def test_changing_birthday_days_before_changes_only_birthday_coupons(world):
    result = backtest(world, BASE, with_birthday_days(10))
    kinds = result.kinds()
    assert {"birthday_coupon", "geo_thank_you", "welcome", "abandoned_cart"} <= set(kinds)
    changed = [k for k in kinds if result.current.get(k, 0) != result.new.get(k, 0)]
    assert changed == ["birthday_coupon"]
    assert result.new["birthday_coupon"] > result.current["birthday_coupon"] > 0
    assert result.differing
    for d in result.differing:
        assert set(d.only_current) | set(d.only_new) == {"birthday_coupon"}
    shown = render(result, limit=3)
    listed = [line for line in shown.splitlines() if line.startswith("  ")]
    assert len(listed) == min(3, len(result.differing))
    assert all("birthday_coupon" in line for line in listed)
    assert contains_pii(shown) == []  # customers are shown masked
    assert result.rejected > 0  # the world's deliberately malformed events are left out


def test_the_same_rules_fire_the_same_triggers(world):
    result = backtest(world, BASE, copy.deepcopy(BASE))
    assert result.current == result.new and sum(result.current.values()) > 0
    assert result.differing == []
    assert "no customer's triggers differ" in render(result)


def envelope(event_id: str, kind: str, at: str, email: str, props: dict | None = None) -> dict:
    return {"event_id": event_id, "type": kind, "occurred_at": at, "source": "pos",
            "customer": {"email": email}, "properties": props or {}}


def test_an_erased_person_seen_again_is_someone_new_and_duplicates_count_once():
    events = [envelope("e1", "signup", "2026-03-01T10:00:00+00:00", "Ann@Example.com"),
              envelope("e1", "signup", "2026-03-01T10:00:00+00:00", "Ann@Example.com"),
              envelope("e2", "erase_request", "2026-03-02T10:00:00+00:00", "ann@example.com"),
              envelope("e3", "signup", "2026-03-03T10:00:00+00:00", "ann@example.com"),
              {"event_id": "bad", "type": "sale", "occurred_at": "yesterday"}]
    result = backtest(events, BASE, BASE)
    assert (result.events, result.duplicates, result.rejected) == (3, 1, 1)
    assert result.current["welcome"] == 2


def test_cli_with_a_partial_rules_file(world, tmp_path):
    data = tmp_path / "world.jsonl"
    data.write_text("".join(to_jsonl_line(e) + "\n" for e in world), encoding="utf-8")
    rules = tmp_path / "new.yaml"
    rules.write_text("triggers:\n  birthday_coupon:\n    days_before: 10\n", encoding="utf-8")
    assert load_rule_set(rules, base=BASE)["triggers"]["geo_thank_you"] == BASE["triggers"]["geo_thank_you"]
    done = CliRunner().invoke(cli, ["backtest", "--rules", str(rules), "--input", str(data), "--json",
                                    "--limit", "5"])
    assert done.exit_code == 0, done.output
    body = orjson.loads(done.output.splitlines()[-1])
    changed = {k for k, v in body["counts"].items() if v["current"] != v["new"]}
    assert changed == {"birthday_coupon"} and 0 < len(body["customers"]) <= 5
    assert contains_pii(done.output) == []
    missing = CliRunner().invoke(cli, ["backtest", "--rules", str(rules), "--input", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "cannot read" in missing.output and "Traceback" not in missing.output
