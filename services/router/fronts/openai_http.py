"""The OpenAI-compatible HTTP front (FastAPI + uvicorn), served by the router process beside its
gRPC API and calling the same router core (core/service.py: gate, tenancy, admission, relay), so a
request over HTTP is admitted, queued, retried, failed over and counted exactly as one over gRPC.
In the router process rather than a gateway beside it: one hop less, one process to run, and the
admission queue and limits see both kinds of traffic.

- ``POST /v1/chat/completions``, ``POST /v1/completions``: ``stream: true`` sends SSE chunks and
  ``data: [DONE]``; ``stream_options.include_usage`` adds a last chunk with usage.
- ``POST /v1/embeddings`` (``encoding_format`` float or base64), ``GET /v1/models``.
- ``GET /health``: 200 while the router can serve (200, 503 while it stops or before any model is
  registered), as vLLM's and LiteLLM's servers answer load generators such as guidellm;
  ``GET /ping``: liveness (200 while the process answers).
- Parameters it does not implement are refused by name (openai_schema.py), never dropped.
- ``Authorization: Bearer <key>`` goes to the tenancy gate; ``priority`` (low | normal | high |
  critical) in the body is the request's priority (capped by the tenant).
- Errors in OpenAI's JSON shape: 400 invalid, 401, 403, 404, 429 with ``Retry-After``, 503, 504.
- A client that disconnects cancels the generation (the relay cancels the agent's stream).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from meshserve.router.core.call import Call
from meshserve.router.core.service import RouterInference
from meshserve.router.fronts.http_errors import BodyLimit, error_body, from_exception
from meshserve.router.fronts.http_tracing import finish, server_span, trace_headers, traced
from meshserve.router.fronts.openai_schema import (
    UNSUPPORTED,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    generate_request,
)
from meshserve.router.fronts.openai_shapes import Shape
from meshserve.router.tenancy.tenants import PRIORITIES
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import inference_pb2
from opentelemetry import trace
from starlette.exceptions import HTTPException as StarletteHTTPException


def call_of(request: Request, timeout_s: float | None) -> Call:
    """The core's view of an HTTP request: its authorization header and its timeout."""
    return Call.within(timeout_s, request.headers.get("authorization", ""), request.headers)


def response_headers(call: Call) -> dict[str, str]:
    """The core's headers and trailers as HTTP headers: W3C's traceresponse keeps its name;
    meshserve's own get the x- prefix."""
    return {k if k == "traceresponse" else f"x-{k}": v for k, v in (*call.headers, *call.trailers)}


def openai_app(core: RouterInference, stopping: Callable[[], bool] = lambda: False) -> FastAPI:
    """The app over the router core; ``stopping`` says the router is shutting down (/health)."""
    # FastAPI's own telemetry off: our server span (router/http_tracing.py) is the one the gRPC
    # front has too — GenAI attributes, the gRPC code as ERROR, traceresponse, spans that cover a
    # whole streamed body — and per-dependency spans would be noise (ListModels polls included).
    app = FastAPI(
        title="meshserve OpenAI-compatible API",
        docs_url=None,
        redoc_url=None,
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )

    app.add_middleware(BodyLimit)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        unsupported = [e for e in errors if e.get("type") == UNSUPPORTED]
        if unsupported:  # a parameter we do not implement: say which, in OpenAI's shape
            body = error_body(400, unsupported[0]["msg"], UNSUPPORTED)
            body["error"]["param"] = unsupported[0]["ctx"]["name"]
            return JSONResponse(body, status_code=400)
        problems = "; ".join(
            "the body is not valid JSON"
            if err.get("type") == "json_invalid"
            else f"{'.'.join(str(x) for x in err['loc'][1:])}: {err['msg']}"
            for err in errors
        )
        return JSONResponse(error_body(400, problems, "INVALID_REQUEST"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code)

    def failure(e: BaseException, span: trace.Span | None = None) -> JSONResponse:
        status, body, headers = from_exception(e)
        if span is not None:
            headers.update(trace_headers(span))
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Readiness: 503 while the router stops or knows no model (nothing could be served)."""
        routes = core.table.current.routes
        ready = sum(len(r.ready) for r in routes.values())
        why = "shutting down" if stopping() else "" if routes else "no model is registered"
        body = {"status": why or "ok", "models": len(routes), "ready_replicas": ready}
        return JSONResponse(body, status_code=503 if why else 200)

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "alive"}

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        try:
            got = await core.list_models(inference_pb2.ListModelsRequest(), call_of(request, 5))
        except (ServiceError, grpc.aio.AioRpcError) as e:
            return failure(e)
        # Only what this API serves: a tensor model (task: classify) answers KServe and Infer,
        # and load generators such as guidellm take the first model listed.
        # A LoRA adapter names its base model in ``parent`` (as vLLM's server lists them).
        routes = core.table.current.routes
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": "meshserve",
                "parent": (routes[m.name].spec.base or None) if m.name in routes else None,
            }
            for m in got.models
            if m.name not in routes or routes[m.name].spec.engine_args.get("task") != "classify"
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
        inputs = [body.input] if isinstance(body.input, str) else body.input
        span = server_span(request)
        try:
            with trace.use_span(span, end_on_exit=False, set_status_on_exception=False):
                got = await core.embed(
                    inference_pb2.EmbedRequest(model=body.model, inputs=inputs),
                    call_of(request, None),
                )
        except (ServiceError, grpc.aio.AioRpcError) as e:
            finish(span, e)
            return failure(e, span)
        finish(span)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _encoded(e.values, body.encoding_format),
            }
            for i, e in enumerate(got.embeddings)
        ]
        usage = {"prompt_tokens": 0, "total_tokens": 0}
        answer = {"object": "list", "data": data, "model": body.model, "usage": usage}
        return JSONResponse(answer, headers=trace_headers(span))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await run(body, request, False, body.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await run(body, request, True, bool(body.logprobs))

    async def run(
        body: ChatRequest | CompletionRequest, request: Request, chat: bool, logprobs: bool
    ) -> Any:
        span = server_span(request)
        try:
            g = generate_request(body, request.headers.get("x-session-id", "")[:256])
            if body.priority:
                g.priority = PRIORITIES[body.priority]  # type: ignore[assignment]
        except ServiceError as e:
            finish(span, e)
            return failure(e, span)
        call = call_of(request, body.timeout)
        options = body.stream_options
        shape = Shape(
            body.model,
            chat,
            bool(options and options.include_usage),
            logprobs,
            bool(options and options.continuous_usage_stats),
        )
        stream = traced(span, core.generate(g, call))  # ends the span when the stream ends
        try:  # the first message (or the error) before any byte is sent: errors get a status
            first = await anext(stream)
        except StopAsyncIteration:
            first = b""
        except (ServiceError, grpc.aio.AioRpcError) as e:
            return failure(e, span)
        if body.stream:
            return StreamingResponse(
                shape.sse(first, stream),
                media_type="text/event-stream",
                headers={**response_headers(call), "cache-control": "no-cache"},
            )
        try:
            whole = await shape.whole(first, stream)
            return JSONResponse(whole, headers=response_headers(call))
        except (ServiceError, grpc.aio.AioRpcError) as e:
            return failure(e, span)

    return app


def _encoded(values: Sequence[float], encoding: str) -> list[float] | str:
    """An embedding as floats, or as OpenAI's base64 of little-endian float32 (the SDK's
    default request)."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return list(values)
