"""The agent's dynamic batcher (nodeagent/batching.py) on a real event loop, with a run function
that records the batches it is given (the engine's forward pass is what it stands for; the torch
engine itself runs in tests/e2e/test_tensor_models.py), and the adaptive window's rule."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from meshserve.batchconfig import BatchConfig
from meshserve.nodeagent.batching import AdaptiveWindow, Batcher, Job, quantile
from meshserve.rpc.errors import ServiceError


class Recorder:
    """Runs a batch: each job's result is its payload doubled; records batch sizes."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[Any]] = []
        self.delay_s = delay_s
        self.gate: asyncio.Event | None = None
        self.began = asyncio.Event()  # a batch reached the run function

    async def __call__(self, jobs: list[Job]) -> list[Any]:
        self.batches.append([j.payload for j in jobs])
        self.began.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return [j.payload * 2 for j in jobs]


async def started(config: BatchConfig, run: Recorder) -> Batcher:
    b = Batcher("m", config, run)
    b.start()
    return b


async def test_concurrent_requests_share_batches_up_to_the_max() -> None:
    run = Recorder()
    b = await started(BatchConfig("fixed", 0.5, 8), run)
    done = await asyncio.gather(*[b.submit(i, 1, "k") for i in range(20)])
    assert [d.result for d in done] == [i * 2 for i in range(20)]  # each gets its own rows
    assert [len(x) for x in run.batches] == [8, 8, 4]  # full batches go at once
    assert {d.batch_rows for d in done[:8]} == {8}
    await b.stop(ServiceError(grpc.StatusCode.UNAVAILABLE, "x", "X"))


async def test_a_lone_request_waits_the_window_and_no_longer() -> None:
    run = Recorder()
    b = await started(BatchConfig("fixed", 0.05, 8), run)
    t0 = time.monotonic()
    d = await b.submit(1, 1, "k")
    waited = time.monotonic() - t0
    assert d.batch_rows == 1 and d.window_s == pytest.approx(0.05)
    assert 0.04 <= waited < 1.0  # the window, not "until the batch fills"
    assert d.queue_s >= 0.04
    await b.stop(ServiceError(grpc.StatusCode.UNAVAILABLE, "x", "X"))


async def test_off_runs_each_request_alone() -> None:
    run = Recorder()
    b = await started(BatchConfig("off", 0.05, 8), run)
    t0 = time.monotonic()
    await asyncio.gather(*[b.submit(i, 1, "k") for i in range(5)])
    assert [len(x) for x in run.batches] == [1] * 5
    assert time.monotonic() - t0 < 0.2  # no window
    await b.stop(ServiceError(grpc.StatusCode.UNAVAILABLE, "x", "X"))


async def test_arrivals_during_a_batch_form_the_next_one_without_waiting() -> None:
    run = Recorder()
    run.gate = asyncio.Event()
    b = await started(BatchConfig("fixed", 10.0, 4), run)  # a window nobody should wait out
    first = [asyncio.create_task(b.submit(i, 1, "k")) for i in range(4)]
    await asyncio.wait_for(run.began.wait(), 5)
    later = [asyncio.create_task(b.submit(i, 1, "k")) for i in range(10, 14)]
    await asyncio.sleep(0.01)
    run.gate.set()
    await asyncio.wait_for(asyncio.gather(*first, *later), 2.0)
    assert run.batches == [[0, 1, 2, 3], [10, 11, 12, 13]]
    await b.stop(ServiceError(grpc.StatusCode.UNAVAILABLE, "x", "X"))


async def test_only_equal_keys_share_a_batch_and_rows_count() -> None:
    run = Recorder()
    b = await started(BatchConfig("fixed", 0.02, 4), run)
    got = await asyncio.gather(
        b.submit("a", 3, "shape-a"),
        b.submit("b", 1, "shape-b"),
        b.submit("c", 2, "shape-a"),  # 3 + 2 rows > 4: next batch
        b.submit("d", 1, "shape-a"),
    )
    assert [g.result for g in got] == ["aa", "bb", "cc", "dd"]
    assert sorted(sorted(x) for x in run.batches) == [["a", "d"], ["b"], ["c"]]
    await b.stop(ServiceError(grpc.StatusCode.UNAVAILABLE, "x", "X"))


async def test_higher_priority_goes_first() -> None:
    run = Recorder()
    run.gate = asyncio.Event()
    b = await started(BatchConfig("fixed", 0.0, 2), run)
    blocker = asyncio.create_task(b.submit("x", 2, "k"))
    await asyncio.wait_for(run.began.wait(), 5)
    low = [asyncio.create_task(b.submit(f"low{i}", 1, "k", priority=1)) for i in range(2)]
    await asyncio.sleep(0.005)
    high = asyncio.create_task(b.submit("high", 1, "k", priority=3))
    await asyncio.sleep(0.005)
    run.gate.set()
    await asyncio.gather(blocker, *low, high)
    assert run.batches[1] == ["high", "low0"]
    await b.stop(ServiceError(grpc.StatusCode.UNAVAILABLE, "x", "X"))


async def test_a_cancelled_caller_is_dropped_and_an_expired_one_refused() -> None:
    run = Recorder()
    run.gate = asyncio.Event()
    b = await started(BatchConfig("fixed", 0.0, 1), run)
    blocker = asyncio.create_task(b.submit("x", 1, "k"))
    await asyncio.wait_for(run.began.wait(), 5)
    gone = asyncio.create_task(b.submit("gone", 1, "k"))
    late = asyncio.create_task(b.submit("late", 1, "k", timeout=0.01))
    kept = asyncio.create_task(b.submit("kept", 1, "k"))
    await asyncio.sleep(0.03)
    gone.cancel()
    run.gate.set()
    assert (await kept).result == "keptkept"
    with pytest.raises(ServiceError) as e:
        await late
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await blocker
    assert ["gone"] not in run.batches and ["late"] not in run.batches
    await b.stop(ServiceError(grpc.StatusCode.UNAVAILABLE, "x", "X"))


async def test_stop_fails_waiting_requests_and_a_failed_batch_fails_its_requests() -> None:
    async def broken(jobs: list[Job]) -> list[Any]:
        raise RuntimeError("forward pass failed")

    b = await started(BatchConfig("fixed", 0.0, 4), Recorder())
    b._run = broken
    with pytest.raises(RuntimeError):
        await b.submit(1, 1, "k")
    run = Recorder()
    run.gate = asyncio.Event()
    b2 = await started(BatchConfig("fixed", 0.0, 1), run)
    first = asyncio.create_task(b2.submit(1, 1, "k"))
    queued = asyncio.create_task(b2.submit(2, 1, "k"))
    await asyncio.wait_for(run.began.wait(), 5)
    await b2.stop(ServiceError(grpc.StatusCode.UNAVAILABLE, "unloaded", "MODEL_UNLOADED"))
    for task in (first, queued):
        with pytest.raises((ServiceError, asyncio.CancelledError)):
            await task
    with pytest.raises(ServiceError):  # a stopped batcher takes nothing
        await b2.submit(3, 1, "k")
    await b.stop(ServiceError(grpc.StatusCode.UNAVAILABLE, "x", "X"))


async def test_adaptive_batcher_shrinks_its_window_when_requests_run_late() -> None:
    run = Recorder()
    b = await started(BatchConfig("adaptive", 0.03, 8, target_p95_s=0.01), run)
    for _ in range(3 * AdaptiveWindow.MIN_SAMPLES):  # one at a time: each waits the window
        await b.submit(1, 1, "k")
    assert b.window_s < 0.01  # it waited 30 ms per request; now under the 10 ms target
    await b.stop(ServiceError(grpc.StatusCode.UNAVAILABLE, "x", "X"))


def test_adaptive_window_rule() -> None:
    w = AdaptiveWindow(target_s=0.05, limit_s=0.02)
    assert w.window_s == 0.02
    t = 0.0
    for _ in range(AdaptiveWindow.MIN_SAMPLES):  # P95 above the target: halve
        t += 0.01
        moved = w.observe(0.08, t)
    assert moved and w.window_s == pytest.approx(0.01)
    for _ in range(10 * AdaptiveWindow.MIN_SAMPLES):  # still above: down to 0, not below
        t += 0.01
        w.observe(0.08, t)
    assert w.window_s == 0.0
    for _ in range(40 * AdaptiveWindow.MIN_SAMPLES):  # headroom: grows back, to the limit
        t += 0.01
        w.observe(0.01, t)
    assert w.window_s == pytest.approx(0.02)
    for _ in range(AdaptiveWindow.MIN_SAMPLES):  # between 60 % and 100 % of target: hold
        t += 0.01
        assert not w.observe(0.04, t)
    # Few requests: a decision after a second, on at least five of them
    slow = AdaptiveWindow(target_s=0.05, limit_s=0.02)
    assert not slow.observe(0.09, 0.0) and not slow.observe(0.09, 2.0)
    for i in range(3):
        slow.observe(0.09, 2.0 + i)
    assert slow.window_s == pytest.approx(0.01)


def test_adaptive_window_undoes_a_halving_that_made_things_worse() -> None:
    """Overload: the P95 is above the target whatever the window, and smaller batches make it
    worse; the window goes back and stays for HOLD decisions before it is tried again."""
    w = AdaptiveWindow(target_s=0.05, limit_s=0.02)
    t = 0.0

    def decide(p95: float) -> None:
        nonlocal t
        for _ in range(AdaptiveWindow.MIN_SAMPLES):
            t += 0.01
            w.observe(p95, t)

    decide(0.08)
    assert w.window_s == pytest.approx(0.01)
    decide(0.10)  # worse after halving: undone
    assert w.window_s == pytest.approx(0.02)
    for _ in range(AdaptiveWindow.HOLD):  # held, though still above the target
        decide(0.08)
        assert w.window_s == pytest.approx(0.02)
    decide(0.08)  # tried again
    assert w.window_s == pytest.approx(0.01)
    decide(0.081)  # no worse (within 10 %): keeps halving
    assert w.window_s == pytest.approx(0.005)


def test_quantile() -> None:
    assert quantile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert quantile([3.0], 0.95) == 3.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"batching": "sometimes"}, "batching must be one of"),
        ({"batch_window_ms": "-1"}, "batch_window_ms"),
        ({"max_batch_size": "0"}, "max_batch_size"),
        ({"max_batch_size": "eight"}, "numbers"),
        ({"batching": "adaptive"}, "latency_slo_ms"),
    ],
)
def test_batch_config_refuses_bad_arguments(args: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchConfig.from_args(args)


def test_batch_config_defaults_and_slo_fallback() -> None:
    assert BatchConfig.from_args({}) == BatchConfig("fixed", 0.02, 8, 0.0)
    c = BatchConfig.from_args({"batching": "adaptive"}, slo_ms=40)
    assert c.mode == "adaptive" and c.target_p95_s == pytest.approx(0.04)
