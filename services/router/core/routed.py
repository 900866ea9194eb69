"""A route's Generate (DESIGN §9 "Routes"; routing/routes.py decides, core/routes.py keeps the
documents): a cascade's small model first when the route has one, then the plan's hops in
order, each until its first token — a hop that fails before it (an error, or a queue wait over
the hop's bound) hands the request to the next, said on the span (event
``meshserve.route.fallback``) and in usage — and shadow copies, detached.

Cascades hold the small model's stream until its first ``tokens`` tokens (or its end) are in:
streamed and unary calls alike, so a client never sees an answer that is then withdrawn; the
cost is that a cascade's TTFT is those tokens' time. The small model's tokens are billed (it
ran), its answer kept or dropped by their mean log probability (``meshserve.cascade.*`` on the
span; `route status` rows of role ``cascade`` and ``escalated``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc
from meshserve.router.core.accounting import Tenancy, usage_of
from meshserve.router.core.admission import Who
from meshserve.router.core.call import Call
from meshserve.router.core.relay import Relay
from meshserve.router.core.routes import Routes, TargetStats
from meshserve.router.core.table import EndpointTable
from meshserve.router.routing.endpoints import Route
from meshserve.router.routing.routes import Cascade, Facts, Hop, Plan, Policy
from meshserve.router.tenancy.gate import permission_denied
from meshserve.router.tenancy.tenants import Tenant
from meshserve.rpc.errors import ServiceError, not_found_model
from meshserve.v1 import cluster_pb2, common_pb2, inference_pb2
from opentelemetry import trace

SHADOWS_IN_FLIGHT = 64
SHADOW_TIMEOUT_S = 60.0
# What hands a route's request to its next hop: the hop could not serve it now. Not a bad
# request, a refusal of the caller, or the caller's own deadline or cancel.
FALLS_BACK = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}
# Generate on one model: (request, route, call, tenant, hop) → the raw messages
GenerateOn = Callable[
    [inference_pb2.GenerateRequest, Route, Call, Tenant, Hop | None], AsyncGenerator[bytes, None]
]


# The caller's own limits (tenancy/quota.py): another model would be refused as well.
CALLERS_LIMITS = {"REQUESTS_PER_S_LIMIT", "TOKENS_PER_MIN_LIMIT", "CONCURRENT_STREAMS_LIMIT"}
HAND_ON_S = 0.5  # less left of the caller's deadline than this: no next hop is worth starting


def falls_back(e: ServiceError, call: Call) -> bool:
    return e.code in FALLS_BACK and e.reason not in CALLERS_LIMITS and _time_left(call)


REFUSED = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.CANCELLED,
}


def _time_left(call: Call) -> bool:
    """Enough of the caller's deadline left to start another model."""
    left = call.remaining_s()
    return left is None or left > HAND_ON_S


def facts(
    tenant: Tenant,
    auth: bool,
    call: Call,
    session_key: str = "",
    request_id: str = "",
    priority: int = 0,
    chars: int = 0,
) -> Facts:
    """What a route reads of a request. Without auth every caller is the same "tenant", so
    stickiness falls to the session key, else the request (a fresh draw), not one key for all."""
    return Facts(
        tenant.name if auth else "",
        session_key,
        request_id or uuid.uuid4().hex,
        tenant.priority(priority),
        chars,
        call.metadata,
    )


def fresh(call: Call) -> None:
    """Before another model answers: the headers and failover trailer of one that did not."""
    call.headers.clear()
    call.trailers[:] = [t for t in call.trailers if t[0] != "meshserve-failovers"]


class RoutedGenerate:
    def __init__(
        self,
        routes: Routes,
        table: EndpointTable,
        relay: Relay,
        tenancy: Tenancy,
        identify: Callable[[Call], Tenant],
        generate_on: GenerateOn,
    ) -> None:
        self.routes, self.table, self.relay, self.tenancy = routes, table, relay, tenancy
        self.identify, self.generate_on = identify, generate_on
        self._shadows: set[asyncio.Task[None]] = set()

    def _resolve(self, model: str) -> Route:
        route = self.table.current.resolve(model)
        if route is None:
            raise not_found_model(model, list(self.table.current.routes))
        return route

    async def generate(
        self, policy: Policy, request: inference_pb2.GenerateRequest, call: Call
    ) -> AsyncGenerator[bytes, None]:
        span = trace.get_current_span()
        tenant = self.identify(call)
        if self.tenancy.source.book.auth and not tenant.may_use(policy.name):
            raise permission_denied(tenant, policy.name)
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
        plan = policy.plan(
            facts(
                tenant,
                self.tenancy.source.book.auth,
                call,
                request.session_key,
                request.request_id,
                request.priority,
                chars,
            )
        )
        span.set_attribute("meshserve.route", plan.route)
        if plan.rule:
            span.set_attribute("meshserve.route.rule", plan.rule)
        if not plan.hops:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"route {plan.route!r} has no target for this request (no rule matched and it "
                "has no weighted targets)",
                "NO_TARGET",
            )
        pristine = inference_pb2.GenerateRequest()
        pristine.CopyFrom(request)
        for model in plan.shadows:
            self._shadow(plan, model, pristine, call, tenant)
        if plan.cascade is not None:
            kept = False
            async for message in self._cascade(plan, plan.cascade, pristine, call, tenant):
                kept = True
                yield message
            if kept:
                return
            fresh(call)
        for i, hop in enumerate(plan.hops):
            last = i == len(plan.hops) - 1
            attempt = inference_pb2.GenerateRequest()
            attempt.CopyFrom(pristine)
            attempt.model = hop.model
            role = "escalated" if plan.cascade is not None and i == 0 else hop.role
            stats = self.routes.target(plan.route, hop.model, role)
            span.set_attribute("meshserve.route.target", hop.model)
            started, first, messages = time.perf_counter(), 0.0, []
            try:
                gen = self.generate_on(attempt, self._resolve(hop.model), call, tenant, hop)
                async with contextlib.aclosing(gen):  # closed here, in this task, if we are
                    async for message in gen:
                        first = first or time.perf_counter() - started
                        messages.append(message)
                        yield message
            except ServiceError as e:
                stats.ended(False, first or None, time.perf_counter() - started, 0)
                if messages or last or not falls_back(e, call):
                    raise
                stats.fell_back += 1
                span.add_event(
                    "meshserve.route.fallback",
                    {
                        "meshserve.route.from": hop.model,
                        "meshserve.route.to": plan.hops[i + 1].model,
                        "meshserve.route.reason": e.reason or e.code.name,
                    },
                )
                fresh(call)
                continue
            stats.ended(True, first, time.perf_counter() - started, usage_of(messages)[1])
            if i:
                span.set_attribute("meshserve.route.fallbacks", i)
            return

    async def _cascade(
        self,
        plan: Plan,
        cascade: Cascade,
        pristine: inference_pb2.GenerateRequest,
        call: Call,
        tenant: Tenant,
    ) -> AsyncIterator[bytes]:
        """The small model's answer when its confidence holds (then nothing is yielded if it
        does not: the caller escalates). Its messages carry log probabilities only when the
        client asked for them."""
        attempt = inference_pb2.GenerateRequest()
        attempt.CopyFrom(pristine)
        attempt.model, attempt.sampling.logprobs = cascade.model, True
        asked = pristine.sampling.logprobs
        stats = self.routes.target(plan.route, cascade.model, "cascade")
        started = time.perf_counter()
        gen = self._small(attempt, cascade.model, call, tenant)
        decide = self._decide(cascade, gen, asked, stats, started, call)
        async with contextlib.aclosing(gen), contextlib.aclosing(decide):  # closed in this task
            async for raw in decide:
                yield raw

    async def _small(
        self, attempt: inference_pb2.GenerateRequest, model: str, call: Call, tenant: Tenant
    ) -> AsyncGenerator[bytes, None]:
        """The cascade's small model (its absence is an error of the stream: escalated)."""
        upstream = self.generate_on(attempt, self._resolve(model), call, tenant, None)
        async with contextlib.aclosing(upstream):
            async for raw in upstream:
                yield raw

    async def _decide(
        self,
        cascade: Cascade,
        gen: AsyncIterator[bytes],
        asked: bool,
        stats: TargetStats,
        started: float,
        call: Call,
    ) -> AsyncGenerator[bytes, None]:
        span = trace.get_current_span()
        held: list[bytes] = []
        logprobs: list[float] = []
        done = False
        try:
            async for raw in gen:
                msg = inference_pb2.GenerateResponse.FromString(raw)
                logprobs += [lp.logprob for lp in msg.logprobs]
                held.append(raw if asked else _without_logprobs(msg))
                if msg.finish_reason or len(logprobs) >= cascade.tokens:
                    done = bool(msg.finish_reason)
                    break
        except ServiceError as e:  # the small model cannot answer (absent, down, too long a
            # prompt for it): the larger one may; not the caller's own refusals or deadline
            if e.code in REFUSED or e.reason in CALLERS_LIMITS or not _time_left(call):
                raise
            stats.ended(False, None, time.perf_counter() - started, 0)
            span.set_attribute("meshserve.cascade.escalated", True)
            span.set_attribute("meshserve.cascade.reason", e.reason or e.code.name)
            return
        head = logprobs[: cascade.tokens]
        mean = sum(head) / len(head) if head else float("-inf")
        span.set_attribute("meshserve.cascade.mean_logprob", mean)
        decided = time.perf_counter() - started
        if cascade.escalate(logprobs):  # the caller closes ``gen``: its replica stops
            stats.ended(True, decided, decided, len(logprobs))
            span.set_attribute("meshserve.cascade.escalated", True)
            return
        span.set_attribute("meshserve.cascade.escalated", False)
        for raw in held:
            yield raw
        tokens = len(logprobs)
        if not done:
            async for raw in gen:
                msg = inference_pb2.GenerateResponse.FromString(raw)
                tokens += len(msg.token_ids)
                yield raw if asked else _without_logprobs(msg)
        stats.ended(True, decided, time.perf_counter() - started, tokens)

    def _shadow(
        self,
        plan: Plan,
        model: str,
        request: inference_pb2.GenerateRequest,
        call: Call,
        tenant: Tenant,
    ) -> None:
        """A copy of the request to ``model``, detached: its answer is read and dropped, its
        latency and errors recorded (`route status`); sheddable (it yields to real traffic),
        never billed to the tenant, at most SHADOWS_IN_FLIGHT at once (more are not sent)."""
        route = self.table.current.resolve(model)
        stats = self.routes.target(plan.route, model, "shadow")
        if route is None:
            stats.ended(False, None, 0.0, 0)  # the candidate is not registered: an error of it
            return
        if (
            len(self._shadows) >= SHADOWS_IN_FLIGHT
            or route.spec.engine == cluster_pb2.ENGINE_KIND_EXTERNAL  # never through a paid API
        ):
            stats.skipped += 1  # not sent: no verdict on the candidate
            return
        copy = inference_pb2.GenerateRequest()
        copy.CopyFrom(request)
        copy.model, copy.request_id = model, f"{request.request_id}-shadow"
        left = call.remaining_s()
        detached = Call.within(SHADOW_TIMEOUT_S if left is None else min(left, SHADOW_TIMEOUT_S))
        who = Who(tenant.name, common_pb2.PRIORITY_LOW, tenant.weight)
        task = asyncio.get_running_loop().create_task(
            self._run_shadow(copy, route, detached, who, stats)
        )
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _run_shadow(
        self,
        request: inference_pb2.GenerateRequest,
        route: Route,
        call: Call,
        who: Who,
        stats: TargetStats,
    ) -> None:
        started, first, messages = time.perf_counter(), None, []
        try:
            async for message in self.relay.generate(request, route, call, who):
                first = first or time.perf_counter() - started
                messages.append(message)
            stats.ended(True, first, time.perf_counter() - started, usage_of(messages)[1])
        except ServiceError as e:  # recorded, never raised: nobody waits for a shadow
            # Shed for real traffic, or out of time: not the candidate's fault.
            if e.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED):
                stats.skipped += 1
            else:
                stats.ended(False, first, time.perf_counter() - started, 0)
        except Exception:
            stats.ended(False, first, time.perf_counter() - started, 0)

    def close(self) -> None:
        """The router stops: shadow copies in flight are cancelled."""
        for task in list(self._shadows):
            task.cancel()


def _without_logprobs(msg: inference_pb2.GenerateResponse) -> bytes:
    msg.ClearField("logprobs")
    return msg.SerializeToString()
