"""The `omnicrm` command: `up` runs the embedded stack with demo traffic; `generate` makes a world."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import typer

from shared.clock import WallClock
from shared.config import DEV_KEY_SECRET, SERVICE_PORTS, Settings, load_settings
from shared.errors import ConfigError, OmnicrmError
from shared.generator import MALFORMED, to_jsonl_line
from shared.generator import generate as make_world
from shared.kafka import ensure_topics
from shared.publish import (
    BackgroundPublisher,
    Pacer,
    PublishError,
    PublishResult,
    publish_http,
    publish_kafka,
    write_jsonl,
)
from shared.stack import (
    Broker,
    Postgres,
    StackError,
    child_env,
    create_database,
    drop_database,
    port_is_free,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="omnicrm: real-time customer engagement for omnichannel retailers.")
SERVICE_ORDER = ("ingestion", "identity", "loyalty", "triggers", "notifications")


def available_services() -> list[str]:
    """Services whose code exists (`up` runs what exists)."""
    root = Path(__file__).resolve().parent.parent / "services"
    return [s for s in SERVICE_ORDER
            if (root / s / "app.py").is_file() and (root / s / "__main__.py").is_file()]


def _say(message: str) -> None:
    typer.echo(message, err=False)


def _fail(message: str) -> None:
    typer.echo(f"omnicrm: {message}", err=True)
    raise typer.Exit(1)


class Stack:
    """The processes `omnicrm up` owns, stopped together."""

    def __init__(self) -> None:
        self.broker: Broker | None = None
        self.postgres: Postgres | None = None
        self.children: dict[str, subprocess.Popen] = {}

    def stop(self) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.children.clear()
        if self.broker is not None:
            self.broker.stop()
        if self.postgres is not None:
            self.postgres.stop()


def _wait_ready(name: str, url: str, proc: subprocess.Popen, timeout: float,
                log: Path = Path(".omnicrm/logs")) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{name} exited with code {proc.returncode} while starting; see {log / (name + '.log')}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise StackError(f"{name} was not ready at {url}/ready within {timeout:.0f}s; see {log / (name + '.log')}")


@app.command()
def up(no_traffic: bool = typer.Option(False, "--no-traffic", help="start idle, for a client to drive"),
       timeout: float = typer.Option(90.0, help="seconds to wait for each service to be ready"),
       customers: int = typer.Option(5000, min=1, help="customers in the demo world"),
       day_minutes: float = typer.Option(10.0, min=0.0, help="minutes the generated day takes to play (0: as fast as possible)"),
       seed: int | None = typer.Option(None, min=0, help="world seed (default: from the clock, so each run is new)"),
       duration: float = typer.Option(0.0, min=0.0, help="stop after this many seconds (0: run until Ctrl-C)"),
       dashboard: bool | None = typer.Option(None, "--dashboard/--no-dashboard", help="live dashboard (default: when the terminal is interactive)")) -> None:
    """Start broker, PostgreSQL and the services as separate processes; Ctrl-C stops everything."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        _fail(str(exc))
    home = settings.home
    (home / "logs").mkdir(parents=True, exist_ok=True)
    stack = Stack()
    traffic: BackgroundPublisher | None = None
    stopping = {"flag": False}

    def on_signal(signum, _frame) -> None:
        stopping["flag"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        for name in available_services():
            port = settings.port(name)
            if not port_is_free(settings.host, port):
                raise StackError(f"{name} port {settings.host}:{port} is already in use: free it or set OMNICRM_{name.upper()}_PORT")
        bootstrap = settings.kafka_bootstrap_servers
        if bootstrap is None:
            port = int(os.environ.get("OMNICRM_BROKER_PORT", "9092"))
            _say(f"starting the embedded broker on 127.0.0.1:{port} ...")
            stack.broker = Broker(port=port, log_path=home / "logs" / "broker.log").start()
            bootstrap = stack.broker.bootstrap
        dsn = settings.database_url
        if dsn is None:
            _say("starting embedded PostgreSQL ...")
            stack.postgres = Postgres(home=home).start()
            if stack.broker is not None:
                # The embedded broker starts empty: offsets and state kept from an earlier run
                # would point past its end, so the demo database starts empty too.
                asyncio.run(drop_database(stack.postgres.dsn, "omnicrm"))
            dsn = asyncio.run(create_database(stack.postgres.dsn, "omnicrm"))
        else:
            stack.postgres = None
            Postgres(dsn=dsn).start()
            if stack.broker is not None:
                _say("note: the embedded broker starts empty; use a fresh DATABASE_URL database "
                     "(offsets kept from an earlier run would point past its end)")
        asyncio.run(ensure_topics(bootstrap, settings.partitions))
        env = child_env(KAFKA_BOOTSTRAP_SERVERS=bootstrap, DATABASE_URL=dsn, PYTHONUNBUFFERED="1")
        services = available_services()
        if services:
            _say(f"starting {', '.join(services)} ...")
        for name in services:
            log = open(home / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
            stack.children[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"], env=env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        for name in services:
            url = f"http://{settings.host}:{settings.port(name)}"
            _wait_ready(name, url, stack.children[name], timeout, home / "logs")
            _say(f"  {name:<14} {url}  ready")
        if settings.api_keys and settings.api_keys[0].secret == DEV_KEY_SECRET:
            _say(f"dev API key (all scopes): {DEV_KEY_SECRET}")
        _say(f"broker {bootstrap}; logs in {home / 'logs'}")
        if not services:
            _say("no services are installed yet: broker and database are up")
        _say("omnicrm is up; Ctrl-C stops everything")
        if not no_traffic and "ingestion" in services:
            traffic = _start_traffic(settings, customers, day_minutes, seed)
        elif not no_traffic:
            _say("no ingestion service installed: no demo traffic")
        _watch(stack, settings, services, traffic, duration, dashboard)
    except KeyboardInterrupt:
        _say("stopping ...")
    except (StackError, OmnicrmError) as exc:
        typer.echo(f"omnicrm: {exc}", err=True)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if traffic is not None:
            traffic.stop()
            _say(f"traffic: {traffic.status()}")
            if traffic.error:
                typer.echo(f"omnicrm: traffic: {traffic.error}", err=True)
        stack.stop()
    if code == 0:
        _say("stopped")
    raise typer.Exit(code)


def _ingest_key(settings: Settings) -> str:
    """The secret of the first key allowed to publish (the dev key in embedded mode)."""
    for key in settings.api_keys:
        if "ingest" in key.scopes:
            return key.secret
    raise StackError("no API key in OMNICRM_API_KEYS has the ingest scope: the demo traffic cannot be published")


def _read_key(settings: Settings) -> str:
    """A key allowed to read (the messages panel looks customers up)."""
    for key in settings.api_keys:
        if "read" in key.scopes:
            return key.secret
    return ""


def _start_traffic(settings: Settings, customers: int, day_minutes: float,
                   seed: int | None) -> BackgroundPublisher:
    """Generate the day that just ended and feed it to ingestion, compressed into `day_minutes`."""
    now = WallClock().now().replace(second=0, microsecond=0)
    seed = seed if seed is not None else int(now.timestamp()) // 60
    events = list(make_world(seed, customers, 1, now - dt.timedelta(days=1)))
    pacer = Pacer(speedup=86_400 / (day_minutes * 60)) if day_minutes > 0 else None
    url = f"http://{settings.host}:{settings.port('ingestion')}"
    _say(f"traffic: a generated day of {customers} customers (seed {seed}, {len(events):,} events) "
         f"over {day_minutes:g} minutes to {url}/v1/events")
    return BackgroundPublisher(events, url, _ingest_key(settings), pacer).start()


def _watch(stack: Stack, settings: Settings, services: list[str],
           traffic: BackgroundPublisher | None, duration: float, live: bool | None) -> None:
    """Poll the services' metrics every second and draw them until Ctrl-C or `duration`."""
    from rich.console import Console
    from rich.live import Live

    from shared.dashboard import Dashboard, MessageSampler, render

    console = Console()
    live = console.is_terminal if live is None else live
    urls = {n: f"http://{settings.host}:{settings.port(n)}" for n in services}
    board = Dashboard(urls)
    sampler = (MessageSampler(urls["identity"], urls["notifications"], _read_key(settings))
               if traffic and {"identity", "notifications"} <= set(urls) else None)
    began = time.monotonic()
    snapshot = None
    last_line = 0.0
    said: set[str] = set()
    screen = Live(console=console, refresh_per_second=2, screen=False) if live else contextlib.nullcontext()
    try:
        with screen:
            while True:
                for name, proc in stack.children.items():
                    if proc.poll() is not None:
                        raise StackError(f"{name} stopped unexpectedly with code {proc.returncode}; see {settings.home / 'logs' / (name + '.log')}")
                problems = [f"traffic: {traffic.error}"] if traffic and traffic.error else []
                messages = sampler.sample(traffic.recent_emails()) if sampler and traffic else ()
                snapshot = board.poll(traffic=traffic.status() if traffic else None,
                                      problems=problems, messages=messages)
                if live:
                    screen.update(render(snapshot))  # type: ignore[union-attr]
                else:
                    for problem in snapshot.problems:
                        if problem not in said:
                            said.add(problem)
                            typer.echo(f"omnicrm: {problem}", err=True)
                    if time.monotonic() - last_line >= 10:
                        last_line = time.monotonic()
                        _say(_one_line(snapshot))
                if duration and time.monotonic() - began >= duration:
                    break
                time.sleep(1.0)
    finally:
        board.close()
        if sampler is not None:
            sampler.close()
        if snapshot is not None and not live:
            _say(_one_line(snapshot))
            console.print(render(snapshot))


def _one_line(snapshot) -> str:
    """A progress line for logs and pipes: records handled per service, triggers, problems."""
    parts = [f"{s.name} {int(snapshot.total_traffic(s.name)):,}" if s.up else f"{s.name} down"
             for s in snapshot.services]
    fired = int(sum(snapshot.triggers.values()))
    line = "handled: " + ", ".join(parts) + f"; triggers {fired:,}"
    if snapshot.traffic:
        line += f"; traffic {snapshot.traffic}"
    return line


@app.command()
def generate(
    seed: int = typer.Option(1, min=0, help="same seed, same world"),
    customers: int = typer.Option(1000, min=0, help="people in the world"),
    days: int = typer.Option(7, min=1, help="days of traffic"),
    start: str | None = typer.Option(None, help="first day, YYYY-MM-DD or RFC 3339 (default: DAYS days ago, UTC midnight)"),
    malformed: float = typer.Option(0.01, min=0.0, max=0.49, help="share of deliberately malformed events"),
    out: str | None = typer.Option(None, "--out", help="write JSONL to this file ('-' for stdout)"),
    http: str | None = typer.Option(None, "--http", help="POST to this ingestion base URL, e.g. http://127.0.0.1:8000"),
    key: str | None = typer.Option(None, "--key", help="bearer key for --http (default: the first ingest key of OMNICRM_API_KEYS, else the dev key)"),
    kafka: str | None = typer.Option(None, "--kafka", help="produce JSON to this bootstrap's ingest.raw.v1"),
    topic: str = typer.Option("ingest.raw.v1", help="topic for --kafka"),
    rate: float | None = typer.Option(None, min=0.001, help="at most this many events per second"),
    speedup: float | None = typer.Option(None, min=0.001, help="replay event time this many times faster than real time"),
) -> None:
    """Generate a seeded synthetic retail world and write or publish it."""
    sinks = [s for s in (out, http, kafka) if s]
    if len(sinks) != 1:
        _fail("give exactly one of --out FILE, --http URL or --kafka BOOTSTRAP")
    try:
        begin = _parse_start(start, days)
    except ValueError as exc:
        _fail(f"--start: {exc}")
    world = make_world(seed, customers, days, begin, malformed_share=malformed)
    if out:
        if rate or speedup:
            _fail("--rate and --speedup pace publishing; a file is written at once")
        if out == "-":
            count = 0
            for event in world:
                sys.stdout.write(to_jsonl_line(event) + "\n")
                count += 1
        else:
            count = write_jsonl(world, out)
        typer.echo(f"{count:,} events (seed {seed}, {customers} customers, {days} days from "
                   f"{begin.date().isoformat()}) -> {out}", err=True)
        return
    events = list(world)
    bad = sum(1 for e in events if MALFORMED in e)
    pacer = Pacer(rate=rate, speedup=speedup) if (rate or speedup) else None
    result = PublishResult()
    typer.echo(f"publishing {len(events):,} events ({bad:,} deliberately malformed) ...", err=True)

    async def run() -> None:
        from rich.progress import Progress

        with Progress(transient=True, console=_stderr_console()) as progress:
            task = progress.add_task("publishing", total=len(events))

            async def show() -> None:
                while not result.done:
                    progress.update(task, completed=result.sent)
                    await asyncio.sleep(0.2)

            shower = asyncio.create_task(show())
            try:
                if http:
                    secret = key or _default_key()
                    await publish_http(events, http, secret, pacer=pacer, result=result)
                else:
                    await publish_kafka(events, kafka or "", topic=topic, pacer=pacer, result=result)
            finally:
                result.done = True
                await shower

    try:
        asyncio.run(run())
    except PublishError as exc:
        _fail(str(exc))
    except OmnicrmError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {result.summary()}", err=True)
        raise typer.Exit(130) from None
    typer.echo(result.summary() if http else f"produced {result.sent:,} events to {topic}", err=True)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _default_key() -> str:
    try:
        return _ingest_key(load_settings())
    except (ConfigError, StackError):
        return DEV_KEY_SECRET


def _parse_start(raw: str | None, days: int) -> dt.datetime:
    """The world's first instant: a date means UTC midnight; none means DAYS days ago."""
    if raw is None:
        today = WallClock().now().date()
        first = today - dt.timedelta(days=days)
        return dt.datetime(first.year, first.month, first.day, tzinfo=dt.UTC)
    if len(raw) == 10:
        day = dt.date.fromisoformat(raw)
        return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    at = dt.datetime.fromisoformat(raw)
    if at.tzinfo is None:
        raise ValueError("a time needs an offset, e.g. 2026-03-02T00:00:00+00:00")
    return at


@app.command()
def topics(partitions: int = typer.Option(4, help="partitions per partitioned topic")) -> None:
    """Create every topic of CONTRACTS §4 on KAFKA_BOOTSTRAP_SERVERS."""
    settings = load_settings()
    if not settings.kafka_bootstrap_servers:
        _fail("KAFKA_BOOTSTRAP_SERVERS: not set")
    asyncio.run(ensure_topics(settings.kafka_bootstrap_servers, partitions))
    _say("topics ready")


@app.command()
def ports() -> None:
    """Print each service's default port."""
    for name, port in SERVICE_PORTS.items():
        _say(f"{name:<14} {port}")


def _register_tools() -> None:
    from shared.cli_topics import register

    register(app)
    __import__("shared.cli_privacy", fromlist=["register"]).register(app)  # erase-report, rekey, backtest


_register_tools()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
