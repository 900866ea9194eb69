"""The relay's stall watch (router/stall.py): one timer per stream that fires only when a read of
the upstream has waited its whole limit — not while the relay hands a message to a slow client,
and not while messages keep coming."""

from __future__ import annotations

import asyncio

from meshserve.router.core.stall import Stall

LIMIT = 0.08


class Call:
    """Stands in for the upstream grpc.aio call: records the cancel the watch makes."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    def cancel(self) -> bool:
        self.cancelled.set()
        return True


async def test_a_read_that_waits_the_whole_limit_cancels_the_call() -> None:
    call = Call()
    stall = Stall(call, LIMIT)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(call.cancelled.wait(), 2)
    assert stall.fired
    assert loop.time() - started >= LIMIT * 0.99


async def test_messages_that_keep_coming_never_fire_it() -> None:
    call = Call()
    stall = Stall(call, LIMIT)
    for _ in range(12):  # 12 gaps of a third of the limit: 4 limits in all
        stall.reading()
        await asyncio.sleep(LIMIT / 3)
        stall.delivered()
    stall.stop()
    assert not stall.fired and not call.cancelled.is_set()


async def test_a_slow_client_is_not_the_replica_s_silence() -> None:
    call = Call()
    stall = Stall(call, LIMIT)
    stall.delivered()  # handing a message to a client that reads slowly, for 3 limits
    await asyncio.sleep(LIMIT * 3)
    assert not stall.fired
    stall.reading()  # now the replica is waited on: a whole limit from here
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(call.cancelled.wait(), 2)
    assert stall.fired and loop.time() - started >= LIMIT * 0.99


async def test_the_limit_can_change_after_the_first_token() -> None:
    call = Call()
    stall = Stall(call, 10.0)  # the first token's limit
    stall.delivered()
    stall.relimit(LIMIT)  # the inter-token one from here
    stall.reading()
    await asyncio.wait_for(call.cancelled.wait(), 1)  # not at the first limit's 10 s
    assert stall.fired


async def test_a_paced_stream_is_declared_stalled_long_before_the_limit() -> None:
    """After 8 reads of ~5 ms, a silence of 20 x the longest read (at least the floor) fires,
    not the whole inter-token limit: a partition shows in a fraction of a second here."""
    call = Call()
    stall = Stall(call, 30.0)  # the configured inter-token limit
    stall.pace(factor=20.0, floor_s=0.2)
    loop = asyncio.get_running_loop()
    for _ in range(8):
        stall.reading()
        await asyncio.sleep(0.005)
        stall.delivered()
    stall.reading()  # ... and then nothing comes
    started = loop.time()
    await asyncio.wait_for(call.cancelled.wait(), 5)
    took = loop.time() - started
    assert stall.fired and 0.19 <= took < 3.0, took
    assert 0.2 <= stall.current_s < 3.0


async def test_an_unpaced_stream_waits_the_whole_limit() -> None:
    call = Call()
    stall = Stall(call, 0.3)
    stall.pace(factor=20.0, floor_s=0.01)
    for _ in range(3):  # too few reads to trust a pace
        stall.reading()
        await asyncio.sleep(0.001)
        stall.delivered()
    stall.reading()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(call.cancelled.wait(), 5)
    assert loop.time() - started >= 0.29
