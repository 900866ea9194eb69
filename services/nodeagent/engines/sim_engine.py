"""``engine: sim`` — a simulated LLM engine: no weights, no torch, the same `Engine` contract (as
llm-d's inference simulator and vLLM's dummy weights serve their projects). It lets a deployment's
control plane and routing be load-tested without GPUs, and lets the tests run fleets.

The model of a device is `SimSettings` (its ``engine_args``, sim_settings.py).

Log probabilities, when asked, are synthetic (`logprob_at`): a per-prompt confidence.

Memory is the spec's ``memory_bytes`` (what the scheduler places by). Output is deterministic: a
greedy request's tokens depend only on the prompt and the position (failover continues the same
text); a sampled one's on its seed too. One stepper task per engine serves every stream.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from meshserve.kvblocks import (
    Cleared,
    Event,
    Removed,
    Stored,
    chain,
    root,
    sim_text,
    sim_tokens,
)
from meshserve.nodeagent.engines.base import (
    NO_RESUME,
    Chunk,
    EngineConfig,
    EngineStats,
    Logprob,
    Resume,
)
from meshserve.nodeagent.engines.params import GenerationParams, context_too_long
from meshserve.nodeagent.engines.prompts import engine_died, failed, out_of_memory, unloaded
from meshserve.nodeagent.engines.serving import Serving
from meshserve.nodeagent.engines.sim_settings import SimSettings
from meshserve.v1 import cluster_pb2, inference_pb2

DEVICE, HOST, DISK = cluster_pb2.TIER_DEVICE, cluster_pb2.TIER_HOST, cluster_pb2.TIER_DISK
WORDS = [
    "the",
    "mesh",
    "serves",
    "many",
    "models",
    "on",
    "few",
    "cards",
    "while",
    "routers",
    "send",
    "each",
    "request",
    "where",
    "it",
    "is",
    "answered",
    "soonest",
    "and",
    "schedulers",
    "pack",
    "memory",
    "tight",
]
VOCAB = 32_000
ROOT = root()
EMBED_DIM = 32

log = logging.getLogger(__name__)


def token_at(prompt_key: int, position: int, salt: int) -> int:
    return 4 + zlib.crc32(f"{prompt_key}:{position}:{salt}".encode()) % (VOCAB - 4)


def word(token: int) -> str:
    return WORDS[token % len(WORDS)] + " "


def _unit(key: str) -> float:
    return zlib.crc32(key.encode()) / 2**32


def logprob_at(prompt_key: int, position: int, token: int, salt: int, top: int) -> Logprob:
    """Synthetic log probabilities, deterministic like the tokens: each prompt has a confidence
    c uniform in [0.3, 0.99]; the sampled token's probability is c x [0.85, 1] per position; the
    alternatives share the rest, halving down the list (what a confidence cascade reads)."""
    c = 0.3 + 0.69 * _unit(f"confidence:{prompt_key}")
    p = c * (0.85 + 0.15 * _unit(f"jitter:{prompt_key}:{position}"))
    ranked = [(token, p)] + [
        (token_at(prompt_key, position, salt + 1 + i), (1 - p) / 2 ** (i + 1)) for i in range(top)
    ]
    ranked.sort(key=lambda x: -x[1])
    best = tuple((t, word(t), math.log(q)) for t, q in ranked[:top])
    return Logprob(math.log(p), word(token), best)


@dataclass(eq=False)
class SimStream:
    prompt_key: int
    input_tokens: int
    params: GenerationParams
    delivered: int  # tokens already delivered (a resumed stream starts after them)
    text: str  # text delivered so far (stop strings look across it)
    salt: int
    queue: asyncio.Queue[Chunk | BaseException] = field(default_factory=asyncio.Queue)
    first_at: float = 0.0  # loop time of its first token (admission + ttft)
    blocks: list[int] = field(default_factory=list)  # its prompt's full blocks (chained hashes)
    produced: int = 0
    cancelled: bool = False

    @property
    def reserved(self) -> int:
        return self.input_tokens + self.params.max_tokens


class SimEngine(Serving):
    """`Engine` that simulates a device (module docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.settings = SimSettings()
        self._name = ""
        self._memory = 0
        self._tier = 0
        self._max_len = 4096
        self._waiting: list[SimStream] = []
        self._running: list[SimStream] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._steps = 0
        self._generated = 0
        self.ooms = 0
        self._died = ""  # why the stepper ended without being asked to
        self._cache: OrderedDict[int, None] = OrderedDict()  # prefix cache: block hashes, LRU
        self.kv_reports = True
        self.cached_tokens = 0  # prompt tokens whose prefill the prefix cache saved

    # --- lifecycle and tiers -----------------------------------------------------------------

    async def load(self, spec: cluster_pb2.ModelSpec) -> None:
        self.settings = SimSettings.from_args(spec.engine_args)
        await asyncio.sleep(self.settings.load_s)
        if self.settings.fail_load:
            raise RuntimeError(f"simulated load failure of {spec.name!r} (engine_args.fail_load)")
        self._name = spec.name
        self._memory = int(spec.memory_bytes + spec.kv_headroom_bytes)
        self._max_len = spec.max_model_len or 4096
        self._kv_block_tokens = self.settings.block_tokens
        self._tier = DEVICE
        self._died = ""
        self._task = asyncio.create_task(self._stepper(), name=f"sim-{spec.name}")

    def health(self) -> str:
        return self._died

    async def unload(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        err = unloaded()
        for s in [*self._running, *self._waiting]:
            s.queue.put_nowait(err)
        self._running.clear()
        self._waiting.clear()
        self._tier = 0
        self._clear_cache()

    def _clear_cache(self) -> None:
        if self._cache:
            self._cache.clear()
            if self.kv_sink is not None:
                self.kv_sink([Cleared()])

    async def offload(self, tier: int) -> None:
        if tier not in (HOST, DISK):
            raise ValueError(f"cannot offload to tier {tier}")
        gbps = self.settings.host_gbps if tier == HOST else self.settings.disk_gbps
        await asyncio.sleep(self._memory / (gbps * 1e9))
        self._tier = tier
        self._clear_cache()  # the KV cache goes with the device memory

    async def restore(self) -> None:
        if self._tier == DEVICE:
            return
        gbps = self.settings.host_gbps if self._tier == HOST else self.settings.disk_gbps
        await asyncio.sleep(self._memory / (gbps * 1e9))
        self._tier = DEVICE

    @property
    def tier_note(self) -> str:
        return "simulated engine: tiers are timed from host_gbps / disk_gbps, nothing moves"

    def memory_bytes(self) -> int:
        return self._memory if self._tier == DEVICE else 0

    def host_bytes(self) -> int:
        return self._memory if self._tier == HOST else 0

    def disk_bytes(self) -> int:
        return self._memory if self._tier == DISK else 0

    def stats(self) -> EngineStats:
        reserved = sum(s.reserved for s in self._running)
        usage = min(1.0, reserved / self.settings.kv_tokens)
        return EngineStats(
            len(self._running), len(self._waiting), usage, self.ooms, self._generated
        )

    @property
    def in_flight(self) -> int:
        return len(self._running) + len(self._waiting)

    @property
    def max_model_len(self) -> int:
        return self._max_len

    # --- requests ----------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        messages: Sequence[inference_pb2.ChatMessage],
        params: GenerationParams,
        resume: Resume = NO_RESUME,
    ) -> AsyncIterator[Chunk]:
        if self._died:
            raise engine_died(self._name, self._died)
        self._refuse_unless_serving(self._name, self._task is not None)
        text = sim_text(prompt, messages)
        input_tokens = max(1, len(text.encode()) // 4)
        if input_tokens + params.max_tokens > self._max_len:
            raise context_too_long(input_tokens, params.max_tokens, self._max_len)
        greedy = params.temperature == 0
        salt = 0 if greedy else (params.seed if params.seed is not None else random.getrandbits(32))
        stream = SimStream(
            zlib.crc32(text.encode()),
            input_tokens,
            params,
            len(resume.token_ids),
            resume.text,
            salt,
        )
        b = self.settings.block_tokens
        stream.blocks = chain(
            sim_tokens(text), b, root(params.cache_salt) if params.cache_salt else ROOT
        )
        self._waiting.append(stream)
        self._wake.set()
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            stream.cancelled = True
            if stream in self._waiting:
                self._waiting.remove(stream)

    async def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        self._refuse_unless_serving(self._name, self._task is not None)
        out = []
        for text in inputs:
            rng = random.Random(zlib.crc32(text.encode()))
            v = [rng.gauss(0, 1) for _ in range(EMBED_DIM)]
            norm = math.sqrt(sum(x * x for x in v)) or 1.0
            out.append([x / norm for x in v])
        return out

    # --- the device --------------------------------------------------------------------------

    def _admit(self, now: float) -> None:
        """Waiting streams start, in arrival order (higher priority first), while the batch and
        the KV cache have room."""
        self._waiting.sort(key=lambda s: -s.params.priority)  # stable: arrival order kept
        reserved = sum(s.reserved for s in self._running)
        while self._waiting and len(self._running) < self.settings.max_batch:
            s = self._waiting[0]
            if reserved + s.reserved > self.settings.kv_tokens and self._running:
                break  # waits for KV space (a lone stream always runs)
            self._waiting.pop(0)
            hit = 0
            for h in s.blocks:
                if h not in self._cache:
                    break
                hit += 1
            for h in reversed(s.blocks[:hit]):  # a prefix's head is used last: evicted last
                self._cache.move_to_end(h)
            self.cached_tokens += min(s.input_tokens, hit * self.settings.block_tokens)
            uncached = max(0, s.input_tokens - hit * self.settings.block_tokens)
            s.first_at = now + self.settings.ttft_s + uncached * self.settings.prefill_s_per_token
            self._running.append(s)
            reserved += s.reserved

    def _step_time(self) -> float:
        tps = self.settings.device_tokens_per_s
        decoding = sum(1 for s in self._running if s.produced or s.delivered)
        return max(self.settings.itl_s, decoding / tps if tps else 0.0)

    async def _stepper(self) -> None:
        try:
            await self._step_loop()
        except Exception as e:  # the device is gone: every stream fails, nothing more is taken
            self._died = f"the simulated engine died: {e}"
            log.error("%s: %s", self._name, self._died)  # when: bench/chaos_fleet.py reads it
            err = engine_died(self._name, self._died)
            for s in [*self._running, *self._waiting]:
                s.queue.put_nowait(err)
            self._running.clear()
            self._waiting.clear()
            self._clear_cache()

    async def _step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._running = [s for s in self._running if not s.cancelled]
            self._admit(loop.time())
            if not self._running:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            first = min(s.first_at for s in self._running)
            await asyncio.sleep(max(self._step_time(), first - now))
            now = loop.time()
            for s in list(self._running):
                if s.cancelled or now < s.first_at:
                    continue
                self._emit(s)

    def _cache_prompt(self, blocks: list[int]) -> None:
        """A prompt's blocks are cached once its first token is out (the LRU bound evicts)."""
        new = [h for h in blocks if h not in self._cache]
        for h in reversed(blocks):  # as vLLM frees them: a prefix's tail is evicted first
            self._cache[h] = None
            self._cache.move_to_end(h)
        limit = self.settings.cache_blocks or self.settings.kv_tokens // self.settings.block_tokens
        gone = [self._cache.popitem(last=False)[0] for _ in range(len(self._cache) - limit)]
        events: list[Event] = []
        if new:
            events.append(Stored(tuple(new)))
        if gone:
            events.append(Removed(tuple(gone)))
        if events and self.kv_sink is not None:
            self.kv_sink(events)

    def _emit(self, s: SimStream) -> None:
        self._steps += 1
        if self._steps == self.settings.inject_crash_at_step:
            raise RuntimeError(f"injected crash at step {self._steps}")
        if 0 < self.settings.inject_fail_after_step < self._steps:
            self._running.remove(s)
            s.queue.put_nowait(failed(self._name, "inject_fail_after_step"))
            return
        if self.settings.inject_oom_every and self._steps % self.settings.inject_oom_every == 0:
            self.ooms += 1
            self._running.remove(s)
            s.queue.put_nowait(out_of_memory(self._name, "retry (simulated by inject_oom_every)"))
            return
        if not s.produced:
            self._cache_prompt(s.blocks)
        position = s.delivered + s.produced
        token = token_at(s.prompt_key, position, s.salt)
        s.produced += 1
        self._generated += 1
        piece = word(token)
        s.text += piece
        done = position + 1 >= s.params.max_tokens
        reason = inference_pb2.FINISH_REASON_LENGTH if done else 0
        cut = next((s.text.find(x) for x in s.params.stop if x and x in s.text), -1)
        if cut >= 0:
            keep = max(0, len(piece) - (len(s.text) - cut))
            piece, reason = piece[:keep], inference_pb2.FINISH_REASON_STOP
        p = s.params
        logprobs = (
            (logprob_at(s.prompt_key, position, token, s.salt, p.top_logprobs),)
            if p.logprobs
            else ()
        )
        s.queue.put_nowait(
            Chunk(piece, (token,), reason, s.input_tokens, s.delivered + s.produced, logprobs)
        )
        if reason:
            self._running.remove(s)
