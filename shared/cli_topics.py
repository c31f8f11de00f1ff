"""`omnicrm export | replay | offsets`: the commands a developer replaying topics into a test cluster uses."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import orjson
import typer

from shared.clock import WallClock
from shared.config import load_settings
from shared.errors import ConfigError
from shared.publish import (
    Pacer,
    PublishError,
    PublishResult,
    publish_http,
    publish_kafka,
    read_jsonl,
)
from shared.replay import rebase_events, replay_export, reset_offsets, show_offsets
from shared.topics import BY_NAME


def _fail(message: str) -> None:
    typer.echo(f"omnicrm: {message}", err=True)
    raise typer.Exit(1)


def _bootstrap(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        settings = load_settings()
    except ConfigError as exc:
        _fail(str(exc))
    if not settings.kafka_bootstrap_servers:
        _fail("KAFKA_BOOTSTRAP_SERVERS: not set (or pass --bootstrap)")
    return settings.kafka_bootstrap_servers


def _time(raw: str | None, option: str) -> dt.datetime | None:
    if raw is None:
        return None
    try:
        at = dt.datetime.fromisoformat(raw)
    except ValueError:
        _fail(f"{option}: {raw!r} is not RFC 3339")
    if at.tzinfo is None:
        _fail(f"{option}: needs an offset, e.g. 2026-11-01T00:00:00+00:00")
    return at


def _speed(raw: str) -> float | None:
    if raw in ("max", "0"):
        return None
    try:
        value = float(raw.rstrip("x"))
    except ValueError:
        _fail(f"--speed: {raw!r} is not max, 1 (real time) or a factor like 10")
    if value <= 0:
        _fail("--speed must be > 0")
    return value


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(topic: str = typer.Argument(..., help="topic name, e.g. triggers.fired.v1"),
               out: Path = typer.Option(..., "--out", help="file to write"),
               fmt: str = typer.Option("jsonl", "--format", help="jsonl (decoded) or avro (object container file)"),
               since: str | None = typer.Option(None, help="first broker timestamp, RFC 3339"),
               until: str | None = typer.Option(None, help="end (exclusive), RFC 3339"),
               bootstrap: str | None = typer.Option(None, help="default: KAFKA_BOOTSTRAP_SERVERS")) -> None:
        """Dump a topic (or a time range of it) decoded to JSONL, or as an Avro container file."""
        from shared.replay import read_range, write_export

        if topic not in BY_NAME:
            _fail(f"unknown topic {topic!r}; `omnicrm topics` lists them")
        if fmt not in ("jsonl", "avro"):
            _fail("--format: jsonl or avro")
        t = BY_NAME[topic]
        records = asyncio.run(read_range(_bootstrap(bootstrap), t, _time(since, "--since"), _time(until, "--until")))
        try:
            count = write_export(records, out, fmt, t)
        except ValueError as exc:
            _fail(str(exc))
        typer.echo(f"{count:,} records of {topic} -> {out}", err=True)

    @app.command("replay")
    def replay(source: Path = typer.Argument(..., exists=True, dir_okay=False,
                                             help="an `omnicrm export` file, or JSONL events (CONTRACTS §2)"),
               speed: str = typer.Option("max", help="max, 1 (real time) or a factor such as 10"),
               rebase: bool = typer.Option(False, help="shift event times so the first happens now"),
               http: str | None = typer.Option(None, "--http", help="JSONL events: POST to this ingestion URL"),
               key: str | None = typer.Option(None, "--key", help="bearer key for --http"),
               bootstrap: str | None = typer.Option(None, help="default: KAFKA_BOOTSTRAP_SERVERS")) -> None:
        """Publish recorded traffic to a cluster: exports back to their topics, events to ingestion."""
        from rich.progress import Progress

        with source.open("rb") as fh:
            head = fh.read(4)
            fh.seek(0)
            first = fh.readline()
        is_export = head == b"Obj\x01" or (first.strip() and {"topic", "value"} <= set(orjson.loads(first)))
        factor = _speed(speed)
        with Progress(transient=True) as progress:
            task = progress.add_task(f"replaying {source.name}", total=None)
            if is_export:
                count = asyncio.run(replay_export(source, _bootstrap(bootstrap), speed=factor, rebase=rebase,
                                                  progress=lambda n: progress.update(task, completed=n)))
                progress.stop()
                typer.echo(f"replayed {count:,} records to their topics", err=True)
                return
            events = list(read_jsonl(source))
            if rebase:
                events = list(rebase_events(events, WallClock().now()))
            pacer = Pacer(speedup=factor) if factor else None
            result = PublishResult()
            try:
                if http:
                    from shared.cli import _default_key

                    asyncio.run(publish_http(events, http, key or _default_key(), pacer=pacer, result=result))
                else:
                    asyncio.run(publish_kafka(events, _bootstrap(bootstrap), pacer=pacer, result=result))
            except PublishError as exc:
                _fail(str(exc))
        typer.echo(f"replayed {len(events):,} events: {result.summary()}" if http
                   else f"replayed {result.sent:,} events to ingest.raw.v1", err=True)

    @app.command("offsets")
    def offsets(service: str = typer.Argument(..., help="ingestion, identity, loyalty, triggers or notifications"),
                group: str | None = typer.Option(None, help="consumer group (default <service>.hot)"),
                topic: list[str] = typer.Option(None, "--topic", help="topics (default: every topic the group stored)"),
                reset_to: str | None = typer.Option(None, "--reset-to", help="RFC 3339: reposition to the first record at or after it"),
                bootstrap: str | None = typer.Option(None, help="default: KAFKA_BOOTSTRAP_SERVERS")) -> None:
        """Show a service's consumer positions and lag; --reset-to repositions them for reprocessing
        (stop the service's workers first)."""
        settings = load_settings()
        dsn = settings.database_url
        if not dsn:
            _fail("DATABASE_URL: not set (positions are stored in the service's schema)")
        group = group or f"{service}.hot"
        topics = list(topic or []) or asyncio.run(_stored_topics(dsn, service, group))
        if not topics:
            _fail(f"group {group} has stored no positions in schema {service}; pass --topic")
        boot = _bootstrap(bootstrap)
        if reset_to:
            rows = asyncio.run(reset_offsets(boot, dsn, service, group, topics, _time(reset_to, "--reset-to")))
        else:
            rows = asyncio.run(show_offsets(boot, dsn, service, group, topics))
        typer.echo(f"{'topic':<28} {'part':>4} {'stored':>10} {'kafka':>10} {'end':>10} {'lag':>8}")
        for r in rows:
            typer.echo(f"{r.topic:<28} {r.partition:>4} {_n(r.stored):>10} {_n(r.committed):>10} {r.end:>10} {r.lag:>8}")


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


async def _stored_topics(dsn: str, schema: str, group: str) -> list[str]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass($1)", f"{schema}.consumer_offsets"):
            return []
        rows = await conn.fetch(f'SELECT DISTINCT topic FROM "{schema}".consumer_offsets WHERE group_id = $1', group)
        return sorted(r["topic"] for r in rows)
    finally:
        await conn.close()
