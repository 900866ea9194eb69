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
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from meshserve.router.config import RouterConfig
from meshserve.router.core import coldstart
from meshserve.router.core.admission import ANYONE, Admission, Slot, Who
from meshserve.router.core.attempts import AttemptPolicy, Broken, Tries, backoff_s, broken
from meshserve.router.core.budget import RetryBudget
from meshserve.router.core.call import Call
from meshserve.router.core.decisions import span_attributes
from meshserve.router.core.demand import DemandTracker
from meshserve.router.core.headers import Headers
from meshserve.router.core.prefixes import NOT_HASHED
from meshserve.router.core.stall import Stall
from meshserve.router.core.table import EndpointTable
from meshserve.router.core.upstreams import Upstreams, trace_metadata
from meshserve.router.routing.breakers import Breakers
from meshserve.router.routing.endpoints import Route
from meshserve.telemetry import metrics
from meshserve.telemetry.tracing import tracer
from meshserve.v1 import inference_pb2
from opentelemetry import trace

_tracer = tracer("meshserve.router.server")


def tenant_salt(tenant: str, salt: str) -> str:
    """The engine's cache salt for a tenant's request with the client's own ``salt``: a digest
    (one tenant cannot name another's salt, whatever the characters; short, and of vLLM's
    allowed alphabet)."""
    return hashlib.blake2b(f"{tenant}\x1f{salt}".encode(), digest_size=16).hexdigest()


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


class Relay(AttemptPolicy):
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
        super().__init__(config, table, breakers, budget)
        self.admission = admission
        self.upstreams = upstreams
        self.demand = demand

    async def generate(
        self,
        request: inference_pb2.GenerateRequest,
        route: Route,
        call: Call,
        who: Who = ANYONE,
        wait_s: float | None = None,  # a route hop's bound on waiting for a slot (routes.py)
    ) -> AsyncGenerator[bytes, None]:
        start = time.perf_counter()
        model = route.spec.name
        delivered: list[bytes] = []
        tries = Tries(model)
        failovers = resumes = 0
        stuck_since = 0.0  # when the stream last broke
        state = Headers()
        self.budget.request()
        if who.tenant:  # tenants never share cached blocks (the engines salt by it too)
            request.cache_salt = tenant_salt(who.tenant, request.cache_salt)
        prompt = await self.admission.prefixes.prompt_soon(route, request)
        try:
            while True:
                with _tracer.start_as_current_span("router.pick") as pick:
                    slot = await self.admission.acquire(
                        route,
                        request.session_key,
                        call.remaining_s(),
                        tries.failed,
                        who,
                        request.request_id,
                        # a resume prefills the prompt and what was delivered: not forecast
                        NOT_HASHED if delivered else prompt,
                        None if delivered else wait_s,
                    )
                    pick.set_attribute("meshserve.node", slot.endpoint.node_id)
                    if slot.forecast is not None:
                        pick.set_attribute("meshserve.ttft.predicted_s", slot.forecast.predicted_s)
                    if slot.decision is not None and pick.is_recording():
                        pick.set_attributes(span_attributes(slot.decision))
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
                        slot, payload, request, call, state, start, len(tries.log) + 1, first_s
                    ):
                        delivered.append(message)
                        yield message
                    return
                except Broken as b:
                    tries.log.append(f"{slot.endpoint.node_id}: {b.what}")
                    if delivered and continuation_of(delivered[-1:])[2]:
                        return  # it broke after the final message: the client has it all
                    now = time.monotonic()
                    if b.saturated:  # full: queue again, not a failure
                        delay = self.full(tries, now)
                    else:
                        self.give_up_on(slot, b, tries, now)
                        if delivered and len(delivered) == had:  # a resume that got nowhere:
                            # the exclusions space these out; the queue timeout bounds them
                            if now - stuck_since > self.config.queue_timeout_s:
                                raise self.exhausted(model, tries.log, "failovers") from None
                            resumes += 1
                            delay = backoff_s(min(resumes, 5), self.rng)
                        elif delivered:
                            stuck_since, resumes = now, 0
                            failovers += 1
                            metrics.FAILOVERS.labels(model).inc()
                            if failovers > self.config.max_failovers:
                                raise self.exhausted(model, tries.log, "failovers") from None
                            trace.get_current_span().add_event(
                                "failover",
                                {
                                    "meshserve.node": slot.endpoint.node_id,
                                    "meshserve.reason": b.what,
                                },
                            )
                            delay = backoff_s(failovers - 1, self.rng) if failovers > 1 else 0.0
                        else:
                            delay = self.retry(tries, slot, b, now)
                finally:
                    self.admission.release(slot)
                if delay:
                    await self.pause(delay, call)
        finally:
            call.trailers.append(("meshserve-failovers", str(failovers)))

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

    async def _attempt(
        self,
        slot: Slot,
        payload: bytes,
        request: inference_pb2.GenerateRequest,
        call: Call,
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
        upstream = self.upstreams.generate(endpoint.address)(
            payload,
            timeout=call.remaining_s(),
            metadata=trace_metadata(span, request.request_id),
        )
        gone = self.table.departure(slot.model, endpoint.identity)
        watcher = asyncio.get_running_loop().create_task(_cancel_when(gone, upstream))
        key = (endpoint.address, slot.model)
        stall = Stall(upstream, first_s)
        sent = time.monotonic()
        try:
            try:
                first = await upstream.read()
            except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
                if stall.fired:
                    raise Broken(f"no first token in {first_s:.1f} s") from None
                raise _upstream_error(e, gone, "") from None
            state.first_token_s = state.first_token_s or time.monotonic() - sent
            if first is not grpc.aio.EOF:
                self.admission.first_token(slot)
                span.set_attribute("meshserve.ttft.observed_s", time.monotonic() - sent)
            stall.delivered()
            stall.relimit(self.config.inter_token_timeout_s)
            stall.pace(self.config.stall_factor, self.config.stall_floor_s)
            self.breakers.success(key, time.monotonic())
            if not state.sent:
                await state.send(call, upstream, slot, attempt, start, self.demand)
            if first is grpc.aio.EOF:
                return
            yield first
            try:
                while True:
                    stall.reading()
                    if (message := await upstream.read()) is grpc.aio.EOF:
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
            if not upstream.done():
                upstream.cancel()  # our caller went away (or we gave up): stop the agent's work
            span.end()


def _upstream_error(e: BaseException, gone: asyncio.Event, when: str) -> BaseException:
    """What reading the upstream call raised, as the relay sees it: a status as `Broken` (or
    passed through, see `attempts.broken`); a cancel that the departure watcher made (the
    replica left the table) as `Broken`; any other cancel (our caller went away) as itself."""
    if isinstance(e, asyncio.CancelledError):
        return Broken(f"replica left the table{when}") if gone.is_set() else e
    return broken(e, gone.is_set())


async def _cancel_when(gone: asyncio.Event, call: Any) -> None:
    """Cancels ``call`` once its replica is gone, so the read waiting on it fails over now."""
    await gone.wait()
    call.cancel()
