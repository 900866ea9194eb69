"""The Engine contract (DESIGN §5)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from meshserve.v1 import cluster_pb2, inference_pb2
from meshserve.validation import GenerationParams


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"  # "cpu" or "cuda:<index>"
    threads: int = 2  # intra-op threads for CPU inference
    max_batch: int = 32  # sequences generated concurrently; more wait in the engine's queue


@dataclass(frozen=True)
class Chunk:
    """What one engine step produced for one stream."""

    text: str  # text delta
    token_ids: tuple[int, ...]
    finish_reason: int  # inference_pb2.FinishReason; 0 until the last chunk
    input_tokens: int
    output_tokens: int  # generated so far


class Engine(Protocol):
    async def load(self, spec: cluster_pb2.ModelSpec) -> None:
        """Loads weights onto the configured device. Raises on failure; the agent reports FAILED."""

    def generate(
        self,
        prompt: str,
        messages: Sequence[inference_pb2.ChatMessage],
        params: GenerationParams,
    ) -> AsyncIterator[Chunk]:
        """Streams chunks; the last has ``finish_reason`` set. Raises ServiceError (before the first
        chunk) for input the model cannot take. Closing the iterator cancels generation."""

    async def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        """One L2-normalised vector per input."""

    async def unload(self) -> None:
        """Frees the device memory; the engine can be loaded again."""

    def memory_bytes(self) -> int:
        """Memory the loaded model takes, measured (0 when not loaded)."""

    @property
    def in_flight(self) -> int:
        """Streams being generated now."""


def finish_name(reason: int) -> str:
    return inference_pb2.FinishReason.Name(reason)  # type: ignore[arg-type]
