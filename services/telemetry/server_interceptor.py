"""One server span per RPC, with W3C context from the caller's metadata (DESIGN §6).

Written here instead of using opentelemetry-instrumentation-grpc's aio server interceptor because
that one (a) does not record a client's cancel or an expired deadline as an error — on a cancel
between two messages grpc.aio closes the outermost response generator, which is the interceptor's,
so the handler never sees it before the span ends — and (b) wraps every streamed message. Here a
streaming handler runs in gRPC's writer form (`as_writer`): the interceptor awaits it once under
its span, sees a cancel as the task's cancel, and touches nothing per message.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from meshserve.telemetry.tracing import record_cancelled, record_outcome, traceparent
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

_tracer = trace.get_tracer("meshserve.rpc")
# Polls, not requests: health checks, reflection, model listings, readiness and status reads (a
# `meshserve up` exported more of these than of anything else). Their outcomes are in metrics.
UNTRACED_PREFIXES = (
    "/grpc.health.v1.",
    "/grpc.reflection.",
    "/meshserve.v1.Inference/ListModels",
    "/meshserve.v1.NodeAgent/GetNodeStatus",
    "/meshserve.v1.Scheduler/GetPlan",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ServerMetadata",
)


def traceresponse() -> tuple[str, str] | None:
    """The W3C ``traceresponse`` header of the current span (version-trace id-span id-flags), so
    a client can look its request up in the trace backend; None when nothing is traced."""
    parent = traceparent(trace.get_current_span())
    return ("traceresponse", parent) if parent else None


def _code_of(context: Any) -> grpc.StatusCode | None:
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        return None
    if isinstance(code, grpc.StatusCode):
        return code
    return None


def _closed_reason(context: Any) -> str:
    left = context.time_remaining()
    return "deadline exceeded" if left is not None and left <= 0 else "cancelled by the client"


def _finish(span: trace.Span, context: Any, error: BaseException | None) -> None:
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        record_cancelled(span, _closed_reason(context))
        return
    code = _code_of(context)
    if code is None:
        code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
    details = (
        context.details() if code != grpc.StatusCode.OK and hasattr(context, "details") else ""
    )
    record_outcome(span, code, details or "")
    if error is not None and code == grpc.StatusCode.UNKNOWN:
        span.record_exception(error)


def as_writer(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Awaitable[None]]:
    """A unary-stream handler in gRPC's reader/writer form: a coroutine that writes each
    response with ``context.write`` (handlers.stream's form) stays as it is; an async generator
    becomes one. Interceptors then await the handler once: nothing of theirs runs per message,
    and a client's cancel reaches them as the task's cancel."""
    if not inspect.isasyncgenfunction(behavior):
        return behavior

    async def writer(request: Any, context: Any) -> None:
        async for response in behavior(request, context):
            await context.write(response)

    return writer


async def _traced(span: trace.Span, context: Any, call: Awaitable[Any]) -> Any:
    """Awaits one RPC's handler (unary, or a stream's writer) under its server span."""
    error: BaseException | None = None
    try:
        with trace.use_span(span, end_on_exit=False):
            return await call
    except BaseException as e:
        error = e
        raise
    finally:
        _finish(span, context, error)
        span.end()


class TracingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        details: Any,
    ) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(UNTRACED_PREFIXES):
            return handler
        service, _, name = method.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        parent_of = propagate.extract

        def start(context: Any) -> trace.Span:
            carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            return _tracer.start_span(
                method.lstrip("/"),
                context=parent_of(carrier),
                kind=SpanKind.SERVER,
                attributes=attributes,
            )

        if handler.unary_stream is not None:
            writer = as_writer(handler.unary_stream)

            async def unary_stream(request: Any, context: Any) -> None:
                await _traced(start(context), context, writer(request, context))

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is not None:
            unary_behavior = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                return await _traced(start(context), context, unary_behavior(request, context))

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client-streaming RPCs: none of ours


def server_interceptors() -> list[Any]:
    """One server span per RPC, continuing the caller's W3C trace context from metadata."""
    return [TracingInterceptor()]
