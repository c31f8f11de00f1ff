"""The replay tools from the command line, as a developer runs them against a cluster."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys

import orjson

from shared.generator import generate
from shared.kafka import ensure_topics
from shared.publish import write_jsonl
from shared.replay import read_range
from shared.topics import INGEST_RAW
from tests.conftest import ROOT


def omnicrm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_replay_jsonl_to_the_raw_topic_then_export_it(broker, tmp_path):
    asyncio.run(ensure_topics(broker, 4))
    before = len(asyncio.run(read_range(broker, INGEST_RAW)))
    world = tmp_path / "world.jsonl"
    count = write_jsonl(generate(7, 20, 2, dt.date(2026, 11, 1), malformed_share=0.0), world)
    done = omnicrm("replay", str(world), "--speed", "max", "--rebase", "--bootstrap", broker, env={})
    assert done.returncode == 0, done.stderr
    assert f"replayed {count:,} events" in done.stderr
    out = tmp_path / "raw.jsonl"
    done = omnicrm("export", INGEST_RAW.name, "--out", str(out), "--bootstrap", broker, env={})
    assert done.returncode == 0, done.stderr
    rows = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == before + count
    mine = {r["value"]["event_id"] for r in rows}
    assert {e for e in (orjson.loads(line)["event_id"] for line in world.read_text().splitlines())} <= mine


def test_bad_options_are_one_clear_line(broker, tmp_path):
    done = omnicrm("export", "no.such.topic", "--out", str(tmp_path / "x"), "--bootstrap", broker, env={})
    assert done.returncode == 1 and done.stderr.strip().startswith("omnicrm: unknown topic")
    world = tmp_path / "w.jsonl"
    world.write_text('{"event_id": "x"}\n')
    done = omnicrm("replay", str(world), "--speed", "fast", "--bootstrap", broker, env={})
    assert done.returncode == 1 and "--speed" in done.stderr and "Traceback" not in done.stderr
