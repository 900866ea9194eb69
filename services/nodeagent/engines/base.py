"""The Engine contract (DESIGN §5)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from meshserve.kvblocks import Event
from meshserve.nodeagent.engines.params import GenerationParams
from meshserve.v1 import cluster_pb2, common_pb2, inference_pb2


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"  # "cpu", "cuda:<index>", or "" (a MIG instance: only in its own process)
    threads: int = 2  # intra-op threads for CPU inference
    max_batch: int = 32  # sequences generated concurrently; more wait in the engine's queue
    cache_dir: str = ""  # where TIER_DISK copies live; required for the disk tier
    memory_budget_bytes: int = 0  # what the placement granted (weights + KV headroom); 0 = unset
    device_total_bytes: int = 0  # memory of the device the engine runs on (GPU, or host RAM)
    # GPU / MIG uuids the placement names, tensor-parallel rank order: CUDA_VISIBLE_DEVICES of
    # engines that run in processes of their own (binding.py)
    visible_devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineStats:
    running: int  # streams being generated
    waiting: int  # streams queued in the engine
    kv_cache_usage: float  # [0, 1]; 0 where the engine has no paged KV cache
    out_of_memory: int = 0  # requests failed by device OOM since load (the agent moves it at 3)
    generated_tokens: int = 0  # output tokens generated since load (the engine's own counter)
    preempted: int = 0  # streams preempted for a higher priority since load (resumed later)


@dataclass(frozen=True)
class Logprob:
    """One position's log probabilities (asked with ``GenerationParams.logprobs``)."""

    logprob: float  # ln p of the sampled token under the model's raw distribution
    token: str  # the sampled token's text on its own
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, text, logprob), most likely first


@dataclass(frozen=True)
class Chunk:
    """What one engine step produced for one stream."""

    text: str  # text delta
    token_ids: tuple[int, ...]
    finish_reason: int  # inference_pb2.FinishReason; 0 until the last chunk
    input_tokens: int
    output_tokens: int  # generated so far
    logprobs: tuple[Logprob, ...] = ()  # one per token id when the request asked; else empty


def merge_chunks(chunks: Sequence[Chunk]) -> Chunk:
    """Consecutive chunks of one stream as one: their text and tokens, the last one's ending."""
    last = chunks[-1]
    return Chunk(
        "".join(c.text for c in chunks),
        tuple(t for c in chunks for t in c.token_ids),
        last.finish_reason,
        last.input_tokens,
        last.output_tokens,
        tuple(lp for c in chunks for lp in c.logprobs),
    )


def per_token(chunk: Chunk) -> list[Chunk]:
    """A chunk of several tokens (an engine that emits what several steps made at once) as one
    chunk per token, so clients get one message per token: each carries its token and logprob,
    the last one the text and the ending (which token made which text is not known here)."""
    n = len(chunk.token_ids)
    if n <= 1:
        return [chunk]
    return [
        Chunk(
            chunk.text if i == n - 1 else "",
            (token,),
            chunk.finish_reason if i == n - 1 else 0,
            chunk.input_tokens,
            chunk.output_tokens - (n - 1 - i),
            chunk.logprobs[i : i + 1],
        )
        for i, token in enumerate(chunk.token_ids)
    ]


@dataclass(frozen=True)
class Resume:
    """What the client already received when its stream moved here mid-way (a router's
    failover): generation continues after these tokens as if it had never stopped."""

    token_ids: tuple[int, ...] = ()  # delivered tokens; they count against max_tokens
    text: str = ""  # the text delivered with them (deltas concatenated)


NO_RESUME = Resume()


class Engine(Protocol):
    # Prefix caching (engines.serving.Serving has the defaults: none): the KV block size in
    # tokens, whether the engine reports its blocks, and where it sends each batch of
    # `meshserve.kvblocks` events (set by the agent before requests arrive).
    @property
    def kv_block_tokens(self) -> int: ...

    kv_reports: bool
    kv_sink: Callable[[Sequence[Event]], None] | None

    async def load(self, spec: cluster_pb2.ModelSpec) -> None:
        """Loads weights onto the configured device. Raises on failure; the agent reports FAILED."""

    def generate(
        self,
        prompt: str,
        messages: Sequence[inference_pb2.ChatMessage],
        params: GenerationParams,
        resume: Resume = NO_RESUME,
    ) -> AsyncIterator[Chunk]:
        """Streams chunks; the last has ``finish_reason`` set. Raises ServiceError (before the first
        chunk) for input the model cannot take. Closing the iterator cancels generation.

        With ``resume``, the prompt is followed by its tokens, only what comes after them is
        streamed, and usage counts them as output (``output_tokens`` is the whole generation)."""

    async def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        """One L2-normalised vector per input."""

    async def load_adapter(self, name: str, path: str) -> None:
        """Loads the LoRA adapter in the PEFT directory ``path`` under ``name``, for requests
        whose `GenerationParams.adapter` names it (the agent keeps at most the spec's
        ``max_adapters`` loaded and never unloads one a stream uses). Engines without adapters
        raise ServiceError FAILED_PRECONDITION."""

    async def unload_adapter(self, name: str) -> None:
        """Frees an adapter `load_adapter` loaded (no stream uses it)."""

    async def unload(self) -> None:
        """Frees the device memory; the engine can be loaded again."""

    async def offload(self, tier: int) -> None:
        """Moves the weights to ``tier`` (TIER_HOST or TIER_DISK) and stops serving. The caller
        drains in-flight streams first; generate() refuses while offloaded."""

    async def restore(self) -> None:
        """Brings the weights back to the device; the caller warms up before serving."""

    @property
    def tier(self) -> int:
        """Where the weights are now (cluster_pb2.Tier)."""

    @property
    def tier_note(self) -> str:
        """How this engine implements tiers on this host, when it is not the obvious way."""

    def memory_bytes(self) -> int:
        """Device memory the model takes, measured (0 when not loaded or offloaded)."""

    def host_bytes(self) -> int:
        """CPU RAM its offloaded weights take (TIER_HOST)."""

    def disk_bytes(self) -> int:
        """Local disk its offloaded weights take (TIER_DISK)."""

    def stats(self) -> EngineStats: ...

    @property
    def in_flight(self) -> int:
        """Streams being generated now."""

    def health(self) -> str:
        """ "" while the engine can serve; otherwise why it cannot, for good (its worker thread or
        engine-core process died, a step hangs). Cheap and non-blocking: the agent calls it
        every half second on every serving replica and, on an answer, marks the replica FAILED
        and unloads it; the engine fails its in-flight requests itself (`engine_died`), never
        leaving them to hang until their deadline."""


@runtime_checkable
class TensorModel(Protocol):
    """What an engine of a tensor model (``task: classify``) adds to `Engine`."""

    def signature(self) -> common_pb2.TensorSignature:
        """Its inputs and outputs (after load)."""

    async def infer(
        self,
        inputs: Sequence[common_pb2.Tensor],
        outputs: Sequence[str],
        rows: int,
        priority: int,
        timeout: float | None,
    ) -> Any:
        """Checked inputs through the agent's batcher: a `batching.Done` whose result is the
        output tensors (those asked, in order; all when ``outputs`` is empty)."""

    async def warm_up(self) -> None:
        """Runs one small batch (the agent's warm-up before READY)."""


def finish_name(reason: int) -> str:
    return inference_pb2.FinishReason.Name(reason)  # type: ignore[arg-type]
