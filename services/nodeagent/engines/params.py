"""What an engine is asked to generate with (the engine contract's parameters): sampling with
every default resolved from the request and the model's spec, the continuation check a resumed
stream passes, and the context-length refusal engines share."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.rpc.errors import ServiceError, invalid_argument
from meshserve.v1 import cluster_pb2, inference_pb2
from meshserve.validation import MAX_PROMPT_CHARS

DEFAULT_MAX_TOKENS = 64
DEFAULT_ADAPTER_RANK = 16  # vLLM's max_lora_rank default: a base's when max_adapter_rank is 0
GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as vLLM does): logits / 1e-38 overflow


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
    cache_salt: str = ""  # prefix-cache isolation: blocks are reused only under the same salt
    adapter: str = ""  # a LoRA adapter the engine loaded (`Engine.load_adapter`); "": the base


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


def adapter_rank(base: cluster_pb2.ModelSpec) -> int:
    """The largest LoRA rank a base's adapters may have (its slots' rank on engine torch)."""
    return base.max_adapter_rank or DEFAULT_ADAPTER_RANK
