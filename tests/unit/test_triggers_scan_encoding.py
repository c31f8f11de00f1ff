"""The scan's one-loop encoder writes, for every scan row, the trigger id, offer code and value that
rules.trigger_id and the codec give the same trigger."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from services.triggers import rules as R
from services.triggers import store
from services.triggers.handlers import TriggersHandler, _millis
from services.triggers.rules import Offer, RuleConfig
from shared.avro import AvroCodec, SchemaRegistry
from shared.clock import FixedClock
from shared.rules import load_rules
from shared.topics import TRIGGER

CFG = RuleConfig.from_rules(load_rules(environ={}))
AS_OF = dt.datetime(2026, 6, 15, 12, tzinfo=dt.UTC)
CODEC = AvroCodec(SchemaRegistry.load())
BIRTHDAY = ("Birthday: 50 off a 300 spend", 5000, 30000, "USD")
WIN_BACK = ("We miss you: 20.00 off \u00e9", 2000, 0, "USD", _millis(AS_OF + dt.timedelta(days=14)))


def _text(rng: random.Random, longest: int) -> str:
    return "".join(rng.choice("ab\u00e9\u4e2d-:\x1f ") for _ in range(rng.randint(0, longest)))


def _rows(seed: int, n: int) -> list[tuple]:
    rng = random.Random(seed)
    kinds = [*store.SCAN_CONTEXT_KEYS, None]
    rows = []
    for rn in range(n):
        kind = rng.choice(kinds)
        keys = store.SCAN_CONTEXT_KEYS.get(kind, ())
        cid = f"c{rn}" if rng.random() < 0.8 else "c-" + _text(rng, 80)  # ids past 63 bytes: longer lengths
        period = "2026" if rng.random() < 0.5 else _text(rng, 90)
        values = [rng.choice([None, "2026-06-18", str(rng.randint(0, 500)), _text(rng, 12), _text(rng, 70)])
                  for _ in keys]
        occurred = rng.choice([None, _millis(AS_OF) - rng.randint(0, 10**10), -rng.randint(1, 10**12)])
        rows.append((rn + 1, cid, kind, period, occurred, values, _millis(AS_OF) + rng.randint(0, 10**9)))
    return rows


def _expected(rows: list[tuple], skip: set[str]) -> list[tuple]:
    out = []
    for rn, cid, kind, period, occurred_ms, values, expires_ms in rows:
        if kind is None or cid in skip:
            continue
        tid = R.trigger_id(kind, cid, period)
        code = offer = None
        if kind == "birthday_coupon":
            code = "BDAY-" + tid.replace("-", "")[:10].upper()
            offer = dict(zip(("code", "description", "amount", "min_spend", "currency", "expires_at"),
                             (code, *BIRTHDAY, expires_ms), strict=True))
        elif kind == "win_back":
            code = "BACK-" + tid.replace("-", "")[:10].upper()
            offer = dict(zip(("code", "description", "amount", "min_spend", "currency", "expires_at"),
                             (code, *WIN_BACK), strict=True))
        context = {k: v for k, v in zip(store.SCAN_CONTEXT_KEYS[kind], values, strict=True) if v is not None}
        value = CODEC.encode(TRIGGER, {"trigger_id": tid, "kind": kind, "customer_id": cid,
                                       "fired_at": _millis(AS_OF), "period": period, "context": context,
                                       "cause_event_id": None, "occurred_at": occurred_ms, "offer": offer})
        out.append((rn, tid, code, cid.encode(), value))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_scan_rows_are_what_the_codec_writes(seed):
    encoder = TriggersHandler(codec=CODEC, cfg=CFG, clock=FixedClock(AS_OF))._encoder
    assert encoder.fast
    rows = _rows(seed, 3000)
    skip = {r[1] for r in rows if r[2] is None} | {r[1] for r in rows[::50]}
    assert encoder.scan_rows(rows, skip, _millis(AS_OF), BIRTHDAY, WIN_BACK) == _expected(rows, skip)


def test_scan_rows_match_the_encoder_of_fired_triggers():
    """The same bytes as the encoder the batch path uses for a Trigger (make_trigger's)."""
    handler = TriggersHandler(codec=CODEC, cfg=CFG, clock=FixedClock(AS_OF))
    occurred = AS_OF - dt.timedelta(days=90)
    period = occurred.isoformat()
    t = R.make_trigger("win_back", "c42", period, AS_OF, occurred_at=occurred,
                       context={"days_since_last_purchase": "90", "last_purchase_date": "2026-03-17",
                                "orders_count": "3"},
                       offer=Offer("BACK-" + R.trigger_id("win_back", "c42", period).replace("-", "")[:10].upper(),
                                   WIN_BACK[0], WIN_BACK[1], WIN_BACK[2], WIN_BACK[3],
                                   AS_OF + dt.timedelta(days=14)))
    row = (7, "c42", "win_back", period, _millis(occurred), ["90", "2026-03-17", None, "3"], None)
    [(rn, tid, code, key, value)] = handler._encoder.scan_rows([row], set(), _millis(AS_OF), BIRTHDAY, WIN_BACK)
    assert (rn, tid, code, key) == (7, t.trigger_id, t.offer.code, b"c42")
    assert value == handler._encoder.trigger(t)
