"""Token coalescing (nodeagent/coalesce.py) over engine-like streams on a real event loop: the
first token alone, packing by time and by count, a timer flush while the engine stalls, the
engine's error after what it made, cancellation reaching the engine, and the interval chosen per
request or per model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from meshserve.nodeagent.coalesce import coalesced, interval_of
from meshserve.nodeagent.engines.base import Chunk
from meshserve.v1 import inference_pb2


class Engine:
    """Yields ``n`` one-token chunks ``gap_s`` apart (a stall before the last when asked)."""

    def __init__(self, n: int, gap_s: float, stall_s: float = 0.0, fail_at: int = 0) -> None:
        self.n, self.gap_s, self.stall_s, self.fail_at = n, gap_s, stall_s, fail_at
        self.closed = asyncio.Event()

    async def stream(self) -> AsyncIterator[Chunk]:
        try:
            for i in range(self.n):
                if i == self.n - 1 and self.stall_s:
                    await asyncio.sleep(self.stall_s)
                elif i:
                    await asyncio.sleep(self.gap_s)
                if self.fail_at and i == self.fail_at:
                    raise RuntimeError("engine failed")
                last = i == self.n - 1
                yield Chunk(f"t{i} ", (i,), 1 if last else 0, 3, i + 1)
        finally:
            self.closed.set()


async def run(engine: Engine, interval_s: float, tokens: int) -> list[tuple[float, Chunk]]:
    out = []
    async for c in coalesced(engine.stream(), interval_s, tokens):
        out.append((time.monotonic(), c))
    return out


async def test_off_passes_every_chunk_through() -> None:
    got = await run(Engine(5, 0.001), 0, 0)
    assert [c.token_ids for _, c in got] == [(0,), (1,), (2,), (3,), (4,)]


async def test_first_alone_then_packed_by_time_with_nothing_lost() -> None:
    got = [c for _, c in await run(Engine(40, 0.002), 0.02, 0)]
    assert got[0].token_ids == (0,)  # the first token alone
    assert [t for c in got for t in c.token_ids] == list(range(40))
    assert "".join(c.text for c in got) == "".join(f"t{i} " for i in range(40))
    assert len(got) < 20  # packed: 39 tokens in a few messages
    assert got[-1].finish_reason == 1 and got[-1].output_tokens == 40
    assert not any(c.finish_reason for c in got[:-1])


async def test_packed_by_count() -> None:
    got = [c for _, c in await run(Engine(10, 0.001), 0, 4)]
    assert [len(c.token_ids) for c in got] == [1, 4, 4, 1]


async def test_a_stalled_engine_does_not_hold_packed_tokens() -> None:
    engine = Engine(4, 0.001, stall_s=0.5)  # tokens 1, 2 come fast, the last after 0.5 s
    started = time.monotonic()
    got = await run(engine, 0.02, 0)
    assert [c.token_ids for _, c in got] == [(0,), (1, 2), (3,)]
    assert got[1][0] - started < 0.4  # flushed by the timer, long before the stall ended


async def test_engine_error_comes_after_what_it_made() -> None:
    seen: list[Chunk] = []

    async def read() -> None:
        async for c in coalesced(Engine(10, 0.001, fail_at=5).stream(), 1.0, 0):
            seen.append(c)

    with pytest.raises(RuntimeError, match="engine failed"):
        await read()
    assert [t for c in seen for t in c.token_ids] == [0, 1, 2, 3, 4]


async def test_closing_the_stream_closes_the_engine_within_a_step() -> None:
    engine = Engine(10_000, 0.005)
    stream = coalesced(engine.stream(), 0.05, 0)
    await stream.__anext__()
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(engine.closed.wait(), 1.0)


def test_interval_per_request_or_per_model() -> None:
    r = inference_pb2.GenerateRequest()
    args = {"stream_interval_ms": "20", "stream_interval_tokens": "8"}
    assert interval_of(r, args) == (0.02, 8)
    r.stream_interval_ms = 0  # set: off for this request, whatever the model says
    assert interval_of(r, args) == (0.0, 8)
    r.stream_interval_tokens = 99_999
    assert interval_of(r, {}) == (0.0, 4_096)
    assert interval_of(inference_pb2.GenerateRequest(), {}) == (0.0, 0)
