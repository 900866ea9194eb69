"""Engines report their KV blocks (the sim engine's prefix cache), and the agent's tracker gives
each router watch a snapshot and then every batch, in order (nodeagent.kvevents)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from meshserve.kvblocks import DEVICE, Cleared, Event, Removed, Stored, chain, root, sim_tokens
from meshserve.nodeagent.kvevents import MAX_BACKLOG, KvBlocks
from meshserve.router.routing.prefix import Match, PrefixIndex

from tests.unit.test_sim_engine import collect, loaded, params

SYSTEM = "You are a careful assistant who answers in one sentence. " * 8  # 456 bytes


async def test_the_sim_engine_caches_prompt_blocks_and_skips_their_prefill() -> None:
    e = await loaded(prefill_ms_per_token="2", block_tokens="16")
    batches: list[Sequence[Event]] = []
    e.kv_sink = batches.append
    prompt = SYSTEM + "What is a mesh?"  # 471 bytes: 118 tokens, 7 full blocks
    await collect(e.generate(prompt, [], params(1)))
    want = chain(sim_tokens(prompt), 16, root())
    assert batches == [[Stored(tuple(want))]] and len(want) == 7
    assert e.cached_tokens == 0
    question = "What is a router, and what does it do for the many models of a fleet?"
    await collect(e.generate(SYSTEM + question, [], params(1)))  # 525 bytes: 8 blocks
    # its first 7 blocks (112 tokens) are cached: only the rest is prefilled (its first token
    # is due ttft + 20 x 2 ms after admission instead of ttft + 132 x 2 ms)
    assert e.cached_tokens == 112
    assert len(batches) == 2 and len(batches[1][0].hashes) == 1  # type: ignore[union-attr]
    # another tenant's salt shares nothing: its prefill is paid in full, its blocks are others
    salted = await collect(e.generate(prompt, [], params(1, cache_salt="tenant-b")))
    assert salted and not set(batches[2][0].hashes) & set(want)  # type: ignore[union-attr]
    await e.unload()
    assert batches[-1] == [Cleared()]


async def test_the_cache_evicts_least_recently_used_blocks_and_reports_them() -> None:
    e = await loaded(block_tokens="16", cache_blocks="8")
    batches: list[Sequence[Event]] = []
    e.kv_sink = batches.append
    for i in range(3):
        await collect(e.generate(f"{i}" * 320, [], params(1)))  # 5 blocks each
    removed = [h for b in batches for ev in b if isinstance(ev, Removed) for h in ev.hashes]
    stored = [h for b in batches for ev in b if isinstance(ev, Stored) for h in ev.hashes]
    assert len(stored) == 15 and len(removed) == 7  # 8 kept
    index = PrefixIndex()
    for seq, b in enumerate(batches):
        assert index.apply("a", seq, b)
    assert len(index.holds("a")) == 8
    last = chain(sim_tokens("2" * 320), 16, root())
    assert (
        index.match(last, ["a"], 0.0).get("a", Match()).device == 5
    )  # the newest prompt stays whole


async def test_a_watch_gets_a_snapshot_then_every_batch_in_order() -> None:
    kv = KvBlocks(generation=3)
    kv.publish([Stored((1, 2, 3))])
    got: list[tuple[bool, list[Event]]] = []

    async def watch() -> None:
        async for item in kv.watch():
            got.append(item)

    task = asyncio.create_task(watch())
    await asyncio.sleep(0)
    kv.publish([Stored((4,))])
    kv.publish([Removed((1,))])
    for _ in range(10):
        await asyncio.sleep(0)
    kv.close()
    await asyncio.wait_for(task, 1)
    assert got == [
        (True, [Stored((1, 2, 3, 4))]),  # the snapshot is taken when the watch runs
        (False, [Removed((1,))]),
    ] or got == [(True, [Stored((1, 2, 3))]), (False, [Stored((4,))]), (False, [Removed((1,))])]
    index = PrefixIndex()
    for n, (snapshot, events) in enumerate(got):
        if snapshot:
            index.resync("a", n, [(h, ev.medium) for ev in events if isinstance(ev, Stored)
                                  for h in ev.hashes])  # fmt: skip
        else:
            assert index.apply("a", n, events)
    assert index.holds("a") == {2: DEVICE, 3: DEVICE, 4: DEVICE} == dict(kv.blocks)


async def test_a_watcher_that_falls_behind_gets_a_fresh_snapshot_not_unbounded_memory() -> None:
    kv = KvBlocks()
    it = kv.watch().__aiter__()
    assert await it.__anext__() == (True, [])
    for i in range(MAX_BACKLOG + 10):
        kv.publish([Stored((i,))])
    snapshot, events = await it.__anext__()
    assert snapshot and kv.resyncs == 1
    assert events == [Stored(tuple(range(MAX_BACKLOG + 10)))]
    kv.publish([Stored((-1,))])
    assert await it.__anext__() == (False, [Stored((-1,))])
    await it.aclose()  # type: ignore[attr-defined]
    assert kv.watchers == 0
