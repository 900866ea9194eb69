"""vLLM's asynchronous engine (`AsyncLLM`) as an Engine (DESIGN §5).

vLLM runs the model in its own engine-core process and batches every running stream continuously
over a paged KV cache; this module maps our API onto it one to one:

- Streaming: each `generate` is one vLLM request with ``output_kind=DELTA``; closing our iterator
  (client cancel, deadline) closes vLLM's, which aborts the request in the engine core.
- Prompts are tokenized here, through the model's tokenizer and chat template, so the context
  check gives the same INVALID_ARGUMENT as the torch engine before vLLM sees the request.
- Memory: the placement grants bytes (weights + KV headroom + overhead). On a GPU that becomes
  vLLM's ``gpu_memory_utilization`` (a fraction of the device, per engine instance), never vLLM's
  default 0.9, so several models share one GPU. On the CPU build the KV cache is sized by
  ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB), taken from the same grant. The agent serializes loads,
  so vLLM's memory profiling sees a stable device.
- Tiers: with sleep mode (CUDA), TIER_HOST is ``sleep(level=1)`` (weights to CPU RAM, KV cache
  dropped) and restore is ``wake_up()``. TIER_DISK, and every tier on the CPU build (which has no
  sleep mode), shuts the engine down; restore starts it again from the model's files, and the
  engine reports TIER_DISK with a note saying so, instead of pretending to hold the weights in RAM.
- Stats: a vLLM stat logger keeps the latest scheduler stats (KV-cache usage, running, waiting).
- LoRA adapters (spec.max_adapters): loaded at run time, base requests through an identity
  adapter (vllm_lora.py).

`vllm` is imported only in the vllm_* engine modules (STYLE): the router and the scheduler never
load it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from meshserve.kvblocks import Cleared, Event
from meshserve.nodeagent.engines.base import (
    NO_RESUME,
    Chunk,
    EngineConfig,
    EngineStats,
    Resume,
    per_token,
)
from meshserve.nodeagent.engines.params import GenerationParams
from meshserve.nodeagent.engines.prompts import (
    ResumedText,
    check_resume,
    engine_died,
    no_adapters,
    prompt_ids,
)
from meshserve.nodeagent.engines.serving import Serving
from meshserve.nodeagent.engines.vllm_build import build_cancellably
from meshserve.nodeagent.engines.vllm_io import logprobs_of, process_env, sampling_params
from meshserve.nodeagent.engines.vllm_kv import VllmKvEvents
from meshserve.nodeagent.engines.vllm_lora import VllmLora
from meshserve.nodeagent.engines.vllm_plan import (
    GIB,
    VllmPlan,
    offload_step,
    plan_engine,
    restore_step,
)
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import cluster_pb2, inference_pb2
from meshserve.weights import predict_weight_bytes
from vllm.config.kv_events import KVEventsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.platforms import current_platform
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase

log = logging.getLogger(__name__)

DEVICE, HOST, DISK = cluster_pb2.TIER_DEVICE, cluster_pb2.TIER_HOST, cluster_pb2.TIER_DISK
FINISH = {"stop": inference_pb2.FINISH_REASON_STOP, "length": inference_pb2.FINISH_REASON_LENGTH}


class _StatsSink(StatLoggerBase):
    """Keeps the latest scheduler stats of one engine (vLLM calls `record` every engine step)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, owner: VllmEngine | None = None):
        self.owner = owner

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if self.owner is None:
            return
        if iteration_stats is not None:
            self.owner._generated += int(iteration_stats.num_generation_tokens)
        if scheduler_stats is not None:
            self.owner._stats = EngineStats(
                running=int(scheduler_stats.num_running_reqs),
                waiting=int(scheduler_stats.num_waiting_reqs),
                kv_cache_usage=float(scheduler_stats.kv_cache_usage),
            )

    def log_engine_initialized(self) -> None:
        pass


async def _alive(stream: AsyncIterator[Any], name: str) -> AsyncIterator[Any]:
    """vLLM's outputs; its EngineDeadError as UNAVAILABLE (a router continues the stream on
    another replica) instead of an unknown error."""
    try:
        async for out in stream:
            yield out
    except EngineDeadError as e:
        raise engine_died(name, "vLLM's engine core died") from e


class VllmEngine(Serving):
    """`Engine` over vLLM's AsyncLLM."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._llm: Any = None
        self._tok: Any = None
        self._spec: cluster_pb2.ModelSpec | None = None
        self._plan: VllmPlan | None = None
        self._tier = 0
        self._max_len = 0
        self._weights = 0
        self._in_flight = 0
        self._stats = EngineStats(running=0, waiting=0, kv_cache_usage=0.0)
        self._generated = 0  # vLLM's generation tokens, summed over its iteration stats
        self._on_cpu = bool(current_platform.is_cpu())
        self._sleep = not self._on_cpu and bool(current_platform.is_sleep_mode_available())
        self._kv: VllmKvEvents | None = None  # its KV events, while the engine runs
        self._lora: VllmLora | None = None  # its LoRA adapters (spec.max_adapters), while it runs
        self.kv_reports = True

    def _kv_to_agent(self, events: Sequence[Event]) -> None:
        if self.kv_sink is not None:
            self.kv_sink(events)

    # --- state -------------------------------------------------------------------------------

    def health(self) -> str:
        """vLLM's own verdict: its client marks the engine dead when an engine-core process
        exits (a monitor thread watches them), and errored when its output loop ended."""
        llm = self._llm
        if llm is not None and llm.errored:
            return "vLLM's engine core died (EngineDeadError)"
        return ""

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def tier_note(self) -> str:
        if self._sleep:
            return (
                "vLLM sleep mode: TIER_HOST is sleep(level=1); TIER_DISK restarts from the source"
            )
        return (
            "vLLM without sleep mode (CPU build): offloading shuts the engine down and restore "
            "restarts it from the model's files, so the weights sit on disk, not in CPU RAM"
        )

    def memory_bytes(self) -> int:
        """What vLLM holds on the device: its whole grant on a GPU (it reserves the fraction up
        front), weights + KV cache on the CPU build."""
        if self._tier != DEVICE or self._plan is None:
            return 0
        if self._on_cpu:
            return self._weights + self._plan.cpu_kv_gib * GIB
        fraction = float(self._plan.kwargs["gpu_memory_utilization"])  # of each GPU of a gang
        gpus = int(self._plan.kwargs.get("tensor_parallel_size", 1))
        return int(fraction * self.config.device_total_bytes) * gpus

    def host_bytes(self) -> int:
        return self._weights if self._tier == HOST else 0

    def disk_bytes(self) -> int:
        return 0  # the disk tier reads the model's own files: no copy is made

    def stats(self) -> EngineStats:
        # vLLM reports scheduler stats only on engine steps: after the last stream ends (or is
        # aborted) the engine idles and its last report still counts that stream. Every request
        # goes through generate(), so none in flight means none running or waiting.
        if self._in_flight == 0:
            return EngineStats(0, 0, 0.0, generated_tokens=self._generated)
        return replace(self._stats, generated_tokens=self._generated)

    # --- lifecycle ---------------------------------------------------------------------------

    async def load(self, spec: cluster_pb2.ModelSpec) -> None:
        self._weights = await asyncio.to_thread(
            predict_weight_bytes, Path(spec.source), spec.engine_args.get("dtype")
        )
        self._plan = plan_engine(spec, self.config, self._on_cpu, self._sleep, self._weights)
        self._spec = spec
        await self._start()

    async def _start(self) -> None:
        assert self._plan is not None
        started = time.monotonic()
        kwargs = dict(self._plan.kwargs)
        if kwargs.get("enable_prefix_caching", True):  # vLLM's default: on
            self._kv = VllmKvEvents(self._kv_to_agent)
            kwargs["kv_events_config"] = KVEventsConfig(**self._kv.config())
        args = AsyncEngineArgs(**kwargs)

        def factory(vllm_config: Any, engine_index: int = 0) -> _StatsSink:
            return _StatsSink(vllm_config, engine_index, self)

        # Building the engine blocks for seconds (it spawns and profiles the engine core): off the
        # event loop, so leases keep beating, and cancellable (vllm_build.py). AsyncLLM starts its
        # output handler on first use. The engine-core processes vLLM spawns now read the plan's
        # environment (their devices, by uuid); the agent's own is restored once they run. Loads
        # are serialized per agent.
        try:
            with process_env(self._plan.env):
                self._llm = await build_cancellably(
                    partial(AsyncLLM.from_engine_args, args, stat_loggers=[factory]),
                    AsyncLLM.shutdown,
                )
        except BaseException:
            kv, self._kv = self._kv, None
            if kv is not None:  # only now: the engine core binds its socket there
                await asyncio.shield(kv.close())
            raise
        self._tok = self._llm.get_tokenizer()
        if self._plan.kwargs.get("enable_lora"):
            work = tempfile.mkdtemp(prefix="meshserve-lora-", dir=self.config.cache_dir or None)
            self._lora = VllmLora(self._llm, Path(work))
            if self._on_cpu:  # base requests through an identity adapter (vllm_lora.py)
                assert self._spec is not None
                await self._lora.start(Path(self._spec.source))
        self._max_len = int(self._llm.model_config.max_model_len)
        if self._kv is not None:
            self._kv.start()
            self._kv_block_tokens = int(self._llm.vllm_config.cache_config.block_size)
        self._tier = DEVICE
        log.info(
            "vLLM engine for %s up in %.1f s",
            self._plan.kwargs["served_model_name"][0],
            time.monotonic() - started,
        )

    async def _stop(self) -> None:
        lora, self._lora = self._lora, None
        if lora is not None:
            lora.close()
        kv, self._kv = self._kv, None
        if kv is not None:
            await kv.close()
            self._kv_to_agent([Cleared()])  # its cache is gone with it
        llm, self._llm = self._llm, None
        if llm is not None:
            if llm.errored:  # in-flight requests fail now, as vLLM's own output loop does
                with contextlib.suppress(Exception):
                    llm.output_processor.propagate_error(EngineDeadError())
            await asyncio.to_thread(llm.shutdown)  # ends any engine-core process still there
        self._stats = EngineStats(running=0, waiting=0, kv_cache_usage=0.0)

    async def unload(self) -> None:
        await self._stop()
        self._tier = 0

    async def offload(self, tier: int) -> None:
        step = offload_step(self._tier, tier, self._sleep)
        if step == "sleep":
            await self._llm.sleep(level=1)  # drops the KV cache: its blocks are gone
            self._kv_to_agent([Cleared()])
            self._tier = HOST
        elif step == "shutdown":
            await self._stop()  # the weights stay in the model's files
            self._tier = DISK

    async def restore(self) -> None:
        step = restore_step(self._tier, self._llm is not None)
        if step == "wake_up":
            await self._llm.wake_up()
            self._tier = DEVICE
        elif step == "start":
            await self._start()

    # --- requests ----------------------------------------------------------------------------

    def _check_serving(self) -> None:
        self._refuse_unless_serving(self._name, self._llm is not None)

    @property
    def _name(self) -> str:
        return self._spec.name if self._spec is not None else ""

    async def generate(
        self,
        prompt: str,
        messages: Sequence[inference_pb2.ChatMessage],
        params: GenerationParams,
        resume: Resume = NO_RESUME,
    ) -> AsyncIterator[Chunk]:
        self._check_serving()
        if why := self.health():
            raise engine_died(self._name, why)
        ids = await prompt_ids(self._tok, prompt, messages, params.max_tokens, self._max_len)
        check_resume(resume.token_ids, int(self._llm.model_config.get_vocab_size()))
        request_id = uuid.uuid4().hex
        done = list(resume.token_ids)
        # Resumed: the delivered tokens extend the prompt, and count against max_tokens.
        rest = replace(params, max_tokens=params.max_tokens - len(done))
        prompt_in: dict[str, Any] = {"prompt_token_ids": ids + done}
        if params.cache_salt:
            prompt_in["cache_salt"] = params.cache_salt
        lora = self._lora.request_for(params.adapter, self._name) if self._lora else None
        if params.adapter and lora is None:
            raise no_adapters(f"vllm engine of {self._name!r}")
        stream = self._llm.generate(
            prompt_in,
            sampling_params(rest),
            request_id,
            lora_request=lora,
            priority=-params.priority,  # vLLM runs lower values first; ours: higher first
        )
        self._in_flight += 1
        produced = len(done)
        # vLLM detokenizes a token-id prompt's continuation from an offset of its own: a resumed
        # stream's text is decoded here so it joins the client's copy exactly.
        resumed = ResumedText(self._tok, done, resume.text, params.stop) if done else None
        try:
            async for out in _alive(stream, self._name):
                c = out.outputs[0]
                produced += len(c.token_ids)
                finish = 0
                if c.finish_reason is not None:
                    finish = FINISH.get(c.finish_reason, 0)
                    if not finish:  # "abort": the engine dropped the request (shutdown, error)
                        raise ServiceError(
                            grpc.StatusCode.UNAVAILABLE,
                            f"vLLM aborted the request ({c.finish_reason}): retry",
                            "ENGINE_ABORTED",
                            retry_after_s=0.5,
                        )
                if c.text or c.token_ids or finish:
                    text = resumed.add(c.token_ids, bool(finish)) if resumed else c.text
                    if resumed is not None and resumed.stopped:  # straddled the failover point
                        finish = inference_pb2.FINISH_REASON_STOP
                    new = tuple(c.token_ids)
                    lps = (
                        logprobs_of(c.logprobs, new, params.top_logprobs, self._tok)
                        if params.logprobs
                        else ()
                    )
                    # One message per token (vLLM hands over what several steps made at once
                    # when the loop falls behind); the agent's coalescer packs them if asked.
                    for chunk in per_token(Chunk(text, new, finish, len(ids), produced, lps)):
                        yield chunk
                if finish:
                    return
        finally:
            self._in_flight -= 1
            with contextlib.suppress(Exception):
                await stream.aclose()  # aborts the request in the engine core if still running

    async def load_adapter(self, name: str, path: str) -> None:
        self._check_serving()
        if self._lora is None:
            raise no_adapters(f"vllm engine of {self._name!r} (max_adapters 0)")
        await self._lora.load(name, path)

    async def unload_adapter(self, name: str) -> None:
        if self._lora is not None:
            await self._lora.unload(name)

    async def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        self._check_serving()
        raise ServiceError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"model {self._name!r} is served by vLLM for generation: call Generate, or serve an "
            "embedding model with engine torch",
            "WRONG_TASK",
        )
