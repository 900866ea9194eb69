"""A cancelled engine build (vllm_build.py) without vLLM: real processes stand for the engine core
and its worker. Cancelling kills what the build spawned, the build's end is awaited (bounded),
and what it built anyway is closed; nothing is closed twice or left running."""

from __future__ import annotations

import asyncio
import multiprocessing
import subprocess
import threading
import time
from typing import Any

import psutil
import pytest
from meshserve.nodeagent.engines import vllm_build
from meshserve.nodeagent.engines.vllm_build import build_cancellably

from tests.waiting import eventually

SPAWN = multiprocessing.get_context("spawn")
current = threading.current_thread


class Built:
    def __init__(self) -> None:
        self.closed = 0


def _spawning_build(spawned: list[multiprocessing.process.BaseProcess]) -> Any:
    """What vLLM's build does: spawns the engine core (here it runs a "worker" of its own) and
    waits for it; fails when it dies."""

    def build() -> Built:
        core = SPAWN.Process(target=subprocess.call, args=(["sleep", "600"],), daemon=True)
        core.start()
        spawned.append(core)
        core.join()
        raise RuntimeError(f"engine core died ({core.exitcode})")

    return build


async def _running(task: asyncio.Task[Any], spawned: list[Any]) -> list[int]:
    """The engine core's pid and its worker's, once both run."""

    def both() -> list[int]:
        if not spawned or task.done():
            return []
        kids = psutil.Process(spawned[0].pid).children()
        return [spawned[0].pid, kids[0].pid] if kids else []

    return await eventually(both, 30, "the engine core and its worker running")  # type: ignore[no-any-return]


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def test_cancel_kills_the_engine_core_and_its_worker_and_ends_the_build() -> None:
    spawned: list[Any] = []
    closed: list[Built] = []
    # Another engine's core, there before this build began: it must not be touched.
    other = SPAWN.Process(target=time.sleep, args=(600,), daemon=True)
    other.start()
    try:
        task = asyncio.create_task(build_cancellably(_spawning_build(spawned), closed.append))
        pids = await _running(task, spawned)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert spawned[0].exitcode == -9  # killed, and the build's thread saw it (join returned)
        await eventually(lambda: all(_gone(p) for p in pids), 10, "core and worker gone")
        assert closed == []  # nothing was built
        assert other.is_alive()
    finally:
        other.kill()


async def test_an_engine_built_after_the_cancel_is_closed_once_off_the_event_loop() -> None:
    closed: list[Built] = []
    loop_thread = threading.current_thread()
    threads: list[threading.Thread] = []

    def close(b: Built) -> None:
        threads.append(threading.current_thread())
        closed.append(b)

    def build() -> Built:
        time.sleep(0.5)  # spawns nothing: the cancel cannot shorten it
        return Built()

    task = asyncio.create_task(build_cancellably(build, close))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(closed) == 1 and loop_thread not in threads  # shutting vLLM down blocks


async def test_cancelled_again_while_abandoning_the_late_engine_is_still_closed() -> None:
    """asyncio.run's final cancel-all may hit the wait for the build: what it builds is still
    closed (off the loop), and a failure is not left unretrieved."""
    closed: list[Built] = []

    def build() -> Built:
        time.sleep(0.6)
        return Built()

    task = asyncio.create_task(build_cancellably(build, closed.append))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.1)  # now in the bounded wait
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: len(closed) == 1, 10, "the late engine closed")


async def test_a_build_outlasting_the_wait_is_closed_when_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vllm_build, "ABANDON_WAIT_S", 0.2)
    closed: list[threading.Thread] = []

    def build() -> Built:
        time.sleep(1.0)
        return Built()

    task = asyncio.create_task(build_cancellably(build, lambda b: closed.append(current())))
    await asyncio.sleep(0.05)
    task.cancel()
    began = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - began < 0.95  # did not wait for the build (1 s)
    assert closed == []
    await eventually(lambda: len(closed) == 1, 10, "the late engine closed")
    assert closed[0] is not current()  # not on the event loop: shutting vLLM down blocks


async def test_without_a_cancel_the_result_or_the_error_is_the_builds() -> None:
    closed: list[Built] = []
    built = await build_cancellably(Built, closed.append)
    assert isinstance(built, Built) and closed == []

    def failing() -> Built:
        raise ValueError("bad engine args")

    with pytest.raises(ValueError, match="bad engine args"):
        await build_cancellably(failing, closed.append)
