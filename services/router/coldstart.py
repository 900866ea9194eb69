"""Holds requests for a model with no READY replica until one turns READY (DESIGN §1).

Bounded per model (RESOURCE_EXHAUSTED past the bound), deadline-aware (DEADLINE_EXCEEDED when the
caller's deadline comes first, UNAVAILABLE when the queue timeout does), and it keeps asking the
scheduler for the model while it waits. Nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from collections.abc import Set as AbstractSet
from typing import Any

import grpc
from meshserve.router.table import EndpointTable, Route
from meshserve.rpc.errors import ServiceError

DEADLINE_MARGIN_S = 0.1  # answer a little before the caller's deadline so it gets our message


class ColdStartQueue:
    def __init__(
        self,
        table: EndpointTable,
        ensure: Callable[[str], Coroutine[Any, Any, str]],
        per_model: int,
        timeout_s: float,
        ensure_interval_s: float,
    ) -> None:
        self.table = table
        self.ensure = ensure  # asks the scheduler; returns why it cannot place, or ""
        self.per_model = per_model
        self.timeout_s = timeout_s
        self.ensure_interval_s = ensure_interval_s
        self.waiting: dict[str, int] = {}

    async def wait_ready(
        self, model: str, deadline_s: float | None, exclude: AbstractSet[str] = frozenset()
    ) -> Route:
        """Returns the model's route once it has a READY replica whose address is not in
        ``exclude`` (replicas that just failed); ``deadline_s`` is the caller's remaining time
        (None: no deadline)."""
        if self.waiting.get(model, 0) >= self.per_model:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.per_model} requests already wait for model {model!r} to start; retry later",
                "COLD_START_QUEUE_FULL",
                retry_after_s=1.0,
            )
        start = time.monotonic()
        queue_end = start + self.timeout_s
        deadline_end = start + deadline_s - DEADLINE_MARGIN_S if deadline_s is not None else None
        end = min(queue_end, deadline_end) if deadline_end is not None else queue_end
        self.waiting[model] = self.waiting.get(model, 0) + 1
        next_ensure = start
        why = ""
        ensuring: asyncio.Task[str] | None = None
        try:
            while True:
                route = self.table.current.resolve(model)
                if route is not None and any(e.address not in exclude for e in route.ready):
                    return route
                now = time.monotonic()
                if ensuring is not None and ensuring.done():
                    why = "" if ensuring.cancelled() or ensuring.exception() else ensuring.result()
                    ensuring = None
                if now >= end:
                    break
                if now >= next_ensure and ensuring is None:
                    ensuring = asyncio.create_task(self.ensure(model))
                    next_ensure = now + self.ensure_interval_s
                await self.table.wait_changed(min(end - now, 0.25))
        finally:
            self.waiting[model] -= 1
            if ensuring is not None:
                ensuring.cancel()
        waited = time.monotonic() - start
        if deadline_end is not None and end == deadline_end:
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no replica of {model!r} became ready within the request's deadline "
                f"({waited:.1f} s); it is starting: retry with a longer deadline",
                "COLD_START_DEADLINE",
            )
        detail = f": {why}" if why else ""
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"no replica of {model!r} became ready in {waited:.1f} s{detail}",
            "NO_READY_REPLICA",
            retry_after_s=2.0,
        )
