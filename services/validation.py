"""Checks a GenerateRequest/EmbedRequest before any work is done; router and agent share it so a
client gets the same INVALID_ARGUMENT from either (rule 3: a message a user can act on)."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.rpc.errors import ServiceError, invalid_argument
from meshserve.v1 import cluster_pb2, inference_pb2

MAX_PROMPT_CHARS = 1_000_000  # requests above this are refused, not truncated
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_EMBED_INPUTS = 256
MAX_STREAM_INTERVAL_MS = 5_000  # token coalescing: the longest a packed token may wait
MAX_INTERVAL_TOKENS = 4_096
MAX_TOP_LOGPROBS = 20  # as OpenAI
DEFAULT_MAX_TOKENS = 64
GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as vLLM does): logits / 1e-38 overflow
ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters with every default resolved."""

    max_tokens: int  # tokens to generate
    temperature: float  # 0 = greedy
    top_p: float  # (0, 1]
    top_k: int  # 0 = off
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    priority: int = 0  # meshserve.v1.Priority as the router capped it; engines may order by it
    logprobs: bool = False  # report each sampled token's logprob (raw: before temperature etc.)
    top_logprobs: int = 0  # ... and this many most likely tokens per position


def check_generate(req: inference_pb2.GenerateRequest, spec: cluster_pb2.ModelSpec | None) -> None:
    """Raises ServiceError(INVALID_ARGUMENT) naming every bad field."""
    v: list[tuple[str, str]] = []
    if not req.model:
        v.append(("model", "required: the model name or alias"))
    if bool(req.prompt) == bool(req.messages):
        v.append(("prompt", "give exactly one of prompt and messages (prompt must not be empty)"))
    size = len(req.prompt) + sum(len(m.content) for m in req.messages)
    if size > MAX_PROMPT_CHARS:
        v.append(("prompt", f"request has {size} characters; the limit is {MAX_PROMPT_CHARS}"))
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            v.append((f"messages[{i}].role", f"must be one of {sorted(ROLES)}, got {m.role!r}"))
    s = req.sampling
    limit = spec.max_model_len if spec is not None and spec.max_model_len else 0
    if s.HasField("max_tokens"):
        if s.max_tokens <= 0:
            v.append(("sampling.max_tokens", f"must be > 0, got {s.max_tokens}"))
        elif limit and s.max_tokens > limit:
            v.append(
                (
                    "sampling.max_tokens",
                    f"{s.max_tokens} exceeds the model's context of {limit} tokens",
                )
            )
    if s.HasField("temperature") and not 0.0 <= s.temperature <= 2.0:
        v.append(("sampling.temperature", f"must be in [0, 2], got {s.temperature}"))
    if s.HasField("top_p") and not 0.0 < s.top_p <= 1.0:
        v.append(("sampling.top_p", f"must be in (0, 1], got {s.top_p}"))
    if s.top_k < 0:
        v.append(("sampling.top_k", f"must be >= 0, got {s.top_k}"))
    if len(s.stop) > MAX_STOP_STRINGS:
        v.append(("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings"))
    if any(not x or len(x) > MAX_STOP_CHARS for x in s.stop):
        v.append(("sampling.stop", f"stop strings must have 1-{MAX_STOP_CHARS} characters"))
    if s.top_logprobs > MAX_TOP_LOGPROBS:
        v.append(("sampling.top_logprobs", f"at most {MAX_TOP_LOGPROBS}, got {s.top_logprobs}"))
    elif s.top_logprobs and not s.logprobs:
        v.append(("sampling.top_logprobs", "needs sampling.logprobs set"))
    if req.HasField("stream_interval_ms") and req.stream_interval_ms > MAX_STREAM_INTERVAL_MS:
        v.append(("stream_interval_ms", f"at most {MAX_STREAM_INTERVAL_MS} ms"))
    if req.HasField("stream_interval_tokens") and req.stream_interval_tokens > MAX_INTERVAL_TOKENS:
        v.append(("stream_interval_tokens", f"at most {MAX_INTERVAL_TOKENS} tokens"))
    if len(req.request_id) > 128:
        v.append(("request_id", "at most 128 characters"))
    if len(req.session_key) > 256:
        v.append(("session_key", "at most 256 characters"))
    if v:
        raise invalid_argument(v)


def check_embed(req: inference_pb2.EmbedRequest) -> None:
    v: list[tuple[str, str]] = []
    if not req.model:
        v.append(("model", "required: the model name or alias"))
    if not req.inputs:
        v.append(("inputs", "give at least one input"))
    if len(req.inputs) > MAX_EMBED_INPUTS:
        v.append(("inputs", f"at most {MAX_EMBED_INPUTS} inputs per request"))
    if any(not x for x in req.inputs):
        v.append(("inputs", "inputs must not be empty"))
    if sum(len(x) for x in req.inputs) > MAX_PROMPT_CHARS:
        v.append(("inputs", f"at most {MAX_PROMPT_CHARS} characters in all"))
    if v:
        raise invalid_argument(v)


def resolve_params(
    s: inference_pb2.SamplingParams, spec: cluster_pb2.ModelSpec
) -> GenerationParams:
    return GenerationParams(
        max_tokens=s.max_tokens
        if s.HasField("max_tokens")
        else spec.default_max_tokens or DEFAULT_MAX_TOKENS,
        temperature=(s.temperature if s.temperature >= GREEDY_BELOW else 0.0)
        if s.HasField("temperature")
        else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs if s.logprobs else 0,
    )


def check_continuation(req: inference_pb2.GenerateRequest, params: GenerationParams) -> None:
    """A router's continuation must leave at least one token to generate."""
    done = len(req.continuation.token_ids)
    if done >= params.max_tokens:
        raise invalid_argument(
            [
                (
                    "continuation.token_ids",
                    f"{done} tokens already delivered of max_tokens {params.max_tokens}: "
                    "nothing left to generate",
                )
            ]
        )
    if done and len(req.continuation.text) > MAX_PROMPT_CHARS:
        raise invalid_argument([("continuation.text", f"over {MAX_PROMPT_CHARS} characters")])


def context_too_long(prompt_tokens: int, max_tokens: int, limit: int) -> ServiceError:
    return invalid_argument(
        [
            (
                "sampling.max_tokens",
                f"prompt has {prompt_tokens} tokens; with max_tokens {max_tokens} it exceeds the "
                f"model's context of {limit} tokens: shorten the prompt or lower max_tokens",
            )
        ]
    )


__all__ = ["GenerationParams", "ServiceError", "check_embed", "check_generate", "resolve_params"]
