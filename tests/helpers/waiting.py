"""One way to wait for a condition in a test."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something true or ``timeout`` passes.

    Returns the predicate's last result: true when the condition was met, false when time ran out, so
    ``assert wait_until(...)`` fails on a timeout and a caller can assert on the value itself.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], T | Awaitable[T]], timeout: float = 10.0,
                           interval: float = 0.005) -> T:
    """:func:`wait_until` for a test running on an event loop (the loop keeps running while it waits)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result or time.monotonic() >= deadline:
            return result  # type: ignore[return-value]
        await asyncio.sleep(interval)
