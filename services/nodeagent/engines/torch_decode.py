"""Decoding for the torch engine: one stream's state, sampling a token from logits, and turning
the decoded text into the next streamed chunk (stop strings, max tokens, the context limit,
incomplete UTF-8 held back). Pure given the tensors; the engine's worker thread runs it."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import re
from collections.abc import Callable
from typing import Any

import torch
from meshserve.nodeagent.engines.base import NO_RESUME, Chunk, Logprob, Resume
from meshserve.nodeagent.engines.params import GenerationParams
from meshserve.nodeagent.engines.prompts import stop_cut, visible_end
from meshserve.v1 import inference_pb2

INJECTED_OOM = "CUDA out of memory. Tried to allocate 64.00 MiB (injected)"
STOP = inference_pb2.FINISH_REASON_STOP
LENGTH = inference_pb2.FINISH_REASON_LENGTH


_ARRIVALS = itertools.count()


class Stream:
    """One generation in the worker. Fields are touched by the worker only, except ``cancelled``."""

    def __init__(
        self,
        input_ids: list[int],
        params: GenerationParams,
        loop: asyncio.AbstractEventLoop,
        generator: torch.Generator | None,
        resume: Resume = NO_RESUME,
    ) -> None:
        self.input_ids = input_ids  # the prompt's
        self.params = params
        self.arrived = next(_ARRIVALS)  # arrival order: preemption takes the latest first
        self.loop = loop
        self.generator = generator
        self.queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        # A resumed stream starts where the client's copy ends: those tokens and that text.
        self.generated: list[int] = list(resume.token_ids)
        self.resumed = len(resume.token_ids)  # generated == resumed: no token of ours yet
        self.emitted = resume.text  # text already sent
        # A seeded generator replays the draws the delivered tokens took (see `skip_draws`).
        self.pending_draws = len(resume.token_ids) if generator is not None else 0
        self.cache: Any = None  # transformers Cache after the first step
        self.cancelled = False  # set by the asyncio side; read by the worker
        self.done = False

    def post(self, item: Chunk | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def this_turn(active: list[Stream]) -> list[Stream]:
    """The streams a worker turn steps, in order: higher priorities first (``active`` is sorted
    in place, stably: arrival order within a priority). While a stream waits for its first
    token, streams of lower priority sit the turn out, so an interactive request's time to first
    token does not grow with the batch work beside it."""
    active.sort(key=lambda s: -s.params.priority)
    waiting = [s.params.priority for s in active if len(s.generated) == s.resumed]
    floor = max(waiting, default=0)
    turn = [s for s in active if s.params.priority >= floor]
    turn.sort(key=lambda s: (-s.params.priority, len(s.generated) != s.resumed))
    return turn


def admit(active: list[Stream], inbox: list[Stream], max_batch: int) -> int:
    """Streams from ``inbox`` into ``active`` (both in place), higher priority first, then by
    arrival. Token-level preemption: while the batch is full and a waiting stream outranks a
    running one, the running stream of the lowest priority (the latest to arrive among equals,
    so a preempted one is not picked again and again) gives up its place: its KV cache is
    dropped and it waits again in arrival order, keeping its tokens. When it runs again it
    re-reads its prompt and those tokens (as a failover's continuation does), so a greedy or
    seeded stream goes on exactly as if never stopped. Cancelled streams leave first (they never
    preempt nor are preempted). Returns how many were preempted."""
    inbox[:] = [s for s in inbox if not s.cancelled]
    for s in [s for s in active if s.cancelled]:
        s.cache = None
        active.remove(s)
    inbox.sort(key=_queued)
    preempted = 0
    while inbox:
        if len(active) < max_batch:
            active.append(inbox.pop(0))
            continue
        lowest = min(active, key=lambda s: (s.params.priority, -s.arrived))
        if inbox[0].params.priority <= lowest.params.priority:
            break
        active.remove(lowest)
        lowest.cache = None
        bisect.insort(inbox, lowest, key=_queued)
        preempted += 1
    return preempted


def _queued(s: Stream) -> tuple[int, int]:
    """Where a stream waits: higher priority first, then in arrival order."""
    return (-s.params.priority, s.arrived)


def outranked(inbox: list[Stream], priority: int) -> bool:
    """A stream of higher priority than ``priority`` waits in ``inbox`` (a copy taken without
    the lock: a stale answer only delays the break by one step)."""
    return any(s.params.priority > priority for s in inbox)


def sample(logits: torch.Tensor, p: GenerationParams, generator: torch.Generator | None) -> int:
    """A token id from last-position ``logits``: greedy at temperature 0, else temperature,
    top-k and top-p (nucleus) sampling, reproducible with a seeded ``generator``."""
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
    return int(torch.multinomial(probs, 1, generator=generator))


def logprob_of(
    logits: torch.Tensor, token: int, top: int, text_of: Callable[[int], str]
) -> Logprob:
    """``token``'s log probability under the raw ``logits`` (before temperature, top-k and top-p,
    as vLLM's default ``raw_logprobs``) and the ``top`` most likely tokens'."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, str, float], ...] = ()
    if top:
        values, ids = torch.topk(lp, min(top, lp.numel()))
        best = tuple((i, text_of(i), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return Logprob(float(lp[token]), text_of(token), best)


def next_chunk(
    s: Stream, token: int, text: str, eos: bool, max_len: int, logprob: Logprob | None = None
) -> Chunk:
    """The chunk for ``token`` just generated, given ``text``, the decoding of all generated
    tokens. Advances ``s.emitted``. Text that may yet become a stop string or a complete UTF-8
    character is held back until the next token decides."""
    p = s.params
    finish = 0
    if eos and not p.ignore_eos:
        finish = STOP
    cut = stop_cut(text, len(s.emitted), p.stop)
    if cut is not None:
        text, finish = text[:cut], STOP
    if not finish and (
        len(s.generated) >= p.max_tokens or len(s.input_ids) + len(s.generated) >= max_len
    ):
        finish = LENGTH
    end = visible_end(text, len(s.emitted), p.stop, bool(finish))
    delta = text[len(s.emitted) : end]
    s.emitted += delta
    logprobs = (logprob,) if logprob is not None else ()
    return Chunk(delta, (token,), finish, len(s.input_ids), len(s.generated), logprobs)


def skip_draws(generator: torch.Generator, draws: int, vocab: int) -> None:
    """Advances ``generator`` as ``draws`` calls of `sample` over ``vocab`` logits would have:
    on CPU torch a multinomial draw consumes generator state by the distribution's size, not its
    values, so a resumed seeded stream continues exactly as the uninterrupted one would."""
    uniform = torch.full((vocab,), 1.0 / vocab)
    for _ in range(draws):
        torch.multinomial(uniform, 1, generator=generator)


def requested_bytes(oom_message: str) -> int:
    """What a CUDA OOM says it tried to allocate ("Tried to allocate 64.00 MiB"); 0 if unsaid."""
    m = re.search(r"Tried to allocate ([0-9.]+) ([KMGT]i?B)", oom_message)
    if m is None:
        return 0
    scale = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 10**3, "MB": 10**6}
    return int(float(m.group(1)) * scale.get(m.group(2), 2**20))
