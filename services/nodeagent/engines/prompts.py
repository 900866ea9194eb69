"""What every engine does with a request before generating: the prompt (or chat messages through
the tokenizer's chat template) to token ids, checked against the model's context; and the
statuses engines answer with (not on the device, unloaded, out of device memory). Tokenizers
are Hugging Face ones (untyped here)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
from meshserve.nodeagent.engines.params import context_too_long
from meshserve.rpc.errors import ServiceError, invalid_argument
from meshserve.v1 import cluster_pb2, inference_pb2

OFF_LOOP_CHARS = 20_000  # prompts longer than this are tokenized in a worker thread


def encode(tok: Any, prompt: str, messages: Sequence[inference_pb2.ChatMessage]) -> list[int]:
    """Token ids: chat messages through the chat template (its special tokens included once),
    or ``role: content`` lines when the tokenizer has none; a plain prompt with the tokenizer's
    special tokens."""
    if messages:
        turns = [{"role": m.role, "content": m.content} for m in messages]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        prompt = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
    return list(tok(prompt, add_special_tokens=True)["input_ids"])


async def prompt_ids(
    tok: Any,
    prompt: str,
    messages: Sequence[inference_pb2.ChatMessage],
    max_tokens: int,
    max_len: int,
) -> list[int]:
    """``encode`` (off the event loop for long prompts), never empty, and within the context
    together with ``max_tokens`` (else INVALID_ARGUMENT saying by how much)."""
    if len(prompt) + sum(len(m.content) for m in messages) > OFF_LOOP_CHARS:
        ids = await asyncio.to_thread(encode, tok, prompt, messages)
    else:
        ids = encode(tok, prompt, messages)
    if not ids:
        ids = [tok.bos_token_id or tok.eos_token_id or 0]
    if len(ids) + max_tokens > max_len:
        raise context_too_long(len(ids), max_tokens, max_len)
    return ids


def check_resume(token_ids: Sequence[int], vocab: int) -> None:
    """A continuation's token ids must be tokens of this model (a router sends what a replica of
    the same model produced; anything else is a caller's mistake, not an engine crash)."""
    bad = next((t for t in token_ids if t >= vocab), None)
    if bad is not None:
        raise invalid_argument(
            [("continuation.token_ids", f"token id {bad} is outside the vocabulary of {vocab}")]
        )


def not_serving(name: str, tier: int) -> ServiceError:
    """UNAVAILABLE for a model that is offloaded or not loaded here (the router tries another)."""
    offloaded = tier in (cluster_pb2.TIER_HOST, cluster_pb2.TIER_DISK)
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"model {name!r} is {'offloaded' if offloaded else 'not loaded'} here",
        "NOT_LOADED",
        retry_after_s=1.0,
    )


def unloaded() -> ServiceError:
    """For requests an unload cut short: UNAVAILABLE, so a router retries them elsewhere."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE, "model was unloaded", "MODEL_UNLOADED", retry_after_s=0.5
    )


def engine_died(name: str, why: str) -> ServiceError:
    """For requests on an engine that died under them: UNAVAILABLE, so a router continues each
    on another replica (or this one, once the agent reloaded it)."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"model {name!r}: its engine died ({why}); retry",
        "ENGINE_DIED",
        retry_after_s=1.0,
    )


def out_of_memory(
    name: str, what: str = "retry (a router sends it to another replica)"
) -> ServiceError:
    """A device OOM during a request: RESOURCE_EXHAUSTED for it, not a crashed engine."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"model {name!r} ran out of device memory on this replica: {what}",
        "DEVICE_OUT_OF_MEMORY",
        retry_after_s=1.0,
    )


def failed(name: str, why: str) -> ServiceError:
    """The engine failed one request and stays up (INTERNAL: a router tries elsewhere)."""
    return ServiceError(
        grpc.StatusCode.INTERNAL, f"model {name!r} failed this request ({why})", "ENGINE_ERROR"
    )


def stop_cut(text: str, emitted: int, stops: Sequence[str]) -> int | None:
    """Where ``text`` ends at the first stop string that is not entirely within the first
    ``emitted`` characters already sent (None: no stop string yet)."""
    if not stops:
        return None
    start = max(0, emitted - max(len(s) for s in stops))
    cuts = [i for i in (text.find(x, start) for x in stops) if i >= 0]
    return min(cuts) if cuts else None


def visible_end(text: str, emitted: int, stops: Sequence[str], finished: bool) -> int:
    """How much of ``text`` may be sent now: all of it once finished; else it holds back an
    incomplete UTF-8 character, and what could be the start of a stop string."""
    if finished:
        return len(text)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
        return emitted
    longest = max((len(s) for s in stops), default=0)
    if longest:
        return max(emitted, len(text) - (longest - 1))
    return len(text)


class ResumedText:
    """Text for a resumed stream whose engine detokenizes only new tokens from an unknown offset
    (vLLM with token-id prompts): the whole generation decoded here, deltas past what the client
    has, with the same hold-back and stop rules as an uninterrupted stream (whose detokenizer
    never sends a trailing incomplete UTF-8 character, not even when the stream ends)."""

    def __init__(self, tok: Any, done: Sequence[int], delivered: str, stops: Sequence[str]) -> None:
        self.tok = tok
        self.ids = list(done)
        self.emitted = delivered
        self.stops = tuple(stops)
        self.stopped = False  # a stop string ended the text (one the engine may not have seen)

    def add(self, token_ids: Sequence[int], finished: bool) -> str:
        """The delta for ``token_ids`` just generated (``finished``: the last of the stream)."""
        self.ids += token_ids
        text: str = self.tok.decode(self.ids, skip_special_tokens=True)
        cut = stop_cut(text, len(self.emitted), self.stops)
        if cut is not None:
            text, finished, self.stopped = text[:cut], True, True
        elif finished:  # as vLLM's own stream: an incomplete last character is never sent
            text = text.rstrip("\ufffd")
        end = visible_end(text, len(self.emitted), self.stops, finished)
        delta = text[len(self.emitted) : end]
        self.emitted += delta
        return delta


def no_adapters(engine: str) -> ServiceError:
    """FAILED_PRECONDITION for an adapter asked of an engine that cannot load one."""
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"the {engine} serves no LoRA adapters: serve the base with engine torch or vllm",
        "NO_ADAPTERS",
    )
