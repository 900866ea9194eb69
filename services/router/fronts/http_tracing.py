"""Server spans for the HTTP fronts (OpenAI-compatible): what the gRPC tracing interceptor does
for gRPC calls, for a request that arrives over HTTP. The caller's W3C ``traceparent`` header is
the parent; the router core's spans (pick, attempt) and the agent's nest under it; the response
carries W3C ``traceresponse``; status OK, or ERROR with the gRPC code behind the HTTP status.

A streamed body is produced after the handler has returned (by the server's response task), so
`traced` makes the span current around each step of the stream instead of around the handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from fastapi import Request
from meshserve.rpc.errors import ServiceError
from meshserve.telemetry.tracing import record_cancelled, record_outcome, traceparent, tracer
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

_tracer = tracer("meshserve.router.http")


def server_span(request: Request) -> trace.Span:
    """A SERVER span for ``request``, child of its ``traceparent`` header when it has one."""
    route = request.url.path
    return _tracer.start_span(
        f"{request.method} {route}",
        context=propagate.extract(request.headers),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method, "http.route": route},
    )


def trace_headers(span: trace.Span) -> dict[str, str]:
    """``traceresponse`` for a response (none when nothing is traced)."""
    parent = traceparent(span)
    return {"traceresponse": parent} if parent else {}


def finish(span: trace.Span, error: BaseException | None = None) -> None:
    """Ends ``span``: OK, or ERROR with the gRPC code of what the core raised."""
    if error is None:
        record_outcome(span, grpc.StatusCode.OK)
    elif isinstance(error, ServiceError):
        record_outcome(span, error.code, error.message)
    elif isinstance(error, grpc.aio.AioRpcError):
        record_outcome(span, error.code(), error.details() or "")
    else:
        record_outcome(span, grpc.StatusCode.UNKNOWN, type(error).__name__)
    span.end()


async def traced(span: trace.Span, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``stream`` with ``span`` current while each message is produced; ends ``span`` when the
    stream ends, fails, or the client goes away (then the core's stream is closed too)."""
    try:
        while True:
            with trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                try:
                    item = await anext(stream)
                except StopAsyncIteration:
                    break
            yield item
    except (asyncio.CancelledError, GeneratorExit):
        record_cancelled(span)
        span.end()
        raise
    except BaseException as e:
        finish(span, e)
        raise
    else:
        finish(span)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
