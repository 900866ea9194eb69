"""The leader's wait for a burst of lost nodes (leases expiring over a few seconds) to end, so
that one round re-places all of it (`SchedulerLoop._settle_losses`), on a fake clock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from meshserve.scheduler import leader as leader_module
from meshserve.scheduler.leader import LOSS_QUIET_S, LOSS_WAIT_MAX_S, SchedulerLoop


class Clock:
    """monotonic() and sleep() in virtual time; ``losses`` are the times nodes are lost at."""

    def __init__(self, scheduler: SchedulerLoop, losses: list[float]) -> None:
        self.now, self.scheduler, self.losses = 100.0, scheduler, sorted(losses)

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        end = self.now + seconds
        while self.losses and self.losses[0] <= end:  # a lease expires while the round waits
            self.now = self.losses.pop(0)
            self.scheduler._lost_at = self.now
        self.now = end


async def waited(monkeypatch: pytest.MonkeyPatch, last_loss: float, later: list[float]) -> float:
    scheduler = SchedulerLoop.__new__(SchedulerLoop)  # only the loss bookkeeping is exercised
    scheduler._lost_at = last_loss
    clock = Clock(scheduler, later)
    # The leader module's own names only: the event loop keeps its real clock.
    monkeypatch.setattr(leader_module, "time", SimpleNamespace(monotonic=clock.monotonic))
    monkeypatch.setattr(leader_module, "asyncio", SimpleNamespace(sleep=clock.sleep))
    await scheduler._settle_losses()
    return clock.now - 100.0


async def test_no_recent_loss_no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    assert await waited(monkeypatch, float("-inf"), []) == 0.0
    assert await waited(monkeypatch, 100.0 - LOSS_QUIET_S, []) == 0.0


async def test_waits_until_no_node_was_lost_for_the_quiet_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Lost at 99.8 (the round starts at 100); more at 100.5 and 101.2, each within the quiet.
    took = await waited(monkeypatch, 99.8, [100.5, 101.2])
    assert took == pytest.approx(1.2 + LOSS_QUIET_S)


async def test_a_long_run_of_losses_waits_at_most_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    took = await waited(monkeypatch, 100.0, [100.0 + 0.5 * i for i in range(1, 20)])
    assert LOSS_WAIT_MAX_S <= took <= LOSS_WAIT_MAX_S + LOSS_QUIET_S
