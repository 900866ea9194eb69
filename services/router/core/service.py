"""The router's Inference service: a transparent, smart proxy in front of the agents.

Every call first passes the gate (gate.py: who the tenant is, what it may use, its priority
and its limits); Generate then goes through the relay (relay.py: admission, retries before the
first token, failover after it); Embed takes a slot the same way and retries on another replica.
Deadlines and cancellation propagate: upstream calls get the caller's remaining time, and a
cancelled caller cancels the upstream call. What a served request used is counted for its
tenant when it ends (usage.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from meshserve.router.config import RouterConfig
from meshserve.router.core.admission import Admission, Who
from meshserve.router.core.budget import RetryBudget
from meshserve.router.core.demand import DemandTracker
from meshserve.router.core.genai import genai_attributes
from meshserve.router.core.relay import RETRYABLE, Relay
from meshserve.router.core.table import EndpointTable
from meshserve.router.core.upstreams import Upstreams, trace_metadata
from meshserve.router.routing.endpoints import Route
from meshserve.router.routing.exclusions import Exclusions
from meshserve.router.tenancy.gate import BookSource, TenantRates, caller, permission_denied
from meshserve.router.tenancy.quota import Quotas, Ticket
from meshserve.router.tenancy.tenants import Tenant
from meshserve.router.tenancy.usage import UsageLedger, to_proto
from meshserve.rpc import handlers
from meshserve.rpc.errors import ServiceError, not_found_model
from meshserve.rpc.handlers import Ctx
from meshserve.telemetry import metrics
from meshserve.telemetry.server_interceptor import traceresponse
from meshserve.tensors import check_inputs, not_a_tensor_model
from meshserve.v1 import inference_pb2, inference_pb2_grpc, router_pb2
from meshserve.validation import check_embed, check_generate
from opentelemetry import trace


@dataclass
class Tenancy:
    """The gate's parts: the tenant book, this router's per-tenant rates (its share of
    cluster-wide limits), the limits, and the usage ledger."""

    source: BookSource
    rates: TenantRates
    quotas: Quotas
    ledger: UsageLedger

    def admit(self, tenant: Tenant, model: str) -> Ticket | None:
        self.rates.arrived(tenant.name)
        if not (tenant.limits.any or tenant.model_limits):
            return None
        try:
            return self.quotas.admit(tenant, model, time.monotonic())
        except ServiceError as e:
            metrics.REFUSED.labels(tenant.name, e.reason).inc()
            raise

    def done(
        self,
        tenant: Tenant,
        ticket: Ticket | None,
        model: str,
        cold: bool,
        usage: tuple[int, int],
        gpu_seconds: float,
        served: bool = True,
    ) -> None:
        """The request ended: its limits get their stream back and its tokens; a request that
        was served (its stream began) is counted for its tenant."""
        if ticket is not None:
            self.quotas.finish(tenant, ticket, sum(usage), time.monotonic())
        if not served:
            return
        price = self.source.book.prices.get(model)
        self.ledger.record(tenant.name, model, cold, usage[0], usage[1], gpu_seconds, price)


def usage_of(messages: list[bytes]) -> tuple[int, int]:
    """(input, output) tokens of a relayed stream: the final message's usage, or (a stream that
    ended early) the tokens delivered, input unknown."""
    if not messages:
        return 0, 0
    last = inference_pb2.GenerateResponse.FromString(messages[-1])
    if last.finish_reason and (last.usage.input_tokens or last.usage.output_tokens):
        return int(last.usage.input_tokens), int(last.usage.output_tokens)
    return 0, sum(len(inference_pb2.GenerateResponse.FromString(m).token_ids) for m in messages)


def gpu_seconds_of(messages: list[bytes]) -> float:
    """The device time a relayed stream is billed: what the agent that finished it reports on
    its final message (its fair share of the replica: `Usage.gpu_seconds`). A stream that failed
    over is billed for the part its last replica served (an agent that died cannot report), and
    one that ended without a final message for nothing."""
    if not messages:
        return 0.0
    last = inference_pb2.GenerateResponse.FromString(messages[-1])
    return float(last.usage.gpu_seconds) if last.finish_reason else 0.0


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
        tenancy: Tenancy,
    ) -> None:
        self.tenancy = tenancy
        self.config = config
        self.table = table
        self.admission = admission
        self.relay = relay
        self.upstreams = upstreams
        self.budget = budget
        self.demand = demand

    def enter(self, context: Ctx, name: str) -> tuple[Tenant, Route]:
        """The caller's tenant and the model's route: UNAUTHENTICATED, PERMISSION_DENIED (the
        same whether or not the model exists), NOT_FOUND (listing what the tenant may use)."""
        book = self.tenancy.source.book
        tenant = caller(book, context)
        route = self.table.current.resolve(name)
        if book.auth and not tenant.may_use(name, route.spec.name if route else ""):
            raise permission_denied(tenant, name)
        if route is None:
            known = [n for n, r in self.table.current.routes.items() if tenant.may_use(n)]
            raise not_found_model(name, known)
        trace.get_current_span().set_attribute("meshserve.tenant", tenant.name)
        return tenant, route

    # --- Generate ----------------------------------------------------------------------------

    async def generate(
        self, request: inference_pb2.GenerateRequest, context: Ctx
    ) -> AsyncIterator[bytes]:
        span = trace.get_current_span()
        span.set_attribute("gen_ai.request.model", request.model)
        tenant, route = self.enter(context, request.model)
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
        # Fair queueing off (an ablation): every request equal, at the agent too.
        asked = tenant.priority(request.priority) if self.config.fair_queueing else 0
        request.priority = asked  # type: ignore[assignment]
        span.set_attribute("meshserve.priority", int(request.priority))
        ticket = self.tenancy.admit(tenant, model)
        who = Who(tenant.name, request.priority, tenant.weight)
        cold = not route.ready
        self.demand.arrived(model)
        self.demand.in_flight(model, +1)
        metrics.IN_FLIGHT.labels("router", model).inc()
        code = "OK"
        messages: list[bytes] = []
        try:
            async for message in self.relay.generate(request, route, context, who):
                messages.append(message)
                yield message
        except BaseException as e:
            code = handlers.code_of(e)
            raise
        finally:
            self.demand.in_flight(model, -1)
            metrics.IN_FLIGHT.labels("router", model).dec()
            metrics.REQUESTS.labels("router", model, code).inc()
            usage = usage_of(messages)
            genai_attributes(span, request, usage, messages)
            self.tenancy.done(
                tenant, ticket, model, cold, usage, gpu_seconds_of(messages), bool(messages)
            )

    # --- Embed, Infer, ListModels ---------------------------------------------------------

    async def embed(
        self, request: inference_pb2.EmbedRequest, context: Ctx
    ) -> inference_pb2.EmbedResponse:
        check_embed(request)
        tenant, route = self.enter(context, request.model)
        who = Who(tenant.name, tenant.priority(0), tenant.weight)
        reply: inference_pb2.EmbedResponse = await self._unary(
            "Embed", request, route, context, tenant, who
        )
        return reply

    async def infer(
        self, request: inference_pb2.InferRequest, context: Ctx
    ) -> inference_pb2.InferResponse:
        """A tensor model's request: checked here when the model's signature is known (the
        agent checks it again), then sent to a replica like Embed (any failure before a reply
        is retried elsewhere: inference on tensors has no side effects)."""
        tenant, route = self.enter(context, request.model)
        if route.spec.engine_args.get("task") != "classify":
            raise not_a_tensor_model(route.spec.name)
        if route.signature is not None:
            check_inputs(route.spec.name, request.inputs, request.outputs, route.signature)
        asked = tenant.priority(request.priority) if self.config.fair_queueing else 0
        request.priority = asked  # type: ignore[assignment]
        who = Who(tenant.name, request.priority, tenant.weight)
        reply: inference_pb2.InferResponse = await self._unary(
            "Infer", request, route, context, tenant, who
        )
        return reply

    async def _unary(
        self, method: str, request: Any, route: Route, context: Ctx, tenant: Tenant, who: Who
    ) -> Any:
        """One unary call (Embed, Infer) through the tenant's limits, admission and retries;
        counted for the tenant when it was served."""
        ticket = self.tenancy.admit(tenant, route.spec.name)
        cold = not route.ready
        served = False
        code = "OK"
        self.demand.arrived(route.spec.name)
        self.demand.in_flight(route.spec.name, +1)
        metrics.IN_FLIGHT.labels("router", route.spec.name).inc()
        try:
            reply = await self._attempts(method, request, route, context, who)
            served = True
            if (tr := traceresponse()) is not None:
                await context.send_initial_metadata((tr,))
            return reply
        except BaseException as e:
            code = handlers.code_of(e)
            raise
        finally:
            self.demand.in_flight(route.spec.name, -1)
            metrics.IN_FLIGHT.labels("router", route.spec.name).dec()
            metrics.REQUESTS.labels("router", route.spec.name, code).inc()
            self.tenancy.done(tenant, ticket, route.spec.name, cold, (0, 0), 0.0, served=served)

    async def _attempts(
        self, method: str, request: Any, route: Route, context: Ctx, who: Who
    ) -> Any:
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        self.budget.request()
        failed = Exclusions()
        errors: list[str] = []
        while True:
            slot = await self.admission.acquire(
                route, "", handlers.remaining_s(context), failed, who
            )
            request.model = slot.model
            stub = inference_pb2_grpc.InferenceStub(self.upstreams.channel(slot.endpoint.address))
            try:
                return await getattr(stub, method)(
                    request,
                    timeout=handlers.remaining_s(context),
                    metadata=trace_metadata(trace.get_current_span(), request.request_id),
                )
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE and e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                errors.append(f"{slot.endpoint.node_id}: {e.code().name}: {e.details()}")
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    failed.add(slot.endpoint.identity)
                if len(errors) >= self.config.max_attempts or not self.budget.try_retry():
                    raise ServiceError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"model {slot.model!r}: {method} failed on every attempt: "
                        + "; ".join(errors),
                        "ALL_REPLICAS_FAILED",
                        retry_after_s=1.0,
                    ) from None
            finally:
                self.admission.release(slot)

    async def list_models(
        self, request: inference_pb2.ListModelsRequest, context: Ctx
    ) -> inference_pb2.ListModelsResponse:
        book = self.tenancy.source.book
        tenant = caller(book, context)
        out = inference_pb2.ListModelsResponse()
        for name, route in sorted(self.table.current.routes.items()):
            if book.auth and not tenant.may_use(name, *route.spec.aliases):
                continue
            out.models.add(
                name=name,
                aliases=route.spec.aliases,
                ready_replicas=len(route.ready),
                max_model_len=route.spec.max_model_len,
                signature=route.signature,
            )
        return out

    async def usage(
        self, request: router_pb2.UsageRequest, context: Ctx
    ) -> router_pb2.UsageResponse:
        """What tenants used through this router: a tenant its own, an admin everyone's."""
        tenant = caller(self.tenancy.source.book, context)
        if tenant.admin:
            tenants = [request.tenant] if request.tenant else None
        elif request.tenant and request.tenant != tenant.name:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"tenant {tenant.name!r} may read only its own usage",
                "USAGE_NOT_ALLOWED",
            )
        else:
            tenants = [tenant.name]
        rows, covered = self.tenancy.ledger.report(tenants, int(request.since_unix_ms))
        return to_proto(self.config.router_id, rows, covered)


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
            "Infer": grpc.unary_unary_rpc_method_handler(
                handlers.unary(servicer.infer),
                request_deserializer=inference_pb2.InferRequest.FromString,
                response_serializer=inference_pb2.InferResponse.SerializeToString,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                handlers.unary(servicer.list_models),
                request_deserializer=inference_pb2.ListModelsRequest.FromString,
                response_serializer=inference_pb2.ListModelsResponse.SerializeToString,
            ),
        },
    )


def admin_handlers_for(servicer: RouterInference) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "meshserve.v1.Router",
        {
            "Usage": grpc.unary_unary_rpc_method_handler(
                handlers.unary(servicer.usage),
                request_deserializer=router_pb2.UsageRequest.FromString,
                response_serializer=router_pb2.UsageResponse.SerializeToString,
            ),
        },
    )
