"""The five services as real processes on a broker and database of their own, for e2e and fault tests.

Each service is `python -m services.<name>` with the environment CONTRACTS §1 documents; the
pipeline can SIGKILL and restart any of them, and tells when all are ready.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("ingestion", "identity", "loyalty", "triggers", "notifications")

INGEST_KEY = "e2e-ingest-secret-0123456789"
READ_KEY = "e2e-read-secret-0123456789"
PII_KEY = "e2e-pii-secret-0123456789"
ADMIN_KEY = "e2e-admin-secret-0123456789"
API_KEYS = ",".join([
    f"pos:{INGEST_KEY}:ingest",
    f"reader:{READ_KEY}:read",
    f"support:{PII_KEY}:read|read_pii",
    f"ops:{ADMIN_KEY}:ingest|read|read_pii|admin",
])
SHOPIFY_SECRET = "e2e-shopify-webhook-secret"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Pipeline:
    """Service processes sharing one broker and one database; `env` adds or overrides variables."""

    bootstrap: str
    dsn: str
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            self.ports.setdefault(name, free_port())

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMNICRM_")}
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "DATABASE_URL": self.dsn,
            "OMNICRM_API_KEYS": API_KEYS,
            "OMNICRM_SHOPIFY_WEBHOOK_SECRET": SHOPIFY_SECRET,
            "OMNICRM_DELIVERY": "sandbox",
            "OMNICRM_HOME": str(self.log_dir),
            "PYTHONUNBUFFERED": "1",
            **{f"OMNICRM_{n.upper()}_PORT": str(p) for n, p in self.ports.items() if n in SERVICES},
        })
        env.update(self.env)
        return env

    def start(self, *names: str) -> None:
        for name in names or SERVICES:
            log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"], cwd=ROOT, env=self._environment(),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def start_worker(self, name: str, index: int) -> str:
        """Start worker `index` (>= 1) of service `name`: same consumer groups, its own HTTP port.

        Returns its key in `procs`/`ports` (`<name>-<index>`), usable with wait_ready, url, kill.
        """
        key = f"{name}-{index}"
        self.ports.setdefault(key, free_port())
        env = self._environment()
        env[f"OMNICRM_{name.upper()}_PORT"] = str(self.ports[key])
        log = open(self.log_dir / f"{key}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[key] = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"], cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return key

    def wait_ready(self, *names: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for name in names or SERVICES:
            while True:
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url(name)}/ready", timeout=1.0).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} not ready within {timeout:.0f}s:\n{self.tail(name)}")
                time.sleep(0.1)

    def kill(self, name: str) -> None:
        """SIGKILL: no clean shutdown, no flush, like a machine losing power."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def restart(self, name: str) -> None:
        self.start(name)

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            self.procs.pop(name, None)

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
