"""The OpenAI HTTP front's request bodies, and which parameters it honours.

Every field of a body is either implemented, or refused with 400 ``unsupported parameter 'X'``
(``code: unsupported_parameter``, ``param: X``): a client that asks for JSON output, tool calls or
several choices must not get plain text and no error. Fields OpenAI and vLLM define whose value
changes nothing here are accepted at that neutral value only (``n: 1``, ``presence_penalty: 0``,
``response_format: {type: text}``, ``tools: []`` …), as real clients and load generators send
them; ``metadata``, ``store`` and ``service_tier`` only label a request and are accepted and
ignored. ``user`` (or an ``x-session-id`` header, which wins) is the request's session key:
a user's requests prefer one replica, where their conversation is cached. ``cache_salt``
(vLLM's) isolates the request's prefix cache: blocks are reused only under the same salt.
"""

from __future__ import annotations

from typing import Any, Literal

from meshserve.rpc.errors import invalid_argument
from meshserve.v1 import inference_pb2
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

Priority = Literal["low", "normal", "high", "critical"]
UNSUPPORTED = "unsupported_parameter"  # the pydantic error type, and OpenAI's error code

# Known parameters this front does not implement, with the values that mean "not asked for".
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1, None),
    "best_of": (1, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "repetition_penalty": (1, 1.0, None),  # vLLM
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),  # only says how tools may be called
    "response_format": (None, {"type": "text"}),
    "echo": (False, None),
    "suffix": (None, ""),
    "min_tokens": (0, None),  # vLLM
    "prompt_logprobs": (None, 0),  # vLLM
    "dimensions": (None,),  # embeddings: only the model's own size
    "tool_calls": (None, []),  # an assistant message's
}
# Labels of a request: accepted, not acted on.
IGNORED = frozenset({"metadata", "store", "service_tier"})


class _Strict(BaseModel):
    """Refuses every field it does not declare, naming it (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _only_what_we_honour(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, value in list(data.items()):
            if name in cls.model_fields:
                continue
            if name in IGNORED or (name in NEUTRAL and _neutral(value, NEUTRAL[name])):
                del data[name]
                continue
            raise PydanticCustomError(UNSUPPORTED, "unsupported parameter '{name}'", {"name": name})
        return data


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    return any(value == n and type(value) is type(n) for n in neutral if n is not None) or (
        value is None and None in neutral
    )


class StreamOptions(_Strict):
    include_usage: bool | None = None
    # vLLM's: usage on every chunk. Prompt tokens are known only at the end here, so every
    # chunk carries completion tokens so far and the final usage chunk the whole count.
    continuous_usage_stats: bool | None = None


class Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's; -1 or 0: off
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None  # vLLM's: generate past the end-of-sequence token
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    priority: Priority | None = None  # meshserve: the request's priority (capped by the tenant)
    timeout: float | None = Field(default=None, gt=0)  # meshserve: a deadline in seconds
    # meshserve: token coalescing (GenerateRequest.stream_interval_*): several tokens per chunk
    stream_interval_ms: int | None = Field(default=None, ge=0)
    stream_interval_tokens: int | None = Field(default=None, ge=0)
    user: str | None = Field(default=None, max_length=256)  # the session key (affinity)
    cache_salt: str | None = Field(default=None, max_length=256)  # vLLM's: cache isolation


class Message(_Strict):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # a participant's label: accepted, not acted on


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)  # legacy: the top-N to return


class EmbeddingRequest(_Strict):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


def sampling(req: Sampling, logprobs: bool, top_logprobs: int) -> inference_pb2.SamplingParams:
    s = inference_pb2.SamplingParams(ignore_eos=bool(req.ignore_eos))
    limit = req.max_completion_tokens or req.max_tokens
    if limit is not None:
        s.max_tokens = limit
    if req.temperature is not None:
        s.temperature = req.temperature
    if req.top_p is not None:
        s.top_p = req.top_p
    if req.top_k is not None and req.top_k > 0:
        s.top_k = req.top_k
    if req.seed is not None:
        if req.seed < 0:
            raise invalid_argument([("seed", "must be >= 0")])
        s.seed = req.seed
    if req.stop:
        s.stop.extend([req.stop] if isinstance(req.stop, str) else req.stop)
    if top_logprobs and not logprobs:
        raise invalid_argument([("top_logprobs", "needs logprobs: true")])
    s.logprobs = logprobs
    s.top_logprobs = top_logprobs
    return s


def generate_request(
    req: ChatRequest | CompletionRequest, session: str = ""
) -> inference_pb2.GenerateRequest:
    """The native request for an HTTP body (the prompt or messages, sampling, coalescing, the
    session key: ``session`` (the x-session-id header) or the body's ``user``)."""
    g = inference_pb2.GenerateRequest(
        model=req.model, session_key=session or req.user or "", cache_salt=req.cache_salt or ""
    )
    if isinstance(req, ChatRequest):
        for m in req.messages:
            g.messages.add(role=m.role, content=text_of(m.content))
        g.sampling.CopyFrom(sampling(req, bool(req.logprobs), req.top_logprobs or 0))
    else:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise invalid_argument([("prompt", "one prompt per request")])
        g.prompt = prompts[0]
        asked = req.logprobs is not None
        g.sampling.CopyFrom(sampling(req, asked, req.logprobs or 0))
    if req.stream_interval_ms is not None:
        g.stream_interval_ms = req.stream_interval_ms
    if req.stream_interval_tokens is not None:
        g.stream_interval_tokens = req.stream_interval_tokens
    return g


def text_of(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, list):  # OpenAI content parts: the text ones
        return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return content or ""
