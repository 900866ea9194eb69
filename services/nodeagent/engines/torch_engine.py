"""Transformers models on CPU or CUDA: causal LMs streamed token by token, or encoders serving
embeddings (``engine_args: {task: embed}``) (DESIGN §5).

One worker thread owns the model, so the event loop never waits on a forward pass. Each turn the
worker advances every active stream by one token (round robin, up to ``max_batch`` streams), so
concurrent requests share the device fairly and a cancel takes effect before the next token.
Streams are stepped one by one rather than padded into one batched forward: continuous batching of
sequences of different lengths needs a paged KV cache, which the vLLM engine brings. Concurrent
Embed requests are batched into shared forward passes.

Tiers: GPU → pinned CPU RAM → local disk, through one flat buffer per model (engines/flat.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from typing import Any

import grpc
import torch
from meshserve.nodeagent.engines.base import (
    NO_RESUME,
    Chunk,
    EngineConfig,
    EngineStats,
    Resume,
)
from meshserve.nodeagent.engines.params import GenerationParams
from meshserve.nodeagent.engines.prompts import (
    check_resume,
    engine_died,
    out_of_memory,
    prompt_ids,
    unloaded,
)
from meshserve.nodeagent.engines.torch_adapters import TorchAdapters
from meshserve.nodeagent.engines.torch_decode import (
    Stream,
    admit,
    logprob_of,
    next_chunk,
    outranked,
    requested_bytes,
    sample,
    skip_draws,
    this_turn,
)
from meshserve.nodeagent.engines.torch_device import set_threads
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import cluster_pb2, inference_pb2
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

EMBED_BATCH = 64  # inputs per forward pass when batching Embed requests
STEP_TIMEOUT_S = 120.0  # a worker turn running longer than this is a hung device (engine_args)


class WorkerCrash(RuntimeError):
    """A failure of the worker itself (drills: ``engine_args.inject_crash_at_step``)."""


class TorchEngine(TorchAdapters):
    """`Engine` over a transformers AutoModelForCausalLM."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._tok: Any = None
        self._texts: dict[int, str] = {}  # token id → its text alone (logprobs)
        self._max_len = 0
        self._vocab = 0  # token ids the model's embedding takes
        self._eos: frozenset[int] = frozenset()
        self._cond = threading.Condition()
        self._inbox: list[Stream] = []
        self._embeds: list[tuple[list[str], Future[list[list[float]]]]] = []
        self._active: list[Stream] = []
        self._thread: threading.Thread | None = None
        self._in_flight = 0
        self._steps = 0  # decode steps over the engine's life
        self._generated = 0  # tokens sampled over the engine's life
        self._inject_oom_every = 0
        self._inject_crash_at = 0  # drills: the worker dies at this decode step (0: never)
        self._max_batch = config.max_batch
        self.ooms = 0  # requests failed by device OOM
        self.preempted = 0  # streams that gave their batch place to a higher priority
        self._died = ""  # why the worker thread ended without being asked to
        self._turn_started = 0.0  # monotonic s when the running worker turn began; 0 between
        self._step_timeout_s = STEP_TIMEOUT_S

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def stats(self) -> EngineStats:
        return EngineStats(
            len(self._active), len(self._inbox), 0.0, self.ooms, self._generated, self.preempted
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def health(self) -> str:
        if self._died:
            return self._died
        started = self._turn_started
        if started and time.monotonic() - started > self._step_timeout_s:
            return f"a decode step has run for over {self._step_timeout_s:.0f} s (hung device?)"
        return ""

    async def load(self, spec: cluster_pb2.ModelSpec) -> None:
        await asyncio.to_thread(self._load_sync, spec)
        self._stopping = False
        self._died = ""
        self._thread = threading.Thread(target=self._run, name=f"torch-{spec.name}", daemon=True)
        self._thread.start()

    def _load_sync(self, spec: cluster_pb2.ModelSpec) -> None:
        set_threads(self.config.threads)
        args = dict(spec.engine_args)
        dtype = self._dtype(args)
        before = self._allocated()
        tok = AutoTokenizer.from_pretrained(spec.source)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        # Fault injection for tests and drills: a device OOM at every Nth decode step (counted
        # over the engine's life); 0 = never.
        self._inject_oom_every = int(args.get("inject_oom_every", 0))
        # ... and a worker that dies outside any request (a CUDA error, a bug): the engine is
        # dead for good, which the agent's health check must find.
        self._inject_crash_at = int(args.get("inject_crash_at_step", 0))
        self._step_timeout_s = float(args.get("step_timeout_s", STEP_TIMEOUT_S))
        self._max_batch = int(args.get("max_batch", self.config.max_batch))
        if self._max_batch < 1:
            raise ValueError(f"engine_args.max_batch must be >= 1, got {self._max_batch}")
        self._task = args.get("task", "generate")
        if self._task not in ("generate", "embed"):
            raise ValueError(f"engine_args.task must be generate or embed, got {self._task!r}")
        auto = AutoModelForCausalLM if self._task == "generate" else AutoModel
        model = auto.from_pretrained(spec.source, dtype=dtype)
        model.to(self._device).eval()  # type: ignore[arg-type]
        self._make_slots(model, spec)  # LoRA adapter slots (spec.max_adapters), measured too
        self._tok = tok
        self._texts = {}
        self._max_len = spec.max_model_len or int(model.config.max_position_embeddings)
        embedding: Any = model.get_input_embeddings()
        self._vocab = int(embedding.num_embeddings)
        eos = model.generation_config.eos_token_id if self._task == "generate" else None
        if eos is None:
            eos = tok.eos_token_id
        self._eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._settle(model, spec.name, before)

    async def unload(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self._step_timeout_s)
            if self._thread.is_alive():  # hung in a step (the health check said so): leave it
                log.error("%s: the worker is stuck in a step; abandoning it", self._name)
                with self._cond:
                    self._fail_all(engine_died(self._name, "a decode step hung"))
            self._thread = None
        self._tok = None
        self._drop_adapters()
        self._forget()
        await asyncio.to_thread(gc.collect)
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # --- requests ----------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        messages: Sequence[inference_pb2.ChatMessage],
        params: GenerationParams,
        resume: Resume = NO_RESUME,
    ) -> AsyncIterator[Chunk]:
        self._check_serving()
        if self._task != "generate":
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {self._name!r} serves embeddings only: call Embed",
                "WRONG_TASK",
            )
        ids = await prompt_ids(self._tok, prompt, messages, params.max_tokens, self._max_len)
        check_resume(resume.token_ids, self._vocab)
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(self._device).manual_seed(params.seed)
        stream = Stream(ids, params, asyncio.get_running_loop(), generator, resume)
        with self._cond:
            if self._died:  # the worker is gone: nobody would ever take it
                raise engine_died(self._name, self._died)
            self._inbox.append(stream)
            self._cond.notify()
        self._in_flight += 1
        try:
            # One chunk per token: the agent's coalescer packs them when the request or the
            # model asks (stream_interval_*); otherwise clients count one message per token.
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            stream.cancelled = True
            self._in_flight -= 1

    def _token_text(self, token: int) -> str:
        """A token's text on its own (cached: a vocabulary's worth at most)."""
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self._tok.decode([token])
        return text

    async def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        self._check_serving()
        future: Future[list[list[float]]] = Future()
        with self._cond:
            if self._died:
                raise engine_died(self._name, self._died)
            self._embeds.append((list(inputs), future))
            self._cond.notify()
        return await asyncio.wrap_future(future)

    def _embed_batch(self, jobs: list[tuple[list[str], Future[list[list[float]]]]]) -> None:
        """All pending Embed requests in shared forward passes of up to EMBED_BATCH inputs."""
        texts = [t for inputs, _ in jobs for t in inputs]
        try:
            vectors: list[list[float]] = []
            for i in range(0, len(texts), EMBED_BATCH):
                vectors += self._embed_sync(texts[i : i + EMBED_BATCH])
        except Exception as e:
            for _, future in jobs:
                future.set_exception(e)
            return
        start = 0
        for inputs, future in jobs:
            future.set_result(vectors[start : start + len(inputs)])
            start += len(inputs)

    def _embed_sync(self, inputs: list[str]) -> list[list[float]]:
        enc = self._tok(
            inputs, padding=True, truncation=True, max_length=self._max_len, return_tensors="pt"
        ).to(self._device)
        if self._task == "embed":  # an encoder: mean-pool its last hidden state
            hidden = self._model(**enc).last_hidden_state.float()
        else:
            hidden = self._forward("", **enc, output_hidden_states=True).hidden_states[-1].float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        vectors: list[list[float]] = pooled.cpu().tolist()
        return vectors

    # --- worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve_forever()
        except BaseException as e:  # outside any one request: the engine is dead for good
            log.exception("%s: the torch worker thread died", self._name)
            self._turn_started = 0.0
            with self._cond:
                self._died = f"the torch worker thread died: {type(e).__name__}: {e}"
                self._fail_all(engine_died(self._name, self._died))

    def _serve_forever(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._inbox or self._active or self._embeds):
                        self._cond.wait()
                    if self._stopping:
                        self._fail_all()
                        return
                    self.preempted += admit(self._active, self._inbox, self._max_batch)
                    embeds, self._embeds = self._embeds, []
                with self._turn:
                    self._turn_started = time.monotonic()
                    self._turn_once(embeds)
                    self._turn_started = 0.0

    def _turn_once(self, embeds: list[tuple[list[str], Future[list[list[float]]]]]) -> None:
        """One worker turn: the pending Embed batch, then one token for each stream the turn
        takes (`this_turn`: by priority), ended early when a higher priority arrives."""
        if embeds:
            self._embed_batch(embeds)
        streams = this_turn(self._active)
        for i, stream in enumerate(streams):
            if i and outranked(list(self._inbox), stream.params.priority):
                break  # a request of higher priority arrived: the turn restarts with it
            if not stream.cancelled:
                try:
                    self._step(stream)
                except torch.OutOfMemoryError as e:
                    self._out_of_memory(stream, e)
                except WorkerCrash:
                    raise  # the engine's own failure, not this request's
                except Exception as e:
                    log.exception("generation step failed")
                    stream.post(e)
                    stream.done = True
        for stream in [s for s in self._active if s.cancelled or s.done]:
            stream.cache = None
            self._active.remove(stream)

    def _out_of_memory(self, stream: Stream, error: Exception) -> None:
        """A device OOM fails that request (RESOURCE_EXHAUSTED: the router retries it elsewhere,
        with what was already delivered), not the engine: its KV cache is freed, the allocator's
        cache emptied, and the measured memory raised by what was asked for, so the scheduler's
        next round accounts for it."""
        self.ooms += 1
        stream.cache = None
        stream.done = True
        asked = requested_bytes(str(error))
        if self._device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self._device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self._device)
            self._memory = max(self._memory, peak + asked)
        else:
            self._memory += asked or self._memory // 10
        log.warning("%s: out of device memory (%d so far): %s", self._name, self.ooms, error)
        stream.post(out_of_memory(self._name))

    def _fail_all(self, err: ServiceError | None = None) -> None:
        err = err or unloaded()
        for stream in [*self._active, *self._inbox]:
            stream.post(err)
        self._active.clear()
        self._inbox.clear()
        for _, future in self._embeds:
            future.set_exception(err)
        self._embeds.clear()

    def _step(self, s: Stream) -> None:
        self._steps += 1
        if self._steps == self._inject_crash_at:
            raise WorkerCrash(f"injected worker crash at decode step {self._steps}")
        if self._inject_oom_every and self._steps % self._inject_oom_every == 0:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 64.00 MiB (injected)"
            )
        # The first step reads the prompt and any resumed tokens; later ones the last token.
        last = s.input_ids + s.generated if s.cache is None else [s.generated[-1]]
        out = self._forward(
            s.params.adapter,
            input_ids=torch.tensor([last], device=self._device),
            cache=s.cache,
            use_cache=True,
        )
        s.cache = out.cache
        logits = out.logits[0, -1].float()
        if s.pending_draws and s.generator is not None:
            skip_draws(s.generator, s.pending_draws, logits.numel())
            s.pending_draws = 0
        token = sample(logits, s.params, s.generator)
        s.generated.append(token)
        self._generated += 1
        text = self._tok.decode(s.generated, skip_special_tokens=True)
        p = s.params
        logprob = (
            logprob_of(logits, token, p.top_logprobs, self._token_text) if p.logprobs else None
        )
        chunk = next_chunk(s, token, text, token in self._eos, self._max_len, logprob)
        s.post(chunk)
        s.done = bool(chunk.finish_reason)
