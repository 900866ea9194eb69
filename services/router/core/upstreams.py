"""Calls from the router to agents: raw-bytes Generate over the process's channel pool, and the
trace context and request id as metadata (injected once per call, not per message)."""

from __future__ import annotations

from typing import Any

import grpc
from meshserve.router.routing.endpoints import RouteTable
from meshserve.rpc.channels import ChannelPool
from opentelemetry import propagate, trace

GENERATE = "/meshserve.v1.Inference/Generate"


def trace_metadata(span: trace.Span, request_id: str) -> tuple[tuple[str, str], ...]:
    """W3C trace context of ``span`` plus the request id, as gRPC metadata."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return (*carrier.items(), ("meshserve-request-id", request_id))


class Upstreams:
    """No client interceptors: they wrap every streamed message (DESIGN §7)."""

    def __init__(self, pool: ChannelPool) -> None:
        self.pool = pool
        self._incarnations: dict[str, int] = {}  # address → the agent incarnation last seen

    def channel(self, address: str) -> grpc.aio.Channel:
        return self.pool.get(address)

    def generate(self, address: str) -> Any:
        # Raw bytes both ways: the request is serialized once, responses are forwarded as they came.
        return self.pool.get(address).unary_stream(GENERATE)

    def follow(self, table: RouteTable, models: set[str]) -> None:
        """An agent restarted on the same address (a new incarnation in the table): a fresh
        channel, or calls would fail fast through the old channel's reconnect backoff (DESIGN
        §7: refused for seconds after the agent is back). Looks at the routes that changed."""
        for model in models:
            route = table.routes.get(model)
            if route is None:
                continue
            for e in route.ready:
                seen = self._incarnations.get(e.address)
                if seen is not None and seen != e.incarnation and e.incarnation:
                    self.pool.reset(e.address)
                self._incarnations[e.address] = e.incarnation
