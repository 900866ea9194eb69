"""The router's Inference service, transport-neutral: a transparent, smart proxy in front of
the agents that every front (fronts/: native gRPC, OpenAI HTTP, KServe) calls with a `Call`.

Every call first passes the gate (tenancy/gate.py: who the tenant is, what it may use, its
priority and its limits); Generate then goes through the relay (relay.py: admission, retries
before the first token, failover after it); Embed and Infer through the same attempt policy
(unary.py). Deadlines and cancellation propagate: upstream calls get the caller's remaining
time, and a cancelled caller cancels the upstream call. Each request is counted in one place
when it ends (accounting.py).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from meshserve.router.config import RouterConfig
from meshserve.router.core.accounting import Accountant, Tenancy, gpu_seconds_of, usage_of
from meshserve.router.core.admission import Admission, Who
from meshserve.router.core.call import Call
from meshserve.router.core.decisions import DECISIONS_KEPT
from meshserve.router.core.decisions import to_proto as decision_proto
from meshserve.router.core.external import External
from meshserve.router.core.genai import genai_attributes
from meshserve.router.core.relay import Relay
from meshserve.router.core.routed import RoutedGenerate, facts, falls_back
from meshserve.router.core.routes import Routes
from meshserve.router.core.table import EndpointTable
from meshserve.router.core.unary import Unary
from meshserve.router.routing.endpoints import Route
from meshserve.router.routing.routes import Hop
from meshserve.router.tenancy.gate import caller, permission_denied
from meshserve.router.tenancy.tenants import Tenant
from meshserve.router.tenancy.usage import to_proto
from meshserve.routespec import models_named
from meshserve.rpc.errors import ServiceError, not_found_model
from meshserve.telemetry.server_interceptor import traceresponse
from meshserve.tensors import check_inputs, not_a_tensor_model
from meshserve.v1 import cluster_pb2, inference_pb2, router_pb2
from meshserve.validation import check_embed, check_generate
from opentelemetry import trace

T = TypeVar("T")


class RouterInference:
    """The core's calls; the fronts translate their protocols to and from these."""

    def __init__(
        self,
        config: RouterConfig,
        table: EndpointTable,
        admission: Admission,
        relay: Relay,
        unary: Unary,
        accountant: Accountant,
        routes: Routes | None = None,
    ) -> None:
        self.config = config
        self.routes = routes or Routes()
        self.external = External()
        self.table = table
        self.admission = admission
        self.relay = relay
        self.unary = unary
        self.accountant = accountant
        self.tenancy: Tenancy = accountant.tenancy
        self.routed = RoutedGenerate(
            self.routes, table, relay, self.tenancy, self.identify, self._generate_on
        )

    def identify(self, call: Call) -> Tenant:
        """The caller's tenant; raises UNAUTHENTICATED."""
        return caller(self.tenancy.source.book, call.authorization, call.subjects)

    def _admin_only(self, call: Call, what: str, reason: str) -> None:
        """With auth on, only admin tenants read ``what`` (it names replicas and requests)."""
        tenant = self.identify(call)
        if self.tenancy.source.book.auth and not tenant.admin:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"tenant {tenant.name!r} may not read {what} (admin tenants may)",
                reason,
            )

    def enter(self, call: Call, name: str) -> tuple[Tenant, Route]:
        """The caller's tenant and the model's route: UNAUTHENTICATED, PERMISSION_DENIED (the
        same whether or not the model exists), NOT_FOUND (listing what the tenant may use). A
        route's name resolves to its plan's first model for this call (KServe's reads)."""
        tenant, models = self.targets(call, name)
        return tenant, self._model(tenant, models[0], routed=models[0] != name)

    async def _each_target(
        self, call: Call, name: str, one: Callable[[Tenant, Route], Awaitable[T]]
    ) -> T:
        """``one(tenant, route)`` on ``name``'s model, or on a route's models in order while a
        model fails before it answers in a way the next may not (routed.falls_back)."""
        tenant, models = self.targets(call, name)
        for i, model in enumerate(models):
            try:
                return await one(tenant, self._model(tenant, model, routed=model != name))
            except ServiceError as e:
                if i == len(models) - 1 or not falls_back(e, call):
                    raise
        raise AssertionError("unreachable: the last model returns or raises")

    def targets(self, call: Call, name: str) -> tuple[Tenant, list[str]]:
        """The caller's tenant and the models a call to ``name`` may try, in order: ``name``
        itself, or a route's plan for this call (rules, weights, fallbacks; routes.py). A tenant
        allowed a route may use whatever it sends to; NOT_FOUND when no rule and no weight
        gives it a model."""
        tenant = self.identify(call)
        policy = self.routes.get(name)
        if policy is None:
            return tenant, [name]
        if self.tenancy.source.book.auth and not tenant.may_use(name):
            raise permission_denied(tenant, name)
        hops = policy.plan(facts(tenant, self.tenancy.source.book.auth, call)).hops
        if not hops:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"route {name!r} has no target for "
                "this request (no rule matched, no weighted targets)",
                "NO_TARGET",
            )
        trace.get_current_span().set_attribute("meshserve.route", name)
        return tenant, [h.model for h in hops]

    def _model(self, tenant: Tenant, name: str, routed: bool = False) -> Route:
        book = self.tenancy.source.book
        route = self.table.current.resolve(name)
        if book.auth and not routed and not tenant.may_use(name, route.spec.name if route else ""):
            raise permission_denied(tenant, name)
        if route is None:
            known = [n for n, r in self.table.current.routes.items() if tenant.may_use(n)]
            raise not_found_model(name, known)
        trace.get_current_span().set_attribute("meshserve.tenant", tenant.name)
        return route

    # --- Generate ----------------------------------------------------------------------------

    async def generate(
        self, request: inference_pb2.GenerateRequest, call: Call
    ) -> AsyncGenerator[bytes, None]:
        span = trace.get_current_span()
        span.set_attribute("gen_ai.request.model", request.model)
        policy = self.routes.get(request.model)
        if policy is not None:  # a route's name: its plan's hops (routes.py)
            routed = self.routed.generate(policy, request, call)
            async with contextlib.aclosing(routed):  # closed in this task, however it ends
                async for message in routed:
                    yield message
            return
        tenant, route = self.enter(call, request.model)
        plain = self._generate_on(request, route, call, tenant)
        async with contextlib.aclosing(plain):
            async for message in plain:
                yield message

    async def _generate_on(
        self,
        request: inference_pb2.GenerateRequest,
        route: Route,
        call: Call,
        tenant: Tenant,
        hop: Hop | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """One Generate on ``route``'s model (``hop``: as a route's target or fallback)."""
        span = trace.get_current_span()
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
        # Fair queueing off (an ablation): every request equal, at the agent too.
        asked = tenant.priority(request.priority) if self.config.fair_queueing else 0
        request.priority = asked  # type: ignore[assignment]
        span.set_attribute("meshserve.priority", int(request.priority))
        who = Who(tenant.name, request.priority, tenant.weight)
        messages: list[bytes] = []
        external = route.spec.engine == cluster_pb2.ENGINE_KIND_EXTERNAL
        with self.accountant.request(
            tenant, route.spec.name, not (route.ready or external)
        ) as used:
            used.fallback = hop is not None and hop.role == "fallback"
            wait_s = hop.max_wait_s if hop is not None else None
            if external:  # an endpoint outside the mesh (core/external.py)
                upstream = self.external.generate(request, route.spec, call)
            else:
                upstream = self.relay.generate(request, route, call, who, wait_s)
            try:
                async with contextlib.aclosing(upstream):  # its slot goes back now, in this task
                    async for message in upstream:
                        messages.append(message)
                        yield message
            finally:
                used.usage = usage_of(messages)
                used.gpu_seconds = gpu_seconds_of(messages)
                used.served = bool(messages)
                genai_attributes(span, request, used.usage, messages)

    # --- routes (routing/routes.py decides; core/routes.py keeps them) ------------------------

    async def route_status(
        self, request: router_pb2.RouteStatusRequest, call: Call
    ) -> router_pb2.RouteStatusResponse:
        """A route's targets side by side as this router served them."""
        self._admin_only(call, "route statistics", "ROUTE_STATUS_NOT_ALLOWED")
        if self.routes.get(request.route) is None:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"no route {request.route!r} (known: {sorted(self.routes.policies) or 'none'})",
                "NO_ROUTE",
            )
        return self.routes.status(request.route, self.config.router_id)

    # --- Embed, Infer, ListModels ---------------------------------------------------------

    async def embed(
        self, request: inference_pb2.EmbedRequest, call: Call
    ) -> inference_pb2.EmbedResponse:
        check_embed(request)

        async def one(tenant: Tenant, route: Route) -> inference_pb2.EmbedResponse:
            who = Who(tenant.name, tenant.priority(0), tenant.weight)
            reply: inference_pb2.EmbedResponse = await self._unary(
                "Embed", request, route, call, tenant, who
            )
            return reply

        return await self._each_target(call, request.model, one)

    async def infer(
        self, request: inference_pb2.InferRequest, call: Call
    ) -> inference_pb2.InferResponse:
        """A tensor model's request: checked here when the model's signature is known (the
        agent checks it again), then sent to a replica like Embed (any failure before a reply
        is retried elsewhere: inference on tensors has no side effects)."""
        priority = request.priority

        async def one(tenant: Tenant, route: Route) -> inference_pb2.InferResponse:
            if route.spec.engine_args.get("task") != "classify":
                raise not_a_tensor_model(route.spec.name)
            if route.signature is not None:
                check_inputs(route.spec.name, request.inputs, request.outputs, route.signature)
            asked = tenant.priority(priority) if self.config.fair_queueing else 0
            request.priority = asked  # type: ignore[assignment]
            who = Who(tenant.name, request.priority, tenant.weight)
            reply: inference_pb2.InferResponse = await self._unary(
                "Infer", request, route, call, tenant, who
            )
            return reply

        return await self._each_target(call, request.model, one)

    async def _unary(
        self,
        method: str,
        request: inference_pb2.EmbedRequest | inference_pb2.InferRequest,
        route: Route,
        call: Call,
        tenant: Tenant,
        who: Who,
    ) -> Any:
        """One unary call through the tenant's limits, admission and the attempt policy;
        counted for the tenant when it was served."""
        if route.spec.engine == cluster_pb2.ENGINE_KIND_EXTERNAL:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{route.spec.name!r} is an external model: it serves Generate "
                "(completions and chat) only",
                "EXTERNAL_GENERATE_ONLY",
            )
        with self.accountant.request(tenant, route.spec.name, not route.ready) as used:
            reply = await self.unary.call(method, request, route, call, who)
            used.served = True
            if (tr := traceresponse()) is not None:
                call.headers.append(tr)
            return reply

    async def list_models(
        self, request: inference_pb2.ListModelsRequest, call: Call
    ) -> inference_pb2.ListModelsResponse:
        book = self.tenancy.source.book
        tenant = self.identify(call)
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
        for name, policy in sorted(self.routes.policies.items()):  # routes: their targets' replicas
            if book.auth and not tenant.may_use(name):
                continue
            targets = [self.table.current.resolve(m) for m in models_named(policy.spec)]
            ready = sum(len(r.ready) for r in targets if r is not None)
            out.models.add(name=name, ready_replicas=ready)
        return out

    async def usage(self, request: router_pb2.UsageRequest, call: Call) -> router_pb2.UsageResponse:
        """What tenants used through this router: a tenant its own, an admin everyone's."""
        tenant = self.identify(call)
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

    async def explain_route(
        self, request: router_pb2.ExplainRouteRequest, call: Call
    ) -> router_pb2.ExplainRouteResponse:
        """This router's last routing decisions for a model (admin tenants only, with auth)."""
        self._admin_only(call, "routing decisions", "EXPLAIN_NOT_ALLOWED")
        route = self.table.current.resolve(request.model)
        if route is None:
            raise not_found_model(request.model, list(self.table.current.routes))
        limit = min(request.limit or 10, DECISIONS_KEPT)
        out = router_pb2.ExplainRouteResponse(router_id=self.config.router_id)
        for asked, d in self.admission.decisions.last(route.spec.name, limit):
            out.decisions.append(decision_proto(asked, d))
        return out
