"""`make demo`'s entry point, headless: `omnicrm up` starts everything, feeds a generated day and
its dashboard shows traffic in every service; then it stops cleanly on its own."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid

from shared.stack import create_database, drop_database, free_port
from tests.conftest import ROOT
from tests.support.pipeline import SERVICES


def test_up_feeds_traffic_through_every_service(pg_server: str, tmp_path) -> None:
    name = f"omnicrm_demo_{uuid.uuid4().hex[:8]}"
    dsn = asyncio.run(create_database(pg_server, name))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMNICRM_", "KAFKA_")) and k != "DATABASE_URL"}
    env.update({"DATABASE_URL": dsn, "OMNICRM_HOME": str(tmp_path / "home"),
                "OMNICRM_BROKER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1",
                **{f"OMNICRM_{s.upper()}_PORT": str(free_port()) for s in SERVICES}})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "shared.cli", "up", "--no-dashboard", "--duration", "35",
             "--day-minutes", "0.25", "--customers", "400", "--seed", "77"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    finally:
        asyncio.run(drop_database(pg_server, name))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "omnicrm is up" in output and "stopped" in output
    handled = [line for line in done.stdout.splitlines() if line.startswith("handled: ")][-1]
    counts = {m.group(1): int(m.group(2).replace(",", ""))
              for m in re.finditer(r"(\w+) ([\d,]+)", handled.split(";")[0])}
    for service in SERVICES:
        assert counts.get(service, 0) > 0, f"{service} shows no traffic: {handled}"
    final = re.findall(r"traffic: ([\d,]+)/([\d,]+) events sent, ([\d,]+) accepted, ([\d,]+) "
                       r"rejected \(([\d,]+) malformed on purpose\)", output)[-1]
    sent, total, accepted, rejected, malformed = (int(x.replace(",", "")) for x in final)
    assert sent == total > 500, "the whole generated day went out"
    assert rejected == malformed > 0, "ingestion rejects exactly the deliberately malformed events"
    dupes = re.findall(r"malformed on purpose\), ([\d,]+) duplicates", output)
    duplicates = int(dupes[-1].replace(",", "")) if dupes else 0  # a retried batch, if any
    assert accepted + duplicates == sent - malformed
