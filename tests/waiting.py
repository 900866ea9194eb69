"""Wait on conditions with timeouts (rule 5: no sleep-and-hope)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def eventually(
    probe: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> Any:
    """Polls ``probe`` until it returns a truthy value; fails with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            last = value
        except Exception as e:  # a probe may fail while the condition is not yet true
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)
