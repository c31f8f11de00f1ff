"""Waiting for a condition with a deadline, instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]], *, timeout: float = 30.0,
                     interval: float = 0.1, message: str = "condition") -> T:
    """Return the first truthy result of `probe`, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{message} not reached within {timeout:.0f}s (last: {last!r})")


def eventually_sync(probe: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.1,
                    message: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{message} not reached within {timeout:.0f}s (last: {last!r})")
