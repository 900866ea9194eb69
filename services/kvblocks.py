"""KV-cache blocks as the router and the engines name them (pure; shared by both sides).

A prompt's token ids are cut into full blocks of ``block_tokens`` (the engine's KV block size; a
partial last block is never cached, as in vLLM) and each block gets a chained hash, as vLLM's
prefix cache does: ``h_i = H(h_{i-1}, tokens of block i)`` with the root ``h_{-1} = H(extras)``,
where the extras are what makes equal tokens different cache entries (the LoRA adapter, the
tenant's ``cache_salt``). Two prompts share block i exactly when they share everything up to the
end of block i and the same extras, so a block hash names a whole prefix.

H is BLAKE2b-64 over fixed-width bytes: reproducible across processes and machines (unlike
Python's ``hash`` or vLLM's default pickle-based sha256, DESIGN §7), so agents can translate an
engine's events into these names and every router computes the same names from a prompt.
Engines with their own hashes (vLLM) are translated by the agent from the token ids their events
carry; the hash is ours.

`sim_tokens` is the simulated engine's tokenizer (4 bytes of UTF-8 a token, as its token counts
always were), here so that the router can tokenize a prompt for a ``sim`` model exactly as its
engine does.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Protocol

DEVICE, HOST = 1, 2  # where a block lives (cluster_pb2.TIER_DEVICE / TIER_HOST)
DEFAULT_BLOCK_TOKENS = 16  # vLLM's default block size on GPUs (its CPU build uses 128)
MAX_BLOCKS = 1024  # hashed per prompt at most (prefixes beyond 16 k tokens at 16 a block are rare)


def root(*extras: str) -> int:
    """The parent of a prompt's first block: the extras (adapter, cache salt) that separate
    equal token sequences; no extras is the plain model's root."""
    return int.from_bytes(blake2b("\x1f".join(extras).encode(), digest_size=8).digest(), "big")


def chain(
    tokens: Sequence[int], block_tokens: int, parent: int, limit: int = MAX_BLOCKS
) -> list[int]:
    """The chained hashes of the full blocks of ``tokens`` (at most ``limit``)."""
    out: list[int] = []
    n = min(len(tokens) // block_tokens, limit)
    pack = struct.Struct(f"<Q{block_tokens}I").pack
    h = parent
    for i in range(n):
        block = tokens[i * block_tokens : (i + 1) * block_tokens]
        h = int.from_bytes(blake2b(pack(h, *block), digest_size=8).digest(), "big")
        out.append(h)
    return out


class _Turn(Protocol):
    role: str
    content: str


def sim_text(prompt: str, messages: Iterable[_Turn]) -> str:
    """The text the ``sim`` engine reads: the prompt, or its chat messages as ``role: content``
    lines (the router hashes this very text, so the two cannot drift apart)."""
    return prompt or "".join(f"{m.role}: {m.content}\n" for m in messages)


def sim_tokens(text: str) -> list[int]:
    """The ``sim`` engine's tokens of a text: one per 4 bytes of UTF-8 (the last one shorter)."""
    raw = text.encode()
    return [4 + zlib.crc32(raw[i : i + 4]) % 31_996 for i in range(0, len(raw), 4)] or [4]


# --- what engines report of their blocks (vLLM's KV events, in our names) --------------------


@dataclass(frozen=True)
class Stored:
    hashes: tuple[int, ...]
    medium: int = DEVICE


@dataclass(frozen=True)
class Removed:
    hashes: tuple[int, ...]
    medium: int = DEVICE


@dataclass(frozen=True)
class Cleared:
    pass


Event = Stored | Removed | Cleared
