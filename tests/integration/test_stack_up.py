"""`omnicrm up` as a user runs it: ready, clean stop on SIGTERM, one clear line when a port is taken."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from shared.cli import available_services
from shared.stack import free_port
from tests.conftest import ROOT
from tests.support.polling import eventually_sync

OMNICRM = [sys.executable, "-m", "shared.cli"]


def up_env(tmp_path, database: str | None, broker_port: int) -> tuple[dict[str, str], dict[str, int]]:
    ports = {name: free_port() for name in ("ingestion", "identity", "loyalty", "triggers", "notifications")}
    env = dict(os.environ, OMNICRM_HOME=str(tmp_path / "home"), OMNICRM_BROKER_PORT=str(broker_port),
               PYTHONUNBUFFERED="1")
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    if database:
        env["DATABASE_URL"] = database
    for name, port in ports.items():
        env[f"OMNICRM_{name.upper()}_PORT"] = str(port)
    return env, ports


def test_up_starts_everything_and_sigterm_leaves_no_process_behind(tmp_path, database):
    env, ports = up_env(tmp_path, database, free_port())
    out = tmp_path / "up.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen([*OMNICRM, "up", "--no-traffic"], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        eventually_sync(lambda: b"omnicrm is up" in out.read_bytes() or proc.poll() is not None,
                        timeout=120, message="omnicrm up ready")
        assert proc.poll() is None, out.read_text()
        family = psutil.Process(proc.pid).children(recursive=True)
        assert any("tansu" in " ".join(p.cmdline()) for p in family), "embedded broker not started"
        for name in available_services():
            assert httpx.get(f"http://127.0.0.1:{ports[name]}/ready", timeout=5).status_code == 200
            assert f"{name}" in out.read_text()
        pids = [p.pid for p in family]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, out.read_text()
        assert "stopped" in out.read_text()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            time.sleep(0.1)
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert left == [], f"processes left behind: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("what", ["broker"])
def test_taken_broker_port_is_one_clear_line(tmp_path, database, what):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env, _ = up_env(tmp_path, database, port)
        result = subprocess.run([*OMNICRM, "up", "--no-traffic"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"broker port 127.0.0.1:{port} is already in use" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_unreachable_database_is_one_clear_line(tmp_path):
    env, _ = up_env(tmp_path, f"postgresql://nobody@127.0.0.1:{free_port()}/nowhere", free_port())
    result = subprocess.run([*OMNICRM, "up", "--no-traffic"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the database" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
