"""Debian's Prometheus for the tests: found on PATH, or installed with apt-get on a fresh machine.

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
APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends",
               "-o", "DPkg::Lock::Timeout=120", "prometheus"]


class PrometheusUnavailable(RuntimeError):
    """Neither found nor installable: the message says what to do."""


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)


def _install() -> None:
    if shutil.which("apt-get") is None:
        raise PrometheusUnavailable("prometheus/promtool are missing and there is no apt-get: "
                                    "install Prometheus 2.x so both are on PATH")
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise PrometheusUnavailable("prometheus is missing: run `apt-get install prometheus` as root")
        sudo = ["sudo", "-n"]
    created_policy = False
    if os.geteuid() == 0 and not POLICY_RC.exists():
        POLICY_RC.write_text("#!/bin/sh\n# tests/support/prometheus.py: no daemons during install\nexit 101\n")
        POLICY_RC.chmod(POLICY_RC.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        created_policy = True
    try:
        result = _run(sudo + APT_INSTALL)
        if result.returncode != 0:  # stale or empty package lists on a fresh machine
            _run(sudo + ["apt-get", "update"])
            result = _run(sudo + APT_INSTALL)
        if result.returncode != 0:
            raise PrometheusUnavailable(
                f"`apt-get install prometheus` failed ({result.returncode}): "
                f"{(result.stderr or result.stdout)[-2000:]}")
    finally:
        if created_policy:
            POLICY_RC.unlink(missing_ok=True)


@functools.cache
def ensure_prometheus() -> tuple[str, str]:
    """Paths of the `prometheus` and `promtool` binaries, installing Debian's package if needed."""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        _install()
        prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        raise PrometheusUnavailable("the prometheus package installed no prometheus/promtool on PATH")
    return prometheus, promtool
