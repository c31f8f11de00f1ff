"""Debian's tools for the deploy tests (prometheus, promtool, docker-compose): found on PATH, or
installed with apt-get on a fresh machine.

The install never starts the packaged daemon: a policy-rc.d that denies service starts is put in
place for the duration of the install when the machine has none (as Docker images do).
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
from pathlib import Path

POLICY_RC = Path("/usr/sbin/policy-rc.d")
APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120"]


class ToolUnavailable(RuntimeError):
    """Neither found nor installable: the message says what to do."""



def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)


def _install(package: str) -> None:
    if shutil.which("apt-get") is None:
        raise ToolUnavailable(f"{package} is missing and there is no apt-get: install it")
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise ToolUnavailable(f"{package} is missing: run `apt-get install {package}` as root")
        sudo = ["sudo", "-n"]
    created_policy = False
    if os.geteuid() == 0 and not POLICY_RC.exists():
        POLICY_RC.write_text("#!/bin/sh\n# tests/support/prometheus.py: no daemons during install\nexit 101\n")
        POLICY_RC.chmod(POLICY_RC.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        created_policy = True
    try:
        result = _run(sudo + APT_INSTALL + [package])
        if result.returncode != 0:  # stale or empty package lists on a fresh machine
            _run(sudo + ["apt-get", "update"])
            result = _run(sudo + APT_INSTALL + [package])
        if result.returncode != 0:
            raise ToolUnavailable(
                f"`apt-get install {package}` failed ({result.returncode}): "
                f"{(result.stderr or result.stdout)[-2000:]}")
    finally:
        if created_policy:
            POLICY_RC.unlink(missing_ok=True)


@functools.cache
def ensure_debian_tools(package: str, *binaries: str) -> tuple[str, ...]:
    """Paths of `binaries`, installing Debian's `package` if any is missing."""
    paths = [shutil.which(b) for b in binaries]
    if None in paths:
        _install(package)
        paths = [shutil.which(b) for b in binaries]
    missing = [b for b, p in zip(binaries, paths, strict=True) if p is None]
    if missing:
        raise ToolUnavailable(f"the {package} package installed no {', '.join(missing)} on PATH")
    return tuple(p for p in paths if p is not None)


def ensure_prometheus() -> tuple[str, str]:
    """Paths of the `prometheus` and `promtool` binaries (Debian's package `prometheus`)."""
    prometheus, promtool = ensure_debian_tools("prometheus", "prometheus", "promtool")
    return prometheus, promtool


def ensure_docker_compose() -> str:
    """Path of `docker-compose` (Debian's package), which validates compose files offline."""
    (compose,) = ensure_debian_tools("docker-compose", "docker-compose")
    return compose
