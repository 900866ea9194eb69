"""The router's Inference service: a transparent, smart proxy in front of the agents.

Generate forwards the agents' response messages as raw bytes (no re-encoding per token; DESIGN §3).
Retries happen only before the first message, on another replica; after it, an upstream error ends
the stream with the upstream's status. Deadlines and cancellation propagate: the upstream call gets
the caller's remaining time, and a cancelled caller cancels the upstream call.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine
from collections.abc import Set as AbstractSet
from typing import Any

import grpc
from meshserve.router.coldstart import ColdStartQueue
from meshserve.router.config import RouterConfig
from meshserve.router.demand import DemandTracker
from meshserve.router.outliers import Outliers
from meshserve.router.picker import rank
from meshserve.router.table import Endpoint, EndpointTable, Route
from meshserve.rpc import handlers
from meshserve.rpc.channels import ChannelPool
from meshserve.rpc.errors import ServiceError, not_found_model
from meshserve.rpc.handlers import Ctx
from meshserve.telemetry import metrics
from meshserve.telemetry.tracing import tracer
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from meshserve.validation import check_embed, check_generate
from opentelemetry import propagate, trace

_tracer = tracer(__name__)
GENERATE = "/meshserve.v1.Inference/Generate"

# Codes on which another replica may succeed (only before the first message).
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.NOT_FOUND,  # the replica unloaded between the table and the call
        grpc.StatusCode.CANCELLED,  # the agent shut down mid-call
    }
)
# Failures that say something about the replica's health (outlier detection).
UNHEALTHY = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
FORWARDED_HEADERS = frozenset({"meshserve-node", "meshserve-model"})


def trace_metadata(span: trace.Span, request_id: str) -> tuple[tuple[str, str], ...]:
    """W3C trace context of ``span`` plus the request id, as gRPC metadata."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return (*carrier.items(), ("meshserve-request-id", request_id))


class _Retry(Exception):
    """A replica failed before its first message; another may succeed."""

    def __init__(self, error: grpc.aio.AioRpcError | None) -> None:
        super().__init__(error.details() if error else "timeout")
        self.error = error


class Upstreams:
    """Calls to agents over the process's channel pool. No client interceptors: they wrap every
    streamed message; the trace context is injected once per call instead (`trace_metadata`)."""

    def __init__(self, pool: ChannelPool) -> None:
        self.pool = pool

    def channel(self, address: str) -> grpc.aio.Channel:
        return self.pool.get(address)

    def generate(self, address: str) -> Any:
        # Raw bytes both ways: the request is serialized once, responses are forwarded as they came.
        return self.pool.get(address).unary_stream(GENERATE)


class RouterInference:
    """Handlers for meshserve.v1.Inference; registered by `handlers_for` below."""

    def __init__(
        self,
        config: RouterConfig,
        table: EndpointTable,
        ensure: Callable[[str], Coroutine[Any, Any, str]],
        demand: DemandTracker,
        upstreams: Upstreams,
    ) -> None:
        self.config = config
        self.table = table
        self.ensure = ensure
        self.demand = demand
        self.coldstart = ColdStartQueue(
            table, ensure, config.queue_per_model, config.queue_timeout_s, config.ensure_interval_s
        )
        self.upstreams = upstreams
        self.outstanding: dict[str, int] = defaultdict(int)  # address → streams in flight
        self.outliers = Outliers(config.eject_after_failures, config.eject_for_s)
        self._tiebreak = itertools.count()

    # --- shared steps ------------------------------------------------------------------------

    def _route(self, name: str) -> Route:
        route = self.table.current.resolve(name)
        if route is None:
            raise not_found_model(name, list(self.table.current.routes))
        return route

    async def _ready_route(
        self, route: Route, context: Ctx, failed: AbstractSet[str] = frozenset()
    ) -> Route:
        """The route to serve from: the model's own, a READY fallback, or the cold-start wait.
        ``failed`` are addresses that just failed this request: they do not count as ready."""
        if any(e.address not in failed for e in route.ready):
            return route
        for name in route.spec.fallbacks:
            fallback = self.table.current.resolve(name)
            if fallback is not None and any(e.address not in failed for e in fallback.ready):
                asyncio.get_running_loop().create_task(self.ensure(route.spec.name))
                trace.get_current_span().set_attribute("meshserve.fallback", fallback.spec.name)
                return fallback
        model = route.spec.name
        self.demand.queued(model, +1)
        metrics.QUEUED.labels(model).inc()
        try:
            with _tracer.start_as_current_span(
                "router.queue", attributes={"gen_ai.request.model": model}
            ):
                return await self.coldstart.wait_ready(
                    model, handlers.remaining_s(context), exclude=failed
                )
        finally:
            self.demand.queued(model, -1)
            metrics.QUEUED.labels(model).dec()

    def _ranked(
        self, route: Route, session_key: str, failed: AbstractSet[str] = frozenset()
    ) -> tuple[Any, ...]:
        with _tracer.start_as_current_span("router.pick") as span:
            ranked = rank(
                [e for e in route.ready if e.address not in failed],
                self.outstanding,
                self.outliers.ejected(time.monotonic()),
                session_key,
                next(self._tiebreak),
            )
            span.set_attribute("meshserve.candidates", [e.node_id for e in ranked])
        return ranked[: self.config.max_attempts]

    # --- Generate ----------------------------------------------------------------------------

    async def generate(
        self, request: inference_pb2.GenerateRequest, context: Ctx
    ) -> AsyncIterator[bytes]:
        span = trace.get_current_span()
        span.set_attribute("gen_ai.request.model", request.model)
        route = self._route(request.model)
        check_generate(request, route.spec)
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        span.set_attribute("meshserve.request_id", request.request_id)
        model = route.spec.name
        self.demand.arrived(model)
        self.demand.in_flight(model, +1)
        metrics.IN_FLIGHT.labels("router", model).inc()
        code = "OK"
        try:
            async for message in self._generate(request, route, context):
                yield message
        except BaseException as e:
            code = handlers.code_of(e)
            raise
        finally:
            self.demand.in_flight(model, -1)
            metrics.IN_FLIGHT.labels("router", model).dec()
            metrics.REQUESTS.labels("router", model, code).inc()

    async def _generate(
        self, request: inference_pb2.GenerateRequest, route: Route, context: Ctx
    ) -> AsyncIterator[bytes]:
        start = time.perf_counter()
        failed: set[str] = set()
        attempt = 0
        last_error: grpc.aio.AioRpcError | None = None
        # Each pass tries the ranked replicas; when all of them fail before the first token (an
        # agent just died and its lease has not expired yet), wait for a fresh replica within the
        # caller's deadline and try again. Never after the first token (DESIGN §4).
        for _ in range(2):
            route = await self._ready_route(route, context, failed)
            request.model = route.spec.name
            payload = request.SerializeToString()
            for endpoint in self._ranked(route, request.session_key, failed):
                attempt += 1
                if attempt > 1:
                    metrics.RETRIES.labels(route.spec.name).inc()
                outcome = self._attempt(endpoint, payload, request, route, attempt, start, context)
                try:
                    async for message in outcome:
                        yield message
                    return
                except _Retry as r:
                    failed.add(endpoint.address)
                    last_error = r.error or last_error
        tried = f"{last_error.code().name}: {last_error.details()}" if last_error else "timeout"
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"every replica of {route.spec.name!r} failed before the first token ({tried})",
            "ALL_REPLICAS_FAILED",
            retry_after_s=1.0,
        )

    async def _attempt(
        self,
        endpoint: Endpoint,
        payload: bytes,
        request: inference_pb2.GenerateRequest,
        route: Route,
        attempt: int,
        start: float,
        context: Ctx,
    ) -> AsyncIterator[bytes]:
        """Streams from one replica; raises _Retry when it fails before the first message."""
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
        self.outstanding[endpoint.address] += 1
        try:
            try:
                first = await asyncio.wait_for(call.read(), self.config.first_token_timeout_s)
            except TimeoutError:
                self.outliers.failure(endpoint.address, time.monotonic())
                span.set_status(trace.Status(trace.StatusCode.ERROR, "no first token in time"))
                raise _Retry(None) from None
            except grpc.aio.AioRpcError as e:
                span.set_status(
                    trace.Status(trace.StatusCode.ERROR, f"{e.code().name}: {e.details()}")
                )
                if e.code() in UNHEALTHY:
                    self.outliers.failure(endpoint.address, time.monotonic())
                if e.code() not in RETRYABLE:
                    raise
                raise _Retry(e) from None
            self.outliers.success(endpoint.address)
            ttft = time.perf_counter() - start
            metrics.TTFT.labels("router", route.spec.name).observe(ttft)
            self.demand.first_token(route.spec.name, ttft)
            trace.get_current_span().set_attribute("meshserve.ttft_s", ttft)
            upstream_headers = await call.initial_metadata() or ()
            headers = [(k, v) for k, v in upstream_headers if k in FORWARDED_HEADERS]
            await context.send_initial_metadata((*headers, ("meshserve-attempts", str(attempt))))
            if first is grpc.aio.EOF:
                return
            yield first
            # One timeout for the whole stream, pushed forward after each message: cheaper than a
            # wait_for (a new task) per message.
            gap = self.config.inter_token_timeout_s
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(loop.time() + gap) as watchdog:
                    while (message := await call.read()) is not grpc.aio.EOF:
                        yield message
                        watchdog.reschedule(loop.time() + gap)
            except TimeoutError:
                raise ServiceError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"replica on {endpoint.node_id} stalled: no token for {gap:.0f} s",
                    "REPLICA_STALLED",
                ) from None
        finally:
            self.outstanding[endpoint.address] -= 1
            if not call.done():
                call.cancel()  # our caller went away (or we gave up): stop the agent's work
            span.end()

    # --- Embed, ListModels -------------------------------------------------------------------

    async def embed(
        self, request: inference_pb2.EmbedRequest, context: Ctx
    ) -> inference_pb2.EmbedResponse:
        check_embed(request)
        route = await self._ready_route(self._route(request.model), context)
        request.model = route.spec.name
        self.demand.arrived(route.spec.name)
        last_error: grpc.aio.AioRpcError | None = None
        for endpoint in self._ranked(route, ""):
            stub = inference_pb2_grpc.InferenceStub(self.upstreams.channel(endpoint.address))
            self.outstanding[endpoint.address] += 1
            try:
                reply: inference_pb2.EmbedResponse = await stub.Embed(
                    request,
                    timeout=handlers.remaining_s(context),
                    metadata=trace_metadata(trace.get_current_span(), request.request_id),
                )
                return reply
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE:
                    raise
                last_error = e
            finally:
                self.outstanding[endpoint.address] -= 1
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            f"every replica of {route.spec.name!r} failed"
            + (f" ({last_error.code().name}: {last_error.details()})" if last_error else ""),
            "ALL_REPLICAS_FAILED",
            retry_after_s=1.0,
        )

    async def list_models(
        self, request: inference_pb2.ListModelsRequest, context: Ctx
    ) -> inference_pb2.ListModelsResponse:
        out = inference_pb2.ListModelsResponse()
        for name, route in sorted(self.table.current.routes.items()):
            out.models.add(
                name=name,
                aliases=route.spec.aliases,
                ready_replicas=len(route.ready),
                max_model_len=route.spec.max_model_len,
            )
        return out


def handlers_for(servicer: RouterInference) -> grpc.GenericRpcHandler:
    """Generate's responses go out as the raw bytes the agent sent (response_serializer=None)."""
    return grpc.method_handlers_generic_handler(
        "meshserve.v1.Inference",
        {
            "Generate": grpc.unary_stream_rpc_method_handler(
                handlers.stream(servicer.generate),
                request_deserializer=inference_pb2.GenerateRequest.FromString,
                response_serializer=None,
            ),
            "Embed": grpc.unary_unary_rpc_method_handler(
                handlers.unary(servicer.embed),
                request_deserializer=inference_pb2.EmbedRequest.FromString,
                response_serializer=inference_pb2.EmbedResponse.SerializeToString,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                handlers.unary(servicer.list_models),
                request_deserializer=inference_pb2.ListModelsRequest.FromString,
                response_serializer=inference_pb2.ListModelsResponse.SerializeToString,
            ),
        },
    )
