"""What every engine does with a request before generating: the prompt (or chat messages through
the tokenizer's chat template) to token ids, checked against the model's context, and the status
for a model that is not on the device. Tokenizers are Hugging Face ones (untyped here)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import cluster_pb2, inference_pb2
from meshserve.validation import context_too_long

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


def not_serving(name: str, tier: int) -> ServiceError:
    """UNAVAILABLE for a model that is offloaded or not loaded here (the router tries another)."""
    offloaded = tier in (cluster_pb2.TIER_HOST, cluster_pb2.TIER_DISK)
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"model {name!r} is {'offloaded' if offloaded else 'not loaded'} here",
        "NOT_LOADED",
        retry_after_s=1.0,
    )


def held_back(tok: Any, token_ids: Sequence[int], delivered: str) -> str:
    """Text of resumed ``token_ids`` that the client has not received: their decoding beyond the
    ``delivered`` text (what the old replica held back: the start of a possible stop string).
    Engines that detokenize only new tokens send it first. An incomplete UTF-8 character at the
    end is left to the next token; a decoding that does not extend ``delivered`` yields ""."""
    if not token_ids:
        return ""
    full = tok.decode(list(token_ids), skip_special_tokens=True).rstrip("\ufffd")
    return full[len(delivered) :] if full.startswith(delivered) else ""
