"""Transformers causal LMs on CPU or CUDA, streamed token by token (DESIGN §5).

One worker thread owns the model, so the event loop never waits on a forward pass. Each turn the
worker advances every active stream by one token (round robin, up to ``max_batch`` streams), so
concurrent requests share the device fairly and a cancel takes effect before the next token.
Streams are stepped one by one rather than padded into one batched forward: continuous batching of
sequences of different lengths needs a paged KV cache, which the vLLM engine brings (issue 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from typing import Any

import grpc
import torch
from meshserve.nodeagent.engines.base import Chunk, EngineConfig
from meshserve.rpc.errors import ServiceError
from meshserve.v1 import cluster_pb2, inference_pb2
from meshserve.validation import GenerationParams, context_too_long
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

STOP = inference_pb2.FINISH_REASON_STOP
LENGTH = inference_pb2.FINISH_REASON_LENGTH

_threads_set = False


def _set_threads(n: int) -> None:
    global _threads_set  # process-wide torch setting: set once per process
    if not _threads_set:
        torch.set_num_threads(max(1, n))
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        _threads_set = True


class _Stream:
    """One generation in the worker. Fields are touched by the worker only, except ``cancelled``."""

    def __init__(
        self,
        input_ids: list[int],
        params: GenerationParams,
        loop: asyncio.AbstractEventLoop,
        generator: torch.Generator | None,
    ) -> None:
        self.input_ids = input_ids
        self.params = params
        self.loop = loop
        self.generator = generator
        self.queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        self.generated: list[int] = []
        self.emitted = ""  # text already sent
        self.cache: Any = None  # transformers Cache after the first step
        self.cancelled = False  # set by the asyncio side; read by the worker
        self.done = False
        self.max_stop = max((len(s) for s in params.stop), default=0)

    def post(self, item: Chunk | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class TorchEngine:
    """`Engine` over a transformers AutoModelForCausalLM."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._model: Any = None
        self._tok: Any = None
        self._device = torch.device(config.device)
        self._max_len = 0
        self._eos: frozenset[int] = frozenset()
        self._memory = 0
        self._cond = threading.Condition()
        self._inbox: list[_Stream] = []
        self._jobs: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._active: list[_Stream] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def memory_bytes(self) -> int:
        return self._memory

    # --- lifecycle ---------------------------------------------------------------------------

    async def load(self, spec: cluster_pb2.ModelSpec) -> None:
        await asyncio.to_thread(self._load_sync, spec)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"torch-{spec.name}", daemon=True)
        self._thread.start()

    def _load_sync(self, spec: cluster_pb2.ModelSpec) -> None:
        _set_threads(self.config.threads)
        args = dict(spec.engine_args)
        default_dtype = "float32" if self._device.type == "cpu" else "bfloat16"
        dtype = getattr(torch, args.get("dtype", default_dtype))
        before = torch.cuda.memory_allocated(self._device) if self._device.type == "cuda" else 0
        tok = AutoTokenizer.from_pretrained(spec.source)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(spec.source, dtype=dtype)
        model.to(self._device).eval()  # type: ignore[arg-type]
        self._tok, self._model = tok, model
        self._max_len = spec.max_model_len or int(model.config.max_position_embeddings)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tok.eos_token_id
        self._eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        if self._device.type == "cuda":
            self._memory = torch.cuda.memory_allocated(self._device) - before
        else:
            tensors = [*model.parameters(), *model.buffers()]
            self._memory = sum(t.numel() * t.element_size() for t in tensors)

    async def unload(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._model = self._tok = None
        self._memory = 0
        await asyncio.to_thread(gc.collect)
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # --- requests ----------------------------------------------------------------------------

    def _encode(self, prompt: str, messages: Sequence[inference_pb2.ChatMessage]) -> list[int]:
        if messages:
            turns = [{"role": m.role, "content": m.content} for m in messages]
            if self._tok.chat_template:
                prompt = self._tok.apply_chat_template(
                    turns, tokenize=False, add_generation_prompt=True
                )
            else:
                prompt = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
        ids: list[int] = self._tok(prompt, add_special_tokens=True)["input_ids"]
        return ids

    async def generate(
        self,
        prompt: str,
        messages: Sequence[inference_pb2.ChatMessage],
        params: GenerationParams,
    ) -> AsyncIterator[Chunk]:
        if self._model is None or self._stopping:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                "model is not loaded here",
                "NOT_LOADED",
                retry_after_s=1.0,
            )
        if len(prompt) + sum(len(m.content) for m in messages) > 20_000:
            ids = await asyncio.to_thread(self._encode, prompt, messages)
        else:
            ids = self._encode(prompt, messages)
        if not ids:
            ids = [self._tok.bos_token_id or self._tok.eos_token_id or 0]
        if len(ids) + params.max_tokens > self._max_len:
            raise context_too_long(len(ids), params.max_tokens, self._max_len)
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(self._device).manual_seed(params.seed)
        stream = _Stream(ids, params, asyncio.get_running_loop(), generator)
        with self._cond:
            self._inbox.append(stream)
            self._cond.notify()
        self._in_flight += 1
        try:
            while True:
                items = [await stream.queue.get()]
                while not stream.queue.empty():  # coalesce what the worker produced meanwhile
                    items.append(stream.queue.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                chunks = [c for c in items if isinstance(c, Chunk)]
                last = chunks[-1]
                yield Chunk(
                    "".join(c.text for c in chunks),
                    tuple(t for c in chunks for t in c.token_ids),
                    last.finish_reason,
                    last.input_tokens,
                    last.output_tokens,
                )
                if last.finish_reason:
                    return
        finally:
            stream.cancelled = True
            self._in_flight -= 1

    async def embed(self, inputs: Sequence[str]) -> list[list[float]]:
        if self._model is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, "model is not loaded here", "NOT_LOADED"
            )
        future: Future[list[list[float]]] = Future()
        with self._cond:
            self._jobs.append((lambda: self._embed_sync(list(inputs)), future))
            self._cond.notify()
        return await asyncio.wrap_future(future)

    def _embed_sync(self, inputs: list[str]) -> list[list[float]]:
        enc = self._tok(
            inputs, padding=True, truncation=True, max_length=self._max_len, return_tensors="pt"
        ).to(self._device)
        out = self._model(**enc, output_hidden_states=True)
        hidden = out.hidden_states[-1].float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        vectors: list[list[float]] = pooled.cpu().tolist()
        return vectors

    # --- worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._inbox or self._active or self._jobs):
                        self._cond.wait()
                    if self._stopping:
                        self._fail_all()
                        return
                    room = self.config.max_batch - len(self._active)
                    self._active.extend(self._inbox[:room])
                    del self._inbox[:room]
                    jobs, self._jobs = self._jobs, []
                for fn, future in jobs:
                    try:
                        future.set_result(fn())
                    except Exception as e:
                        future.set_exception(e)
                for stream in list(self._active):
                    if not stream.cancelled:
                        try:
                            self._step(stream)
                        except Exception as e:
                            log.exception("generation step failed")
                            stream.post(e)
                            stream.done = True
                    if stream.cancelled or stream.done:
                        stream.cache = None
                        self._active.remove(stream)

    def _fail_all(self) -> None:
        err = ServiceError(
            grpc.StatusCode.UNAVAILABLE,
            "model was unloaded",
            "MODEL_UNLOADED",
            retry_after_s=0.5,
        )
        for stream in [*self._active, *self._inbox]:
            stream.post(err)
        self._active.clear()
        self._inbox.clear()
        for _, future in self._jobs:
            future.set_exception(err)
        self._jobs.clear()

    def _step(self, s: _Stream) -> None:
        last = s.input_ids if s.cache is None else [s.generated[-1]]
        out = self._model(
            input_ids=torch.tensor([last], device=self._device), cache=s.cache, use_cache=True
        )
        s.cache = out.cache
        token = self._sample(out.logits[0, -1].float(), s)
        s.generated.append(token)
        p = s.params
        finish = 0
        if token in self._eos and not p.ignore_eos:
            finish = STOP
        text = self._tok.decode(s.generated, skip_special_tokens=True)
        if p.stop:
            start = max(0, len(s.emitted) - s.max_stop)
            cuts = [i for i in (text.find(x, start) for x in p.stop) if i >= 0]
            if cuts:
                text, finish = text[: min(cuts)], STOP
        if not finish and (
            len(s.generated) >= p.max_tokens or len(s.input_ids) + len(s.generated) >= self._max_len
        ):
            finish = LENGTH
        end = len(text)
        if not finish:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                end = len(s.emitted)
            elif s.max_stop:  # hold back what could be the start of a stop string
                end = max(len(s.emitted), len(text) - (s.max_stop - 1))
        delta = text[len(s.emitted) : end]
        s.emitted += delta
        s.post(Chunk(delta, (token,), finish, len(s.input_ids), len(s.generated)))
        s.done = bool(finish)

    @staticmethod
    def _sample(logits: torch.Tensor, s: _Stream) -> int:
        p = s.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, index = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, 0) - sorted_probs > p.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(0, index, sorted_probs)
            probs = probs / probs.sum()
        return int(torch.multinomial(probs, 1, generator=s.generator))
