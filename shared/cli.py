"""The `omnicrm` command: `up` runs the embedded stack; more tools join as they are built."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import typer

from shared.config import DEV_KEY_SECRET, SERVICE_PORTS, load_settings
from shared.errors import ConfigError, OmnicrmError
from shared.kafka import ensure_topics
from shared.stack import Broker, Postgres, StackError, child_env, create_database, port_is_free

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


def _wait_ready(name: str, url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{name} exited with code {proc.returncode} while starting; see .omnicrm/logs/{name}.log")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise StackError(f"{name} was not ready at {url}/ready within {timeout:.0f}s; see .omnicrm/logs/{name}.log")


@app.command()
def up(no_traffic: bool = typer.Option(False, "--no-traffic", help="start idle, for a client to drive"),
       timeout: float = typer.Option(90.0, help="seconds to wait for each service to be ready")) -> None:
    """Start broker, PostgreSQL and the services as separate processes; Ctrl-C stops everything."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        _fail(str(exc))
    home = settings.home
    (home / "logs").mkdir(parents=True, exist_ok=True)
    stack = Stack()
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
            dsn = asyncio.run(create_database(stack.postgres.dsn, "omnicrm"))
        else:
            stack.postgres = None
            Postgres(dsn=dsn).start()
        asyncio.run(ensure_topics(bootstrap, settings.partitions))
        env = child_env(KAFKA_BOOTSTRAP_SERVERS=bootstrap, DATABASE_URL=dsn, PYTHONUNBUFFERED="1")
        services = available_services()
        for name in services:
            log = open(home / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
            stack.children[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"], env=env, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        for name in services:
            url = f"http://{settings.host}:{settings.port(name)}"
            _wait_ready(name, url, stack.children[name], timeout)
            _say(f"  {name:<14} {url}  ready")
        if settings.api_keys and settings.api_keys[0].secret == DEV_KEY_SECRET:
            _say(f"dev API key (all scopes): {DEV_KEY_SECRET}")
        _say(f"broker {bootstrap}; logs in {home / 'logs'}")
        if not services:
            _say("no services are installed yet: broker and database are up")
        _say("omnicrm is up; Ctrl-C stops everything" + ("" if no_traffic else " (traffic generator not started: not available yet)"))
        while True:
            for name, proc in stack.children.items():
                if proc.poll() is not None:
                    raise StackError(f"{name} stopped unexpectedly with code {proc.returncode}; see {home / 'logs' / (name + '.log')}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        _say("stopping ...")
    except (StackError, OmnicrmError) as exc:
        typer.echo(f"omnicrm: {exc}", err=True)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()
    if code == 0:
        _say("stopped")
    raise typer.Exit(code)


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
