"""Cold starts in one place: a model without a READY replica is asked of the scheduler
(EnsureModel) by one loop per model (singleflight), again every ``interval_s`` while anyone
waits for it — requests queued in admission, or a KServe repository load (`until_ready`) —
keeping what the scheduler answered: why it cannot place the model, and when it expects a
replica to serve."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from meshserve.router.core.table import EndpointTable
from meshserve.rpc.errors import ServiceError

RECHECK_S = 0.5
UNREACHABLE = "scheduler unreachable"


@dataclass(frozen=True)
class Ensured:
    """The scheduler's answer to EnsureModel."""

    unplaceable: str = ""  # why it cannot place the model; "" when it is (being) placed
    ready_in_s: float = 0.0  # its estimate of when a replica can serve (0: unknown or now)
    wake_refused: str = ""  # asked to wake one more replica: why not ("" when it does)


class ColdStarts:
    def __init__(
        self,
        table: EndpointTable,
        ensure: Callable[[str, bool], Coroutine[Any, Any, Ensured]],
        interval_s: float,
        queued: Callable[[str], bool],
        on_estimate: Callable[[str], None],
    ) -> None:
        self.table = table
        self.ensure = ensure  # asks the scheduler to place a model
        self.interval_s = interval_s
        self.queued = queued  # whether requests wait in admission for the model
        self.on_estimate = on_estimate  # the scheduler gave a ready estimate for the model
        self.unplaceable: dict[str, str] = {}  # model → the scheduler's last reason
        self.ready_at: dict[str, float] = {}  # model → when the scheduler expects it (monotonic)
        self._loading: Counter[str] = Counter()  # callers of until_ready, per model
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def _ready(self, model: str) -> bool:
        route = self.table.current.resolve(model)
        return route is not None and bool(route.ready)

    def start(self, model: str) -> None:
        """The model's EnsureModel loop, unless one runs (singleflight)."""
        task = self._tasks.get(model)
        if task is None or task.done():
            self._tasks[model] = asyncio.create_task(self._loop(model))

    async def _loop(self, model: str) -> None:
        while self.queued(model) or self._loading[model]:
            if self._ready(model):
                return
            try:
                answer = await self.ensure(model, False)
                self.unplaceable[model] = answer.unplaceable
                if answer.ready_in_s > 0:
                    self.ready_at[model] = time.monotonic() + answer.ready_in_s
                    self.on_estimate(model)
            except Exception as e:  # the scheduler unreachable: the wait goes on
                self.unplaceable[model] = f"{UNREACHABLE} ({type(e).__name__})"
            await asyncio.sleep(self.interval_s)

    async def until_ready(self, model: str, deadline: float) -> None:
        """Returns once ``model`` has a READY replica, asking the scheduler meanwhile; raises
        RESOURCE_EXHAUSTED (it cannot be placed), UNAVAILABLE (no scheduler answers) or, at
        ``deadline`` (monotonic), DEADLINE_EXCEEDED — the load goes on."""
        self._loading[model] += 1
        self.unplaceable.pop(model, None)  # this wait judges by the scheduler's next answer
        try:
            while not self._ready(model):
                self.start(model)
                why = self.unplaceable.get(model, "")
                if why.startswith(UNREACHABLE):
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"model {model!r}: {why}; retry shortly",
                        "SCHEDULER_UNAVAILABLE",
                        retry_after_s=2.0,
                    )
                if why:
                    raise ServiceError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"model {model!r} cannot be placed: {why}",
                        "UNSCHEDULABLE",
                        retry_after_s=10.0,
                    )
                if time.monotonic() > deadline - 1.0:
                    raise ServiceError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"model {model!r} is still loading; the load goes on",
                        "LOAD_EXCEEDS_DEADLINE",
                    )
                await asyncio.sleep(RECHECK_S)
        finally:
            self._loading[model] -= 1
            if not self._loading[model]:
                del self._loading[model]

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
