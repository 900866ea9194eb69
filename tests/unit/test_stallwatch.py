"""The event-loop watchdog (stallwatch.py) reports a blocked loop once per stall, with where."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from meshserve.lifecycle.watchdog import StallWatch


async def test_a_blocked_loop_is_reported_once_with_its_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = StallWatch(threshold_s=0.3, tick_s=0.05)
    watch.start()
    await asyncio.sleep(0.2)  # a healthy loop: nothing
    assert watch.stalls == 0
    with caplog.at_level(logging.WARNING, logger="meshserve.lifecycle.watchdog"):
        time.sleep(0.8)  # noqa: ASYNC251 - the point: block the loop
        await asyncio.sleep(0.2)
    await watch.stop()
    assert watch.stalls == 1  # one stall, one report, however long it lasted
    (record,) = caplog.records
    assert "blocked for" in record.message and "time.sleep(0.8)" in record.message
