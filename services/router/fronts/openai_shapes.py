"""OpenAI's response shapes from the router's GenerateResponse messages (pure: bytes in, JSON out).

Streams go out one SSE chunk per message, and agents send one message per token unless the
request or the model asked for coalescing (``stream_interval_*``), so clients that count chunks
count tokens. Log probabilities take each API's shape: chat's ``logprobs.content`` (token,
logprob, bytes, top_logprobs), the legacy completions' parallel lists (tokens, token_logprobs,
top_logprobs as {token: logprob}, text_offset).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from meshserve.router.fronts.http_errors import from_exception
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import inference_pb2

FINISH = {inference_pb2.FINISH_REASON_LENGTH: "length", inference_pb2.FINISH_REASON_STOP: "stop"}


def chat_logprobs(m: inference_pb2.GenerateResponse) -> dict[str, Any]:
    """Chat's ``logprobs`` object for one message's tokens."""
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode()),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
                    for t in lp.top
                ],
            }
            for lp in m.logprobs
        ],
        "refusal": None,
    }


class CompletionLogprobs:
    """The legacy completions' ``logprobs`` lists, with text offsets counted across a stream."""

    def __init__(self) -> None:
        self.offset = 0

    def of(self, m: inference_pb2.GenerateResponse) -> dict[str, Any]:
        offsets = []
        for lp in m.logprobs:
            offsets.append(self.offset)
            self.offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in m.logprobs],
            "token_logprobs": [lp.logprob for lp in m.logprobs],
            "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in m.logprobs],
            "text_offset": offsets,
        }


def merge_logprobs(parts: list[dict[str, Any]], chat: bool) -> dict[str, Any] | None:
    if not parts:
        return None
    if chat:
        return {"content": [c for p in parts for c in p["content"]], "refusal": None}
    return {k: [x for p in parts for x in p[k]] for k in parts[0]}


class Shape:
    """Turns the router's GenerateResponse messages into OpenAI's completion shapes."""

    def __init__(
        self,
        model: str,
        chat: bool,
        include_usage: bool,
        logprobs: bool = False,
        continuous_usage: bool = False,
    ) -> None:
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.continuous_usage = continuous_usage
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._completion_logprobs = CompletionLogprobs()

    def _logprobs_of(self, m: inference_pb2.GenerateResponse) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return chat_logprobs(m) if self.chat else self._completion_logprobs.of(m)

    def _chunk(
        self, m: inference_pb2.GenerateResponse, finish: str | None, first: bool
    ) -> dict[str, Any]:
        logprobs = self._logprobs_of(m)
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": m.text} if first else {}
            if not first and m.text:
                delta["content"] = m.text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            if logprobs is not None:
                choice["logprobs"] = logprobs
        else:
            choice = {"index": 0, "text": m.text, "finish_reason": finish, "logprobs": logprobs}
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
        generated = 0
        try:
            async for raw in _messages(first, rest):
                m = inference_pb2.GenerateResponse.FromString(raw)
                generated += len(m.token_ids)
                finish = FINISH.get(m.finish_reason) if m.finish_reason else None
                if finish:
                    usage = self.usage(m)
                chunk = self._chunk(m, finish, is_first)
                if self.continuous_usage:  # vLLM's: what is known so far
                    chunk["usage"] = usage or {"prompt_tokens": 0, "completion_tokens": generated,
                                               "total_tokens": generated}  # fmt: skip
                elif self.include_usage:
                    chunk["usage"] = None  # as OpenAI: null on every chunk but the last
                yield _event(chunk)
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
        logprobs: list[dict[str, Any]] = []
        finish, usage = None, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        async for raw in _messages(first, rest):
            m = inference_pb2.GenerateResponse.FromString(raw)
            text.append(m.text)
            if (lp := self._logprobs_of(m)) is not None:
                logprobs.append(lp)
            if m.finish_reason:
                finish, usage = FINISH.get(m.finish_reason, "stop"), self.usage(m)
        content = "".join(text)
        merged = merge_logprobs(logprobs, self.chat)
        if self.chat:
            message = {"role": "assistant", "content": content}
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "message": message,
                                      "logprobs": merged}  # fmt: skip
        else:
            choice = {"index": 0, "text": content, "finish_reason": finish, "logprobs": merged}
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": [choice], "usage": usage}  # fmt: skip


async def _messages(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for raw in rest:
        yield raw


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
