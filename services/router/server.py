"""The router's Inference service: a transparent, smart proxy in front of the agents.

Generate goes through the relay (relay.py: admission, retries before the first token, failover
after it); Embed takes a slot the same way and retries on another replica. Deadlines and
cancellation propagate: upstream calls get the caller's remaining time, and a cancelled caller
cancels the upstream call.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
from meshserve.router.admission import Admission, Identity
from meshserve.router.budget import RetryBudget
from meshserve.router.config import RouterConfig
from meshserve.router.demand import DemandTracker
from meshserve.router.relay import RETRYABLE, Relay
from meshserve.router.table import EndpointTable, Route
from meshserve.router.upstreams import Upstreams, trace_metadata
from meshserve.rpc import handlers
from meshserve.rpc.errors import ServiceError, not_found_model
from meshserve.rpc.handlers import Ctx
from meshserve.telemetry import metrics
from meshserve.v1 import inference_pb2, inference_pb2_grpc
from meshserve.validation import check_embed, check_generate
from opentelemetry import trace


class RouterInference:
    """Handlers for meshserve.v1.Inference; registered by `handlers_for` below."""

    def __init__(
        self,
        config: RouterConfig,
        table: EndpointTable,
        admission: Admission,
        relay: Relay,
        upstreams: Upstreams,
        budget: RetryBudget,
        demand: DemandTracker,
    ) -> None:
        self.config = config
        self.table = table
        self.admission = admission
        self.relay = relay
        self.upstreams = upstreams
        self.budget = budget
        self.demand = demand

    def _route(self, name: str) -> Route:
        route = self.table.current.resolve(name)
        if route is None:
            raise not_found_model(name, list(self.table.current.routes))
        return route

    # --- Generate ----------------------------------------------------------------------------

    async def generate(
        self, request: inference_pb2.GenerateRequest, context: Ctx
    ) -> AsyncIterator[bytes]:
        span = trace.get_current_span()
        span.set_attribute("gen_ai.request.model", request.model)
        route = self._route(request.model)
        check_generate(request, route.spec)
        if request.continuation.token_ids or request.continuation.text:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "continuation is set by routers when a stream fails over; clients leave it empty",
                "INVALID_REQUEST",
            )
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        span.set_attribute("meshserve.request_id", request.request_id)
        model = route.spec.name
        self.demand.arrived(model)
        self.demand.in_flight(model, +1)
        metrics.IN_FLIGHT.labels("router", model).inc()
        code = "OK"
        try:
            async for message in self.relay.generate(request, route, context):
                yield message
        except BaseException as e:
            code = handlers.code_of(e)
            raise
        finally:
            self.demand.in_flight(model, -1)
            metrics.IN_FLIGHT.labels("router", model).dec()
            metrics.REQUESTS.labels("router", model, code).inc()

    # --- Embed, ListModels -------------------------------------------------------------------

    async def embed(
        self, request: inference_pb2.EmbedRequest, context: Ctx
    ) -> inference_pb2.EmbedResponse:
        check_embed(request)
        route = self._route(request.model)
        self.demand.arrived(route.spec.name)
        self.budget.request()
        failed: set[Identity] = set()
        errors: list[str] = []
        while True:
            slot = await self.admission.acquire(route, "", handlers.remaining_s(context), failed)
            request.model = slot.model
            stub = inference_pb2_grpc.InferenceStub(self.upstreams.channel(slot.endpoint.address))
            try:
                reply: inference_pb2.EmbedResponse = await stub.Embed(
                    request,
                    timeout=handlers.remaining_s(context),
                    metadata=trace_metadata(trace.get_current_span(), request.request_id),
                )
                return reply
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE and e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                errors.append(f"{slot.endpoint.node_id}: {e.code().name}: {e.details()}")
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    failed.add(slot.endpoint.identity)
                if len(errors) >= self.config.max_attempts or not self.budget.try_retry():
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"model {slot.model!r}: embedding failed on every attempt: "
                        + "; ".join(errors),
                        "ALL_REPLICAS_FAILED",
                        retry_after_s=1.0,
                    ) from None
            finally:
                self.admission.release(slot)

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
