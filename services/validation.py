"""Checks a GenerateRequest/EmbedRequest before any work is done; router and agent share it so a
client gets the same INVALID_ARGUMENT from either (rule 3: a message a user can act on). What an
engine is then handed (`GenerationParams`) lives with the engine contract (nodeagent/engines/
params.py)."""

from __future__ import annotations

from meshserve.rpc.errors import ServiceError, invalid_argument
from meshserve.v1 import cluster_pb2, inference_pb2

MAX_PROMPT_CHARS = 1_000_000  # requests above this are refused, not truncated
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_EMBED_INPUTS = 256
MAX_STREAM_INTERVAL_MS = 5_000  # token coalescing: the longest a packed token may wait
MAX_INTERVAL_TOKENS = 4_096
MAX_TOP_LOGPROBS = 20  # as OpenAI
ROLES = frozenset({"system", "user", "assistant"})


MAX_SALT_CHARS = 256  # a label, not data (the OpenAI front allows as many)


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
    if len(req.cache_salt) > MAX_SALT_CHARS:
        v.append(("cache_salt", f"{len(req.cache_salt)} characters; the limit is {MAX_SALT_CHARS}"))
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


__all__ = ["ServiceError", "check_embed", "check_generate"]
