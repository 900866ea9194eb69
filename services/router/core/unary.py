"""Unary calls (Embed, Infer) through admission and the attempt policy that Generate's relay
uses too (attempts.py): a slot on a replica, the caller's remaining time as the upstream
deadline, the outcome reported to the replica's breaker (a half-open breaker's probe resolves
either way), a full replica back to the queue, a failure retried elsewhere with backoff within
``max_attempts`` and the retry budget. Inference on tensors and embeddings has no side
effects, so any failure before the answer may be retried."""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
from meshserve.router.config import RouterConfig
from meshserve.router.core.admission import ANYONE, Admission, Who
from meshserve.router.core.attempts import AttemptPolicy, Broken, Tries, broken
from meshserve.router.core.budget import RetryBudget
from meshserve.router.core.call import Call
from meshserve.router.core.decisions import span_attributes
from meshserve.router.core.table import EndpointTable
from meshserve.router.core.upstreams import Upstreams, trace_metadata
from meshserve.router.routing.breakers import Breakers
from meshserve.router.routing.endpoints import Route
from meshserve.telemetry.tracing import tracer
from meshserve.v1 import inference_pb2_grpc
from opentelemetry import trace

_tracer = tracer("meshserve.router.server")


class Unary(AttemptPolicy):
    def __init__(
        self,
        config: RouterConfig,
        table: EndpointTable,
        admission: Admission,
        upstreams: Upstreams,
        breakers: Breakers,
        budget: RetryBudget,
    ) -> None:
        super().__init__(config, table, breakers, budget)
        self.admission = admission
        self.upstreams = upstreams

    async def call(
        self, method: str, request: Any, route: Route, call: Call, who: Who = ANYONE
    ) -> Any:
        """``method`` of meshserve.v1.Inference with ``request`` on a replica of ``route``."""
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        self.budget.request()
        tries = Tries(route.spec.name)
        while True:
            with _tracer.start_as_current_span("router.pick") as pick:
                slot = await self.admission.acquire(
                    route, "", call.remaining_s(), tries.failed, who, request.request_id
                )
                pick.set_attribute("meshserve.node", slot.endpoint.node_id)
                if slot.decision is not None and pick.is_recording():
                    pick.set_attributes(span_attributes(slot.decision))
            request.model = slot.model
            key = (slot.endpoint.address, slot.model)
            stub = inference_pb2_grpc.InferenceStub(self.upstreams.channel(slot.endpoint.address))
            try:
                reply = await getattr(stub, method)(
                    request,
                    timeout=call.remaining_s(),
                    metadata=trace_metadata(trace.get_current_span(), request.request_id),
                )
                self.breakers.success(key, time.monotonic())
                return reply
            except grpc.aio.AioRpcError as e:
                b = broken(e)
                if not isinstance(b, Broken):
                    raise  # the caller's own error (INVALID_ARGUMENT, DEADLINE_EXCEEDED …)
                tries.log.append(f"{slot.endpoint.node_id}: {b.what}")
                now = time.monotonic()
                if b.saturated:  # full: queue again, not a failure
                    delay = self.full(tries, now)
                else:
                    self.give_up_on(slot, b, tries, now)
                    delay = self.retry(tries, slot, b, now)
            finally:
                self.admission.release(slot)
            await self.pause(delay, call)
