"""Token coalescing (`GenerateRequest.stream_interval_*`, engine_args of the same names): the
tokens of several engine steps packed into one message, so routers and clients spend less CPU
per token (vLLM's and SGLang's ``stream_interval``).

The first chunk always goes alone and at once (TTFT is untouched); after it, chunks gather until
the oldest gathered one has waited ``interval_s`` or ``tokens`` are gathered, and the final chunk
flushes what is gathered. A pump task reads the engine meanwhile, so a timer can flush while the
engine is between steps; closing the coalesced stream cancels the pump, which closes the engine's
stream (cancel and deadlines act within one step, as without coalescing).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from meshserve.nodeagent.engines.base import Chunk, merge_chunks
from meshserve.v1 import inference_pb2

_END = object()
MAX_MS, MAX_TOKENS = 5_000, 4_096  # as validation.py caps a request's own


def interval_of(
    request: inference_pb2.GenerateRequest, args: Mapping[str, str]
) -> tuple[float, int]:
    """(seconds, tokens) for this request: its own fields where set, else the model's
    engine_args; (0, 0) is off."""
    ms = (
        request.stream_interval_ms
        if request.HasField("stream_interval_ms")
        else int(args.get("stream_interval_ms", 0))
    )
    tokens = (
        request.stream_interval_tokens
        if request.HasField("stream_interval_tokens")
        else int(args.get("stream_interval_tokens", 0))
    )
    return min(ms, MAX_MS) / 1000, min(tokens, MAX_TOKENS)


async def coalesced(
    chunks: AsyncIterator[Chunk], interval_s: float, tokens: int
) -> AsyncIterator[Chunk]:
    if interval_s <= 0 and tokens <= 1:
        async for chunk in chunks:
            yield chunk
        return
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in chunks:
                queue.put_nowait(chunk)
            queue.put_nowait(_END)
        except Exception as e:  # the engine's error reaches the caller in order
            queue.put_nowait(e)

    task = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    try:
        first = await queue.get()
        if first is _END:
            return
        if isinstance(first, BaseException):
            raise first
        assert isinstance(first, Chunk)
        yield first
        if first.finish_reason:
            return
        pending: list[Chunk] = []
        due = 0.0
        while True:
            wait = max(0.0, due - loop.time()) if pending and interval_s > 0 else None
            try:  # asyncio.timeout: a cancel is never lost, as wait_for's can be on 3.11
                async with asyncio.timeout(wait):
                    item = await queue.get()
            except TimeoutError:
                yield merge_chunks(pending)
                pending = []
                continue
            if item is _END:
                if pending:
                    yield merge_chunks(pending)
                return
            if isinstance(item, BaseException):
                if pending:  # what the engine made before it failed still goes out
                    yield merge_chunks(pending)
                raise item
            assert isinstance(item, Chunk)
            if not pending:
                due = loop.time() + interval_s
            pending.append(item)
            full = tokens > 0 and sum(len(c.token_ids) for c in pending) >= tokens
            if item.finish_reason or full:
                yield merge_chunks(pending)
                pending = []
                if item.finish_reason:
                    return
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
