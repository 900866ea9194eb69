"""Dynamic batching of tensor-model requests in the agent (seed 003; Triton's dynamic batcher).

Requests queue per model; a batch runs when it holds ``max_batch`` rows, or when the oldest
waiting request has waited the batching window. While a batch runs, arrivals queue, and the
next batch takes them at once (their window has passed): under load batches fill, with no
added wait. Only requests whose rows have the same shape (and that want the same outputs) share
a batch; higher priorities go first. One batch runs at a time per model (one engine instance).

Modes (``engine_args.batching``): ``off`` (each request alone: the baseline), ``fixed`` (the
window as configured), ``adaptive`` (the window moves against a P95 latency target,
`AdaptiveWindow`). Every batch is a span (``engine.batch``) linked to the spans of the requests
in it; sizes, waits and the window are Prometheus metrics (``meshserve_batch_*``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import grpc
from meshserve.batchconfig import BatchConfig
from meshserve.rpc.errors import ServiceError
from meshserve.telemetry import metrics
from meshserve.telemetry.tracing import tracer
from opentelemetry import trace

_tracer = tracer(__name__)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


class AdaptiveWindow:
    """The batching window under a P95 target: halved when the P95 of recent requests is above
    the target, grown by a quarter (at least 0.5 ms) when it is under 60 % of it, within
    [0, limit]. A halving that made the P95 worse (by 10 %) is undone and no halving is tried
    for the next ``HOLD`` decisions: the excess then comes from load, and smaller batches cost
    more per request (overload is for admission and autoscaling to answer). Each decision reads
    only requests served under the window then in force (the samples restart after every
    decision), at least ``MIN_SAMPLES`` of them, or all of the last second when fewer arrived."""

    MIN_SAMPLES = 20
    SHRINK, GROW, HEADROOM, WORSE, HOLD = 0.5, 1.25, 0.6, 1.1, 5
    FLOOR_S = 0.0002  # below this the window is 0: take what is queued and go

    def __init__(self, target_s: float, limit_s: float) -> None:
        self.target_s = target_s
        self.limit_s = limit_s
        self.window_s = limit_s
        self._samples: list[float] = []
        self._since = 0.0
        self._undo: tuple[float, float] | None = None  # (window, P95) before the last halving
        self._hold = 0

    def observe(self, latency_s: float, now: float) -> bool:
        """Counts one served request; True when the window moved."""
        if not self._samples:
            self._since = now
        self._samples.append(latency_s)
        enough = len(self._samples) >= self.MIN_SAMPLES
        if not enough and (now - self._since < 1.0 or len(self._samples) < 5):
            return False
        p95 = quantile(self._samples, 0.95)
        self._samples = []
        before = self.window_s
        undo, self._undo = self._undo, None
        if p95 <= self.target_s:
            self._hold = 0
            if p95 < self.HEADROOM * self.target_s:
                self.window_s = min(self.limit_s, max(self.window_s * self.GROW, 0.0005))
        elif undo is not None and p95 > undo[1] * self.WORSE:
            self.window_s, self._hold = undo[0], self.HOLD
        elif self._hold:
            self._hold -= 1
        elif self.window_s:
            self._undo = (self.window_s, p95)
            self.window_s = self.window_s * self.SHRINK
            if self.window_s < self.FLOOR_S:
                self.window_s = 0.0
        return self.window_s != before


@dataclass(frozen=True)
class Done:
    """A request's result and how it was batched."""

    result: Any
    batch_rows: int
    batch_requests: int
    queue_s: float  # arrival in the batcher → its batch started
    window_s: float  # the window in force when its batch formed


@dataclass(eq=False)
class Job:
    payload: Any  # what the engine's run function takes for this request
    rows: int
    key: Hashable  # only equal keys share a batch
    priority: int
    arrived: float
    deadline: float  # monotonic; math.inf for none
    future: asyncio.Future[Done]
    link: trace.Link | None = None
    seq: int = 0
    started: float = field(default=0.0)


RunBatch = Callable[[list[Job]], Awaitable[list[Any]]]


class Batcher:
    """One model's batcher: `submit` requests; ``run`` computes one batch (a list of jobs → one
    result each, in order)."""

    def __init__(self, model: str, config: BatchConfig, run: RunBatch) -> None:
        self.model = model
        self.config = config
        self._run = run
        self.adaptive = (
            AdaptiveWindow(config.target_p95_s, config.window_s)
            if config.mode == "adaptive"
            else None
        )
        self._queue: list[Job] = []
        self._stopped: ServiceError | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._seq = 0
        self.running = 0  # requests in the batch being computed
        metrics.BATCH_WINDOW.labels(model).set(self.window_s)

    @property
    def window_s(self) -> float:
        if self.config.mode == "off":
            return 0.0
        return self.adaptive.window_s if self.adaptive is not None else self.config.window_s

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.model}")

    async def stop(self, error: ServiceError) -> None:
        """Fails what waits with ``error`` and stops the loop (the batch running is cancelled)."""
        self._stopped = error  # the batch cut short fails with it too (_compute)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for job in self._queue:
            if not job.future.done():
                job.future.set_exception(error)
        self._queue.clear()

    async def submit(
        self,
        payload: Any,
        rows: int,
        key: Hashable,
        priority: int = 0,
        timeout: float | None = None,
    ) -> Done:
        """Queues one request and waits for its batch. Cancelling the caller drops the request
        (a batch already running still computes it, and the result is discarded)."""
        if self._task is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"model {self.model!r} is not serving here",
                "NOT_LOADED",
                retry_after_s=1.0,
            )
        now = time.monotonic()
        self._seq += 1
        span = trace.get_current_span().get_span_context()
        job = Job(
            payload,
            rows,
            key,
            priority,
            now,
            now + timeout if timeout is not None else math.inf,
            asyncio.get_running_loop().create_future(),
            trace.Link(span) if span.is_valid else None,
            self._seq,
        )
        self._queue.append(job)
        self._wake.set()
        return await job.future

    # --- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await self._fill()
            batch = self._take(time.monotonic())
            if batch:
                await self._compute(batch)

    async def _fill(self) -> None:
        """Waits until the head's key has a full batch queued, or the oldest request's window
        has passed."""
        while self._queue:
            head = self._head()
            if self.config.mode == "off":
                return
            queued = sum(j.rows for j in self._queue if j.key == head.key)
            oldest = min(j.arrived for j in self._queue if j.key == head.key)
            left = oldest + self.window_s - time.monotonic()
            if queued >= self.config.max_batch or left <= 0:
                return
            self._wake.clear()
            try:  # asyncio.timeout: a cancel (stop) is never lost, as wait_for's can be on 3.11
                async with asyncio.timeout(left):
                    await self._wake.wait()
            except TimeoutError:
                return

    def _head(self) -> Job:
        return min(self._queue, key=lambda j: (-j.priority, j.seq))

    def _take(self, now: float) -> list[Job]:
        """The next batch: the head's key, by priority then arrival, up to max_batch rows (one
        request when batching is off); requests whose caller left or whose deadline passed are
        dropped on the way."""
        for job in [j for j in self._queue if j.future.done() or j.deadline <= now]:
            self._queue.remove(job)
            if not job.future.done():
                job.future.set_exception(
                    ServiceError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the deadline passed while the request waited for a batch of model "
                        f"{self.model!r}",
                        "DEADLINE_IN_QUEUE",
                    )
                )
        if not self._queue:
            return []
        head = self._head()
        room = self.config.max_batch if self.config.mode != "off" else head.rows
        batch: list[Job] = []
        for job in sorted(self._queue, key=lambda j: (-j.priority, j.seq)):
            if job.key == head.key and job.rows <= room:
                batch.append(job)
                room -= job.rows
                if self.config.mode == "off" or room == 0:
                    break
        for job in batch:
            self._queue.remove(job)
        return batch

    async def _compute(self, batch: list[Job]) -> None:
        window = self.window_s
        start = time.monotonic()
        rows = sum(j.rows for j in batch)
        self.running = len(batch)
        links = [j.link for j in batch if j.link is not None]
        try:
            with _tracer.start_as_current_span(
                "engine.batch",
                links=links,
                attributes={
                    "gen_ai.request.model": self.model,
                    "meshserve.batch.rows": rows,
                    "meshserve.batch.requests": len(batch),
                    "meshserve.batch.window_ms": window * 1000,
                    "meshserve.batch.mode": self.config.mode,
                },
            ):
                results = await self._run(batch)
        except Exception as e:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        except asyncio.CancelledError:
            for job in batch:
                if not job.future.done() and self._stopped is not None:
                    job.future.set_exception(self._stopped)
            raise
        finally:
            self.running = 0
        end = time.monotonic()
        metrics.BATCH_ROWS.labels(self.model).observe(rows)
        for job, result in zip(batch, results, strict=True):
            queue_s = start - job.arrived
            metrics.BATCH_QUEUE.labels(self.model).observe(queue_s)
            metrics.BATCH_LATENCY.labels(self.model).observe(end - job.arrived)
            if self.adaptive is not None and self.adaptive.observe(end - job.arrived, end):
                metrics.BATCH_WINDOW.labels(self.model).set(self.window_s)
            if not job.future.done():
                job.future.set_result(Done(result, rows, len(batch), queue_s, window))
