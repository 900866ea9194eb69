"""One Generate through the mesh: admission, attempts, retries before the first token, and
failover after it. No request lost, no token repeated.

- Before the first token, a failed attempt is retried (jittered exponential backoff, within the
  deadline, within the router's retry budget) on another replica, or on the same one when it is
  the only one. Saturation (RESOURCE_EXHAUSTED) goes back to the admission queue: not a failure.
- After the first token, a broken stream (agent killed or frozen, connection lost, the replica
  gone from the table, no token within the inter-token timeout) continues on another READY
  replica: the request goes again with a `Continuation` of what the client already has, and the
  agent streams only what follows, so the client sees one stream. At most ``max_failovers``
  breaks; a resume that fails before its first token is not one (a partitioned replica fails
  fast): its replica is excluded a while (exclusions.py), within ``queue_timeout_s``.
- Responses are forwarded as the raw bytes the agent sent, parsed only for a failover.
- Trailers: ``meshserve-failovers``. Headers: ``meshserve-node``, ``meshserve-model``,
  ``meshserve-attempts`` and, when the request waited for a slot, ``meshserve-queued-ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from meshserve.router.config import RouterConfig
from meshserve.router.core import coldstart
from meshserve.router.core.admission import ANYONE, Admission, Slot, Who
from meshserve.router.core.budget import RetryBudget
from meshserve.router.core.demand import DemandTracker
from meshserve.router.core.headers import Headers
from meshserve.router.core.stall import Stall
from meshserve.router.core.table import EndpointTable
from meshserve.router.core.upstreams import Upstreams, trace_metadata
from meshserve.router.routing.breakers import Breakers
from meshserve.router.routing.endpoints import Route
from meshserve.router.routing.exclusions import Exclusions, Identity
from meshserve.rpc import handlers
from meshserve.rpc.errors import ServiceError, decode_details, error_reason
from meshserve.rpc.handlers import Ctx
from meshserve.telemetry import metrics
from meshserve.telemetry.tracing import tracer
from meshserve.v1 import inference_pb2
from opentelemetry import trace

_tracer = tracer("meshserve.router.core.service")

# Codes on which another attempt may succeed.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.NOT_FOUND,  # the replica unloaded between the table and the call
        grpc.StatusCode.CANCELLED,  # the agent shut down mid-call
    }
)
# Reasons an agent gives when the replica itself is gone (engines/prompts.py), or when it may
# be (cut off from etcd, cluster/fence.py): the request leaves that replica at once.
GONE_REASONS = frozenset({"ENGINE_DIED", "MODEL_UNLOADED", "AGENT_FENCED"})
# Failures that say something about the replica's health (breakers).
UNHEALTHY = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0


class Broken(Exception):
    """An attempt ended without finishing the stream; another may go on."""

    def __init__(
        self, what: str, unhealthy: bool = True, saturated: bool = False, gone: bool = False
    ) -> None:
        super().__init__(what)
        self.what = what
        self.unhealthy = unhealthy  # counts against the replica's breaker
        self.saturated = saturated  # the replica was full: back to the queue
        self.gone = gone  # the replica said it is gone for good (its engine died, unloaded)


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Full jitter (AWS): uniform in [0, min(cap, base x 2^attempt)]."""
    return rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def continuation_of(delivered: list[bytes]) -> tuple[list[int], str, bool]:
    """Token ids and text the client has from the raw messages it got, and whether the last
    one finished the stream."""
    ids: list[int] = []
    text: list[str] = []
    finished = False
    for raw in delivered:
        msg = inference_pb2.GenerateResponse.FromString(raw)
        ids += msg.token_ids
        text.append(msg.text)
        finished = finished or bool(msg.finish_reason)
    return ids, "".join(text), finished


class Relay:
    def __init__(
        self,
        config: RouterConfig,
        table: EndpointTable,
        admission: Admission,
        upstreams: Upstreams,
        breakers: Breakers,
        budget: RetryBudget,
        demand: DemandTracker,
    ) -> None:
        self.config = config
        self.table = table
        self.admission = admission
        self.upstreams = upstreams
        self.breakers = breakers
        self.budget = budget
        self.demand = demand
        self.rng = random.Random()

    async def generate(
        self,
        request: inference_pb2.GenerateRequest,
        route: Route,
        context: Ctx,
        who: Who = ANYONE,
    ) -> AsyncIterator[bytes]:
        start = time.perf_counter()
        model = route.spec.name
        delivered: list[bytes] = []
        failed = Exclusions()  # replicas this request gave up on (for a while: exclusions.py)
        strikes: dict[Identity, int] = {}
        attempts: list[str] = []
        retries = failovers = saturated = resumes = 0
        full_since = stuck_since = 0.0  # agents answer RESOURCE_EXHAUSTED / a stream broke
        state = Headers()
        self.budget.request()
        try:
            while True:
                with _tracer.start_as_current_span("router.pick") as pick:
                    slot = await self.admission.acquire(
                        route, request.session_key, handlers.remaining_s(context), failed, who
                    )
                    pick.set_attribute("meshserve.node", slot.endpoint.node_id)
                    if slot.waited_s:
                        pick.set_attribute("meshserve.queued_s", slot.waited_s)
                        if not route.ready:  # it waited for a cold start: say why and how
                            status = self.table.status_of(model, slot.endpoint)
                            coldstart.explain(pick, slot.waited_s, status)
                payload = self._payload(request, slot, delivered)
                had = len(delivered)
                delay = 0.0  # backoff before the next attempt, taken without holding a slot
                try:
                    first_s = self._first_limit(state, bool(delivered), resumes)
                    async for message in self._attempt(
                        slot, payload, request, context, state, start, len(attempts) + 1, first_s
                    ):
                        delivered.append(message)
                        yield message
                    return
                except Broken as b:
                    attempts.append(f"{slot.endpoint.node_id}: {b.what}")
                    if delivered and continuation_of(delivered[-1:])[2]:
                        return  # it broke after the final message: the client has it all
                    now = time.monotonic()
                    if b.saturated:  # full: queue again, not a failure
                        saturated += 1
                        full_since = full_since or now
                        if now - full_since > self.config.queue_timeout_s:
                            raise ServiceError(
                                grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"model {model!r}: replicas stayed full (other routers' streams) "
                                f"for {now - full_since:.0f} s: " + "; ".join(attempts[-3:]),
                                "REPLICAS_FULL",
                                retry_after_s=1.0,
                            ) from None
                        delay = backoff_s(min(saturated, 5), self.rng)
                    else:
                        self._give_up_on(slot, b, strikes, failed, now)
                        if delivered and len(delivered) == had:  # a resume that got nowhere:
                            # the exclusions space these out; the queue timeout bounds them
                            if now - stuck_since > self.config.queue_timeout_s:
                                raise self._exhausted(model, attempts, "failovers") from None
                            resumes += 1
                            delay = backoff_s(min(resumes, 5), self.rng)
                        elif delivered:
                            stuck_since, resumes = now, 0
                            failovers += 1
                            metrics.FAILOVERS.labels(model).inc()
                            if failovers > self.config.max_failovers:
                                raise self._exhausted(model, attempts, "failovers") from None
                            trace.get_current_span().add_event(
                                "failover",
                                {
                                    "meshserve.node": slot.endpoint.node_id,
                                    "meshserve.reason": b.what,
                                },
                            )
                            delay = backoff_s(failovers - 1, self.rng) if failovers > 1 else 0.0
                        else:
                            retries += 1
                            if retries >= self.config.max_attempts:
                                raise self._exhausted(model, attempts, "attempts") from None
                            if not self.budget.try_retry():
                                metrics.RETRIES_DENIED.inc()
                                raise self._exhausted(model, attempts, "budget") from None
                            metrics.RETRIES.labels(model).inc()
                            delay = backoff_s(retries, self.rng)
                finally:
                    self.admission.release(slot)
                if delay:
                    await self._pause(delay, context)
        finally:
            with contextlib.suppress(Exception):
                context.set_trailing_metadata((("meshserve-failovers", str(failovers)),))

    def _give_up_on(
        self,
        slot: Slot,
        b: Broken,
        strikes: dict[Identity, int],
        failed: Exclusions,
        now: float,
    ) -> None:
        """Counts the failure against the replica's breaker, and leaves the replica for this
        request when it has others to go to, at its second failure (a transient failure of the
        only replica is not a verdict), or at once when it said it is gone for good (its engine
        died, it was unloaded: a reload is another replica, which the request may take)."""
        if b.unhealthy:
            self.breakers.failure((slot.endpoint.address, slot.model), now)
        identity = slot.endpoint.identity
        strikes[identity] = strikes.get(identity, 0) + 1
        if b.gone or strikes[identity] >= 2 or self._others(slot, identity):
            failed.add(identity)
            strikes[identity] = 0  # a retry after the exclusion gets its two chances again

    def _others(self, slot: Slot, identity: Identity) -> bool:
        """Whether the model has another READY replica to go to."""
        route = self.table.current.resolve(slot.model)
        return route is not None and any(e.identity != identity for e in route.ready)

    def _first_limit(self, state: Headers, resumed: bool, resumes: int) -> float:
        """How long an attempt waits for its first message. A resume's comes about as fast as
        the stream's first did, give or take its longer prompt: ``stall_factor`` times that (at
        least ``stall_floor_s``), once more for each resume that got nothing (a long prefill
        is not starved), at most the first token timeout. A replica cut off by a partition
        is silent: this is how long that takes to tell, where the first token timeout is a
        minute."""
        cfg = self.config
        if not resumed or not state.first_token_s:
            return cfg.first_token_timeout_s
        paced = max(cfg.stall_floor_s, cfg.stall_factor * state.first_token_s)
        return min(cfg.first_token_timeout_s, paced * (1 + resumes))

    def _payload(
        self, request: inference_pb2.GenerateRequest, slot: Slot, delivered: list[bytes]
    ) -> bytes:
        request.model = slot.model
        if not delivered:
            return request.SerializeToString()
        ids, text, _ = continuation_of(delivered)
        resumed = inference_pb2.GenerateRequest()
        resumed.CopyFrom(request)
        resumed.continuation.token_ids[:] = ids
        resumed.continuation.text = text
        return resumed.SerializeToString()

    async def _pause(self, seconds: float, context: Ctx) -> None:
        left = handlers.remaining_s(context)
        if left is not None:
            seconds = min(seconds, max(0.0, left - 0.2))
        await asyncio.sleep(seconds)

    def _exhausted(self, model: str, attempts: list[str], why: str) -> ServiceError:
        what = {
            "attempts": f"every attempt failed before the first token ({len(attempts)})",
            "budget": "an attempt failed and the router's retry budget is spent (retry storm "
            "protection)",
            "failovers": f"the stream broke {len(attempts)} times (max_failovers "
            f"{self.config.max_failovers})",
        }[why]
        return ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"model {model!r}: {what}: " + "; ".join(attempts),
            "ALL_REPLICAS_FAILED" if why != "failovers" else "FAILOVERS_EXHAUSTED",
            retry_after_s=1.0,
        )

    async def _attempt(
        self,
        slot: Slot,
        payload: bytes,
        request: inference_pb2.GenerateRequest,
        context: Ctx,
        state: Headers,
        start: float,
        attempt: int,
        first_s: float,
    ) -> AsyncIterator[bytes]:
        """Streams from one replica; raises Broken when it ends without the final message."""
        endpoint = slot.endpoint
        span = _tracer.start_span(
            "router.attempt",
            attributes={"meshserve.node": endpoint.node_id, "meshserve.attempt": attempt},
            kind=trace.SpanKind.CLIENT,
        )
        call = self.upstreams.generate(endpoint.address)(
            payload,
            timeout=handlers.remaining_s(context),
            metadata=trace_metadata(span, request.request_id),
        )
        gone = self.table.departure(slot.model, endpoint.identity)
        watcher = asyncio.get_running_loop().create_task(_cancel_when(gone, call))
        key = (endpoint.address, slot.model)
        stall = Stall(call, first_s)
        sent = time.monotonic()
        try:
            try:
                first = await call.read()
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
                if stall.fired:
                    raise Broken(f"no first token in {first_s:.1f} s") from None
                raise _upstream_error(e, gone, "") from None
            state.first_token_s = state.first_token_s or time.monotonic() - sent
            stall.delivered()
            stall.relimit(self.config.inter_token_timeout_s)
            stall.pace(self.config.stall_factor, self.config.stall_floor_s)
            self.breakers.success(key, time.monotonic())
            if not state.sent:
                await state.send(context, call, slot, attempt, start, self.demand)
            if first is grpc.aio.EOF:
                return
            yield first
            try:
                while True:
                    stall.reading()
                    if (message := await call.read()) is grpc.aio.EOF:
                        break
                    stall.delivered()
                    yield message
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
                if stall.fired:
                    raise Broken(f"stalled: no token for {stall.current_s:.1f} s") from None
                raise _upstream_error(e, gone, " mid-stream") from None
        except Broken as b:
            span.set_status(trace.Status(trace.StatusCode.ERROR, b.what))
            raise
        finally:
            stall.stop()
            watcher.cancel()
            self.table.forget_departure(slot.model, endpoint.identity)
            if not call.done():
                call.cancel()  # our caller went away (or we gave up): stop the agent's work
            span.end()


def _upstream_error(e: BaseException, gone: asyncio.Event, when: str) -> BaseException:
    """What reading the upstream call raised, as the relay sees it: a status as `Broken` (or
    passed through, see `_broken`); a cancel that the departure watcher made (the replica left
    the table) as `Broken`; any other cancel (our caller went away) as itself."""
    if isinstance(e, asyncio.CancelledError):
        return Broken(f"replica left the table{when}") if gone.is_set() else e
    return _broken(e, gone)


async def _cancel_when(gone: asyncio.Event, call: Any) -> None:
    """Cancels ``call`` once its replica is gone, so the read waiting on it fails over now."""
    await gone.wait()
    call.cancel()


def _broken(e: grpc.aio.AioRpcError, gone: asyncio.Event) -> Exception:
    """An upstream status as `Broken` (another replica may go on) or as itself (it may not)."""
    code = e.code()
    what = f"{code.name}: {e.details()}"
    if gone.is_set():
        return Broken(f"replica left the table ({what})")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not _limit_of_ours(e):
        return Broken(what, unhealthy=False, saturated=True)
    if code in RETRYABLE:
        reason = error_reason(decode_details(e.trailing_metadata()))
        return Broken(what, unhealthy=code in UNHEALTHY, gone=reason in GONE_REASONS)
    passed: Exception = e  # the caller's own error (INVALID_ARGUMENT, DEADLINE_EXCEEDED …)
    return passed


def _limit_of_ours(e: grpc.aio.AioRpcError) -> bool:
    """RESOURCE_EXHAUSTED for a message over gRPC's size limit is the request's fault."""
    return "larger than max" in (e.details() or "")
