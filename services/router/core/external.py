"""Models served outside the mesh (``engine: external``): an OpenAI-compatible endpoint — a
vLLM server, a hosted API — that the router streams through with the same tenancy, limits,
usage and traces as a model of the fleet (the caller, core/service.py, accounts for it).

Client: the official `openai` SDK (async, streaming; its own retries off: ours are the mesh's).
A prompt goes to ``/completions``, messages to ``/chat/completions``; usage is asked for with
``stream_options.include_usage``. Failure semantics as for replicas, without continuation: a
connection error, a 5xx, 408, 409 or 429 before the first token is retried with jittered
backoff within the caller's deadline (at most ATTEMPTS), then UNAVAILABLE (so a route's next
hop takes it); a break after the first token is UNAVAILABLE (the endpoint cannot resume a
stream); 4xx are the request's (INVALID_ARGUMENT, PERMISSION_DENIED, NOT_FOUND). The key: the
router's environment variable the spec names (a Kubernetes Secret mounted as it)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from meshserve.router.core.attempts import backoff_s
from meshserve.router.core.call import Call
from meshserve.rpc.errors import ServiceError
from meshserve.telemetry.tracing import tracer
from meshserve.v1 import cluster_pb2, inference_pb2
from opentelemetry import propagate, trace

_tracer = tracer("meshserve.router.external")
ATTEMPTS = 3
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}
FINISH = {"length": inference_pb2.FINISH_REASON_LENGTH, "stop": inference_pb2.FINISH_REASON_STOP}
STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.PERMISSION_DENIED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    422: grpc.StatusCode.INVALID_ARGUMENT,
}


def _unavailable(model: str, why: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"external model {model!r}: {why}",
        "EXTERNAL_UNAVAILABLE",
        retry_after_s=1.0,
    )


class External:
    """One AsyncOpenAI client per (url, key variable): its connection pool is reused."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str], Any] = {}
        self.rng = random.Random()

    def _client(self, spec: cluster_pb2.ModelSpec) -> Any:
        key = (spec.url, spec.api_key_env)
        client = self._clients.get(key)
        if client is None:
            try:
                from openai import AsyncOpenAI
            except ImportError:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "external models need the "
                    "`openai` package in the router: pip install 'meshserve[http]'",
                    "EXTERNAL_CLIENT_MISSING",
                ) from None
            secret = os.environ.get(spec.api_key_env, "") if spec.api_key_env else "unused"
            if not secret:
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"external model {spec.name!r}: the router has no "
                    f"${spec.api_key_env} (its API key)",
                    "EXTERNAL_KEY_MISSING",
                )
            client = self._clients[key] = AsyncOpenAI(
                base_url=spec.url, api_key=secret, max_retries=0
            )
        return client

    async def generate(
        self, request: inference_pb2.GenerateRequest, spec: cluster_pb2.ModelSpec, call: Call
    ) -> AsyncGenerator[bytes, None]:
        import openai

        client = self._client(spec)
        model = spec.served_model or spec.name
        with _tracer.start_as_current_span(
            "router.external",
            kind=trace.SpanKind.CLIENT,
            attributes={"meshserve.external.url": spec.url, "gen_ai.request.model": model},
        ) as span:
            headers: dict[str, str] = {}
            propagate.inject(headers)
            started, delivered = time.monotonic(), 0
            for attempt in range(ATTEMPTS):
                try:
                    stream = await self._open(client, request, model, call, headers)
                    async with stream:
                        async for message in _messages(stream):
                            if not delivered:  # the response headers go with the first message
                                call.headers += [
                                    ("meshserve-model", spec.name),
                                    ("meshserve-node", f"external {spec.url}"),
                                    ("meshserve-attempts", str(attempt + 1)),
                                ]
                            delivered += 1
                            yield message
                    span.set_attribute("meshserve.external.attempts", attempt + 1)
                    return
                except openai.APIStatusError as e:
                    if delivered or e.status_code not in RETRYABLE_STATUS:
                        raise self._status(spec, e, delivered) from None
                    why = f"HTTP {e.status_code}: {_detail(e)}"
                except openai.APIError as e:  # a connection lost, a timeout, or an error the
                    # endpoint sent inside the stream (vLLM's `data: {"error": …}`)
                    if delivered:
                        raise _unavailable(
                            spec.name,
                            f"the stream broke mid-way ({type(e).__name__}); "
                            "an external endpoint cannot resume it",
                        ) from None
                    why = f"{type(e).__name__}: {e}"
                span.add_event("retry", {"meshserve.reason": why})
                left = call.remaining_s()
                pause = backoff_s(attempt, self.rng)
                if attempt == ATTEMPTS - 1 or (left is not None and left <= pause):
                    raise _unavailable(
                        spec.name,
                        f"{attempt + 1} attempt(s) failed in "
                        f"{time.monotonic() - started:.1f} s; last: {why}",
                    )
                await asyncio.sleep(pause)

    async def _open(
        self,
        client: Any,
        r: inference_pb2.GenerateRequest,
        model: str,
        call: Call,
        headers: dict[str, str],
    ) -> Any:
        s = r.sampling
        args: dict[str, Any] = {
            "model": model,
            "stream": True,
            "extra_headers": headers,
            "stream_options": {"include_usage": True},
            "timeout": call.remaining_s() or 600.0,
        }
        if s.HasField("max_tokens"):
            args["max_tokens"] = s.max_tokens
        if s.HasField("temperature"):
            args["temperature"] = s.temperature
        if s.HasField("top_p"):
            args["top_p"] = s.top_p
        if s.HasField("seed"):
            args["seed"] = s.seed
        if s.stop:
            args["stop"] = list(s.stop)
        extra: dict[str, Any] = {}
        if s.ignore_eos:
            extra["ignore_eos"] = True  # vLLM's extension; other endpoints ignore unknown fields
        if s.top_k:
            extra["top_k"] = s.top_k
        if extra:
            args["extra_body"] = extra
        if r.messages:
            messages = [{"role": m.role, "content": m.content} for m in r.messages]
            return await client.chat.completions.create(messages=messages, **args)
        return await client.completions.create(prompt=r.prompt, **args)

    def _status(self, spec: cluster_pb2.ModelSpec, e: Any, delivered: int) -> ServiceError:
        code = STATUS.get(e.status_code, grpc.StatusCode.UNAVAILABLE)
        if delivered:
            code = grpc.StatusCode.UNAVAILABLE
        return ServiceError(
            code,
            f"external model {spec.name!r}: HTTP {e.status_code}: {_detail(e)}",
            "EXTERNAL_ERROR",
        )


def _detail(e: Any) -> str:
    return str(getattr(e, "message", "") or e)[:300]


async def _messages(stream: Any) -> AsyncIterator[bytes]:
    """OpenAI stream chunks as GenerateResponse bytes: a message per text delta, then a final
    one with the finish reason and the endpoint's usage."""
    finish = 0
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices or ():
            text = getattr(choice, "text", None)
            if text is None:  # chat: a delta
                text = getattr(getattr(choice, "delta", None), "content", None) or ""
            if choice.finish_reason:
                finish = FINISH.get(choice.finish_reason, inference_pb2.FINISH_REASON_STOP)
            if text:
                yield inference_pb2.GenerateResponse(text=text).SerializeToString()
    final = inference_pb2.GenerateResponse(finish_reason=finish or inference_pb2.FINISH_REASON_STOP)  # type: ignore[arg-type]
    if usage is not None:
        final.usage.input_tokens = int(usage.prompt_tokens or 0)
        final.usage.output_tokens = int(usage.completion_tokens or 0)
    yield final.SerializeToString()
