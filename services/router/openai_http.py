"""The OpenAI-compatible HTTP front (FastAPI + uvicorn), served by the router process beside its
gRPC API and calling the same router core (server.py: gate, tenancy, admission, relay), so a
request over HTTP is admitted, queued, retried, failed over and counted exactly as one over gRPC.
In the router process rather than a gateway beside it: one hop less, one process to run, and the
admission queue and limits see both kinds of traffic.

- ``POST /v1/chat/completions``, ``POST /v1/completions``: ``stream: true`` sends SSE chunks and
  ``data: [DONE]``; ``stream_options.include_usage`` adds a last chunk with usage.
- ``POST /v1/embeddings``, ``GET /v1/models``.
- ``Authorization: Bearer <key>`` goes to the tenancy gate; ``priority`` (low | normal | high |
  critical) in the body is the request's priority (capped by the tenant).
- Errors in OpenAI's JSON shape: 400 invalid, 401, 403, 404, 429 with ``Retry-After``, 503, 504.
- A client that disconnects cancels the generation (the relay cancels the agent's stream).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from meshserve.router.http_errors import BodyLimit, error_body, from_exception
from meshserve.router.http_tracing import finish, server_span, trace_headers, traced
from meshserve.router.server import RouterInference
from meshserve.router.tenants import PRIORITIES
from meshserve.rpc.errors import ServiceError, invalid_argument
from meshserve.v1 import inference_pb2
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

FINISH = {inference_pb2.FINISH_REASON_LENGTH: "length", inference_pb2.FINISH_REASON_STOP: "stop"}
Priority = Literal["low", "normal", "high", "critical"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use are accepted
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: Priority | None = None  # meshserve: the request's priority (capped by the tenant)
    timeout: float | None = Field(default=None, gt=0)  # meshserve: a deadline in seconds


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: str | list[str]


class HttpContext:
    """What the router core asks of a gRPC servicer context, from an HTTP request."""

    def __init__(self, request: Request, timeout_s: float | None) -> None:
        auth = request.headers.get("authorization", "")
        self._metadata = (("authorization", auth),) if auth else ()
        self._deadline = time.monotonic() + timeout_s if timeout_s else None
        self.headers: dict[str, str] = {}

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        # W3C's traceresponse keeps its name; meshserve's own headers get the x- prefix.
        self.headers.update({k if k == "traceresponse" else f"x-{k}": v for k, v in metadata})

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.headers.update({f"x-{k}": v for k, v in metadata})


def sampling(req: Sampling) -> inference_pb2.SamplingParams:
    if req.n != 1:
        raise invalid_argument([("n", "only 1 is supported")])
    s = inference_pb2.SamplingParams()
    limit = req.max_completion_tokens or req.max_tokens
    if limit is not None:
        s.max_tokens = limit
    if req.temperature is not None:
        s.temperature = req.temperature
    if req.top_p is not None:
        s.top_p = req.top_p
    if req.seed is not None:
        if req.seed < 0:
            raise invalid_argument([("seed", "must be >= 0")])
        s.seed = req.seed
    if req.stop:
        s.stop.extend([req.stop] if isinstance(req.stop, str) else req.stop)
    return s


def text_of(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, list):  # OpenAI content parts: the text ones
        return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return content or ""


def openai_app(core: RouterInference) -> FastAPI:
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
        problems = "; ".join(
            "the body is not valid JSON"
            if err.get("type") == "json_invalid"
            else f"{'.'.join(str(x) for x in err['loc'][1:])}: {err['msg']}"
            for err in exc.errors()
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

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        try:
            got = await core.list_models(inference_pb2.ListModelsRequest(), HttpContext(request, 5))
        except (ServiceError, grpc.aio.AioRpcError) as e:
            return failure(e)
        data = [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "meshserve"}
            for m in got.models
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
                    HttpContext(request, None),
                )
        except (ServiceError, grpc.aio.AioRpcError) as e:
            finish(span, e)
            return failure(e, span)
        finish(span)
        data = [
            {"object": "embedding", "index": i, "embedding": list(e.values)}
            for i, e in enumerate(got.embeddings)
        ]
        usage = {"prompt_tokens": 0, "total_tokens": 0}
        answer = {"object": "list", "data": data, "model": body.model, "usage": usage}
        return JSONResponse(answer, headers=trace_headers(span))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            return failure(invalid_argument([("prompt", "one prompt per request")]))
        return await run(body, request, inference_pb2.GenerateRequest(prompt=prompts[0]), False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        g = inference_pb2.GenerateRequest()
        for m in body.messages:
            g.messages.add(role=m.role, content=text_of(m.content))
        return await run(body, request, g, True)

    async def run(
        body: Sampling, request: Request, g: inference_pb2.GenerateRequest, chat: bool
    ) -> Any:
        span = server_span(request)
        try:
            g.model = body.model
            g.sampling.CopyFrom(sampling(body))
            if body.priority:
                g.priority = PRIORITIES[body.priority]  # type: ignore[assignment]
        except ServiceError as e:
            finish(span, e)
            return failure(e, span)
        ctx = HttpContext(request, body.timeout)
        shape = Shape(
            body.model, chat, bool(body.stream_options and body.stream_options.include_usage)
        )
        stream = traced(span, core.generate(g, ctx))  # ends the span when the stream ends
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
                headers={**ctx.headers, "cache-control": "no-cache"},
            )
        try:
            return JSONResponse(await shape.whole(first, stream), headers=ctx.headers)
        except (ServiceError, grpc.aio.AioRpcError) as e:
            return failure(e, span)

    return app


class Shape:
    """Turns the router's GenerateResponse messages into OpenAI's completion shapes."""

    def __init__(self, model: str, chat: bool, include_usage: bool) -> None:
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _chunk(self, text: str, finish: str | None, first: bool) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
            if not first and text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice]}  # fmt: skip

    @staticmethod
    def usage(m: inference_pb2.GenerateResponse) -> dict[str, int]:
        i, o = int(m.usage.input_tokens), int(m.usage.output_tokens)
        return {"prompt_tokens": i, "completion_tokens": o, "total_tokens": i + o}

    async def sse(self, first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        usage: dict[str, int] | None = None
        is_first = True
        try:
            async for raw in _messages(first, rest):
                m = inference_pb2.GenerateResponse.FromString(raw)
                finish = FINISH.get(m.finish_reason) if m.finish_reason else None
                if finish:
                    usage = self.usage(m)
                yield _event(self._chunk(m.text, finish, is_first))
                is_first = False
        except (ServiceError, grpc.aio.AioRpcError) as e:  # mid-stream: OpenAI sends the error
            _status, body, _headers = from_exception(e)
            yield _event(body)
        if self.include_usage and usage is not None:
            yield _event({"id": self.id, "object": "chat.completion.chunk" if self.chat
                          else "text_completion", "created": self.created, "model": self.model,
                          "choices": [], "usage": usage})  # fmt: skip
        yield b"data: [DONE]\n\n"

    async def whole(self, first: bytes, rest: AsyncIterator[bytes]) -> dict[str, Any]:
        text: list[str] = []
        finish, usage = None, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        async for raw in _messages(first, rest):
            m = inference_pb2.GenerateResponse.FromString(raw)
            text.append(m.text)
            if m.finish_reason:
                finish, usage = FINISH.get(m.finish_reason, "stop"), self.usage(m)
        content = "".join(text)
        if self.chat:
            message = {"role": "assistant", "content": content}
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "message": message}
        else:
            choice = {"index": 0, "text": content, "finish_reason": finish, "logprobs": None}
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": [choice], "usage": usage}  # fmt: skip


async def _messages(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for raw in rest:
        yield raw


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
